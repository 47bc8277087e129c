//! Exporter connections. Every executor accepts on the same port (SO_REUSEPORT, so the kernel
//! spreads connections over cores); each connection is read by the executor that accepted it,
//! its frames decoded and validated, its batches split and dispatched to the shards, and an
//! ack written for each batch once every part of it is durable.
//!
//! A frame whose header or checksum is bad, that is truncated, oversized or of the wrong kind
//! closes its connection (after a bad header the stream position means nothing), with a
//! counted and logged reason; other connections are untouched. An intact frame whose content is
//! refused keeps the connection: a batch that cannot be read at all gets a typed refusal, and a
//! readable one loses only the records [`crate::evidence`] refuses, named in its ack.
//!
//! With `[tls]` a connection is served only once its mutual TLS handshake has finished
//! ([`crate::tls`]); its receive buffers are allocated after that, never for a stranger.

mod batch;

use std::rc::Rc;
use std::time::{Duration, Instant};

use flowattr_common::wire::{
    Ack, AckStatus, CLOCK_PROBE_SEQUENCE, ExporterId, FrameDecoder, FrameError, FrameKind,
    encode_message,
};
use flowattr_common::{Timestamp, duration_nanos};
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::channels::local_channel;
use glommio::net::TcpListener;

use crate::connection_slots::NoSlot;
use crate::metrics::Rejection;
use crate::partial_frames::{FREE_BYTES, PartialFrameHold, READ_CHUNK};
use crate::shard::Shard;
use crate::tls::ClaimSet;
use batch::read_batch;

/// How often a connection waiting for the node (its memory cap, the partial-frame budget)
/// looks again.
const WAIT_STEP: Duration = crate::memory::SAMPLE_PERIOD;

/// A connection that has waited this long between frames gives up its read buffer for one of
/// [`WAITING_READ_BYTES`]. Exporters keep their connections open between batches (a minute
/// apart by default): thousands of them each holding a whole read's buffer while they wait
/// would hold a gigabyte. A busy connection's next frame comes sooner, and keeps its buffer.
const SHED_AFTER: Duration = Duration::from_secs(1);

/// The read of a connection waiting for its first frame or its next one (and its buffer's
/// size); once a read fills it, the next ones are of [`READ_CHUNK`]. Exporters' batches of a
/// few flows never need more.
const WAITING_READ_BYTES: usize = 16 << 10;

