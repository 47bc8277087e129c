//! The shipping side of the agent: send the oldest queued batch, wait for its answer, act on
//! it, and back off while the collector is away. An answer is never a reason to stop the
//! queue: a batch refused whole goes to the dead-letter directory and the next is sent; records
//! refused one by one go there too while the rest of their batch counts as delivered.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use flowattr_common::Timestamp;
use flowattr_common::backoff::Backoff;
use flowattr_common::client::{ClientError, CollectorConnection};
use flowattr_common::collector_address::{CollectorAddress, Failover};
use flowattr_common::dead_letter::DeadLetters;
use flowattr_common::tls::ClientTls;
use flowattr_common::wire::{Ack, AckStatus, checksum_of, refusal_summary};
use flowattr_exporter::clock::{ClockCheck, ClockEstimate, ClockOffset};
use flowattr_exporter::spool::{Queued, Spool};

use crate::counters::AgentCounters;

/// What the agent's cut and the shipper share: the queue the cut fills and the shipper drains,
/// and the clock estimate the shipper's acks fill and the cut reads.
pub(crate) struct Shared {
    pub(crate) spool: Mutex<Spool>,
    /// Filled from acks by the shipper, read at each cut.
    pub(crate) clock: Mutex<ClockEstimate>,
    pub(crate) queued: Condvar,
    pub(crate) stop: AtomicBool,
    pub(crate) counters: Arc<AgentCounters>,
}

/// Sends queued batches oldest first, each until answered; reconnects with exponential backoff
/// (100 ms doubling to 10 s, jittered) while the collector is unreachable, to the next of the
/// collectors after each failure. With `once`, returns when the queue is empty and the capture
/// side has stopped.
pub(crate) fn ship(
    mut collectors: Failover,
    tls: Option<&ClientTls>,
    shared: &Shared,
    once: bool,
    dead_letters: &mut DeadLetters,
) {
    let mut backoff = Backoff::default();
    let mut clock_was_healthy = true;
    // Connected (and the clock probed) before the first cut, so that the first batch carries
    // a clock reading too; if the collector is away, that batch goes without.
    let mut connection = connect(collectors.current(), tls, shared).ok();
    loop {
        let Some(front) = next_batch(shared) else {
            return;
        };
        if shared.stop.load(Ordering::Relaxed) && !once {
            // Stopping: what is queued stays in the spool for the next run.
            return;
        }
        let sent = Timestamp::now();
        match send(collectors.current(), tls, shared, &mut connection, &front) {
            Ok(ack) => {
                backoff.reset();
                let check = ClockCheck::from_ack(
                    sent,
                    Timestamp::now(),
                    ack.collector_time,
                    ack.max_skew_ns,
                );
                record_clock(shared, check, ack.max_skew_ns, &mut clock_was_healthy);
                shared
                    .clock
                    .lock()
                    .expect("not poisoned")
                    .record(&check, ClockOffset::monotonic_now());
                answered(shared, &front, &ack, dead_letters);
                shared
                    .spool
                    .lock()
                    .expect("not poisoned")
                    .acked(front.sequence);
            }
            Err(error) => {
                shared
                    .counters
                    .send_failures
                    .fetch_add(1, Ordering::Relaxed);
                let wait = backoff.next_wait();
                let failed = collectors.current().clone();
                collectors.failed();
                tracing::warn!(
                    "sending batch {} to {failed}: {error}; retrying in {wait:?} with {}",
                    front.sequence,
                    collectors.current()
                );
                connection = None;
                std::thread::sleep(wait);
                if shared.stop.load(Ordering::Relaxed) && !once {
                    return;
                }
            }
        }
    }
}

/// The oldest queued batch, waiting for one; None once the queue is empty and capture stopped.
fn next_batch(shared: &Shared) -> Option<Queued> {
    let mut spool = shared.spool.lock().expect("not poisoned");
    loop {
        while spool.is_empty() && !shared.stop.load(Ordering::Relaxed) {
            spool = shared
                .queued
                .wait_timeout(spool, Duration::from_millis(200))
                .expect("not poisoned")
                .0;
        }
        let front = spool.front();
        spool.log_problems();
        match front {
            Some(front) => return Some(front),
            // Empty because the spool dropped what it could not read: wait for more.
            None if !shared.stop.load(Ordering::Relaxed) => continue,
            None => return None,
        }
    }
}

