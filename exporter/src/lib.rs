//! The flowattr exporter: a per-host agent that sees every TCP connection open and close through
//! an eBPF program on `sock:inet_sock_set_state`, tags the local side with the workload that owns
//! it at capture time, and ships batches of flows to its regional collector.
//!
//! The eBPF object is compiled by `build.rs` and embedded here, so the agent is one file to
//! deploy.

use std::ffi::CStr;
use std::io;
use std::path::Path;

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
    ensure_mounted(c"tracefs", "tracefs", "/sys/kernel/tracing", "events")?;
    ensure_mounted(c"bpf", "bpf", "/sys/fs/bpf", "")?;
    Ok(())
}

fn ensure_mounted(
    fs_c: &CStr,
    fs: &'static str,
    path: &'static str,
    probe: &str,
) -> Result<(), MountError> {
    if is_mounted(path, probe) {
        return Ok(());
    }
    let target = std::ffi::CString::new(path).expect("static path has no NUL");
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call; data is
    // null, which mount(2) accepts for these filesystems.
    let rc = unsafe {
        libc::mount(
            fs_c.as_ptr(),
            target.as_ptr(),
            fs_c.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(MountError::Mount {
            fs,
            path,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn is_mounted(path: &str, probe: &str) -> bool {
    if !probe.is_empty() {
        return Path::new(path).join(probe).exists();
    }
    std::fs::read_to_string("/proc/self/mounts")
        .map(|mounts| {
            mounts
                .lines()
                .any(|line| line.split_whitespace().nth(1) == Some(path))
        })
        .unwrap_or(false)
}
