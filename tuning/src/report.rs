//! A plan as people read it (a table), as programs read it (JSON), and as a plot of nodes
//! against flows per second.

use std::fmt::Write;
use std::path::Path;

use serde::Serialize;

use crate::broker::{BrokerPlan, BrokerResource};
use crate::calibration::Calibration;
use crate::plan::{Load, Plan, Resource, plan};
use crate::profile::Profile;

fn quantity(resource: Resource, value: f64) -> String {
    if value.is_infinite() {
        return "unlimited".into();
    }
    match resource {
        Resource::Cpu => format!("{value:.2} cores"),
        Resource::Memory | Resource::DiskSpace => format!("{:.2} GiB", value / (1u64 << 30) as f64),
        Resource::DiskBandwidth | Resource::NetworkIn | Resource::NetworkOut => {
            format!("{:.1} MB/s", value / 1e6)
        }
        Resource::Connections => format!("{value:.0}"),
    }
}

pub fn table(
    plan: &Plan,
    brokers: Option<&BrokerPlan>,
    load: &Load,
    profile: &Profile,
    calibration: &Calibration,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "flowattr-plan: {:.0} flows/s per region, {} region(s), {:.0} active IPs, {:.0} reassignments/s, sink {}, profile {} ({} vCPU, {:.0} GiB)",
        load.flows_per_second,
        plan.regions,
        load.active_ips,
        load.reassignments_per_second,
        load.sink,
        profile.name,
        profile.vcpus,
        profile.memory_bytes / (1u64 << 30) as f64
    );
    let _ = writeln!(
        out,
        "planned at most {:.0}% of any resource per node\n",
        load.utilization * 100.0
    );
    let _ = writeln!(
        out,
        "{:<15} {:>18} {:>16} {:>18} {:>7} {:>12}",
        "resource", "region demand", "every node", "node capacity", "nodes", "use at plan"
    );
    for constraint in &plan.constraints {
        let nodes = constraint
            .nodes
            .map_or("no fit".to_owned(), |n| n.to_string());
        let at = plan.nodes_per_region.map_or("-".to_owned(), |n| {
            format!("{:.0}%", constraint.utilization_at(n) * 100.0)
        });
        let _ = writeln!(
            out,
            "{:<15} {:>18} {:>16} {:>18} {:>7} {:>12}",
            constraint.resource.name(),
            quantity(constraint.resource, constraint.divisible),
            quantity(constraint.resource, constraint.per_node_fixed),
            quantity(constraint.resource, constraint.capacity),
            nodes,
            at
        );
    }
    let _ = writeln!(out);
    match plan.nodes_per_region {
        Some(nodes) => {
            let _ = writeln!(
                out,
                "nodes: {nodes} per region, {} in all; binding: {}",
                plan.total_nodes().unwrap_or(nodes),
                plan.binding.name()
            );
            let others: Vec<String> = plan
                .constraints
                .iter()
                .filter(|constraint| constraint.resource != plan.binding)
                .map(|constraint| {
                    format!(
                        "{} {:.0}%",
                        constraint.resource.name(),
                        (1.0 - constraint.utilization_at(nodes)) * 100.0
                    )
                })
                .collect();
            let _ = writeln!(
                out,
                "headroom of the others at {nodes} nodes: {}",
                others.join(", ")
            );
        }
        None => {
            let _ = writeln!(
                out,
                "nodes: no number of {} nodes fits: {} that every node must hold exceeds what one offers; plan a larger profile",
                profile.name,
                plan.binding.name()
            );
        }
    }
    if let Some((flows, resource)) = plan.node_capacity(load) {
        let _ = writeln!(
            out,
            "one node carries at most {flows:.0} flows/s at this utilization (then {} binds)",
            resource.name()
        );
    }
    if let (Some(demand), Some(brokers)) = (&plan.broker, brokers) {
        let _ = writeln!(
            out,
            "\nkafka: broadcast {:.1} MB/s written and {:.1} MB/s read (every node reads it all), sink {:.1} MB/s; {} partitions x {} replicas",
            demand.broadcast_write_bytes_per_second / 1e6,
            demand.broadcast_read_bytes_per_second / 1e6,
            demand.sink_bytes_per_second / 1e6,
            brokers.partitions,
            brokers.replication
        );
        let _ = writeln!(
            out,
            "{:<20} {:>18} {:>18} {:>8}",
            "broker resource", "cluster demand", "per broker", "brokers"
        );
        for constraint in &brokers.constraints {
            let (demand, per_broker) = match constraint.resource {
                BrokerResource::NetworkIn | BrokerResource::NetworkOut | BrokerResource::Disk => (
                    format!("{:.1} MB/s", constraint.demand / 1e6),
                    format!("{:.1} MB/s", constraint.per_broker / 1e6),
                ),
                BrokerResource::Partitions | BrokerResource::Replication => (
                    format!("{:.0}", constraint.demand),
                    format!("{:.0}", constraint.per_broker),
                ),
            };
            let _ = writeln!(
                out,
                "{:<20} {:>18} {:>18} {:>8}",
                constraint.resource.name(),
                demand,
                per_broker,
                constraint.brokers
            );
        }
        let _ = writeln!(
            out,
            "brokers: {} per region on {}; binding: {}",
            brokers.brokers,
            brokers.profile,
            brokers.binding.name()
        );
    }
    let _ = writeln!(out, "profile: {}", profile.source);
    let _ = writeln!(
        out,
        "calibration: {} on {} ({}, {})",
        calibration.measured.command,
        calibration.measured.machine,
        calibration.measured.date,
        calibration.measured.commit
    );
    if let Some(rate) = calibration.offered_flows_per_second.get(&load.sink) {
        let _ = writeln!(
            out,
            "the {} sink's CPU cost was measured at a steady offered {rate:.0} flows/s",
            load.sink
        );
    }
    out
}

