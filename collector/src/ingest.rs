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

use std::rc::Rc;
use std::sync::atomic::Ordering;

use flowattr_common::wire::{
    Ack, AckStatus, ExporterId, Frame, FrameDecoder, FrameError, FrameKind,
    FlowBatch, PayloadError, RefusedRecord, ValidFlowBatch, encode_message, refusal_summary,
};
use flowattr_common::{Timestamp, duration_nanos};
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::channels::local_channel;
use glommio::net::TcpListener;

use crate::delay::codec::{BlockHeader, BufferedFlow};
use crate::metrics::Rejection;
use crate::shard::{AckDetails, ConnectionHandle, Dictionary, Shard, SplitBatch};
use crate::tls::ClaimSet;

/// Bytes read from a socket at a time.
const READ_CHUNK: usize = 256 << 10;

pub async fn accept_loop(listener: TcpListener, shard: Rc<Shard>) {
    loop {
        let stream = match listener.accept().await {
            Ok(stream) => stream,
            Err(error) => {
                // Out of file descriptors, mostly: back off rather than spin.
                eprintln!("flowattr-collector: shard {}: accept failed: {error}", shard.id);
                glommio::timer::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let open = shard.node.connections.fetch_add(1, Ordering::Relaxed) + 1;
        if open > shard.node.config.ingest.max_connections {
            shard.node.connections.fetch_sub(1, Ordering::Relaxed);
            shard.metrics().reject(Rejection::ConnectionLimit);
            continue;
        }
        shard.metrics().connections_accepted.add(1);
        shard.metrics().connections_open.add(1);
        let _ = stream.set_nodelay(true);
        let shard = shard.clone();
        glommio::spawn_local(async move {
            let peer = stream.peer_addr().ok();
            let served = match &shard.node.tls {
                None => serve_connection(stream, None, &shard).await,
                Some(tls) => match tls.accept(stream).await {
                    Ok((stream, claims)) => serve_connection(stream, Some(&claims), &shard).await,
                    Err(reason) => Err((Rejection::Handshake, reason)),
                },
            };
            if let Err((why, message)) = served {
                shard.metrics().reject(why);
                eprintln!(
                    "flowattr-collector: shard {}: closing connection from {}: {}: {message}",
                    shard.id,
                    peer.map_or_else(|| "?".to_owned(), |peer| peer.to_string()),
                    why.as_str()
                );
            }
            shard.metrics().connections_open.sub(1);
            shard.node.connections.fetch_sub(1, Ordering::Relaxed);
        })
        .detach();
    }
}

type Closed = (Rejection, String);

async fn serve_connection<S>(stream: S, claims: Option<&ClaimSet>, shard: &Rc<Shard>) -> Result<(), Closed>
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

    let decoder = FrameDecoder::new(shard.node.config.ingest.max_frame_bytes);
    let max_skew_ns = duration_nanos(shard.node.config.max_clock_skew());
    let mut buffer: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut chunk = vec![0u8; READ_CHUNK];
    loop {
        let mut consumed = 0;
        loop {
            let decoded = decoder.decode(&buffer[consumed..]).map_err(frame_rejection)?;
            let Some((frame, used)) = decoded else { break };
            if frame.kind != FrameKind::FlowBatch {
                return Err((
                    Rejection::UnexpectedKind,
                    format!("{:?} frame on an ingest connection", frame.kind),
                ));
            }
            consumed += used;
            let arrival = Timestamp::now();
            match ValidFlowBatch::from_frame(&frame) {
                Ok(batch) => {
                    let mut refused = Vec::new();
                    let (header, workloads, split) = split_batch(shard, &batch, arrival, claims, &mut refused);
                    let details = AckDetails {
                        frame_checksum: frame.checksum,
                        refused,
                        collector_time: arrival,
                        max_skew_ns,
                    };
                    shard.dispatch(&connection, header, workloads, split, details).await;
                }
                Err(error) => refuse_batch(shard, &connection, &frame, arrival, max_skew_ns, &error),
            }
        }
        buffer.drain(..consumed);
        // Past the memory cap nothing more is read: TCP pushes back on the exporter.
        while shard.node.memory.paused() {
            glommio::timer::sleep(crate::memory::SAMPLE_PERIOD).await;
        }
        let read = reader
            .read(&mut chunk)
            .await
            .map_err(|error| (Rejection::Io, error.to_string()))?;
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
        buffer.extend_from_slice(&chunk[..read]);
    }
}

fn frame_rejection(error: FrameError) -> Closed {
    let why = match error {
        FrameError::TooLarge { .. } => Rejection::TooLarge,
        _ => Rejection::Frame,
    };
    (why, error.to_string())
}

/// Answers a batch whose content cannot be stored at all. Its exporter and sequence are read
/// only if the archive itself is valid; the frame checksum names it either way.
fn refuse_batch(
    shard: &Shard,
    connection: &ConnectionHandle,
    frame: &Frame<'_>,
    arrival: Timestamp,
    max_skew_ns: u64,
    error: &PayloadError,
) {
    let (exporter, sequence) = frame
        .access::<FlowBatch>()
        .map_or((0, 0), |batch| (batch.exporter.0.to_native(), batch.sequence.to_native()));
    shard.metrics().reject(Rejection::Payload);
    shard.metrics().batches_refused.add(1);
    eprintln!(
        "flowattr-collector: shard {}: refused batch {sequence} of exporter {exporter}: {error}",
        shard.id
    );
    connection.answer_now(Ack {
        exporter: ExporterId(exporter),
        sequence,
        frame_checksum: frame.checksum,
        status: AckStatus::Refused(error.batch_refusal()),
        refused: Vec::new(),
        collector_time: arrival,
        max_skew_ns,
    });
}

/// Copies the admitted records of a validated batch out of the receive buffer, split by
/// destination shard; the others go to `refused`, counted for their exporter.
fn split_batch(
    shard: &Shard,
    batch: &ValidFlowBatch<'_>,
    arrival: Timestamp,
    claims: Option<&ClaimSet>,
    refused: &mut Vec<RefusedRecord>,
) -> (BlockHeader, Dictionary, SplitBatch) {
    let header = BlockHeader {
        exporter: batch.exporter.0.to_native(),
        sequence: batch.sequence.to_native(),
        arrival,
    };
    let workloads: Dictionary = batch
        .workloads
        .iter()
        .map(|name| Box::from(name.as_str()))
        .collect();
    let mut split = SplitBatch::new(shard.router.shards());
    // The shard's one gate: the executor runs one connection's batch at a time, and its scratch
    // table is bounded by one batch, however many connections there are.
    let regions = shard.node.forwarding.as_ref().map(|forwarding| &forwarding.table);
    shard.gate.borrow_mut().check_batch(batch, arrival, claims, refused, |index, record| {
        let flow = BufferedFlow::from_wire(record, index);
        match regions.and_then(|table| table.elsewhere(flow.remote_ip)) {
            Some(region) => split.add_forwarded(&shard.router, header.exporter, region, flow),
            None => split.add(&shard.router, header.exporter, flow),
        }
    });
    if !refused.is_empty() {
        shard.metrics().records_refused.add(header.exporter, refused);
        eprintln!(
            "flowattr-collector: shard {}: refused {} of the {} records of batch {} of exporter {} ({})",
            shard.id,
            refused.len(),
            batch.flows.len(),
            header.sequence,
            header.exporter,
            refusal_summary(refused)
        );
    }
    (header, workloads, split)
}

