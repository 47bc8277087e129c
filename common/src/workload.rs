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

/// Bytes of one workload name. Names are identifiers, not documents.
pub const WORKLOAD_NAME_BYTES_MAX: usize = 255;

/// The one rule for a workload name, wherever a name enters the system (registration, a host
/// identity file, a batch's dictionary): non-empty, at most [`WORKLOAD_NAME_BYTES_MAX`] bytes,
/// no control characters. Names end up in files of `id name` lines, JSON, Prometheus labels
/// and Graphviz files; a tab or newline in one would break each of them.
pub fn check_workload_name(name: &str) -> Result<(), NameProblem> {
    check_identifier(name, WORKLOAD_NAME_BYTES_MAX)
}

/// The same rule with another bound (region names).
pub fn check_identifier(name: &str, bytes_max: usize) -> Result<(), NameProblem> {
    if name.is_empty() {
        return Err(NameProblem::Empty);
    }
    if name.len() > bytes_max {
        return Err(NameProblem::TooLong {
            bytes: name.len(),
            limit: bytes_max,
        });
    }
    if name.chars().any(char::is_control) {
        return Err(NameProblem::ControlCharacter);
    }
    Ok(())
}

/// Why a name breaks the rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameProblem {
    Empty,
    TooLong { bytes: usize, limit: usize },
    ControlCharacter,
}

impl core::fmt::Display for NameProblem {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            NameProblem::Empty => f.write_str("is empty"),
            NameProblem::TooLong { bytes, limit } => {
                write!(f, "is {bytes} bytes long, over the limit of {limit}")
            }
            NameProblem::ControlCharacter => {
                f.write_str("holds a control character (tab, newline, ...)")
            }
        }
    }
}
