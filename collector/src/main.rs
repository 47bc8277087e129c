//! `flowattr-collector`. The networked pipeline is being built (issue 3); today the binary runs
//! the attribution core on a built-in synthetic fleet and checks every answer against the
//! fleet's ground truth, printing attributed flows as JSON lines, the dependency graph and a
//! summary. It exits non-zero if a single flow is misattributed.
use std::collections::BTreeMap;

use anyhow::{Context, bail};
use clap::Parser;
use flowattr_collector::ownership::{
    Attribution, Heartbeat, OwnershipConfig, OwnershipMap, Reason, WorkloadInterner,
};
use flowattr_collector::synthetic::{FleetShape, SyntheticFleet, SyntheticFlow};
use flowattr_common::Timestamp;

/// Attributes the remote side of every TCP flow to the workload that owned the IP at the
/// flow's start. Runs a built-in synthetic fleet until the networked pipeline lands.
#[derive(Debug, Parser)]
#[command(name = "flowattr-collector", version)]
struct Args {
    /// Flows in the synthetic fleet.
    #[arg(long, default_value_t = 20_000)]
    flows: usize,
    /// IPs in the synthetic fleet (each handed between workloads over the hour).
    #[arg(long, default_value_t = 200)]
    ips: u32,
    /// Fraction of heartbeats lost on the way (0 to 1).
    #[arg(long, default_value_t = 0.1)]
    loss: f64,
    /// Largest clock skew between two hosts, in milliseconds (must stay under the 1 s slack).
    #[arg(long, default_value_t = 200)]
    skew_ms: u64,
    /// Seed of the synthetic fleet.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Attributed flows to print as JSON lines.
    #[arg(long, default_value_t = 10)]
    show: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !(0.0..=1.0).contains(&args.loss) {
        bail!("--loss must be between 0 and 1, got {}", args.loss);
    }
    let shape = FleetShape {
        flows: args.flows,
        ips: args.ips,
        seed: args.seed,
        ..FleetShape::default()
    };
    let fleet = SyntheticFleet::generate(shape).context("generating the synthetic fleet")?;
    let mut interner = WorkloadInterner::default();
    let ids: Vec<_> = fleet
        .workload_names
        .iter()
        .map(|name| interner.intern(name))
        .collect();

    let mut map = OwnershipMap::new(OwnershipConfig::default());
    let mut rng = fastrand::Rng::with_seed(args.seed ^ 0x5eed);
    let mut heartbeats = Vec::with_capacity(fleet.flows.len() * 2);
    for flow in &fleet.flows {
        // Both ends report the flow, each from its own clock.
        for end in [flow.local, flow.remote] {
            let skew_ns = rng.u64(..=args.skew_ms * 1_000_000);
            let start = Timestamp::from_nanos(flow.start.as_nanos() + skew_ns);
            let finish = Timestamp::from_nanos(flow.end.as_nanos() + skew_ns);
            heartbeats.push(Heartbeat {
                ip: end.ip,
                port: 0,
                owner: ids[end.workload],
                start,
                end: finish,
            });
        }
    }
    // Late, duplicated, lost: the order and completeness production gives us.
    let duplicates: Vec<_> = (0..heartbeats.len() / 10)
        .map(|_| heartbeats[rng.usize(..heartbeats.len())])
        .collect();
    heartbeats.extend(duplicates);
    heartbeats.retain(|_| rng.f64() >= args.loss);
    rng.shuffle(&mut heartbeats);
    for heartbeat in &heartbeats {
        map.insert(*heartbeat).context("synthetic heartbeat")?;
    }

    let mut correct = 0usize;
    let mut misattributed = 0usize;
    let mut unattributed: BTreeMap<Reason, usize> = BTreeMap::new();
    let mut dependencies: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for (shown, flow) in fleet.flows.iter().enumerate() {
        let attribution = map.attribute(flow.remote.ip, 443, flow.start);
        let local_name = fleet.workload_names[flow.local.workload].as_str();
        let remote_name = match attribution {
            Attribution::Owner(owner) if owner == ids[flow.remote.workload] => {
                correct += 1;
                interner.name(owner)
            }
            Attribution::Owner(owner) => {
                misattributed += 1;
                interner.name(owner)
            }
            Attribution::Unattributed(reason) => {
                *unattributed.entry(reason).or_default() += 1;
                None
            }
        };
        if let Some(remote_name) = remote_name {
            *dependencies.entry((local_name, remote_name)).or_default() += 1;
        }
        if shown < args.show {
            println!("{}", flow_json(flow, local_name, attribution, remote_name));
        }
    }

    println!(
        "\ndependency graph (top 10 edges of {}):",
        dependencies.len()
    );
    let mut edges: Vec<_> = dependencies.into_iter().collect();
    edges.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    for ((local, remote), count) in edges.iter().take(10) {
        println!("  {local} -> {remote}: {count} flows");
    }
    let reasons: Vec<String> = unattributed
        .iter()
        .map(|(reason, count)| format!("{}={count}", reason.as_str()))
        .collect();
    println!(
        "\n{} flows over {} s: {correct} attributed correctly, {} unattributed ({}), {misattributed} misattributed",
        fleet.flows.len(),
        shape.duration_s,
        unattributed.values().sum::<usize>(),
        if reasons.is_empty() {
            "none".to_string()
        } else {
            reasons.join(", ")
        },
    );
    if misattributed > 0 {
        bail!("{misattributed} flows misattributed");
    }
    Ok(())
}

/// One attributed flow as a JSON object; serde_json escapes whatever the workload names hold.
fn flow_json(
    flow: &SyntheticFlow,
    local_workload: &str,
    attribution: Attribution,
    remote_workload: Option<&str>,
) -> serde_json::Value {
    let unattributed = match attribution {
        Attribution::Owner(_) => None,
        Attribution::Unattributed(reason) => Some(reason.as_str()),
    };
    serde_json::json!({
        "start_ns": flow.start.as_nanos(),
        "local_ip": flow.local.ip.to_string(),
        "local_workload": local_workload,
        "remote_ip": flow.remote.ip.to_string(),
        "remote_workload": remote_workload,
        "unattributed": unattributed,
    })
}