pub async fn accept_loop(listener: TcpListener, shard: Rc<Shard>) {
    loop {
        let stream = match listener.accept().await {
            Ok(stream) => stream,
            Err(error) => {
                // Out of file descriptors, mostly: back off rather than spin.
                tracing::error!("shard {}: accept failed: {error}", shard.id);
                glommio::timer::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(peer) = stream.peer_addr() else {
            continue;
        };
        let slot = match shard.node.connection_slots.take(peer.ip()) {
            Ok(slot) => slot,
            Err(why) => {
                shard.metrics().reject(match why {
                    NoSlot::Full => Rejection::ConnectionLimit,
                    NoSlot::AddressFull => Rejection::AddressLimit,
                });
                continue;
            }
        };
        shard.metrics().connections_accepted.add(1);
        shard.metrics().connections_open.add(1);
        let _ = stream.set_nodelay(true);
        let shard = shard.clone();
        glommio::spawn_local(async move {
            let served = match &shard.node.tls {
                None => serve_connection(stream, None, &shard).await,
                Some(tls) => match tls.accept(stream).await {
                    Ok((stream, claims)) => serve_connection(stream, Some(&claims), &shard).await,
                    Err(reason) => Err((Rejection::Handshake, reason)),
                },
            };
            if let Err((why, message)) = served {
                shard.metrics().reject(why);
                tracing::warn!(
                    "shard {}: closing connection from {peer}: {}: {message}",
                    shard.id,
                    why.as_str()
                );
            }
            shard.metrics().connections_open.sub(1);
            drop(slot);
        })
        .detach();
    }
}

type Closed = (Rejection, String);

/// Reads one connection's frames until it closes. A connection must send its next complete
/// frame within `ingest.idle_timeout` of accept or of its previous one, so that connections
/// that send nothing, or dribble a frame, cannot keep their places (and the memory their frames
/// hold) for ever; time spent waiting on the node (acks, its memory cap, the partial-frame
/// budget) does not count against it.
async fn serve_connection<S>(
    stream: S,
    claims: Option<&ClaimSet>,
    shard: &Rc<Shard>,
) -> Result<(), Closed>
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let (mut reader, mut writer) = futures_lite::io::split(stream);
    let (acks, ack_queue) = local_channel::new_unbounded::<Ack>();
    let connection = shard.new_connection(acks);
    glommio::spawn_local(async move {
        let mut frame = Vec::with_capacity(64);
        while let Some(ack) = ack_queue.recv().await {
            frame.clear();
            if encode_message(&ack, &mut frame).is_err() {
                break;
            }
            // TLS holds written bytes in its session until flushed.
            let sent = async {
                writer.write_all(&frame).await?;
                writer.flush().await
            };
            if sent.await.is_err() {
                // The exporter is gone; it resends unacked batches when it reconnects.
                break;
            }
        }
    })
    .detach();

    let config = &shard.node.config.ingest;
    let decoder = FrameDecoder::new(config.max_frame_bytes);
    let max_skew_ns = duration_nanos(shard.node.config.max_clock_skew());
    let mut hold = PartialFrameHold::new(&shard.node.partial_frames);
    let mut counted = CountedCapacity {
        counter: &shard.metrics().receive_buffer_bytes,
        bytes: 0,
    };
    let mut buffer: Vec<u8> = Vec::new();
    // A connection waits for its first frame as it does between frames: with a small read.
    let mut read_bytes = WAITING_READ_BYTES;
    let mut deadline = Instant::now() + config.idle_timeout;
    loop {
        let mut consumed = 0;
        loop {
            let decoded = decoder
                .decode(&buffer[consumed..])
                .map_err(frame_rejection)?;
            let Some((frame, used)) = decoded else { break };
            if !frame.kind.is_flow_batch() && frame.kind != FrameKind::ClockProbe {
                return Err((
                    Rejection::UnexpectedKind,
                    format!("{:?} frame on an ingest connection", frame.kind),
                ));
            }
            consumed += used;
            deadline = Instant::now() + config.idle_timeout;
            if frame.kind == FrameKind::ClockProbe {
                // Answered at once: nothing to make durable, and its round trip is the reading.
                connection.answer_now(Ack {
                    exporter: ExporterId(0),
                    sequence: CLOCK_PROBE_SEQUENCE,
                    frame_checksum: frame.checksum,
                    status: AckStatus::Accepted,
                    refused: Vec::new(),
                    collector_time: Timestamp::now(),
                    max_skew_ns,
                });
                continue;
            }
            let arrival = Timestamp::now();
            // Read to the end before waiting on anything: the shard's expansion buffer serves
            // all its connections, so nothing borrowed from it may live across an await.
            let read = read_batch(
                shard,
                &connection,
                frame,
                (decoder.payload_bytes_max(), claims),
                arrival,
                max_skew_ns,
            );
            if let Some((header, workloads, split, details)) = read {
                shard
                    .dispatch(&connection, header, workloads, split, details)
                    .await;
            }
        }
        buffer.drain(..consumed);
        if buffer.capacity() > FREE_BYTES && buffer.len() + READ_CHUNK <= FREE_BYTES {
            // A large frame is done: its memory goes back, not only its budget.
            buffer.shrink_to(FREE_BYTES);
        }
        // Past the memory cap nothing more is read, and past the partial-frame budget this
        // connection's frame grows no further: TCP pushes back on the exporter. The memory cap
        // is everyone's wait and stops the idle clock; the budget is spent by clients whose
        // frames are unfinished, and waiting for it does not (its spenders' clocks run too).
        let start = buffer.len();
        let capacity =
            receive_capacity(start, buffer.capacity(), read_bytes, config.max_frame_bytes);
        loop {
            if shard.node.memory.paused() {
                deadline = Instant::now() + config.idle_timeout;
            } else if hold.cover(capacity) {
                break;
            } else if Instant::now() >= deadline && !connection.in_flight() {
                return Err(idle(config.idle_timeout, start));
            }
            glommio::timer::sleep(WAIT_STEP).await;
        }
        buffer.reserve_exact(capacity - start);
        buffer.resize(start + read_bytes, 0);
        counted.set(buffer.capacity());
        // Between frames, a buffer larger than a waiting read's is given up if the read does
        // not come soon (however it grew: whole reads, or a large frame trickling in).
        let mut shed_at = (start == 0 && buffer.capacity() > WAITING_READ_BYTES)
            .then(|| Instant::now() + SHED_AFTER);
        let read = loop {
            let wake = shed_at.map_or(deadline, |at| at.min(deadline));
            let read = reader.read(&mut buffer[start..]);
            let timer = async {
                glommio::timer::sleep(wake.saturating_duration_since(Instant::now())).await;
                Err::<usize, _>(std::io::Error::from(std::io::ErrorKind::TimedOut))
            };
            match futures_lite::future::or(read, timer).await {
                Err(error)
                    if error.kind() == std::io::ErrorKind::TimedOut
                        && shed_at.take_if(|at| Instant::now() >= *at).is_some() =>
                {
                    // The read was dropped unfinished, so nothing landed in the buffer.
                    read_bytes = WAITING_READ_BYTES;
                    buffer = vec![0; read_bytes];
                    counted.set(buffer.capacity());
                    continue;
                }
                Err(error) if error.kind() == std::io::ErrorKind::TimedOut => {
                    if connection.in_flight() {
                        // Waiting for acks is waiting on the node.
                        deadline = Instant::now() + config.idle_timeout;
                        continue;
                    }
                    return Err(idle(config.idle_timeout, start));
                }
                read => break read.map_err(|error| (Rejection::Io, error.to_string()))?,
            }
        };
        buffer.truncate(start + read);
        if read == read_bytes {
            // More is coming: whole reads from here on.
            read_bytes = READ_CHUNK;
        }
        if read == 0 {
            return if buffer.is_empty() {
                Ok(())
            } else {
                Err((
                    Rejection::Truncated,
                    format!("stream ended {} bytes into a frame", buffer.len()),
                ))
            };
        }
    }
}

/// A connection's read buffer in `flowattr_ingest_receive_buffer_bytes`, until it closes.
struct CountedCapacity<'a> {
    counter: &'a crate::metrics::Counter,
    bytes: usize,
}

