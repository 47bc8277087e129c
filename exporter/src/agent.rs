//! The agent's loop: capture on one thread (drain the ring buffer continuously, cut a batch
//! every interval), ship on another (`ship.rs`: send the oldest queued batch, act on its answer,
//! back off and retry while the collector is away). The queue between them is the [`Spool`];
//! the interval being gathered is kept in the [`IntervalJournal`] until it is cut, so a killed
//! agent loses no flow it counted as captured.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use flowattr_common::kernel::{DIRECTION_INBOUND, FlowEvent, OpenSocket};
use flowattr_common::wire::{BATCH_FLOWS_MAX, ClockedFlowBatch, ExporterId, FlowBatch, FlowRecord, WorkloadIndex, encode_message};
use flowattr_common::{Direction, FlowState, Timestamp};
use flowattr_common::tls::ClientTls;

use flowattr_exporter::capture::Capture;
use flowattr_exporter::clock::{ClockEstimate, ClockOffset};
use flowattr_common::dead_letter::{DeadLetters, flow_json};
use flowattr_exporter::journal::{self, IntervalJournal};
use flowattr_exporter::registry::WorkloadNames;
use flowattr_exporter::spool::{Queued, Spool};

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// None: capture only (`--dump`).
    pub collector: Option<SocketAddr>,
    /// Mutual TLS with the collector; None: plain TCP.
    pub tls: Option<ClientTls>,
    pub interval: Duration,
    pub exporter: ExporterId,
    pub region: String,
    /// A file holding the workload name of the whole host, reread every interval.
    pub host_identity: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub pin_dir: PathBuf,
    pub memory_batches: usize,
    pub spool_batches: usize,
    /// Print every captured flow as a JSON line.
    pub dump: bool,
    /// Stop after the first interval's batch is shipped (or, without a collector, cut).
    pub once: bool,
}

/// Counters the agent keeps, served on `/metrics` and reported on exit.
#[derive(Debug, Default)]
pub struct AgentCounters {
    pub flows_captured: AtomicU64,
    pub flows_unknown_workload: AtomicU64,
    pub flows_incomplete: AtomicU64,
    pub batches_acked: AtomicU64,
    pub send_failures: AtomicU64,
    pub events_lost: AtomicU64,
    pub spool_batches: AtomicU64,
    pub batches_dropped: AtomicU64,
    pub flows_dropped: AtomicU64,
    pub ebpf_runs: AtomicU64,
    pub ebpf_run_ns: AtomicU64,
    pub ebpf_missed: AtomicU64,
    pub batches_refused: AtomicU64,
    pub flows_refused: AtomicU64,
    pub dead_letter_bytes: AtomicU64,
    pub dead_letter_dropped: AtomicU64,
    /// From the last ack: this host's clock against the collector's (see `ClockCheck`).
    pub clock_checked: AtomicBool,
    pub clock_offset_ns: AtomicI64,
    pub clock_uncertainty_ns: AtomicU64,
    pub clock_healthy: AtomicBool,
    pub clock_max_skew_ns: AtomicU64,
}

