//! What crosses the kernel boundary between the exporter's eBPF program and its agent: map
//! keys and values, ring buffer events and the load-time globals. All `#[repr(C)]` with
//! explicit padding, so both sides agree byte for byte and every bit pattern is valid.

use crate::{CanonicalIp, WorkloadId};

/// `direction` values.
pub const DIRECTION_OUTBOUND: u8 = 0;
pub const DIRECTION_INBOUND: u8 = 1;

/// `OpenSocket::checked` values: what the last refresh of open sockets found.
/// Written by the state-change program (established, or a connect still waiting): not
/// refreshed since.
pub const CHECKED_NOT_YET: u8 = 0;
/// The socket at that kernel address still has this connection's addresses, ports and a live
/// state: its round trip and counters were read now.
pub const CHECKED_ALIVE: u8 = 1;
/// The socket is gone (its close was never seen: the kernel skipped the program's run) or the
/// memory is another socket's now: not an open connection to report.
pub const CHECKED_GONE: u8 = 2;

/// A connection's counters as `tcp_sock` keeps them, since its start.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketCounters {
    /// `bytes_acked`: bytes sent and acknowledged (plus 1 for an acknowledged SYN or FIN).
    pub bytes_acked: u64,
    /// `bytes_received` (plus 1 for the remote's SYN or FIN).
    pub bytes_received: u64,
    pub segs_out: u32,
    pub segs_in: u32,
    pub total_retrans: u32,
    pub _pad: u32,
}

/// A TCP socket the program has seen open, keyed in its map by the socket's kernel address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenSocket {
    /// Kernel monotonic time (`bpf_ktime_get_ns`) of the first state change seen.
    pub start_ns: u64,
    pub local_ip: CanonicalIp,
    pub remote_ip: CanonicalIp,
    pub local_port: u16,
    pub remote_port: u16,
    pub direction: u8,
    /// 1 if `workload` came from the (IPv4, port) map of a shared (NAT64) address.
    pub shared: u8,
    /// One of the `CHECKED_*` values.
    pub checked: u8,
    pub _pad: u8,
    /// The local workload resolved in the kernel; 0 when no map knew the local address.
    pub workload: WorkloadId,
    /// `tcp_sock.srtt_us` and `tcp_sock.mdev_us` as the kernel keeps them (the smoothed RTT
    /// in µs shifted left by 3, its mean deviation shifted left by 2): the handshake's when
    /// the socket became established, the latest at each refresh and at the close. 0 before
    /// any sample.
    pub srtt_us_x8: u32,
    pub mdev_us_x4: u32,
    pub _pad2: u32,
    /// Zero when the state-change program wrote the entry; read at each refresh (`checked`
    /// is then `CHECKED_ALIVE`) and at the close.
    pub counters: SocketCounters,
}

/// One closed connection, sent through the ring buffer: its socket with the round trip and
/// counters read at the close.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEvent {
    pub socket: OpenSocket,
    pub end_ns: u64,
}

/// Key of the shared-address map: a NAT64-style host IPv4 address and a local port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SharedKey {
    pub ip: [u8; 4],
    pub port: u16,
    pub _pad: u16,
}

/// Where the program finds what it reads, discovered by the agent in the running kernel
/// (the tracepoint's format file, `/sys/kernel/btf/vmlinux`) and set as a global at load
/// time: no offset is compiled in for one kernel. An offset of `u32::MAX` means "absent":
/// the counter reads as 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelLayout {
    // The tracepoint record.
    pub skaddr: u32,
    pub oldstate: u32,
    pub newstate: u32,
    pub sport: u32,
    pub dport: u32,
    pub family: u32,
    pub protocol: u32,
    pub saddr: u32,
    pub daddr: u32,
    pub saddr_v6: u32,
    pub daddr_v6: u32,
    // struct tcp_sock.
    pub bytes_acked: u32,
    pub bytes_received: u32,
    pub segs_in: u32,
    pub segs_out: u32,
    pub total_retrans: u32,
    pub srtt_us: u32,
    pub mdev_us: u32,
    // struct sock_common, at the start of every tcp_sock: what a refresh checks before it
    // trusts that a kernel address still holds the connection it was recorded for.
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_dport: u32,
    pub skc_num: u32,
    pub skc_family: u32,
    pub skc_state: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
}

impl KernelLayout {
    pub const ABSENT: u32 = u32::MAX;

    /// Every offset absent: the program does nothing until the agent sets the real ones.
    pub const UNSET: KernelLayout = KernelLayout {
        skaddr: Self::ABSENT,
        oldstate: Self::ABSENT,
        newstate: Self::ABSENT,
        sport: Self::ABSENT,
        dport: Self::ABSENT,
        family: Self::ABSENT,
        protocol: Self::ABSENT,
        saddr: Self::ABSENT,
        daddr: Self::ABSENT,
        saddr_v6: Self::ABSENT,
        daddr_v6: Self::ABSENT,
        bytes_acked: Self::ABSENT,
        bytes_received: Self::ABSENT,
        segs_in: Self::ABSENT,
        segs_out: Self::ABSENT,
        total_retrans: Self::ABSENT,
        srtt_us: Self::ABSENT,
        mdev_us: Self::ABSENT,
        skc_daddr: Self::ABSENT,
        skc_rcv_saddr: Self::ABSENT,
        skc_dport: Self::ABSENT,
        skc_num: Self::ABSENT,
        skc_family: Self::ABSENT,
        skc_state: Self::ABSENT,
        skc_v6_daddr: Self::ABSENT,
        skc_v6_rcv_saddr: Self::ABSENT,
    };
}

/// Workload names live in a map of fixed-size values.
pub const WORKLOAD_NAME_MAX: usize = 64;

/// A workload name as the name map stores it: UTF-8, zero-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkloadName(pub [u8; WORKLOAD_NAME_MAX]);

const _: () = assert!(core::mem::size_of::<SocketCounters>() == 32);
const _: () = assert!(core::mem::size_of::<OpenSocket>() == 96);
const _: () = assert!(core::mem::size_of::<FlowEvent>() == 104);
const _: () = assert!(core::mem::size_of::<SharedKey>() == 8);

#[cfg(feature = "user")]
mod pod {
    // SAFETY (each): #[repr(C)] plain integers and byte arrays with explicit padding
    // fields: no implicit padding, and every bit pattern is a valid value.
    unsafe impl aya::Pod for super::OpenSocket {}
    unsafe impl aya::Pod for super::FlowEvent {}
    unsafe impl aya::Pod for super::SharedKey {}
    unsafe impl aya::Pod for super::KernelLayout {}
    unsafe impl aya::Pod for super::WorkloadName {}
}
