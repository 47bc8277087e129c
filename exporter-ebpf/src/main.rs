//! The eBPF program of the flowattr exporter, attached to the `sock:inet_sock_set_state`
//! tracepoint. For now it counts TCP state transitions per new state, which proves the whole
//! build-load-attach chain; flow capture is filled in on top of the same entry point.
#![no_std]
#![no_main]

use aya_ebpf::macros::{map, tracepoint};
use aya_ebpf::maps::PerCpuArray;
use aya_ebpf::programs::TracePointContext;

/// Offsets in the tracepoint's record (`/sys/kernel/tracing/events/sock/inet_sock_set_state/format`).
const NEWSTATE_OFFSET: usize = 20;
const PROTOCOL_OFFSET: usize = 30;
const IPPROTO_TCP: u16 = 6;
/// TCP states are 1..=12 (TCP_ESTABLISHED..TCP_NEW_SYN_RECV); one slot each, 0 unused.
const TCP_STATE_SLOTS: u32 = 16;

/// Transitions into each TCP state, per CPU so the hot path never contends on a cache line.
#[map]
static TCP_STATE_TRANSITIONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(TCP_STATE_SLOTS, 0);

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    // A tracepoint's return value is ignored; errors only mean this event is not counted.
    match try_inet_sock_set_state(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

fn try_inet_sock_set_state(ctx: &TracePointContext) -> Result<(), i64> {
    // SAFETY: both offsets lie inside the tracepoint record, whose layout the format file fixes;
    // read_at goes through bpf_probe_read, so a wrong offset reads garbage, not out of bounds.
    let protocol: u16 = unsafe { ctx.read_at(PROTOCOL_OFFSET)? };
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    // SAFETY: as above.
    let new_state: i32 = unsafe { ctx.read_at(NEWSTATE_OFFSET)? };
    let slot = (new_state as u32) % TCP_STATE_SLOTS;
    if let Some(count) = TCP_STATE_TRANSITIONS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, and eBPF programs are not preempted on their CPU mid-run.
        unsafe { *count += 1 };
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