impl AgentCounters {
    /// Prometheus text.
    pub fn render(&self) -> String {
        let series: [(&str, &str, &str, &AtomicU64); 16] = [
            ("flows_captured_total", "counter", "flows captured (closed, with both ports)", &self.flows_captured),
            ("flows_unknown_workload_total", "counter", "captured flows whose local side resolved to no workload (sent anyway)", &self.flows_unknown_workload),
            ("flows_incomplete_total", "counter", "sockets closed before their handshake gave them both ports", &self.flows_incomplete),
            ("events_lost_total", "counter", "flow events lost because the eBPF ring buffer was full", &self.events_lost),
            ("batches_acked_total", "counter", "batches the collector acked", &self.batches_acked),
            ("send_failures_total", "counter", "failed sends (retried with backoff)", &self.send_failures),
            ("spool_batches", "gauge", "batches waiting for an ack (memory and disk)", &self.spool_batches),
            ("batches_dropped_total", "counter", "batches dropped: past the spool bound, or unwritable or unreadable in the spool", &self.batches_dropped),
            ("flows_dropped_total", "counter", "flows in dropped batches", &self.flows_dropped),
            ("ebpf_runs_total", "counter", "eBPF program runs (needs kernel.bpf_stats_enabled=1)", &self.ebpf_runs),
            ("ebpf_run_ns_total", "counter", "eBPF program run time (needs kernel.bpf_stats_enabled=1)", &self.ebpf_run_ns),
            ("batches_refused_total", "counter", "batches the collector refused whole (kept in the dead-letter directory)", &self.batches_refused),
            ("flows_refused_total", "counter", "flows the collector refused, in refused batches or one by one (kept in the dead-letter directory while it has room)", &self.flows_refused),
            ("dead_letter_bytes", "gauge", "bytes held in the dead-letter directory", &self.dead_letter_bytes),
            ("dead_letter_dropped_total", "counter", "refused batches or records not kept: the dead-letter directory was full or unwritable", &self.dead_letter_dropped),
            ("ebpf_missed_total", "counter", "socket transitions the kernel did not run the program for, because it was already running on that CPU (each may be a flow not reported)", &self.ebpf_missed),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in series {
            out.push_str(&format!(
                "# HELP flowattr_exporter_{name} {help}\n# TYPE flowattr_exporter_{name} {kind}\nflowattr_exporter_{name} {}\n",
                value.load(Ordering::Relaxed)
            ));
        }
        if self.clock_checked.load(Ordering::Relaxed) {
            let seconds = |ns: f64| ns / 1e9;
            out.push_str(&format!(
                "# HELP flowattr_exporter_clock_offset_seconds this host's wall clock minus the collector's, from the last ack (positive: ahead)\n# TYPE flowattr_exporter_clock_offset_seconds gauge\nflowattr_exporter_clock_offset_seconds {}\n\
                 # HELP flowattr_exporter_clock_offset_uncertainty_seconds half the round trip of the last ack: the offset is known to within this\n# TYPE flowattr_exporter_clock_offset_uncertainty_seconds gauge\nflowattr_exporter_clock_offset_uncertainty_seconds {}\n\
                 # HELP flowattr_exporter_clock_max_skew_seconds the skew the collector allows before it refuses records\n# TYPE flowattr_exporter_clock_max_skew_seconds gauge\nflowattr_exporter_clock_max_skew_seconds {}\n\
                 # HELP flowattr_exporter_clock_healthy 0 when the offset is certainly past the allowed skew: fix this host's time sync\n# TYPE flowattr_exporter_clock_healthy gauge\nflowattr_exporter_clock_healthy {}\n",
                seconds(self.clock_offset_ns.load(Ordering::Relaxed) as f64),
                seconds(self.clock_uncertainty_ns.load(Ordering::Relaxed) as f64),
                seconds(self.clock_max_skew_ns.load(Ordering::Relaxed) as f64),
                u8::from(self.clock_healthy.load(Ordering::Relaxed)),
            ));
        }
        out
    }
}

pub(crate) struct Shared {
    pub(crate) spool: Mutex<Spool>,
    /// Filled from acks by the shipper, read at each cut.
    pub(crate) clock: Mutex<ClockEstimate>,
    pub(crate) queued: Condvar,
    pub(crate) stop: AtomicBool,
    pub(crate) counters: Arc<AgentCounters>,
}

/// Bytes the dead-letter directory may hold.
const DEAD_LETTER_BYTES_MAX: u64 = 64 << 20;

/// Converts kernel records to wire records, naming local workloads.
struct BatchBuilder {
    workloads: Vec<String>,
    flows: Vec<FlowRecord>,
}

impl BatchBuilder {
    fn new() -> Self {
        BatchBuilder {
            workloads: Vec::new(),
            flows: Vec::new(),
        }
    }

    fn index_of(&mut self, name: &str) -> WorkloadIndex {
        let position = self.workloads.iter().position(|known| known == name);
        WorkloadIndex(position.unwrap_or_else(|| {
            self.workloads.push(name.to_owned());
            self.workloads.len() - 1
        }) as u32)
    }

    /// A record a previous run captured (from the journal), its workload given by name.
    fn add_record(&mut self, mut record: FlowRecord, local_name: Option<&str>) {
        record.local_workload = local_name.map(|name| self.index_of(name));
        self.flows.push(record);
    }

    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        socket: &OpenSocket,
        start: Timestamp,
        end: Timestamp,
        counters: (u64, u64, u32, u32, u32),
        state: FlowState,
        local_name: Option<&str>,
    ) {
        let local_workload = local_name.map(|name| self.index_of(name));
        let (bytes_sent, bytes_received, segments_sent, segments_received, retransmits) = counters;
        self.flows.push(FlowRecord {
            local_ip: socket.local_ip,
            remote_ip: socket.remote_ip,
            local_port: socket.local_port,
            remote_port: socket.remote_port,
            local_workload,
            local_shared: socket.shared == 1,
            start,
            end: end.max(start),
            bytes_sent,
            bytes_received,
            segments_sent,
            segments_received,
            retransmits,
            direction: if socket.direction == DIRECTION_INBOUND {
                Direction::Inbound
            } else {
                Direction::Outbound
            },
            state,
        });
    }
}

