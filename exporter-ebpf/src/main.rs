//! The eBPF program of the flowattr exporter, attached to the `sock:inet_sock_set_state`
//! tracepoint: every TCP connection, IPv4 and IPv6, from its first state change to its close.
//!
//! - SYN_SENT (we connect) or SYN_RECV (they connected): remember the socket's start time and
//!   direction in `OPEN_SOCKETS`, keyed by the socket's kernel address.
//! - ESTABLISHED: record the addresses and ports (the local port of a connect() is only
//!   assigned after SYN_SENT) and the local workload as the maps name it now, so the agent can
//!   report the socket as an open flow every interval while it lives, with the handshake's
//!   round trip. A connection we made
//!   starts here, when the remote accepted it; one made to us, at its SYN.
//! - CLOSE: send one `FlowEvent` to the ring buffer with the counters and the round trip read
//!   from `tcp_sock` and the workload recorded at ESTABLISHED (the owner when the connection
//!   was made), and forget the socket.
//!
//! A second program, `refresh_open_sockets`, is never attached: the agent runs it (a test run)
//! before it reports open connections. It reads every open socket's round trip and counters
//! now, after checking that the memory at that address is still a live socket with the
//! connection's addresses and ports (a close the kernel skipped would otherwise leave a dead
//! entry to be reported open, its counters read from whatever reused the memory).
//!
//! Every offset it reads comes from the `LAYOUT` global, which the agent fills from the running
//! kernel's tracepoint format and BTF at load time. A full ring buffer is counted in `LOST`,
//! never silent.
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::Global;
use aya_ebpf::bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP};
use aya_ebpf::helpers::{bpf_for_each_map_elem, bpf_ktime_get_ns, bpf_probe_read_kernel};
use aya_ebpf::macros::{map, raw_tracepoint, tracepoint};
use aya_ebpf::maps::{HashMap, LruHashMap, PerCpuArray, RingBuf};
use aya_ebpf::programs::{RawTracePointContext, TracePointContext};
use flowattr_common::kernel::{
    CHECKED_ALIVE, CHECKED_GONE, CHECKED_NOT_YET, DIRECTION_INBOUND, DIRECTION_OUTBOUND, FlowEvent,
    KernelLayout, OpenSocket, SharedKey, SocketCounters,
};
use flowattr_common::{CanonicalIp, WorkloadId};

const IPPROTO_TCP: u16 = 6;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_FIN_WAIT1: i32 = 4;
const TCP_FIN_WAIT2: i32 = 5;
const TCP_CLOSE: i32 = 7;
const TCP_CLOSE_WAIT: i32 = 8;
const TCP_LAST_ACK: i32 = 9;
const TCP_CLOSING: i32 = 11;

/// Set by the agent at load time (see `KernelLayout`).
#[unsafe(no_mangle)]
static LAYOUT: Global<KernelLayout> = Global::new(KernelLayout::UNSET);

/// Sockets between their first state change and their close. LRU: a socket whose close was
/// missed (the program attached mid-life) ages out instead of filling the map.
#[map]
static OPEN_SOCKETS: LruHashMap<u64, OpenSocket> = LruHashMap::with_max_entries(262_144, 0);

/// Local IP -> workload, filled by `flowattr-exporter register` (the container path). Pinned
/// by the agent so it survives exporter restarts.
#[map]
static IP_WORKLOADS: HashMap<CanonicalIp, WorkloadId> = HashMap::pinned(65_536, 0);

/// (Local IPv4, local port) -> workload, for host addresses shared by several workloads; an
/// IPv6 socket whose local address is v4-mapped (a dual-stack listener) is looked up here too.
/// Pinned too.
#[map]
static SHARED_WORKLOADS: HashMap<SharedKey, WorkloadId> = HashMap::pinned(65_536, 0);

const RING_BYTES: u32 = 4 << 20;

#[map]
static FLOW_EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

/// Pending bytes past which an event wakes the agent at once.
const WAKEUP_BYTES: u64 = RING_BYTES as u64 / 4;

