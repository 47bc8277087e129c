//! The agent's loop: capture on one thread (drain the ring buffer continuously, cut a batch
//! every interval), ship on another (`ship.rs`: send the oldest queued batch, act on its answer,
//! back off and retry while the collector is away). The queue between them is the [`Spool`];
//! the interval being gathered is kept in the [`IntervalJournal`] until it is cut, so a killed
//! agent loses no flow it counted as captured.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use flowattr_common::collector_address::{CollectorAddresses, Failover};
use flowattr_common::kernel::{FlowEvent, OpenSocket};
use flowattr_common::tls::ClientTls;
use flowattr_common::wire::{
    self as wire, BATCH_FLOWS_MAX, ExporterId, FlowBatch, FrameCompressor, MeasuredFlowBatch,
    encode_message,
};
use flowattr_common::{FlowState, Timestamp};

use flowattr_common::dead_letter::{DeadLetters, flow_json};
use flowattr_exporter::capture::Capture;
use flowattr_exporter::clock::{ClockEstimate, ClockOffset};
use flowattr_exporter::config::WireCompression;
use flowattr_exporter::journal::{self, IntervalJournal};
use flowattr_exporter::platform::map_sync::MapSync;
use flowattr_exporter::platform::{PlatformIdentity, WatcherSettings};
use flowattr_exporter::registration::ExporterDirs;
use flowattr_exporter::registry::WorkloadNames;
use flowattr_exporter::spool::{Queued, Spool};

use crate::batch::BatchBuilder;
pub use crate::counters::AgentCounters;
use crate::reported::ReportedCounters;
use crate::ship::Shared;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// None: capture only (`--dump`).
    pub collector: Option<CollectorAddresses>,
    /// Mutual TLS with the collector; None: plain TCP.
    pub tls: Option<ClientTls>,
    pub interval: Duration,
    pub exporter: ExporterId,
    pub region: String,
    /// This host's name, carried by every batch.
    pub host_name: String,
    /// A file holding the workload name of the whole host, reread every interval.
    pub host_identity: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub pin_dir: PathBuf,
    pub memory_batches: usize,
    pub spool_batches: usize,
    pub wire_compression: WireCompression,
    /// Print every captured flow as a JSON line.
    pub dump: bool,
    /// Stop after the first interval's batch is shipped (or, without a collector, cut).
    pub once: bool,
    /// Workload names from the host's container runtime.
    pub identity: Option<WatcherSettings>,
}

/// Bytes the dead-letter directory may hold.
const DEAD_LETTER_BYTES_MAX: u64 = 64 << 20;

/// How long a due cut waits for the runtime watcher to have read the runtime's events through
/// it, and how often it looks.
const CUT_WAIT: Duration = Duration::from_secs(2);
const CUT_WAIT_STEP: Duration = Duration::from_millis(20);

/// The host's workload name from its identity file: None if there is no file or it is empty;
/// an error if the name breaks the name rule (the collector would refuse every flow it tags).
fn host_workload(path: Option<&Path>) -> Result<Option<String>, String> {
    let Some(path) = path else { return Ok(None) };
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(None);
    };
    let name = text.trim();
    if name.is_empty() {
        return Ok(None);
    }
    flowattr_common::check_workload_name(name)
        .map_err(|problem| format!("host identity file {}: the name {problem}", path.display()))?;
    Ok(Some(name.to_owned()))
}

fn local_name<'a>(
    socket: &OpenSocket,
    names: &'a WorkloadNames,
    host: Option<&'a str>,
) -> Option<&'a str> {
    if socket.workload.get() != 0
        && let Some(name) = names.name(socket.workload)
    {
        return Some(name);
    }
    host
}

/// How often the ring buffer is drained. The program does not wake the agent per event (see
/// exporter-ebpf), only once a quarter of the ring waits: this period is what keeps events
/// moving at ordinary rates.
const DRAIN_PERIOD: Duration = Duration::from_millis(100);

