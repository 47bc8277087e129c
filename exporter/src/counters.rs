//! What the agent counts: served on `/metrics` (Prometheus text) and reported on exit.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

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
    /// Prometheus text.
    pub fn render(&self) -> String {
        let series: [(&str, &str, &str, &AtomicU64); 15] = [
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
        // In the base unit: Prometheus' rate() of it is the share of a core the program takes.
        out.push_str(&format!(
            "# HELP flowattr_exporter_ebpf_run_seconds_total eBPF program run time (needs kernel.bpf_stats_enabled=1)\n# TYPE flowattr_exporter_ebpf_run_seconds_total counter\nflowattr_exporter_ebpf_run_seconds_total {}\n",
            self.ebpf_run_ns.load(Ordering::Relaxed) as f64 / 1e9
        ));
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
        if let Some(identity) = self.identity.get() {
            crate::identity_report::render_metrics(identity, &mut out);
        }
        flowattr_common::process_metrics::render("flowattr-exporter", env!("CARGO_PKG_VERSION"), &mut out);
        out
    }
}
