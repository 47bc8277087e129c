use flowattr_common::WorkloadId;
use rustc_hash::FxHashMap;

/// Maps workload names to the small ids the ownership map stores, and back.
///
/// Names arrive in every batch's dictionary; interning them once makes a segment 24 bytes
/// instead of carrying a string. Workloads are few (thousands) next to flows (millions per
/// second), so the interner never forgets a name.
#[derive(Debug, Default)]
pub struct WorkloadInterner {
    ids: FxHashMap<Box<str>, WorkloadId>,
    names: Vec<Box<str>>,
}

impl WorkloadInterner {
    pub fn intern(&mut self, name: &str) -> WorkloadId {
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

    pub fn name(&self, id: WorkloadId) -> Option<&str> {
        self.names.get(id.get() as usize).map(|name| &**name)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// A message's dictionary of names as ids, each name interned once per message and only if an
/// entry refers to it.
#[derive(Debug)]
pub struct DictionaryIds<'a> {
    names: &'a [Box<str>],
    ids: Vec<Option<WorkloadId>>,
}

impl<'a> DictionaryIds<'a> {
    pub fn new(names: &'a [Box<str>]) -> Self {
        DictionaryIds { names, ids: vec![None; names.len()] }
    }

    /// The id of the name at `index` (checked against the dictionary when the message was
    /// read); None stays None: an unnamed holder.
    pub fn id(&mut self, interner: &mut WorkloadInterner, index: Option<u32>) -> Option<WorkloadId> {
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
        assert_eq!(interner.name(gateway), Some("api-gateway"));
        assert_eq!(interner.get("nope"), None);
        assert_eq!(interner.len(), 2);
    }
}
