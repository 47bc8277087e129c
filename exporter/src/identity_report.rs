//! What the runtime watcher says on `/metrics` and `/healthz`.

use std::fmt;
use std::sync::atomic::Ordering;

use flowattr_common::Timestamp;
use flowattr_common::exposition::Scrape;
use flowattr_exporter::platform::PlatformIdentity;
use flowattr_exporter::platform::history::Unknown;

/// The watcher's history may lag the runtime by a poll or two; past this it is behind.
const BEHIND_AFTER_SECONDS: f64 = 5.0;

pub fn write_metrics(identity: &PlatformIdentity, scrape: &mut Scrape<'_>) -> fmt::Result {
    let status = &identity.status;
    let runtime = [("runtime", identity.runtime.as_str())];
    scrape.gauges(
        "flowattr_exporter_identity_runtime_up",
        "1 while the container runtime answers the watcher",
        [(runtime, u64::from(status.connected.load(Ordering::Relaxed)))],
    )?;
    let counters = [
        (
            "identity_resyncs",
            "full listings of the runtime's containers (at start, and after the runtime was away or events may have been missed)",
            &status.resyncs,
        ),
        (
            "identity_corrected",
            "container addresses a listing found the watcher wrong about (events it missed)",
            &status.corrected,
        ),
        (
            "identity_events",
            "runtime events the watcher read",
            &status.events,
        ),
        (
            "identity_manual_kept",
            "times a registration made by hand kept an address the runtime gave a container",
            &status.manual_kept,
        ),
        (
            "identity_flows_renamed",
            "flows captured under another workload than the one the runtime's history names (the map was stale), renamed at the batch cut",
            &status.flows_renamed,
        ),
        (
            "identity_cuts_unconfirmed",
            "batch cuts that went ahead before the watcher had read the runtime's events through them (2 s): their latest flows leave unnamed",
            &status.cuts_unconfirmed,
        ),
        (
            "identity_flows_named_late",
            "flows captured with no workload that the runtime's history names (the map was late), named at the batch cut",
            &status.flows_named_late,
        ),
    ];
    for (name, help, value) in counters {
        scrape.counters(
            &format!("flowattr_exporter_{name}"),
            help,
            [(runtime, value.load(Ordering::Relaxed))],
        )?;
    }
    scrape.counters(
        "flowattr_exporter_identity_flows_unnamed",
        "flows of container addresses sent with no local workload, by why",
        [
            Unknown::NotYetKnown,
            Unknown::RuntimeAway,
            Unknown::NoContainer,
            Unknown::Conflict,
            Unknown::Outlived,
            Unknown::PortUnconfirmed,
        ]
        .map(|why| {
            (
                (runtime, [("reason", why.as_str())]),
                status.unnamed(why).load(Ordering::Relaxed),
            )
        }),
    )?;
    match identity.known_through() {
        Some(through) => scrape.gauges(
            "flowattr_exporter_identity_known_through_seconds",
            "the instant through which the watcher has read everything the runtime did (Unix time)",
            [(runtime, through.as_nanos() as f64 / 1e9)],
        ),
        None => Ok(()),
    }
}

/// `degraded:` lines for `/healthz`, none while the watcher keeps up.
pub fn health_lines(identity: &PlatformIdentity) -> Vec<String> {
    let status = &identity.status;
    let socket = identity.socket.display();
    let Some(through) = identity.known_through() else {
        return vec![format!(
            "degraded: the container runtime at {socket} has not been listed yet; flows of container addresses leave with no local workload"
        )];
    };
    let behind = Timestamp::now().nanos_since(through) as f64 / 1e9;
    if !status.connected.load(Ordering::Relaxed) || behind > BEHIND_AFTER_SECONDS {
        return vec![format!(
            "degraded: the container runtime at {socket} has not answered for {behind:.0} s; capture goes on, and flows of container addresses since then leave with no local workload"
        )];
    }
    Vec::new()
}
