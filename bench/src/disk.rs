//! `flowattr-bench disk`: the ceiling of the disk under the delay buffer's directory, for the
//! delay buffer's pattern: every byte written once, sequentially, then read once. Measured
//! with io_uring directly (the io-uring crate): O_DIRECT, so the page cache is out of the
//! picture as it is for the delay buffer, and buffers registered with the ring, several
//! requests in flight. The pipeline benchmark reports its own disk traffic as a share of it.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use io_uring::{IoUring, opcode, types};

#[derive(Debug, Clone, Args)]
pub struct DiskArgs {
    /// The directory to measure: the delay buffer's (a scratch file is made and removed there).
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    /// Bytes written then read.
    #[arg(long, default_value_t = 1 << 30)]
    pub bytes: u64,
    /// Bytes per request.
    #[arg(long, default_value_t = 1 << 20)]
    pub request: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 8)]
    pub depth: usize,
}

/// Sequential throughput of one run, bytes per second.
#[derive(Debug, Clone, Copy)]
pub struct DiskCeiling {
    pub write: f64,
    pub read: f64,
}

impl DiskCeiling {
    /// Bytes per second a workload that writes each byte once and reads it once can move
    /// through the device, counting each byte once: the time per byte is a write's plus a
    /// read's.
    pub fn write_then_read(&self) -> f64 {
        1.0 / (1.0 / self.write + 1.0 / self.read)
    }
}

/// O_DIRECT needs the buffer, the offset and the length aligned to the logical block size;
/// 4 KiB covers every device in use.
const ALIGN: usize = 4096;

/// Buffers aligned for O_DIRECT, freed on drop.
struct AlignedBuffers {
    pointers: Vec<*mut u8>,
    layout: Layout,
}

