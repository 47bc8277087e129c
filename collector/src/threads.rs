//! The collector's thread names, as `top -H`, `perf` and /proc show them, so that an operator
//! (and `flowattr-bench pipeline`) can tell attribution's CPU from the sinks'. The kernel keeps
//! 15 bytes of a name: these fit. The Kafka client's own threads are librdkafka's (`rdk:`...).

use std::cell::Cell;

/// The shards' executors (glommio appends the shard's number, which the kernel cuts off).
pub const SHARD: &str = "flowattr-shard";

/// The threads that format and write the sinks' batches, and the forwarding spool's writes:
/// glommio's blocking pool, whose threads would otherwise carry the shard's name.
pub const SINK: &str = match SINK_NAME.to_str() {
    Ok(name) => name,
    Err(_) => panic!("a thread name is UTF-8"),
};

/// [`SINK`] as the kernel takes it.
const SINK_NAME: &std::ffi::CStr = c"flowattr-sink";

/// The RSS sampler.
pub const MEMORY: &str = "flowattr-memory";

thread_local! {
    static NAMED: Cell<bool> = const { Cell::new(false) };
}

/// Names the calling thread a sink thread, once in its life: called by the work glommio's
/// blocking pool runs, as the pool starts its threads unnamed.
pub fn name_sink_thread() {
    if NAMED.get() {
        return;
    }
    NAMED.set(true);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes, which SINK_NAME
    // is (the test holds it to 15 and a NUL), and renames only the calling thread.
    let result = unsafe { libc::prctl(libc::PR_SET_NAME, SINK_NAME.as_ptr()) };
    if result != 0 {
        tracing::debug!("naming a sink thread: {}", std::io::Error::last_os_error());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the kernel shows for a sink thread is [`SINK`], whole.
    #[test]
    fn a_sink_thread_is_named_as_the_kernel_shows_it() {
        std::thread::spawn(|| {
            name_sink_thread();
            name_sink_thread();
            // SAFETY: gettid has no preconditions.
            let thread = unsafe { libc::gettid() };
            let comm = std::fs::read_to_string(format!("/proc/self/task/{thread}/comm")).unwrap();
            assert_eq!(comm.trim_end(), SINK);
        })
        .join()
        .unwrap();
        for name in [SHARD, SINK, MEMORY] {
            assert!(name.len() <= 15, "{name} is cut by the kernel");
        }
    }
}
