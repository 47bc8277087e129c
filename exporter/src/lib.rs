//! The flowattr exporter: a per-host agent that sees every TCP connection open and close through
//! an eBPF program on `sock:inet_sock_set_state`, tags the local side with the workload that owns
//! it at capture time, and ships batches of flows to its regional collector.
//!
//! The eBPF object is compiled by `build.rs` and embedded here, so the agent is one file to
//! deploy.

/// The compiled eBPF object, 8-byte aligned as the ELF parser requires.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/flowattr-exporter-ebpf"));
