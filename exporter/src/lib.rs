//! The flowattr exporter: a per-host agent that sees every TCP connection open and close through
//! an eBPF program on `sock:inet_sock_set_state`, tags the local side with the workload that owns
//! it at capture time, and ships batches of flows to its regional collector.
//!
//! The eBPF object is compiled by `build.rs` and embedded here, so the agent is one file to
//! deploy. [`layout`] finds what the program must read in the running kernel, [`capture`]
//! loads, attaches and reads it, [`clock`] turns kernel time into wall-clock time,
//! [`registry`] names the workload ids the eBPF maps hold, [`registration`] changes them as
//! containers come and go (by hand, or by the [`platform`] watcher that follows the host's
//! container runtime), [`config`] is the settings file every subcommand shares, and
//! [`spool`] is the bounded queue of batches waiting for the collector's ack (each on disk
//! before it counts), [`journal`] keeps the interval being gathered so a crash loses none of
//! it, and `flowattr_common::dead_letter` keeps what the collector refused. The agent loop and the local API are in
//! the binary.

pub mod btf;
pub mod capture;
pub mod clock;
pub mod config;
pub mod journal;
pub mod layout;
pub mod platform;
pub mod registration;
pub mod registry;
pub mod spool;

use std::ffi::CStr;
use std::io;

/// The compiled eBPF object, 8-byte aligned as the ELF parser requires.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/flowattr-exporter-ebpf"));

/// The tracepoint the program attaches to, as (category, name).
pub const TRACEPOINT: (&str, &str) = ("sock", "inet_sock_set_state");

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mounting {fs} at {path}: {source} (the exporter must run as root)")]
    Mount {
        fs: &'static str,
        path: &'static str,
        source: io::Error,
    },
}

/// Mounts tracefs at /sys/kernel/tracing and bpffs at /sys/fs/bpf where they are absent:
/// attaching a tracepoint reads its id from tracefs, and pinned maps live in bpffs.
pub fn ensure_kernel_filesystems() -> Result<(), MountError> {
    ensure_mounted(c"tracefs", c"/sys/kernel/tracing")?;
    ensure_mounted(c"bpf", c"/sys/fs/bpf")?;
    Ok(())
}

fn ensure_mounted(fs: &'static CStr, path: &'static CStr) -> Result<(), MountError> {
    let name = |c: &'static CStr| c.to_str().expect("the literals above are ASCII");
    if is_mount_point(name(path)) {
        return Ok(());
    }
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call; data is
    // null, which mount(2) accepts for these filesystems.
    let rc = unsafe { libc::mount(fs.as_ptr(), path.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        let source = io::Error::last_os_error();
        return Err(MountError::Mount {
            fs: name(fs),
            path: name(path),
            source,
        });
    }
    Ok(())
}

/// This process's mounts as (mount point, filesystem type), from /proc/self/mounts; none if it
/// cannot be read.
fn mounts() -> Vec<(String, String)> {
    let text = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            Some((fields.nth(1)?.to_owned(), fields.next()?.to_owned()))
        })
        .collect()
}

/// The type of the filesystem `path` is on (`bpf`, `ext4`...), from the mount whose point is
/// its longest prefix.
pub fn filesystem_of(path: &std::path::Path) -> Option<String> {
    let path = path.canonicalize().ok()?;
    mounts()
        .into_iter()
        .filter(|(point, _)| path.starts_with(point))
        .max_by_key(|(point, _)| point.len())
        .map(|(_, kind)| kind)
}

fn is_mount_point(path: &str) -> bool {
    mounts().iter().any(|(point, _)| point == path)
}
