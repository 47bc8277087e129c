use flowattr_common::{WorkloadId, WorkloadIdentity};
use rustc_hash::FxHashMap;

/// Maps workload identity keys ([`WorkloadIdentity`]) to the small ids the ownership map
/// stores, and back. A key is interned as its workload's ([`WorkloadIdentity::workload`]):
/// the instance a batch names is its local side's, kept by the flow's block, not by the map.
///
/// Keys arrive in every batch's dictionary; interning them once makes a segment 24 bytes
/// instead of carrying a string. Workloads are few (thousands) next to flows (millions per
/// second), so the interner never forgets one.
#[derive(Debug, Default)]
pub struct WorkloadInterner {
    ids: FxHashMap<Box<str>, WorkloadId>,
    names: Vec<Box<str>>,
    /// Where a key with an instance is rewritten as its workload's.
    scratch: String,
}

impl WorkloadInterner {
    pub fn intern(&mut self, key: &str) -> WorkloadId {
        let mut scratch = std::mem::take(&mut self.scratch);
        let identity = WorkloadIdentity::of_checked_key(key);
        let name = if identity.instance.is_empty() {
            key
        } else {
            scratch.clear();
            identity.workload().write_key(&mut scratch);
            scratch.as_str()
        };
        let id = self.intern_workload(name);
        self.scratch = scratch;
        id
    }

    fn intern_workload(&mut self, name: &str) -> WorkloadId {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id =
            WorkloadId::new(u32::try_from(self.names.len()).expect("fewer than 2^32 workloads"));
        self.names.push(name.into());
        self.ids.insert(name.into(), id);
        id
    }

    pub fn get(&self, name: &str) -> Option<WorkloadId> {
        self.ids.get(name).copied()
    }

    /// The identity key behind `id`, as dictionaries carry it.
    pub fn key(&self, id: WorkloadId) -> Option<&str> {
        self.names.get(id.get() as usize).map(|name| &**name)
    }

    /// The identity behind `id`, field by field.
    pub fn identity(&self, id: WorkloadId) -> Option<WorkloadIdentity<'_>> {
        self.key(id).map(WorkloadIdentity::of_checked_key)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// A workload dictionary (identity keys) shared by every part of one batch or message.
pub type Dictionary = std::sync::Arc<[Box<str>]>;

/// A message's dictionary of names as ids, each name interned once per message and only if an
/// entry refers to it.
#[derive(Debug)]
pub struct DictionaryIds<'a> {
    names: &'a [Box<str>],
    ids: Vec<Option<WorkloadId>>,
}

impl<'a> DictionaryIds<'a> {
    pub fn new(names: &'a [Box<str>]) -> Self {
        DictionaryIds {
            names,
            ids: vec![None; names.len()],
        }
    }

    /// The id of the name at `index` (checked against the dictionary when the message was
    /// read); None stays None: an unnamed holder.
    pub fn id(
        &mut self,
        interner: &mut WorkloadInterner,
        index: Option<u32>,
    ) -> Option<WorkloadId> {
        let index = index? as usize;
        Some(*self.ids[index].get_or_insert_with(|| interner.intern(&self.names[index])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interning_is_stable_and_reversible() {
        let mut interner = WorkloadInterner::default();
        let billing = interner.intern("billing");
        let gateway = interner.intern("api-gateway");
        assert_ne!(billing, gateway);
        assert_eq!(interner.intern("billing"), billing);
        assert_eq!(interner.key(gateway), Some("api-gateway"));
        assert_eq!(interner.get("nope"), None);
        let pod = |instance| {
            WorkloadIdentity {
                name: "shop/api",
                namespace: "shop",
                instance,
                owner_kind: "Deployment",
            }
            .key()
        };
        let api = interner.intern(&pod("api-1"));
        assert_eq!(
            interner.intern(&pod("api-2")),
            api,
            "replicas are one workload"
        );
        assert_eq!(
            interner.identity(api),
            Some(WorkloadIdentity {
                instance: "",
                ..WorkloadIdentity::of_checked_key(&pod("x"))
            })
        );
        assert_eq!(interner.len(), 3);
    }
}