/// Events dropped because the ring buffer was full, per CPU.
#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    // A tracepoint's return value is ignored; an error only means this event is not seen.
    match try_inet_sock_set_state(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

/// Reads a `T` at `offset` in the tracepoint record.
fn field<T>(ctx: &TracePointContext, offset: u32) -> Result<T, i64> {
    if offset == KernelLayout::ABSENT {
        return Err(-1);
    }
    // SAFETY: read_at goes through bpf_probe_read: a wrong offset reads garbage, never out of
    // bounds.
    unsafe { ctx.read_at(offset as usize) }.map_err(i64::from)
}

fn try_inet_sock_set_state(ctx: &TracePointContext) -> Result<(), i64> {
    let layout = LAYOUT.load();
    let new_state: i32 = field(ctx, layout.newstate)?;
    // About two of a connection's five runs are transitions this program ignores (FIN_WAIT1,
    // CLOSE_WAIT, LAST_ACK...): they leave after one read.
    if !matches!(
        new_state,
        TCP_SYN_SENT | TCP_SYN_RECV | TCP_ESTABLISHED | TCP_CLOSE
    ) {
        return Ok(());
    }
    let protocol: u16 = field(ctx, layout.protocol)?;
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let skaddr: u64 = field(ctx, layout.skaddr)?;
    match new_state {
        TCP_SYN_SENT | TCP_SYN_RECV => {
            let direction = if new_state == TCP_SYN_SENT {
                DIRECTION_OUTBOUND
            } else {
                DIRECTION_INBOUND
            };
            let socket = read_socket(ctx, &layout, direction, true)?;
            OPEN_SOCKETS.insert(skaddr, socket, 0).map_err(i64::from)?;
        }
        TCP_ESTABLISHED => {
            let old_state: i32 = field(ctx, layout.oldstate)?;
            let direction = if old_state == TCP_SYN_RECV {
                DIRECTION_INBOUND
            } else {
                DIRECTION_OUTBOUND
            };
            let mut socket = read_socket(ctx, &layout, direction, true)?;
            // The handshake's round trip, which the kernel sampled just before this change:
            // what an open flow's reports carry.
            (socket.srtt_us_x8, socket.mdev_us_x4) = round_trip(skaddr, &layout);
            if let Some(known) = OPEN_SOCKETS.get_ptr(skaddr) {
                // SAFETY: a map value pointer, valid for this program run.
                let known = unsafe { *known };
                socket.direction = known.direction;
                // A connection we made starts when the remote accepted it, not at our first
                // SYN: the collector names the remote by who held its address then, and a SYN
                // retransmitted for seconds can reach an address's next holder.
                if known.direction == DIRECTION_INBOUND {
                    socket.start_ns = known.start_ns;
                }
            }
            OPEN_SOCKETS.insert(skaddr, socket, 0).map_err(i64::from)?;
        }
        TCP_CLOSE => {
            let Some(known) = OPEN_SOCKETS.get_ptr(skaddr) else {
                return Ok(());
            };
            // SAFETY: a map value pointer, valid for this program run. Only what is needed is
            // copied out (the entry is 96 bytes; the frame is bounded), before the remove
            // returns the entry to the map's free list.
            let (direction, start_ns, workload, shared) = unsafe {
                (
                    (*known).direction,
                    (*known).start_ns,
                    (*known).workload,
                    (*known).shared,
                )
            };
            let _ = OPEN_SOCKETS.remove(skaddr);
            let mut socket = read_socket(ctx, &layout, direction, false)?;
            socket.start_ns = start_ns;
            // The workload that held the address when the connection was made, even if the
            // address was re-registered (a container replaced) while it was open.
            socket.workload = workload;
            socket.shared = shared;
            (socket.srtt_us_x8, socket.mdev_us_x4) = round_trip(skaddr, &layout);
            socket.counters = counters(skaddr, &layout);
            let event = FlowEvent {
                socket,
                end_ns: now(),
            };
            // Waking the agent for every event costs an interrupt and a wake-up per event (on
            // this VM, most of the program's time and nearly all the agent's CPU). The agent
            // polls every 100 ms anyway; an event wakes it early only once a quarter of the
            // ring is waiting, well before the ring could fill.
            let flags = if FLOW_EVENTS.query(BPF_RB_AVAIL_DATA.into()) >= WAKEUP_BYTES {
                BPF_RB_FORCE_WAKEUP
            } else {
                BPF_RB_NO_WAKEUP
            };
            if FLOW_EVENTS
                .output::<FlowEvent>(&event, flags.into())
                .is_err()
            {
                if let Some(lost) = LOST.get_ptr_mut(0) {
                    // SAFETY: this CPU's slot; a program is not preempted on its CPU mid-run.
                    unsafe { *lost += 1 };
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// Run by the agent (`BPF_PROG_TEST_RUN`), never attached: refreshes every entry of
/// `OPEN_SOCKETS` in place (see the module's comment).
#[raw_tracepoint]
pub fn refresh_open_sockets(_ctx: RawTracePointContext) -> i32 {
    // SAFETY: the map's definition is what the helper takes as the map (the loader relocates
    // its address), and `refresh_one` has the callback's signature; no context is passed.
    unsafe {
        bpf_for_each_map_elem(
            core::ptr::addr_of!(OPEN_SOCKETS) as *mut c_void,
            refresh_one as *mut c_void,
            core::ptr::null_mut(),
            0,
        ) as i32
    }
}

/// One entry of `OPEN_SOCKETS`: its key, the socket's address; its value, written in place.
/// Returns 0 to go on to the next entry.
#[inline(never)]
extern "C" fn refresh_one(
    _map: *mut c_void,
    key: *const u64,
    value: *mut OpenSocket,
    _ctx: *mut c_void,
) -> i64 {
    // SAFETY: the helper passes pointers to the entry's key and value, valid for this call.
    let (skaddr, socket) = unsafe { (*key, &mut *value) };
    // A connect still waiting for its answer knows no remote port yet: nothing to compare.
    if socket.local_port == 0 || socket.checked == CHECKED_GONE {
        return 0;
    }
    // Read for each entry: handing the walk's one copy over as the callback's context (it
    // must be on the caller's stack) puts the two frames past the verifier's 512 bytes.
    let layout = LAYOUT.load();
    let now = counters(skaddr, &layout);
    let seen = socket.counters;
    // Counters only grow on one socket: smaller ones are another socket's.
    if !is_same_connection(skaddr, &layout, socket)
        || now.bytes_acked < seen.bytes_acked
        || now.bytes_received < seen.bytes_received
        || now.segs_out < seen.segs_out
        || now.segs_in < seen.segs_in
    {
        socket.checked = CHECKED_GONE;
        return 0;
    }
    (socket.srtt_us_x8, socket.mdev_us_x4) = round_trip(skaddr, &layout);
    socket.counters = now;
    socket.checked = CHECKED_ALIVE;
    0
}

/// Whether the memory at `skaddr` is, now, a full TCP socket between a state that carries data
/// and its close, with `socket`'s family, addresses and ports.
#[inline(always)]
fn is_same_connection(skaddr: u64, layout: &KernelLayout, socket: &OpenSocket) -> bool {
    let state: u8 = sock_field(skaddr, layout.skc_state);
    if !matches!(
        i32::from(state),
        TCP_ESTABLISHED
            | TCP_FIN_WAIT1
            | TCP_FIN_WAIT2
            | TCP_CLOSE_WAIT
            | TCP_LAST_ACK
            | TCP_CLOSING
    ) {
        return false;
    }
    let local_port: u16 = sock_field(skaddr, layout.skc_num);
    let remote_port: u16 = u16::from_be(sock_field(skaddr, layout.skc_dport));
    if local_port != socket.local_port || remote_port != socket.remote_port {
        return false;
    }
    let family: u16 = sock_field(skaddr, layout.skc_family);
    let (local, remote) = match family {
        AF_INET => (
            mapped(sock_field(skaddr, layout.skc_rcv_saddr)).octets(),
            mapped(sock_field(skaddr, layout.skc_daddr)).octets(),
        ),
        AF_INET6 => (
            sock_field(skaddr, layout.skc_v6_rcv_saddr),
            sock_field(skaddr, layout.skc_v6_daddr),
        ),
        _ => return false,
    };
    // As integers: an array comparison may compile to a memcmp call, which eBPF cannot make.
    let same =
        |a: [u8; 16], b: CanonicalIp| u128::from_ne_bytes(a) == u128::from_ne_bytes(b.octets());
    same(local, socket.local_ip) && same(remote, socket.remote_ip)
}

/// The socket's counters now.
#[inline(always)]
fn counters(skaddr: u64, layout: &KernelLayout) -> SocketCounters {
    SocketCounters {
        bytes_acked: sock_field(skaddr, layout.bytes_acked),
        bytes_received: sock_field(skaddr, layout.bytes_received),
        segs_out: sock_field(skaddr, layout.segs_out),
        segs_in: sock_field(skaddr, layout.segs_in),
        total_retrans: sock_field(skaddr, layout.total_retrans),
        _pad: 0,
    }
}

fn now() -> u64 {
    // SAFETY: a helper with no arguments and no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// A `tcp_sock` counter at `offset` from the socket, or 0 if the kernel has no such field.
fn sock_field<T: Default>(skaddr: u64, offset: u32) -> T {
    if offset == KernelLayout::ABSENT {
        return T::default();
    }
    // SAFETY: bpf_probe_read_kernel checks the address and fails instead of faulting.
    unsafe { bpf_probe_read_kernel((skaddr + u64::from(offset)) as *const T) }.unwrap_or_default()
}

/// `tcp_sock.srtt_us` and `mdev_us`, as the kernel keeps them. (One 8-byte read of the two,
/// side by side in every kernel since 4.x, measured no cheaper than two reads.)
fn round_trip(skaddr: u64, layout: &KernelLayout) -> (u32, u32) {
    (
        sock_field(skaddr, layout.srtt_us),
        sock_field(skaddr, layout.mdev_us),
    )
}

/// The socket's addresses and ports as the tracepoint record has them now, and with `resolve`
/// its local workload as the maps say now.
///
/// Inlined: as a function of its own, its frame (224 bytes with some linkers) adds to the
/// program's (over 300) and the pair passes the verifier's 512-byte bound on a call chain.
#[inline(always)]
fn read_socket(
    ctx: &TracePointContext,
    layout: &KernelLayout,
    direction: u8,
    resolve: bool,
) -> Result<OpenSocket, i64> {
    let family: u16 = field(ctx, layout.family)?;
    let (local_ip, remote_ip, v4) = if family == AF_INET {
        let local: [u8; 4] = field(ctx, layout.saddr)?;
        let remote: [u8; 4] = field(ctx, layout.daddr)?;
        (mapped(local), mapped(remote), Some(local))
    } else {
        let local: [u8; 16] = field(ctx, layout.saddr_v6)?;
        let remote: [u8; 16] = field(ctx, layout.daddr_v6)?;
        // A dual-stack socket (`::` with IPV6_V6ONLY=0) serving an IPv4 client has the
        // v4-mapped form `::ffff:a.b.c.d` as its local address: that is the IPv4 endpoint, and
        // its (IPv4, port) registration applies as for an AF_INET socket.
        (
            CanonicalIp::from_octets(local),
            CanonicalIp::from_octets(remote),
            v4_mapped(&local),
        )
    };
    let local_port: u16 = field(ctx, layout.sport)?;
    let remote_port: u16 = field(ctx, layout.dport)?;
    let mut shared = 0;
    let mut workload = WorkloadId::new(0);
    if let Some(ip) = v4.filter(|_| resolve) {
        let key = SharedKey {
            ip,
            port: local_port,
            _pad: 0,
        };
        if let Some(found) = SHARED_WORKLOADS.get_ptr(key) {
            // SAFETY: a map value pointer, valid for this program run.
            workload = unsafe { *found };
            shared = 1;
        }
    }
    if resolve && shared == 0 {
        if let Some(found) = IP_WORKLOADS.get_ptr(local_ip) {
            // SAFETY: as above.
            workload = unsafe { *found };
        }
    }
    Ok(OpenSocket {
        start_ns: now(),
        local_ip,
        remote_ip,
        local_port,
        remote_port,
        direction,
        shared,
        checked: CHECKED_NOT_YET,
        _pad: 0,
        workload,
        srtt_us_x8: 0,
        mdev_us_x4: 0,
        _pad2: 0,
        counters: SocketCounters::default(),
    })
}

/// The IPv4 address inside a v4-mapped IPv6 address, if it is one.
fn v4_mapped(ip: &[u8; 16]) -> Option<[u8; 4]> {
    let mut prefix = 0u8;
    for byte in &ip[..10] {
        prefix |= *byte;
    }
    if prefix == 0 && ip[10] == 0xff && ip[11] == 0xff {
        Some([ip[12], ip[13], ip[14], ip[15]])
    } else {
        None
    }
}

fn mapped(v4: [u8; 4]) -> CanonicalIp {
    let [a, b, c, d] = v4;
    CanonicalIp::from_octets([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d])
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
