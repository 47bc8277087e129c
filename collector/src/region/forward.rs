//! One thread per destination region: sends its spool's parts, oldest first, to the first of
//! the region's collectors that answers, and removes each part only once it is acked.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use flowattr_common::client::{ClientError, CollectorConnection};
use flowattr_common::tls::ClientTls;
use flowattr_common::wire::{AckStatus, FrameDecoder, ValidFlowBatch};

use super::{ForwardSpool, ForwardStatus, Forwarding};

/// Starts the forwarding threads of every region but this node's own.
/// `tls`: this node's client side of mutual TLS, when `[tls]` is configured.
pub fn start_forwarders(forwarding: &Forwarding, own: Option<&str>, tls: Option<ClientTls>) -> std::io::Result<()> {
    for (region, spool) in forwarding.table.regions().iter().zip(&forwarding.spools) {
        if Some(region.name.as_str()) == own {
            continue;
        }
        let collectors = region.collectors.clone();
        let spool = spool.clone();
        let status = forwarding.status.clone();
        let name = region.name.clone();
        let tls = tls.clone();
        std::thread::Builder::new()
            .name(format!("flowattr-forward-{name}"))
            .spawn(move || run(&name, &collectors, &spool, &status, tls.as_ref()))?;
    }
    Ok(())
}

fn run(region: &str, collectors: &[std::net::SocketAddr], spool: &ForwardSpool, status: &ForwardStatus, tls: Option<&ClientTls>) {
    let mut connection: Option<CollectorConnection> = None;
    let mut next_collector = 0;
    let mut backoff = Duration::from_millis(100);
    loop {
        let pending = spool.pending().unwrap_or_default();
        if pending.is_empty() {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        for path in pending {
            let sent = (|| {
                if connection.is_none() {
                    let collector = collectors[next_collector % collectors.len()];
                    connection = Some(CollectorConnection::connect_with(collector, Duration::from_secs(10), tls)?);
                }
                send(connection.as_mut().expect("connected above"), &path)
            })();
            match sent {
                Ok(Some((status_of, flows))) => {
                    backoff = Duration::from_millis(100);
                    if matches!(status_of, AckStatus::Refused(_)) {
                        status.batches_refused.fetch_add(1, Ordering::Relaxed);
                        eprintln!("flowattr-collector: region {region} refused {} ({status_of:?}); set aside", path.display());
                        let _ = spool.set_aside(&path);
                    } else {
                        status.batches_forwarded.fetch_add(1, Ordering::Relaxed);
                        status.flows_forwarded.fetch_add(flows, Ordering::Relaxed);
                        let _ = std::fs::remove_file(&path);
                    }
                }
                // Unreadable on our own disk: nothing to send, never acked by anyone else.
                Ok(None) => {
                    let _ = spool.set_aside(&path);
                }
                Err(error) => {
                    status.send_failures.fetch_add(1, Ordering::Relaxed);
                    eprintln!("flowattr-collector: forwarding to region {region}: {error}; retrying in {backoff:?} with its next collector");
                    connection = None;
                    next_collector += 1;
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    break;
                }
            }
        }
    }
}

/// Sends one spooled part and waits for its ack: (status, flows), or None if the file is not a
/// whole batch frame.
fn send(connection: &mut CollectorConnection, path: &Path) -> Result<Option<(AckStatus, u64)>, ClientError> {
    let frame = std::fs::read(path)?;
    let (exporter, sequence, flows) = {
        let Ok(Some((decoded, _))) = FrameDecoder::default().decode(&frame) else { return Ok(None) };
        let Ok(batch) = ValidFlowBatch::from_frame(&decoded) else { return Ok(None) };
        (batch.exporter.0.to_native(), batch.sequence.to_native(), batch.flows.len() as u64)
    };
    connection.send_raw(&frame)?;
    loop {
        let ack = connection.recv_ack()?;
        if ack.exporter.0 == exporter && ack.sequence == sequence {
            return Ok(Some((ack.status, flows)));
        }
    }
}

