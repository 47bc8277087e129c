//! What the runtime watcher says on `/metrics` and `/healthz`.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use flowattr_common::Timestamp;
use flowattr_exporter::platform::PlatformIdentity;
use flowattr_exporter::platform::history::Unknown;

/// The watcher's history may lag the runtime by a poll or two; past this it is behind.
const BEHIND_AFTER_SECONDS: f64 = 5.0;

pub fn render_metrics(identity: &PlatformIdentity, out: &mut String) {
    let status = &identity.status;
    let runtime = identity.runtime.as_str();
    let series = [
        ("identity_runtime_up", "gauge", "1 while the container runtime answers the watcher", u64::from(status.connected.load(Ordering::Relaxed))),
        ("identity_resyncs_total", "counter", "full listings of the runtime's containers (at start, and after the runtime was away or events may have been missed)", status.resyncs.load(Ordering::Relaxed)),
        ("identity_corrected_total", "counter", "container addresses a listing found the watcher wrong about (events it missed)", status.corrected.load(Ordering::Relaxed)),
        ("identity_events_total", "counter", "runtime events the watcher read", status.events.load(Ordering::Relaxed)),
        ("identity_manual_kept_total", "counter", "times a registration made by hand kept an address the runtime gave a container", status.manual_kept.load(Ordering::Relaxed)),
        ("identity_flows_renamed_total", "counter", "flows captured under another workload than the one the runtime's history names (the map was stale), renamed at the batch cut", status.flows_renamed.load(Ordering::Relaxed)),
        ("identity_cuts_unconfirmed_total", "counter", "batch cuts that went ahead before the watcher had read the runtime's events through them (2 s): their latest flows leave unnamed", status.cuts_unconfirmed.load(Ordering::Relaxed)),
        ("identity_flows_named_late_total", "counter", "flows captured with no workload that the runtime's history names (the map was late), named at the batch cut", status.flows_named_late.load(Ordering::Relaxed)),
    ];
    for (name, kind, help, value) in series {
        let _ = write!(
            out,
            "# HELP flowattr_exporter_{name} {help}\n# TYPE flowattr_exporter_{name} {kind}\nflowattr_exporter_{name}{{runtime=\"{runtime}\"}} {value}\n"
        );
    }
    let _ = write!(
        out,
        "# HELP flowattr_exporter_identity_flows_unnamed_total flows of container addresses sent with no local workload, by why\n# TYPE flowattr_exporter_identity_flows_unnamed_total counter\n"
    );
    for why in [Unknown::NotYetKnown, Unknown::RuntimeAway, Unknown::NoContainer, Unknown::Conflict, Unknown::Outlived, Unknown::PortUnconfirmed] {
        let _ = writeln!(
            out,
            "flowattr_exporter_identity_flows_unnamed_total{{runtime=\"{runtime}\",reason=\"{}\"}} {}",
            why.as_str(),
            status.unnamed(why).load(Ordering::Relaxed)
        );
    }
    if let Some(through) = identity.known_through() {
        let _ = write!(
            out,
            "# HELP flowattr_exporter_identity_known_through_seconds the instant through which the watcher has read everything the runtime did (Unix time)\n# TYPE flowattr_exporter_identity_known_through_seconds gauge\nflowattr_exporter_identity_known_through_seconds{{runtime=\"{runtime}\"}} {}\n",
            through.as_nanos() as f64 / 1e9
        );
    }
}

/// `degraded:` lines for `/healthz`, none while the watcher keeps up.
pub fn health_lines(identity: &PlatformIdentity) -> Vec<String> {
    let status = &identity.status;
    let socket = identity.socket.display();
    let Some(through) = identity.known_through() else {
        return vec![format!("degraded: the container runtime at {socket} has not been listed yet; flows of container addresses leave with no local workload")];
    };
    let behind = Timestamp::now().nanos_since(through) as f64 / 1e9;
    if !status.connected.load(Ordering::Relaxed) || behind > BEHIND_AFTER_SECONDS {
        return vec![format!(
            "degraded: the container runtime at {socket} has not answered for {behind:.0} s; capture goes on, and flows of container addresses since then leave with no local workload"
        )];
    }
    Vec::new()
}