impl CountedCapacity<'_> {
    fn set(&mut self, bytes: usize) {
        self.counter.add(bytes as u64);
        self.counter.sub(self.bytes as u64);
        self.bytes = bytes;
    }
}

impl Drop for CountedCapacity<'_> {
    fn drop(&mut self) {
        self.counter.sub(self.bytes as u64);
    }
}

/// What the receive buffer must hold for the next read, of `read_bytes`: doubling as a frame
/// grows (so a large frame is not copied once per read), never past the largest frame and one
/// read.
fn receive_capacity(
    held: usize,
    capacity: usize,
    read_bytes: usize,
    max_frame_bytes: usize,
) -> usize {
    let wanted = held + read_bytes;
    if wanted <= capacity {
        return capacity;
    }
    (2 * capacity)
        .min(max_frame_bytes + flowattr_common::wire::HEADER_BYTES + READ_CHUNK)
        .max(wanted)
}

fn idle(timeout: Duration, held: usize) -> Closed {
    (
        Rejection::Idle,
        format!("no complete frame within {timeout:?} ({held} bytes of one held)"),
    )
}

fn frame_rejection(error: FrameError) -> Closed {
    let why = match error {
        FrameError::TooLarge { .. } => Rejection::TooLarge,
        _ => Rejection::Frame,
    };
    (why, error.to_string())
}