#[derive(Serialize)]
struct JsonReport<'a> {
    profile: &'a Profile,
    sink: &'a str,
    flows_per_second: f64,
    plan: &'a Plan,
    brokers: Option<&'a BrokerPlan>,
}

pub fn json(plan: &Plan, brokers: Option<&BrokerPlan>, load: &Load, profile: &Profile) -> String {
    let report = JsonReport {
        profile,
        sink: &load.sink,
        flows_per_second: load.flows_per_second,
        plan,
        brokers,
    };
    // Infinite capacities (a machine with no network limit) become null.
    serde_json::to_string_pretty(&report).expect("a plan serializes")
}

/// Nodes per region against flows per second, one line per resource and the plan's, from a
/// tenth to twice the planned load.
pub fn plot(
    path: &Path,
    load: &Load,
    profile: &Profile,
    calibration: &Calibration,
    floor: f64,
) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let steps = 60;
    let rates: Vec<f64> = (1..=steps)
        .map(|step| load.flows_per_second * 2.0 * step as f64 / steps as f64)
        .collect();
    let plans: Vec<Plan> = rates
        .iter()
        .map(|&rate| {
            plan(
                &Load {
                    flows_per_second: rate,
                    ..load.clone()
                },
                profile,
                calibration,
                floor,
            )
        })
        .collect::<Result<_, _>>()?;
    let most = plans
        .iter()
        .flat_map(|plan| {
            plan.constraints
                .iter()
                .filter_map(|constraint| constraint.nodes)
        })
        .max()
        .unwrap_or(1);
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "collector nodes per region on {} ({} sink)",
                profile.name, load.sink
            ),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..rates[rates.len() - 1] / 1e6, 0u32..most + 1)?;
    chart
        .configure_mesh()
        .x_desc("million flows/s")
        .y_desc("nodes")
        .draw()?;
    for (index, resource) in Resource::ALL.into_iter().enumerate() {
        let color = Palette99::pick(index).to_rgba();
        let points: Vec<(f64, u32)> = rates
            .iter()
            .zip(&plans)
            .filter_map(|(rate, plan)| Some((rate / 1e6, plan.constraint(resource).nodes?)))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(resource.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    root.present()?;
    Ok(())
}