/// Runs the agent until `stop` is set (or after one interval with `once`).
pub fn run(
    config: AgentConfig,
    stop: Arc<AtomicBool>,
    counters: Arc<AgentCounters>,
) -> anyhow::Result<()> {
    // Everything the agent needs is loaded before it says it is ready: a damaged registry is
    // reported here, with its line, and not after the ready line.
    let mut names = WorkloadNames::load(&config.state_dir)?;
    let mut host = host_workload(config.host_identity.as_deref()).map_err(anyhow::Error::msg)?;
    let spool = Spool::open(
        &config.state_dir.join("spool"),
        config.memory_batches,
        config.spool_batches,
    )?;
    let dead_letters =
        DeadLetters::open(&config.state_dir.join("dead-letter"), DEAD_LETTER_BYTES_MAX)?;
    let saved = saved_sequence(&config.state_dir)?;
    let mut sequence = next_sequence(saved, spool.highest_sequence());
    let mut builder = BatchBuilder::new();
    let mut journal = match config.collector {
        Some(_) => resume_interval(
            &config,
            saved,
            spool.highest_sequence(),
            sequence,
            &mut builder,
        ),
        None => None,
    };
    let mut capture = Capture::start(&config.pin_dir)?;
    if let Some(problem) = &capture.refresh_unavailable {
        tracing::warn!(
            "open connections are reported with their handshake's round trip and no counters: the program that reads them could not be loaded ({problem})"
        );
    }
    if !capture.discovered.missing_counters.is_empty() {
        tracing::warn!(
            "this kernel's tcp_sock lacks {:?}; those counters read 0",
            capture.discovered.missing_counters
        );
    }
    let identity = match &config.identity {
        Some(settings) => {
            // After the capture pinned its maps: the watcher writes them.
            let dirs = ExporterDirs {
                pin_dir: config.pin_dir.clone(),
                state_dir: config.state_dir.clone(),
            };
            let maps = MapSync::open(&dirs)?;
            let identity = PlatformIdentity::start(settings.clone(), maps, stop.clone())?;
            let _ = counters.identity.set(identity.clone());
            Some(identity)
        }
        None => None,
    };
    // One line on stderr once the program is attached: scripts and tests wait for it.
    flowattr_common::logging::announce(&format!(
        "flowattr-exporter ready: exporter {} collector {} interval {:?}",
        config.exporter.0,
        config
            .collector
            .as_ref()
            .map_or_else(|| "none".to_owned(), ToString::to_string),
        config.interval
    ));
    let shared = Arc::new(Shared {
        spool: Mutex::new(spool),
        clock: Mutex::new(ClockEstimate::default()),
        queued: Condvar::new(),
        stop: AtomicBool::new(false),
        counters,
    });
    shared
        .counters
        .dead_letter_bytes
        .store(dead_letters.bytes(), Ordering::Relaxed);
    let shipper = config.collector.clone().map(|collectors| {
        let shared = shared.clone();
        let once = config.once;
        let tls = config.tls.clone();
        let mut dead_letters = dead_letters;
        std::thread::Builder::new()
            .name("flowattr-ship".into())
            .spawn(move || {
                crate::ship::ship(
                    Failover::new(collectors),
                    tls.as_ref(),
                    &shared,
                    once,
                    &mut dead_letters,
                )
            })
            .expect("spawning the shipper thread")
    });

    // One context for every batch: the spool and every retry send the bytes encoded here.
    let mut compressor = match config.wire_compression {
        WireCompression::Zstd => Some(FrameCompressor::new(wire::COMPRESSION_LEVEL)?),
        WireCompression::None => None,
    };
    // Flows of `builder` already in the journal (and counted as captured).
    let mut journaled = builder.flows.len();
    let mut journal_problem = None;
    let mut next_cut = Instant::now() + config.interval;
    let mut offset = ClockOffset::measure();
    let mut events = Vec::new();
    let mut reported = ReportedCounters::default();
    let mut names_problem = None;
    let mut host_problem = None;
    let mut refresh_problem: Option<String> = None;
    // Since when (and which wall-clock instant) a due cut waits for the runtime watcher.
    let mut cut_waiting: Option<(Instant, Timestamp)> = None;
    loop {
        let counters = &shared.counters;
        let timeout = match cut_waiting {
            Some(_) => CUT_WAIT_STEP,
            None => next_cut
                .saturating_duration_since(Instant::now())
                .min(DRAIN_PERIOD),
        };
        events.clear();
        capture.drain(timeout, |event: FlowEvent| events.push(event));
        let unnamed = |event: &FlowEvent| {
            event.socket.workload.get() != 0 && names.name(event.socket.workload).is_none()
        };
        if events.iter().any(unnamed) {
            // Registered since the names were last read: read them again, once per drain.
            names = reload_names(&config.state_dir, names, &mut names_problem);
        }
        for event in &events {
            let socket = event.socket;
            if socket.local_port == 0 || socket.remote_port == 0 {
                // Closed before the handshake gave it both ports: no flow to report.
                counters.flows_incomplete.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let name = local_name(&socket, &names, host.as_deref());
            if name.is_none() {
                counters
                    .flows_unknown_workload
                    .fetch_add(1, Ordering::Relaxed);
            }
            builder.add(
                &socket,
                offset.wall(socket.start_ns),
                offset.wall(event.end_ns),
                reported.closed(&socket),
                FlowState::Closed,
                name,
            );
        }
        if builder.flows.len() > journaled {
            if let Some(journal) = journal.as_mut() {
                let appended =
                    journal.append(sequence, &builder.workloads, builder.since(journaled));
                report_journal(
                    appended.and_then(|()| journal.sync_if_due()),
                    &mut journal_problem,
                );
            }
            counters
                .flows_captured
                .fetch_add((builder.flows.len() - journaled) as u64, Ordering::Relaxed);
            journaled = builder.flows.len();
        } else if let Some(journal) = journal.as_mut() {
            report_journal(journal.sync_if_due(), &mut journal_problem);
        }
        let stopping = stop.load(Ordering::Relaxed);
        if Instant::now() < next_cut && !stopping {
            continue;
        }
        // With a runtime watcher, the instant the cut fell due: open connections are reported
        // as open then, an instant the watcher's history reaches.
        let mut due = None;
        if let Some(identity) = &identity
            && !stopping
        {
            // The history must be complete through the cut before it names the batch; a
            // runtime that does not answer by CUT_WAIT leaves the latest flows unnamed.
            let (since, at) =
                *cut_waiting.get_or_insert_with(|| (Instant::now(), Timestamp::now()));
            if identity.known_through().is_none_or(|through| through < at) {
                if since.elapsed() < CUT_WAIT {
                    continue;
                }
                identity
                    .status
                    .cuts_unconfirmed
                    .fetch_add(1, Ordering::Relaxed);
            }
            due = Some(at);
        }
        cut_waiting = None;
        next_cut += config.interval;
        // Keep the clock offset and the names fresh, then report open sockets as open flows
        // (so idle long-lived connections keep heartbeating their local IP).
        offset = ClockOffset::measure();
        names = reload_names(&config.state_dir, names, &mut names_problem);
        match host_workload(config.host_identity.as_deref()) {
            Ok(name) => {
                host = name;
                host_problem = None;
            }
            // Keep the name read before: flows stay tagged, and the collector accepts them.
            Err(problem) => {
                if host_problem.as_ref() != Some(&problem) {
                    tracing::warn!("keeping the host identity read before: {problem}");
                    host_problem = Some(problem);
                }
            }
        }
        let now = due.unwrap_or_else(|| offset.wall(ClockOffset::monotonic_now()));
        // A connect still waiting for its answer is not among them: it is reported once
        // established, or at its close. Without a refresh they are reported as last read.
        let refreshed = capture
            .refresh_open_sockets()
            .map_err(|error| error.to_string());
        if refreshed.as_ref().err() != refresh_problem.as_ref() {
            if let Err(problem) = &refreshed {
                tracing::warn!(
                    "open connections are reported with the round trip and counters last read: refreshing them failed: {problem}"
                );
            }
            refresh_problem = refreshed.err();
        }
        let open = capture.open_sockets()?;
        counters
            .open_sockets_gone
            .store(open.gone as u64, Ordering::Relaxed);
        for socket in &open.alive {
            let name = local_name(socket, &names, host.as_deref());
            builder.add(
                socket,
                offset.wall(socket.start_ns),
                now,
                reported.open(socket),
                FlowState::Open,
                name,
            );
        }
        reported.end_cut();
        counters.read_capture(&capture);
        // Flows that closed after the instant the runtime's history is known through wait for
        // the next cut, named then, rather than leave unnamed: only while the watcher keeps up
        // (it reached the due instant), so they wait one interval at most.
        let mut carried = Vec::new();
        if let Some(identity) = &identity {
            if let (Some(due), Some(through)) = (due, identity.known_through())
                && through >= due
            {
                carried = builder.take_closed_after(through);
            }
            builder.name_from_runtime(identity);
        }
        let mut next = BatchBuilder::new();
        for (record, round_trip, name) in carried {
            next.add_record(record, round_trip, name.as_deref());
        }
        let batch = std::mem::replace(&mut builder, next);
        if !builder.flows.is_empty()
            && let Some(journal) = journal.as_mut()
        {
            // Journaled under the next batch's sequence before this one's is saved as cut: a
            // crash anywhere from here on recovers them with the next interval.
            let next_sequence = sequence + batch.flows.chunks(BATCH_FLOWS_MAX).len() as u64;
            report_journal(
                journal.append(next_sequence, &builder.workloads, builder.since(0)),
                &mut journal_problem,
            );
        }
        // The spool stays locked until the next sequence is saved, so the shipper cannot see a
        // batch acked (and its file removed) before the save: after a crash anywhere in here,
        // the journal's frames are recognised as cut (in the spool, or below the saved
        // sequence) and never sent twice.
        let clock = shared
            .clock
            .lock()
            .expect("not poisoned")
            .best(ClockOffset::monotonic_now());
        let mut spool = shared.spool.lock().expect("not poisoned");
        for (chunk, round_trips) in journal::chunks(&batch.flows, &batch.round_trips) {
            let measured = MeasuredFlowBatch {
                host: Some(config.host_name.clone()),
                clock,
                batch: FlowBatch {
                    exporter: config.exporter,
                    sequence,
                    region: config.region.clone(),
                    workloads: batch.workloads.clone(),
                    flows: chunk.to_vec(),
                },
                round_trips: round_trips.to_vec(),
            };
            if config.dump {
                dump(&measured);
            }
            if config.collector.is_some() {
                let mut frame = Vec::new();
                // Encoded once: a retry sends the same bytes, reading included.
                match compressor.as_mut() {
                    Some(compressor) => compressor.encode_batch(&measured, &mut frame)?,
                    None => encode_message(&measured, &mut frame)?,
                }
                spool.push(Queued {
                    sequence,
                    flows: chunk.len() as u64,
                    frame,
                });
                spool.log_problems();
            }
            sequence += 1;
        }
        counters
            .spool_batches
            .store(spool.len() as u64, Ordering::Relaxed);
        counters
            .batches_dropped
            .store(spool.dropped_batches, Ordering::Relaxed);
        counters
            .flows_dropped
            .store(spool.dropped_flows, Ordering::Relaxed);
        if let Err(error) = save_sequence(&config.state_dir, sequence) {
            // Capture goes on; only a restart before the next successful save could reuse a
            // sequence (and the collector would take those batches for retries), or send this
            // interval's flows again from the journal.
            tracing::error!("saving the next sequence number: {error}");
        }
        drop(spool);
        shared.queued.notify_all();
        if let Some(journal) = journal.as_mut() {
            let restarted = if builder.flows.is_empty() {
                journal.reset()
            } else {
                journal.restart(sequence, &builder.workloads, builder.since(0))
            };
            report_journal(restarted, &mut journal_problem);
        }
        journaled = builder.flows.len();
        if config.once || stopping {
            break;
        }
    }
    shared.stop.store(true, Ordering::Relaxed);
    shared.queued.notify_all();
    if let Some(shipper) = shipper {
        let _ = shipper.join();
    }
    let mut spool = shared.spool.lock().expect("not poisoned");
    if let Err(error) = spool.persist() {
        tracing::error!("keeping queued batches for the next run: {error}");
    }
    Ok(())
}

/// The names file as it is now; if it cannot be read, the names known so far (registrations
/// keep their ids, so the old names stay right). `problem` is the last error reported: a file
/// that stays damaged is reported once, not at every reload.
fn reload_names(
    state_dir: &Path,
    known: WorkloadNames,
    problem: &mut Option<String>,
) -> WorkloadNames {
    match WorkloadNames::load(state_dir) {
        Ok(names) => {
            *problem = None;
            names
        }
        Err(error) => {
            let text = error.to_string();
            if problem.as_deref() != Some(text.as_str()) {
                tracing::warn!("keeping the workload names read before: {text}");
                *problem = Some(text);
            }
            known
        }
    }
}

/// Batches the spool could not keep are already counted; this says why, once each.
fn dump(batch: &MeasuredFlowBatch) {
    for index in 0..batch.batch.flows.len() {
        println!("{}", flow_json(batch, index));
    }
}

/// Reads back the interval a killed run was gathering (the journal's frames whose batch was not
/// cut) into `builder`, and starts the journal afresh holding them under `sequence`. A journal
/// that cannot be read or written is reported, never a reason not to start: capture goes on,
/// the interval held in memory only.
fn resume_interval(
    config: &AgentConfig,
    saved: u64,
    spooled: Option<u64>,
    sequence: u64,
    builder: &mut BatchBuilder,
) -> Option<IntervalJournal> {
    let path = config.state_dir.join("interval.journal");
    let cut = |frame: u64| frame < saved || spooled.is_some_and(|highest| frame <= highest);
    match journal::recover(&path, cut) {
        Ok(recovered) => {
            if let Some((reason, bytes)) = &recovered.damage {
                tracing::warn!(
                    "interval journal {}: {reason}; {bytes} bytes after it dropped",
                    path.display()
                );
            }
            for MeasuredFlowBatch {
                batch, round_trips, ..
            } in recovered.batches
            {
                for (record, round_trip) in batch.flows.into_iter().zip(round_trips) {
                    let name = record
                        .local_workload
                        .and_then(|index| batch.workloads.get(index.0 as usize));
                    builder.add_record(record, round_trip, name.map(String::as_str));
                }
            }
            if !builder.flows.is_empty() {
                tracing::info!(
                    "{} flows of the last run's interval recovered from its journal",
                    builder.flows.len()
                );
            }
        }
        Err(error) => tracing::error!("{error}; what it held is lost"),
    }
    match IntervalJournal::start(
        &path,
        config.exporter,
        &config.region,
        sequence,
        &builder.workloads,
        builder.since(0),
    ) {
        Ok(journal) => Some(journal),
        Err(error) => {
            tracing::warn!(
                "{error}; capturing without it: a crash loses the interval being gathered"
            );
            None
        }
    }
}

/// Says what went wrong with the journal, once per distinct problem: capture goes on, but a
/// crash could now lose the interval's flows.
fn report_journal(result: Result<(), journal::JournalError>, problem: &mut Option<String>) {
    match result {
        Ok(()) => *problem = None,
        Err(error) => {
            let text = error.to_string();
            if problem.as_deref() != Some(text.as_str()) {
                tracing::warn!("{text}; flows of this interval are held in memory only");
                *problem = Some(text);
            }
        }
    }
}

/// The next sequence number the last run saved (0 if none).
fn saved_sequence(state_dir: &Path) -> anyhow::Result<u64> {
    std::fs::create_dir_all(state_dir)?;
    Ok(std::fs::read_to_string(state_dir.join("next-sequence"))
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .unwrap_or(0))
}

/// Sequence numbers must never repeat for one exporter id, across restarts: the collector takes
/// a repeated one for a retry and drops it as a duplicate. The next one is the saved one, never
/// below what the spool still holds, and never below the wall clock in microseconds: a batch
/// acked just before a crash that came before the save, or a save that failed on a full disk,
/// cannot make a restarted exporter reuse a number (that would take a million batches a
/// second).
fn next_sequence(saved: u64, spooled: Option<u64>) -> u64 {
    let clock = Timestamp::now().as_nanos() / 1_000;
    saved
        .max(clock)
        .max(spooled.map_or(0, |highest| highest + 1))
}

fn save_sequence(state_dir: &Path, next: u64) -> anyhow::Result<()> {
    flowattr_common::durable::replace_file(
        &state_dir.join("next-sequence"),
        format!("{next}\n").as_bytes(),
    )?;
    Ok(())
}
