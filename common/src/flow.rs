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
