//! One thread per destination region: sends its spool's parts, oldest first, to one of the
//! region's collectors (the next in its list after each failure, names resolved at every
//! connect), and removes each part only once it is acked.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use flowattr_common::backoff::Backoff;
use flowattr_common::client::{ClientError, CollectorConnection};
use flowattr_common::collector_address::{CollectorAddresses, Failover};
use flowattr_common::dead_letter::DeadLetters;
use flowattr_common::tls::ClientTls;
use flowattr_common::wire::{Ack, AckStatus, FrameDecoder, ValidFlowBatch, refusal_summary};

use super::{ForwardSpool, ForwardStatus, Forwarding};

/// What the records another region refused one by one may take on disk, per region.
const DEAD_LETTER_BYTES_MAX: u64 = 256 << 20;

/// Starts the forwarding threads of every region but this node's own.
/// `tls`: this node's client side of mutual TLS, when `[tls]` is configured.
pub fn start_forwarders(
    forwarding: &Forwarding,
    own: Option<&str>,
    tls: Option<ClientTls>,
) -> std::io::Result<()> {
    for (region, spool) in forwarding.table.regions().iter().zip(&forwarding.spools) {
        if Some(region.name.as_str()) == own {
            continue;
        }
        let Ok(collectors) = CollectorAddresses::new(region.collectors.clone()) else {
            // The config's check refuses a region to forward to without collectors.
            continue;
        };
        let spool = spool.clone();
        let status = forwarding.status.clone();
        let name = region.name.clone();
        let tls = tls.clone();
        std::thread::Builder::new()
            .name(format!("flowattr-forward-{name}"))
            .spawn(move || {
                run(
                    &name,
                    Failover::new(collectors),
                    &spool,
                    &status,
                    tls.as_ref(),
                )
            })?;
    }
    Ok(())
}

fn run(
    region: &str,
    mut collectors: Failover,
    spool: &ForwardSpool,
    status: &ForwardStatus,
    tls: Option<&ClientTls>,
) {
    let mut dead_letters = loop {
        match DeadLetters::open(&spool.dead_letter_dir(), DEAD_LETTER_BYTES_MAX) {
            Ok(dead_letters) => break dead_letters,
            // Nothing is forwarded (so nothing refused is lost) until it can be kept.
            Err(error) => {
                tracing::warn!("forwarding to region {region}: {error}; retrying in 10 s");
                std::thread::sleep(Duration::from_secs(10));
            }
        }
    };
    let mut connection: Option<CollectorConnection> = None;
    let mut backoff = Backoff::default();
    loop {
        let pending = spool.pending().unwrap_or_default();
        if pending.is_empty() {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        for path in pending {
            let sent = (|| {
                if connection.is_none() {
                    connection = Some(CollectorConnection::connect_to(
                        collectors.current(),
                        Duration::from_secs(10),
                        tls,
                    )?);
                }
                send(connection.as_mut().expect("connected above"), &path)
            })();
            match sent {
                Ok(Some(Answered { ack, flows, frame })) => {
                    backoff.reset();
                    if matches!(ack.status, AckStatus::Refused(_)) {
                        status.batches_refused.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(
                            "region {region} refused {} ({:?}); set aside",
                            path.display(),
                            ack.status
                        );
                        let _ = spool.set_aside(&path);
                        continue;
                    }
                    if !ack.refused.is_empty() {
                        keep_refused(region, &path, &frame, &ack, &mut dead_letters, status);
                    }
                    status.batches_forwarded.fetch_add(1, Ordering::Relaxed);
                    // Saturating: the count of refusals is the other region's word, not ours.
                    status.flows_forwarded.fetch_add(
                        flows.saturating_sub(ack.refused.len() as u64),
                        Ordering::Relaxed,
                    );
                    let _ = std::fs::remove_file(&path);
                }
                // Unreadable on our own disk: nothing to send, never acked by anyone else.
                Ok(None) => {
                    let _ = spool.set_aside(&path);
                }
                Err(error) => {
                    status.send_failures.fetch_add(1, Ordering::Relaxed);
                    let wait = backoff.next_wait();
                    let failed = collectors.current().clone();
                    collectors.failed();
                    tracing::warn!(
                        "forwarding to region {region} at {failed}: {error}; retrying in {wait:?} with {}",
                        collectors.current()
                    );
                    connection = None;
                    std::thread::sleep(wait);
                    break;
                }
            }
        }
    }
}

/// The records of an acked part that the other region refused (its rules on clock skew,
/// retention or claims are narrower than this region's): kept as dead letters, counted apart
/// from the forwarded ones, and said in the log. Never silently gone.
fn keep_refused(
    region: &str,
    path: &Path,
    frame: &[u8],
    ack: &Ack,
    dead_letters: &mut DeadLetters,
    status: &ForwardStatus,
) {
    let refused = ack.refused.len() as u64;
    status.records_refused.fetch_add(refused, Ordering::Relaxed);
    let reasons = refusal_summary(&ack.refused);
    match dead_letters.keep_records(frame, &ack.refused) {
        Ok(()) => tracing::warn!(
            "region {region} refused {refused} records of {} ({reasons}); kept in {}",
            path.display(),
            dead_letters.dir().display()
        ),
        Err(error) => {
            status
                .dead_letter_dropped
                .fetch_add(refused, Ordering::Relaxed);
            tracing::error!("region {region} refused {refused} records ({reasons}); {error}");
        }
    }
}

/// An acked part: the ack, how many flows the part held, and its frame.
struct Answered {
    ack: Ack,
    flows: u64,
    frame: Vec<u8>,
}

/// Sends one spooled part and waits for its ack, or None if the file is not a whole batch
/// frame.
fn send(
    connection: &mut CollectorConnection,
    path: &Path,
) -> Result<Option<Answered>, ClientError> {
    let frame = std::fs::read(path)?;
    let (exporter, sequence, flows) = {
        let Ok(Some((decoded, _))) = FrameDecoder::default().decode(&frame) else {
            return Ok(None);
        };
        let Ok(batch) = ValidFlowBatch::from_frame(&decoded) else {
            return Ok(None);
        };
        (
            batch.exporter.0.to_native(),
            batch.sequence.to_native(),
            batch.flows.len() as u64,
        )
    };
    connection.send_raw(&frame)?;
    loop {
        let ack = connection.recv_ack()?;
        if ack.exporter.0 == exporter && ack.sequence == sequence {
            return Ok(Some(Answered { ack, flows, frame }));
        }
    }
}
