//! Whether this process may use io_uring, which carries every socket and disk write of the
//! node's shards (glommio). Asked once at start, so that a refusal is one line naming the fix
//! rather than an executor's panic: the default seccomp profiles of current Docker and
//! containerd refuse `io_uring_setup`, and `kernel.io_uring_disabled` can refuse it host-wide.

/// io_uring is refused: what the kernel answered.
#[derive(Debug, thiserror::Error)]
#[error(
    "io_uring is refused here ({0}): the collector's sockets and delay buffer run on it. In a container, run with the seccomp profile deploy/seccomp/flowattr-collector.json (docker run --security-opt seccomp=deploy/seccomp/flowattr-collector.json; Kubernetes: seccompProfile Localhost); on a host, set sysctl kernel.io_uring_disabled=0"
)]
pub struct IoUringRefused(std::io::Error);

/// Sets up a one-entry ring and asks it which operations it supports, as glommio does first
/// (a seccomp profile may allow the one call and refuse the other), then closes it.
pub fn check() -> Result<(), IoUringRefused> {
    // The kernel's struct io_uring_params: 120 bytes it reads zeroed and writes back.
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup reads and writes `params`, which is 120 writable bytes (the size
    // of struct io_uring_params) alive for the call; it returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if fd < 0 {
        return Err(IoUringRefused(std::io::Error::last_os_error()));
    }
    const IORING_REGISTER_PROBE: u32 = 8;
    const PROBE_OPS: u32 = 256;
    // struct io_uring_probe: a 16-byte head, then 8 bytes per operation.
    let mut probe = vec![0u8; 16 + 8 * PROBE_OPS as usize];
    // SAFETY: `fd` is the ring just set up; IORING_REGISTER_PROBE writes at most PROBE_OPS
    // entries after the head into `probe`, which holds exactly that many, alive for the call.
    let registered = unsafe {
        libc::syscall(
            libc::SYS_io_uring_register,
            fd,
            IORING_REGISTER_PROBE,
            probe.as_mut_ptr(),
            PROBE_OPS,
        )
    };
    let refused = (registered < 0).then(std::io::Error::last_os_error);
    // SAFETY: `fd` is the descriptor io_uring_setup returned, owned here and closed once.
    unsafe { libc::close(fd as libc::c_int) };
    match refused {
        Some(error) => Err(IoUringRefused(error)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_machine_allows_io_uring() {
        super::check().unwrap();
    }
}