/// The host's workload name from its identity file: None if there is no file or it is empty;
/// an error if the name breaks the name rule (the collector would refuse every flow it tags).
fn host_workload(path: Option<&Path>) -> Result<Option<String>, String> {
    let Some(path) = path else { return Ok(None) };
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(None) };
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
        && let Some(name) = names.name(socket.workload) {
            return Some(name);
        }
    host
}

/// How often the ring buffer is drained. The program does not wake the agent per event (see
/// exporter-ebpf), only once a quarter of the ring waits: this period is what keeps events
/// moving at ordinary rates.
const DRAIN_PERIOD: Duration = Duration::from_millis(100);

/// Runs the agent until `stop` is set (or after one interval with `once`).
pub fn run(config: AgentConfig, stop: Arc<AtomicBool>, counters: Arc<AgentCounters>) -> anyhow::Result<()> {
    // Everything the agent needs is loaded before it says it is ready: a damaged registry is
    // reported here, with its line, and not after the ready line.
    let mut names = WorkloadNames::load(&config.state_dir)?;
    let mut host = host_workload(config.host_identity.as_deref()).map_err(anyhow::Error::msg)?;
    let spool = Spool::open(&config.state_dir.join("spool"), config.memory_batches, config.spool_batches)?;
    let dead_letters = DeadLetters::open(&config.state_dir.join("dead-letter"), DEAD_LETTER_BYTES_MAX)?;
    let saved = saved_sequence(&config.state_dir)?;
    let mut sequence = next_sequence(saved, spool.highest_sequence());
    let mut builder = BatchBuilder::new();
    let mut journal = match config.collector {
        Some(_) => resume_interval(&config, saved, spool.highest_sequence(), sequence, &mut builder),
        None => None,
    };
    let mut capture = Capture::start(&config.pin_dir)?;
    if !capture.discovered.missing_counters.is_empty() {
        tracing::warn!(
            "this kernel's tcp_sock lacks {:?}; those counters read 0",
            capture.discovered.missing_counters
        );
    }
    // One line on stderr once the program is attached: scripts and tests wait for it.
    eprintln!(
        "flowattr-exporter ready: exporter {} collector {} interval {:?}",
        config.exporter.0,
        config.collector.map_or_else(|| "none".to_owned(), |addr| addr.to_string()),
        config.interval
    );
    let shared = Arc::new(Shared {
        spool: Mutex::new(spool),
        clock: Mutex::new(ClockEstimate::default()),
        queued: Condvar::new(),
        stop: AtomicBool::new(false),
        counters,
    });
    shared.counters.dead_letter_bytes.store(dead_letters.bytes(), Ordering::Relaxed);
    let shipper = config.collector.map(|collector| {
        let shared = shared.clone();
        let once = config.once;
        let tls = config.tls.clone();
        let mut dead_letters = dead_letters;
        std::thread::Builder::new()
            .name("flowattr-ship".into())
            .spawn(move || crate::ship::ship(collector, tls.as_ref(), &shared, once, &mut dead_letters))
            .expect("spawning the shipper thread")
    });

    // Flows of `builder` already in the journal (and counted as captured).
    let mut journaled = builder.flows.len();
    let mut journal_problem = None;
    let mut next_cut = Instant::now() + config.interval;
    let mut offset = ClockOffset::measure();
    let mut events = Vec::new();
    let mut names_problem = None;
    let mut host_problem = None;
    loop {
        let counters = &shared.counters;
        let timeout = next_cut.saturating_duration_since(Instant::now()).min(DRAIN_PERIOD);
        events.clear();
        capture.drain(timeout, |event: FlowEvent| events.push(event));
        let unnamed = |event: &FlowEvent| event.socket.workload.get() != 0 && names.name(event.socket.workload).is_none();
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
                counters.flows_unknown_workload.fetch_add(1, Ordering::Relaxed);
            }
            builder.add(
                &socket,
                offset.wall(socket.start_ns),
                offset.wall(event.end_ns),
                (event.bytes_acked, event.bytes_received, event.segs_out, event.segs_in, event.total_retrans),
                FlowState::Closed,
                name,
            );
        }
        if builder.flows.len() > journaled {
            if let Some(journal) = journal.as_mut() {
                let appended = journal.append(sequence, &builder.workloads, &builder.flows[journaled..]);
                report_journal(appended.and_then(|()| journal.sync_if_due()), &mut journal_problem);
            }
            counters.flows_captured.fetch_add((builder.flows.len() - journaled) as u64, Ordering::Relaxed);
            journaled = builder.flows.len();
        } else if let Some(journal) = journal.as_mut() {
            report_journal(journal.sync_if_due(), &mut journal_problem);
        }
        let stopping = stop.load(Ordering::Relaxed);
        if Instant::now() < next_cut && !stopping {
            continue;
        }
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
        let now = offset.wall(ClockOffset::monotonic_now());
        for socket in capture.open_sockets()? {
            let name = local_name(&socket, &names, host.as_deref());
            builder.add(&socket, offset.wall(socket.start_ns), now, (0, 0, 0, 0, 0), FlowState::Open, name);
        }
        let lost = capture.lost_events();
        if lost > counters.events_lost.swap(lost, Ordering::Relaxed) {
            tracing::warn!("{lost} flow events lost in the ring buffer since start");
        }
        let stats = capture.program_stats();
        counters.ebpf_runs.store(stats.runs, Ordering::Relaxed);
        counters.ebpf_run_ns.store(stats.run_ns, Ordering::Relaxed);
        let missed = stats.recursion_misses;
        if missed > counters.ebpf_missed.swap(missed, Ordering::Relaxed) {
            tracing::warn!("the kernel skipped {missed} runs of the program since start (it was already running on that CPU): those transitions are not reported");
        }
        let batch = std::mem::replace(&mut builder, BatchBuilder::new());
        // The spool stays locked until the next sequence is saved, so the shipper cannot see a
        // batch acked (and its file removed) before the save: after a crash anywhere in here,
        // the journal's frames are recognised as cut (in the spool, or below the saved
        // sequence) and never sent twice.
        let clock = shared.clock.lock().expect("not poisoned").best(ClockOffset::monotonic_now());
        let mut spool = shared.spool.lock().expect("not poisoned");
        for chunk in batch.flows.chunks(BATCH_FLOWS_MAX) {
            let batch = FlowBatch {
                exporter: config.exporter,
                sequence,
                region: config.region.clone(),
                workloads: batch.workloads.clone(),
                flows: chunk.to_vec(),
            };
            if config.dump {
                dump(&batch);
            }
            if config.collector.is_some() {
                let mut frame = Vec::new();
                // Encoded once: a retry sends the same bytes, reading included.
                match clock {
                    Some(clock) => encode_message(&ClockedFlowBatch { clock, batch }, &mut frame)?,
                    None => encode_message(&batch, &mut frame)?,
                }
                spool.push(Queued {
                    sequence,
                    flows: chunk.len() as u64,
                    frame,
                });
                report_spool_problems(&mut spool);
            }
            sequence += 1;
        }
        counters.spool_batches.store(spool.len() as u64, Ordering::Relaxed);
        counters.batches_dropped.store(spool.dropped_batches, Ordering::Relaxed);
        counters.flows_dropped.store(spool.dropped_flows, Ordering::Relaxed);
        if let Err(error) = save_sequence(&config.state_dir, sequence) {
            // Capture goes on; only a restart before the next successful save could reuse a
            // sequence (and the collector would take those batches for retries), or send this
            // interval's flows again from the journal.
            tracing::error!("saving the next sequence number: {error}");
        }
        drop(spool);
        shared.queued.notify_all();
        if let Some(journal) = journal.as_mut() {
            report_journal(journal.reset(), &mut journal_problem);
        }
        journaled = 0;
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
fn reload_names(state_dir: &Path, known: WorkloadNames, problem: &mut Option<String>) -> WorkloadNames {
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
pub(crate) fn report_spool_problems(spool: &mut Spool) {
    for problem in spool.take_problems() {
        tracing::warn!("{problem}");
    }
}

fn dump(batch: &FlowBatch) {
    for index in 0..batch.flows.len() {
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
                tracing::warn!("interval journal {}: {reason}; {bytes} bytes after it dropped", path.display());
            }
            for batch in recovered.batches {
                for record in batch.flows {
                    let name = record.local_workload.and_then(|index| batch.workloads.get(index.0 as usize));
                    builder.add_record(record, name.map(String::as_str));
                }
            }
            if !builder.flows.is_empty() {
                tracing::info!("{} flows of the last run's interval recovered from its journal", builder.flows.len());
            }
        }
        Err(error) => tracing::error!("{error}; what it held is lost"),
    }
    match IntervalJournal::start(&path, config.exporter, &config.region, sequence, &builder.workloads, &builder.flows) {
        Ok(journal) => Some(journal),
        Err(error) => {
            tracing::warn!("{error}; capturing without it: a crash loses the interval being gathered");
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
    saved.max(clock).max(spooled.map_or(0, |highest| highest + 1))
}

fn save_sequence(state_dir: &Path, next: u64) -> anyhow::Result<()> {
    flowattr_common::durable::replace_file(&state_dir.join("next-sequence"), format!("{next}\n").as_bytes())?;
    Ok(())
}
