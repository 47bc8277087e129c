//! What the agent counts: served on `/metrics` (Prometheus text) and reported on exit.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use flowattr_common::exposition::{CollectWith, Registry, Scrape};

use flowattr_exporter::capture::Capture;
use flowattr_exporter::platform::PlatformIdentity;

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
    pub open_sockets_gone: AtomicU64,
    pub ebpf_refresh_runs: AtomicU64,
    pub ebpf_refresh_run_ns: AtomicU64,
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
    /// The runtime watcher, once started.
    pub identity: OnceLock<PlatformIdentity>,
}

impl AgentCounters {
    /// Takes the kernel's counts of the capture (lost events, the programs' runs and run time,
    /// skipped runs), saying in the log when events were lost or runs skipped since the last
    /// reading.
    pub fn read_capture(&self, capture: &Capture) {
        let lost = capture.lost_events();
        if lost > self.events_lost.swap(lost, Ordering::Relaxed) {
            tracing::warn!("{lost} flow events lost in the ring buffer since start");
        }
        let stats = capture.program_stats();
        self.ebpf_runs.store(stats.runs, Ordering::Relaxed);
        self.ebpf_run_ns.store(stats.run_ns, Ordering::Relaxed);
        let refresh = capture.refresh_stats();
        self.ebpf_refresh_runs
            .store(refresh.runs, Ordering::Relaxed);
        self.ebpf_refresh_run_ns
            .store(refresh.run_ns, Ordering::Relaxed);
        let missed = stats.recursion_misses;
        if missed > self.ebpf_missed.swap(missed, Ordering::Relaxed) {
            tracing::warn!(
                "the kernel skipped {missed} runs of the program since start (it was already running on that CPU): those transitions are not reported"
            );
        }
    }

    /// What a scrape of the agent's `/metrics` shows: these counters and the process series.
    pub fn registry(counters: Arc<AgentCounters>) -> Registry {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(CollectWith::new(counters, |counters, scrape| {
            counters.write(scrape)
        })));
        registry.register_collector(Box::new(flowattr_common::process_metrics::collector(
            "flowattr-exporter",
            env!("CARGO_PKG_VERSION"),
        )));
        registry
    }

    fn write(&self, scrape: &mut Scrape<'_>) -> fmt::Result {
        let counters: [(&str, &str, &AtomicU64); 14] = [
            (
                "flows_captured",
                "flows captured (closed, with both ports)",
                &self.flows_captured,
            ),
            (
                "flows_unknown_workload",
                "captured flows whose local side resolved to no workload (sent anyway)",
                &self.flows_unknown_workload,
            ),
            (
                "flows_incomplete",
                "sockets closed before their handshake gave them both ports",
                &self.flows_incomplete,
            ),
            (
                "events_lost",
                "flow events lost because the eBPF ring buffer was full",
                &self.events_lost,
            ),
            (
                "batches_acked",
                "batches the collector acked",
                &self.batches_acked,
            ),
            (
                "send_failures",
                "failed sends (retried with backoff)",
                &self.send_failures,
            ),
            (
                "batches_dropped",
                "batches dropped: past the spool bound, or unwritable or unreadable in the spool",
                &self.batches_dropped,
            ),
            (
                "flows_dropped",
                "flows in dropped batches",
                &self.flows_dropped,
            ),
            (
                "ebpf_runs",
                "eBPF program runs (needs kernel.bpf_stats_enabled=1)",
                &self.ebpf_runs,
            ),
            (
                "ebpf_refresh_runs",
                "runs of the program that reads open connections' round trip and counters, one per interval (needs kernel.bpf_stats_enabled=1)",
                &self.ebpf_refresh_runs,
            ),
            (
                "batches_refused",
                "batches the collector refused whole (kept in the dead-letter directory)",
                &self.batches_refused,
            ),
            (
                "flows_refused",
                "flows the collector refused, in refused batches or one by one (kept in the dead-letter directory while it has room)",
                &self.flows_refused,
            ),
            (
                "dead_letter_dropped",
                "refused batches or records not kept: the dead-letter directory was full or unwritable",
                &self.dead_letter_dropped,
            ),
            (
                "ebpf_missed",
                "socket transitions the kernel did not run the program for, because it was already running on that CPU (each may be a flow not reported)",
                &self.ebpf_missed,
            ),
        ];
        for (name, help, value) in counters {
            scrape.counter(
                &format!("flowattr_exporter_{name}"),
                help,
                value.load(Ordering::Relaxed),
            )?;
        }
        scrape.gauge(
            "flowattr_exporter_spool_batches",
            "batches waiting for an ack (memory and disk)",
            self.spool_batches.load(Ordering::Relaxed),
        )?;
        scrape.gauge(
            "flowattr_exporter_open_sockets_gone",
            "sockets the program saw open whose close it never saw, found gone at the last cut and not reported open",
            self.open_sockets_gone.load(Ordering::Relaxed),
        )?;
        scrape.gauge(
            "flowattr_exporter_dead_letter_bytes",
            "bytes held in the dead-letter directory",
            self.dead_letter_bytes.load(Ordering::Relaxed),
        )?;
        // In the base unit: Prometheus' rate() of it is the share of a core the program takes.
        scrape.counter(
            "flowattr_exporter_ebpf_run_seconds",
            "eBPF program run time (needs kernel.bpf_stats_enabled=1)",
            self.ebpf_run_ns.load(Ordering::Relaxed) as f64 / 1e9,
        )?;
        scrape.counter(
            "flowattr_exporter_ebpf_refresh_run_seconds",
            "run time of the program that reads open connections' round trip and counters (needs kernel.bpf_stats_enabled=1)",
            self.ebpf_refresh_run_ns.load(Ordering::Relaxed) as f64 / 1e9,
        )?;
        if self.clock_checked.load(Ordering::Relaxed) {
            let seconds = |ns: f64| ns / 1e9;
            scrape.gauge(
                "flowattr_exporter_clock_offset_seconds",
                "this host's wall clock minus the collector's, from the last ack (positive: ahead)",
                seconds(self.clock_offset_ns.load(Ordering::Relaxed) as f64),
            )?;
            scrape.gauge(
                "flowattr_exporter_clock_offset_uncertainty_seconds",
                "half the round trip of the last ack: the offset is known to within this",
                seconds(self.clock_uncertainty_ns.load(Ordering::Relaxed) as f64),
            )?;
            scrape.gauge(
                "flowattr_exporter_clock_max_skew_seconds",
                "the skew the collector allows before it refuses records",
                seconds(self.clock_max_skew_ns.load(Ordering::Relaxed) as f64),
            )?;
            scrape.gauge(
                "flowattr_exporter_clock_healthy",
                "0 when the offset is certainly past the allowed skew: fix this host's time sync",
                u64::from(self.clock_healthy.load(Ordering::Relaxed)),
            )?;
        }
        match self.identity.get() {
            Some(identity) => crate::identity_report::write_metrics(identity, scrape),
            None => Ok(()),
        }
    }
}