/// Sends `front` and waits for its answer: the ack naming its sequence, or a refusal naming
/// its frame (a refused batch's sequence may be unreadable to the collector).
fn send(
    collector: &CollectorAddress,
    tls: Option<&ClientTls>,
    shared: &Shared,
    connection: &mut Option<CollectorConnection>,
    front: &Queued,
) -> Result<Ack, ClientError> {
    if connection
        .as_ref()
        .is_some_and(CollectorConnection::closed_by_peer)
    {
        // Closed between batches by the collector's idle timeout: a new one, without a failure.
        *connection = None;
    }
    if connection.is_none() {
        *connection = Some(connect(collector, tls, shared)?);
    }
    let live = connection.as_mut().expect("connected above");
    live.send_raw(&front.frame)?;
    let checksum = checksum_of(&front.frame);
    loop {
        let ack = live.recv_ack()?;
        let refused = matches!(ack.status, AckStatus::Refused(_));
        if ack.sequence == front.sequence || (refused && Some(ack.frame_checksum) == checksum) {
            return Ok(ack);
        }
    }
}

/// A new connection, whose first exchange reads the collector's clock for the batches cut next.
fn connect(
    collector: &CollectorAddress,
    tls: Option<&ClientTls>,
    shared: &Shared,
) -> Result<CollectorConnection, ClientError> {
    let mut connection = CollectorConnection::connect_to(collector, Duration::from_secs(10), tls)?;
    let (sent, received, answer) = connection.probe_clock()?;
    let check = ClockCheck::from_ack(sent, received, answer.collector_time, answer.max_skew_ns);
    shared
        .clock
        .lock()
        .expect("not poisoned")
        .record(&check, ClockOffset::monotonic_now());
    Ok(connection)
}

/// Acts on the collector's answer to `front`: counts it, and keeps what it refused.
fn answered(shared: &Shared, front: &Queued, ack: &Ack, dead_letters: &mut DeadLetters) {
    let counters = &shared.counters;
    let kept = match ack.status {
        AckStatus::Accepted | AckStatus::Duplicate => {
            counters.batches_acked.fetch_add(1, Ordering::Relaxed);
            if ack.refused.is_empty() {
                return;
            }
            counters
                .flows_refused
                .fetch_add(ack.refused.len() as u64, Ordering::Relaxed);
            tracing::warn!(
                "the collector refused {} of the {} flows of batch {} ({}); they are kept in the dead-letter directory",
                ack.refused.len(),
                front.flows,
                front.sequence,
                refusal_summary(&ack.refused)
            );
            dead_letters.keep_records(&front.frame, &ack.refused)
        }
        AckStatus::Refused(refusal) => {
            counters.batches_refused.fetch_add(1, Ordering::Relaxed);
            counters
                .flows_refused
                .fetch_add(front.flows, Ordering::Relaxed);
            tracing::warn!(
                "the collector refused batch {} whole ({}, {} flows); it is kept in the dead-letter directory and the next batch goes on",
                front.sequence,
                refusal.as_str(),
                front.flows
            );
            dead_letters
                .keep_batch(front.sequence, refusal, &front.frame)
                .map(|_| ())
        }
    };
    if let Err(error) = kept {
        counters.dead_letter_dropped.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("{error}");
    }
    counters
        .dead_letter_bytes
        .store(dead_letters.bytes(), Ordering::Relaxed);
}

fn record_clock(shared: &Shared, check: ClockCheck, max_skew_ns: u64, was_healthy: &mut bool) {
    let counters = &shared.counters;
    counters
        .clock_offset_ns
        .store(check.offset_ns, Ordering::Relaxed);
    counters
        .clock_uncertainty_ns
        .store(check.uncertainty_ns, Ordering::Relaxed);
    counters
        .clock_max_skew_ns
        .store(max_skew_ns, Ordering::Relaxed);
    counters
        .clock_healthy
        .store(check.healthy, Ordering::Relaxed);
    counters.clock_checked.store(true, Ordering::Relaxed);
    if check.healthy != *was_healthy {
        if check.healthy {
            tracing::info!("this host's clock agrees with the collector's again");
        } else {
            tracing::warn!(
                "this host's clock is {:.3} s {} the collector's (allowed: {:.3} s): the collector corrects its flows' times by the offset each batch carries, and refuses them when it cannot; fix the host's time sync",
                check.offset_ns.unsigned_abs() as f64 / 1e9,
                if check.offset_ns > 0 {
                    "ahead of"
                } else {
                    "behind"
                },
                max_skew_ns as f64 / 1e9
            );
        }
        *was_healthy = check.healthy;
    }
}