impl AlignedBuffers {
    fn new(count: usize, size: usize) -> anyhow::Result<Self> {
        let layout = Layout::from_size_align(size, ALIGN)
            .context("a request size that is a multiple of 4 KiB")?;
        let pointers = (0..count)
            .map(|index| {
                // SAFETY: the layout has a non-zero size (checked by the caller) and a valid
                // alignment; the memory is freed with the same layout in drop.
                let pointer = unsafe { alloc_zeroed(layout) };
                if pointer.is_null() {
                    bail!("allocating {size} bytes");
                }
                // A pattern, so a device that compresses or deduplicates zeros cannot cheat.
                // SAFETY: `pointer` holds `size` bytes just allocated and owned here.
                let bytes = unsafe { std::slice::from_raw_parts_mut(pointer, size) };
                for (at, byte) in bytes.iter_mut().enumerate() {
                    *byte = (at as u64)
                        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                        .wrapping_add(index as u64) as u8;
                }
                Ok(pointer)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(AlignedBuffers { pointers, layout })
    }

    fn iovecs(&self) -> Vec<libc::iovec> {
        self.pointers
            .iter()
            .map(|&pointer| libc::iovec {
                iov_base: pointer.cast(),
                iov_len: self.layout.size(),
            })
            .collect()
    }
}

impl Drop for AlignedBuffers {
    fn drop(&mut self) {
        for &pointer in &self.pointers {
            // SAFETY: allocated in `new` with this layout, freed once.
            unsafe { dealloc(pointer, self.layout) };
        }
    }
}

/// Writes `args.bytes` to a scratch file in `args.dir`, syncs it, reads it back, and removes it.
pub fn measure(args: &DiskArgs) -> anyhow::Result<DiskCeiling> {
    if args.request == 0 || !args.request.is_multiple_of(ALIGN) || args.depth == 0 {
        bail!("--request must be a positive multiple of 4096 and --depth at least 1");
    }
    let requests = args.bytes.div_ceil(args.request as u64);
    let path = args
        .dir
        .join(format!(".flowattr-disk-{}", std::process::id()));
    let result = run(&path, args, requests);
    let _ = std::fs::remove_file(&path);
    result
}

fn run(path: &Path, args: &DiskArgs, requests: u64) -> anyhow::Result<DiskCeiling> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .with_context(|| format!("opening {} with O_DIRECT", path.display()))?;
    let buffers = AlignedBuffers::new(args.depth, args.request)?;
    let mut ring = IoUring::new((args.depth as u32).next_power_of_two().max(8))
        .context("creating an io_uring")?;
    // SAFETY: the iovecs point at buffers that live (in `buffers`) until the ring is dropped,
    // which happens first: `ring` is declared after `buffers`.
    unsafe { ring.submitter().register_buffers(&buffers.iovecs()) }
        .context("registering buffers with the ring")?;
    let fd = types::Fd(file.as_raw_fd());
    let write = pass(&mut ring, &buffers, fd, args.request, requests, true)?;
    let read = pass(&mut ring, &buffers, fd, args.request, requests, false)?;
    let bytes = (requests * args.request as u64) as f64;
    Ok(DiskCeiling {
        write: bytes / write.as_secs_f64(),
        read: bytes / read.as_secs_f64(),
    })
}

/// One sequential pass over the file, `depth` requests in flight; a write pass ends with an
/// fsync, inside the time measured (the delay buffer's writes are durable before acks).
fn pass(
    ring: &mut IoUring,
    buffers: &AlignedBuffers,
    fd: types::Fd,
    request: usize,
    requests: u64,
    write: bool,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let (mut submitted, mut completed) = (0u64, 0u64);
    let mut free: Vec<usize> = (0..buffers.pointers.len()).collect();
    while completed < requests {
        while submitted < requests
            && let Some(slot) = free.pop()
        {
            let offset = submitted * request as u64;
            let pointer = buffers.pointers[slot];
            let entry = if write {
                opcode::WriteFixed::new(fd, pointer, request as u32, slot as u16)
                    .offset(offset)
                    .build()
            } else {
                opcode::ReadFixed::new(fd, pointer, request as u32, slot as u16)
                    .offset(offset)
                    .build()
            };
            // SAFETY: the buffer at `slot` is registered, owned by `buffers`, and not reused
            // until its completion comes back (it is off the free list until then).
            unsafe { ring.submission().push(&entry.user_data(slot as u64)) }
                .map_err(|_| anyhow::anyhow!("the submission queue is full"))?;
            submitted += 1;
        }
        ring.submit_and_wait(1)?;
        for completion in ring.completion() {
            if completion.result() < 0 {
                bail!(
                    "{} failed: {}",
                    if write { "a write" } else { "a read" },
                    std::io::Error::from_raw_os_error(-completion.result())
                );
            }
            if completion.result() as usize != request {
                bail!(
                    "a short {}: {} of {request} bytes",
                    if write { "write" } else { "read" },
                    completion.result()
                );
            }
            free.push(completion.user_data() as usize);
            completed += 1;
        }
    }
    if write {
        let entry = opcode::Fsync::new(fd).build().user_data(u64::MAX);
        // SAFETY: an fsync references no memory.
        unsafe { ring.submission().push(&entry) }
            .map_err(|_| anyhow::anyhow!("the submission queue is full"))?;
        ring.submit_and_wait(1)?;
        let completion = ring.completion().next().context("the fsync's completion")?;
        if completion.result() < 0 {
            bail!(
                "fsync failed: {}",
                std::io::Error::from_raw_os_error(-completion.result())
            );
        }
    }
    Ok(started.elapsed())
}

pub fn run_command(args: &DiskArgs) -> anyhow::Result<()> {
    let ceiling = measure(args)?;
    println!(
        "disk under {}: {} MiB in {} KiB requests, {} in flight, O_DIRECT through io_uring with registered buffers",
        args.dir.display(),
        args.bytes >> 20,
        args.request >> 10,
        args.depth
    );
    println!(
        "  sequential write (fsync included): {:>8.1} MB/s",
        ceiling.write / 1e6
    );
    println!(
        "  sequential read:                   {:>8.1} MB/s",
        ceiling.read / 1e6
    );
    println!(
        "  write-then-read ceiling:           {:>8.1} MB/s of buffered bytes (each written once and read once)",
        ceiling.write_then_read() / 1e6
    );
    Ok(())
}
