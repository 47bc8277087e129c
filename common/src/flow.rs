/// Which end opened the connection, seen from the host that captured it.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "std",
    derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize),
    rkyv(derive(Debug, PartialEq, Eq), compare(PartialEq))
)]
pub enum Direction {
    /// We connected: the local side sent the SYN.
    Outbound = 0,
    /// They connected: the local side accepted.
    Inbound = 1,
}

/// Whether the connection had closed when its flow was reported.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "std",
    derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize),
    rkyv(derive(Debug, PartialEq, Eq), compare(PartialEq))
)]
pub enum FlowState {
    /// Still open at the end of the reporting interval. Long-lived connections are reported
    /// every interval so an idle connection keeps heartbeating its local IP.
    Open = 0,
    Closed = 1,
}

/// A connection's round-trip time as its kernel's TCP stack estimates it (RFC 6298): the
/// smoothed RTT and its mean deviation, in microseconds, as `ss -ti` shows them (`rtt:S/D`,
/// there in milliseconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "std",
    derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize),
    rkyv(derive(Debug, PartialEq, Eq))
)]
pub struct RoundTrip {
    pub smoothed_us: u32,
    pub deviation_us: u32,
}

impl RoundTrip {
    /// From `tcp_sock`'s fields as the kernel keeps them (`srtt_us` is the smoothed RTT in µs
    /// shifted left by 3, `mdev_us` the mean deviation shifted left by 2; `tcp_get_info` shifts
    /// them back the same way). `None` before the first sample: a connection never answered.
    /// A sample is at least 1 µs, so that outputs without a null can say "none" with 0.
    pub fn from_kernel(srtt_us_x8: u32, mdev_us_x4: u32) -> Option<RoundTrip> {
        (srtt_us_x8 != 0).then_some(RoundTrip {
            smoothed_us: (srtt_us_x8 >> 3).max(1),
            deviation_us: mdev_us_x4 >> 2,
        })
    }
}
