use core::time::Duration;

/// A wall-clock instant in nanoseconds since the Unix epoch.
///
/// Attribution compares the start of a flow seen on one host with heartbeats seen on others, so
/// every timestamp in the system is wall-clock time (kernel monotonic time is converted by the
/// exporter before anything leaves the host). `u64` nanoseconds last until the year 2554.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(
    feature = "std",
    derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize),
    rkyv(derive(Debug, PartialEq, Eq, PartialOrd, Ord))
)]
pub struct Timestamp(u64);

// Crosses the kernel boundary and the wire as a plain u64.
const _: () = assert!(core::mem::size_of::<Timestamp>() == 8);

#[cfg(feature = "user")]
// SAFETY: a transparent u64: every bit pattern is valid and there is no padding.
unsafe impl aya::Pod for Timestamp {}

impl Timestamp {
    pub const ZERO: Timestamp = Timestamp(0);
    pub const MAX: Timestamp = Timestamp(u64::MAX);

    pub const fn from_nanos(nanos: u64) -> Self {
        Timestamp(nanos)
    }

    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    pub const fn saturating_add(self, duration: Duration) -> Self {
        Timestamp(self.0.saturating_add(duration_nanos(duration)))
    }

    pub const fn saturating_sub(self, duration: Duration) -> Self {
        Timestamp(self.0.saturating_sub(duration_nanos(duration)))
    }

    /// Nanoseconds from `earlier` to `self`, zero if `earlier` is later.
    pub const fn nanos_since(self, earlier: Timestamp) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    #[cfg(feature = "std")]
    pub fn now() -> Self {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Timestamp(duration_nanos(since_epoch))
    }
}

#[cfg(feature = "std")]
impl ArchivedTimestamp {
    pub fn get(&self) -> Timestamp {
        Timestamp(self.0.to_native())
    }
}

/// A duration in whole nanoseconds, saturating at `u64::MAX` (584 years) instead of truncating.
pub const fn duration_nanos(duration: Duration) -> u64 {
    let nanos = duration.as_nanos();
    if nanos > u64::MAX as u128 {
        u64::MAX
    } else {
        nanos as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates_instead_of_wrapping() {
        let t = Timestamp::from_nanos(5);
        assert_eq!(t.saturating_sub(Duration::from_nanos(9)), Timestamp::ZERO);
        assert_eq!(
            Timestamp::MAX.saturating_add(Duration::from_secs(1)),
            Timestamp::MAX
        );
        assert_eq!(Timestamp::from_nanos(9).nanos_since(t), 4);
        assert_eq!(t.nanos_since(Timestamp::from_nanos(9)), 0);
        assert_eq!(duration_nanos(Duration::MAX), u64::MAX);
    }
}
