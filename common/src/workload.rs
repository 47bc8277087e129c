/// A workload (service, application, container image: whatever owns IPs in the fleet), interned
/// to a small integer.
///
/// Interning is local to one process: the exporter's ids are what its eBPF maps store; the
/// collector interns the names it receives into its own ids. Names, not ids, cross the wire.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkloadId(u32);

impl WorkloadId {
    pub const fn new(id: u32) -> Self {
        WorkloadId(id)
    }

    pub const fn get(self) -> u32 {
        self.0
    }
}

// Crosses the kernel boundary as an eBPF map value.
const _: () = assert!(core::mem::size_of::<WorkloadId>() == 4);

#[cfg(feature = "user")]
// SAFETY: a transparent u32: every bit pattern is valid and there is no padding.
unsafe impl aya::Pod for WorkloadId {}
