//! Who held each address when, by a test's own clock (from before its workload was asked for
//! until after it was gone), and the collector's records judged against it: each side named
//! right, left unnamed, or named wrongly. Right means every field: the workload's name, its
//! namespace and owner kind, and on the local side the pod or container itself.

use std::collections::BTreeMap;

use flowattr_common::Timestamp;
use serde_json::Value;

#[derive(Debug, Clone)]
struct Held {
    workload: String,
    platform: Platform,
    from: Timestamp,
    to: Option<Timestamp>,
}

/// What the container platform says of a holder besides its name; empty where it says nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Platform {
    pub namespace: String,
    pub instance: String,
    pub owner_kind: String,
}

impl Platform {
    /// Whether `record`'s `side` (`local` or `remote`) carries these fields; the remote side
    /// has no instance.
    fn matches(&self, record: &Value, side: &str) -> bool {
        let field = |name: &str| {
            record[format!("{side}_{name}")]
                .as_str()
                .unwrap_or("")
                .to_owned()
        };
        let instance = if side == "local" {
            self.instance.clone()
        } else {
            String::new()
        };
        field("namespace") == self.namespace
            && field("instance") == instance
            && field("owner_kind") == self.owner_kind
    }
}

#[derive(Debug, Default)]
pub struct Holdings(BTreeMap<String, Vec<Held>>);

/// How the records of flows between held addresses named their sides.
#[derive(Debug, Default)]
pub struct Judgement {
    pub flows: usize,
    pub local_right: usize,
    pub local_unnamed: usize,
    pub remote_right: usize,
    /// Named one of the holders of a handover the flow spanned (see [`Holdings::judge`]).
    pub remote_during_handover: usize,
    /// By the collector's reason.
    pub remote_unnamed: BTreeMap<String, usize>,
    pub wrong: Vec<Value>,
}

impl Holdings {
    /// `workload` (with `platform`) holds `ip` from `from` on.
    pub fn begin(&mut self, ip: &str, workload: &str, platform: Platform, from: Timestamp) {
        self.0.entry(ip.to_owned()).or_default().push(Held {
            workload: workload.to_owned(),
            platform,
            from,
            to: None,
        });
    }

    /// The latest hold of `ip` ends at `at`.
    pub fn end(&mut self, ip: &str, at: Timestamp) {
        self.0
            .get_mut(ip)
            .and_then(|holds| holds.last_mut())
            .expect("a hold to end")
            .to = Some(at);
    }

    pub fn count(&self) -> usize {
        self.0.values().map(Vec::len).sum()
    }

    /// The workload that held `ip` at `at`.
    pub fn holder_at(&self, ip: &Value, at: Timestamp) -> Option<String> {
        self.held_at(ip, at).map(|held| held.workload.clone())
    }

    fn held_at(&self, ip: &Value, at: Timestamp) -> Option<&Held> {
        let holds = self.0.get(ip.as_str()?)?;
        holds
            .iter()
            .find(|held| held.from <= at && held.to.is_none_or(|to| at <= to))
    }

    /// The holds of `ip` at some instant of `start..=end`.
    fn holders_during(&self, ip: &Value, start: Timestamp, end: Timestamp) -> Vec<&Held> {
        let Some(holds) = ip.as_str().and_then(|ip| self.0.get(ip)) else {
            return Vec::new();
        };
        holds
            .iter()
            .filter(|held| held.from <= end && held.to.is_none_or(|to| start <= to))
            .collect()
    }

    /// Judges the records whose both addresses are `held_address`es. The local side must name
    /// the holder at the flow's start (or nobody). A connect to an address nobody holds yet can
    /// still be answered by the workload that takes it a moment later (the SYN waits in the
    /// kernel for the address's ARP answer), so a remote side is right if it names one of the
    /// holders during the flow.
    /// Every record must also name this machine as its host.
    pub fn judge(&self, records: &[Value], held_address: impl Fn(&Value) -> bool) -> Judgement {
        let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap()
            .trim()
            .to_owned();
        let mut judgement = Judgement::default();
        for record in records {
            if !held_address(&record["local_ip"]) || !held_address(&record["remote_ip"]) {
                continue;
            }
            judgement.flows += 1;
            let start = Timestamp::from_nanos(record["start_ns"].as_u64().unwrap());
            let end = Timestamp::from_nanos(record["end_ns"].as_u64().unwrap());
            let host_named = record["host_name"].as_str() == Some(host_name.as_str());
            match (
                record["local_workload"].as_str(),
                self.held_at(&record["local_ip"], start),
            ) {
                (None, _) if host_named => judgement.local_unnamed += 1,
                (Some(named), Some(held))
                    if host_named
                        && named == held.workload
                        && held.platform.matches(record, "local") =>
                {
                    judgement.local_right += 1
                }
                _ => judgement.wrong.push(record.clone()),
            }
            match record["remote_workload"].as_str() {
                None => {
                    let reason = record["unattributed"].as_str().unwrap_or("?").to_owned();
                    *judgement.remote_unnamed.entry(reason).or_default() += 1;
                }
                Some(named) => {
                    let holders = self.holders_during(&record["remote_ip"], start, end);
                    let named_right = |held: &&Held| {
                        held.workload == named && held.platform.matches(record, "remote")
                    };
                    match (holders.iter().any(named_right), holders.len()) {
                        (true, 1) => judgement.remote_right += 1,
                        (true, _) => judgement.remote_during_handover += 1,
                        (false, _) => judgement.wrong.push(record.clone()),
                    }
                }
            }
        }
        judgement
    }
}

impl Judgement {
    pub fn summary(&self) -> String {
        format!(
            "{} flow records: local side named right {}, unnamed {}; remote side named right {}, one of the holders of a handover it spanned {}, unattributed {:?}; {} wrong",
            self.flows,
            self.local_right,
            self.local_unnamed,
            self.remote_right,
            self.remote_during_handover,
            self.remote_unnamed,
            self.wrong.len()
        )
    }

    /// No side named wrongly, and enough named right to mean something.
    pub fn assert_right(&self, flows_wanted: usize) {
        assert!(
            self.wrong.is_empty(),
            "{} sides named wrongly, e.g. {:?}",
            self.wrong.len(),
            &self.wrong[..self.wrong.len().min(5)]
        );
        assert!(
            self.flows >= flows_wanted && self.local_right >= self.flows / 2,
            "too few flows named to mean anything: {}",
            self.summary()
        );
        assert!(self.remote_right > 0, "no remote side was named");
    }
}
