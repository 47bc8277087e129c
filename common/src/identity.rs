//! A workload's identity: its name, and what the container platform says of the instance that
//! held an address (namespace, pod or container, owner kind).
//!
//! Every dictionary that names workloads (a flow batch's, a delay block's, a broadcast batch's,
//! a node's interner) holds identities as one text key each, so that every dictionary, codec
//! and interner carries them as it carries names. The key is the name alone when nothing else
//! is known (every name registered by hand, every key written before identities had fields),
//! else the four fields joined by U+001F (unit separator), a control character no field may
//! hold. Outputs never show a key: they show each field.
//!
//! Exporters send identities with their instance; collectors keep workloads
//! ([`WorkloadIdentity::workload`]): two pods of one Deployment are one holder in the ownership
//! map. So only a flow's local side, named by the host that reported it, comes out with its
//! pod or container.

use crate::workload::{NameProblem, check_identifier, check_workload_name};

/// Separates a key's fields.
pub const IDENTITY_SEPARATOR: char = '\u{1f}';
/// Bytes of one field other than the name (a Kubernetes name is at most 253).
pub const IDENTITY_FIELD_BYTES_MAX: usize = 253;
/// Bytes of a whole key: the name, three fields and three separators.
pub const IDENTITY_KEY_BYTES_MAX: usize =
    crate::WORKLOAD_NAME_BYTES_MAX + 3 * (IDENTITY_FIELD_BYTES_MAX + 1);

/// One identity, read in place from its key. An empty field is one the platform did not give.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct WorkloadIdentity<'a> {
    /// What the service map and every output calls the workload (from the name template).
    pub name: &'a str,
    /// The Kubernetes namespace, or the Compose project.
    pub namespace: &'a str,
    /// The pod (Kubernetes) or container (Docker) that held the address.
    pub instance: &'a str,
    /// What owns the instance: a Kubernetes controller kind (`Deployment`, `StatefulSet`,
    /// `DaemonSet`, `Job`, `CronJob`, `Pod`), or Docker's `ComposeService` or `Container`.
    pub owner_kind: &'a str,
}

impl<'a> WorkloadIdentity<'a> {
    /// An identity that is a name and nothing else.
    pub const fn named(name: &'a str) -> Self {
        WorkloadIdentity {
            name,
            namespace: "",
            instance: "",
            owner_kind: "",
        }
    }

    /// Reads a key, checking every rule: the name keeps the name rule, each other field is at
    /// most [`IDENTITY_FIELD_BYTES_MAX`] bytes with no control character, and a key with
    /// fields has exactly four.
    pub fn parse(key: &'a str) -> Result<Self, NameProblem> {
        if key.len() > IDENTITY_KEY_BYTES_MAX {
            return Err(NameProblem::TooLong {
                bytes: key.len(),
                limit: IDENTITY_KEY_BYTES_MAX,
            });
        }
        let mut fields = key.split(IDENTITY_SEPARATOR);
        let name = fields.next().unwrap_or_default();
        check_workload_name(name)?;
        let mut rest = [""; 3];
        let mut count = 0;
        for field in fields {
            if count == rest.len() {
                return Err(NameProblem::ControlCharacter);
            }
            if !field.is_empty() {
                check_identifier(field, IDENTITY_FIELD_BYTES_MAX)?;
            }
            rest[count] = field;
            count += 1;
        }
        if count != 0 && count != rest.len() {
            return Err(NameProblem::ControlCharacter);
        }
        let [namespace, instance, owner_kind] = rest;
        Ok(WorkloadIdentity {
            name,
            namespace,
            instance,
            owner_kind,
        })
    }

    /// Reads a key already checked by [`Self::parse`] (a dictionary entry that passed the
    /// format's checks); an unchecked key reads as its whole text for a name.
    pub fn of_checked_key(key: &'a str) -> Self {
        Self::parse(key).unwrap_or(WorkloadIdentity::named(key))
    }

    /// The identity of the workload rather than of one of its instances: what the ownership
    /// map and the service map compare. Replicas of one Deployment are one workload; an address
    /// passed between them is still named, and a node's memory is bounded by workloads, not by
    /// every pod ever started.
    pub fn workload(&self) -> Self {
        WorkloadIdentity {
            instance: "",
            ..*self
        }
    }

    /// Whether the identity is its name alone.
    pub fn is_name_only(&self) -> bool {
        self.namespace.is_empty() && self.instance.is_empty() && self.owner_kind.is_empty()
    }

    /// Appends the identity's key to `out`.
    #[cfg(feature = "std")]
    pub fn write_key(&self, out: &mut String) {
        out.push_str(self.name);
        if !self.is_name_only() {
            for field in [self.namespace, self.instance, self.owner_kind] {
                out.push(IDENTITY_SEPARATOR);
                out.push_str(field);
            }
        }
    }

    #[cfg(feature = "std")]
    pub fn key(&self) -> String {
        let mut key = String::new();
        self.write_key(&mut key);
        key
    }
}

/// The rule for a dictionary entry: a key that [`WorkloadIdentity::parse`] reads.
pub fn check_identity_key(key: &str) -> Result<(), NameProblem> {
    WorkloadIdentity::parse(key).map(|_| ())
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;

    #[test]
    fn a_key_round_trips_and_a_name_is_its_own_key() {
        let pod = WorkloadIdentity {
            name: "shop/api",
            namespace: "shop",
            instance: "api-7d9f8b6c5d-x2x9q",
            owner_kind: "Deployment",
        };
        assert_eq!(WorkloadIdentity::parse(&pod.key()), Ok(pod));
        assert_eq!(
            WorkloadIdentity::parse("billing"),
            Ok(WorkloadIdentity::named("billing"))
        );
        assert_eq!(WorkloadIdentity::named("billing").key(), "billing");
        let partial = WorkloadIdentity {
            instance: "web-1",
            ..WorkloadIdentity::named("web")
        };
        assert_eq!(partial.key(), "web\u{1f}\u{1f}web-1\u{1f}");
        assert_eq!(WorkloadIdentity::parse(&partial.key()), Ok(partial));
    }

    #[test]
    fn malformed_keys_are_refused() {
        for key in [
            "",
            "\u{1f}ns\u{1f}pod\u{1f}Pod",
            "a\u{1f}b",
            "a\u{1f}b\u{1f}c\u{1f}d\u{1f}e",
            "a\u{1f}b\tc\u{1f}\u{1f}",
        ] {
            assert!(check_identity_key(key).is_err(), "{key:?}");
        }
        let long = "x".repeat(IDENTITY_FIELD_BYTES_MAX + 1);
        assert!(check_identity_key(&format!("a\u{1f}{long}\u{1f}\u{1f}")).is_err());
        assert!(check_identity_key(&format!("a\u{1f}{}\u{1f}\u{1f}", &long[1..])).is_ok());
    }
}
