//! The model: how much of each resource a region's load asks of its collector nodes, and how
//! many nodes of a profile that takes. Every per-flow, per-IP and per-range cost comes from the
//! [`Calibration`]; every capacity from the [`Profile`]; the rest is the user's input.
//!
//! Some demand divides between nodes (flows: each node ingests, buffers and attributes its
//! share), some does not: every node holds the region's whole ownership map and reads the
//! whole region's broadcast. A resource whose undivided demand already fills a node cannot be
//! helped by more nodes: the plan says the profile does not fit.

use std::time::Duration;

use serde::Serialize;

use crate::broker::BrokerDemand;
use crate::calibration::Calibration;
use crate::profile::Profile;

/// What the user plans for: one region's load (regions are alike).
#[derive(Debug, Clone, PartialEq)]
pub struct Load {
    pub flows_per_second: f64,
    /// IPs with evidence within retention.
    pub active_ips: f64,
    /// IP reassignments per second (each adds a segment to an IP's history).
    pub reassignments_per_second: f64,
    /// How long ownership history is kept (`ownership.retention`).
    pub retention: Duration,
    /// How long flows wait in the delay buffer (`delay.delay` plus a segment span).
    pub delay: Duration,
    /// How often a node publishes what it learned (`cluster.publish_interval`).
    pub publish_interval: Duration,
    /// Hosts running the exporter: each keeps one connection to a node of its region.
    pub exporters: f64,
    /// Connections one node takes (`ingest.max_connections`).
    pub max_connections_per_node: f64,
    pub regions: u32,
    /// Share of a region's flows whose remote side is in another region: ingested here,
    /// forwarded, and (regions being alike) as many come in from the others.
    pub cross_region_share: f64,
    /// A sink named in the calibration.
    pub sink: String,
    /// The most of any resource a node may use in the plan (headroom for bursts and for
    /// a node's loss).
    pub utilization: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Resource {
    Cpu,
    Memory,
    DiskBandwidth,
    DiskSpace,
    /// What a node receives: its exporters' flows, flows other regions forward, the broadcast.
    NetworkIn,
    /// What a node sends: its Kafka sink's output, flows it forwards, what it publishes.
    NetworkOut,
    Connections,
}

impl Resource {
    pub const ALL: [Resource; 7] = [
        Resource::Cpu,
        Resource::Memory,
        Resource::DiskBandwidth,
        Resource::DiskSpace,
        Resource::NetworkIn,
        Resource::NetworkOut,
        Resource::Connections,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Resource::Cpu => "cpu",
            Resource::Memory => "memory",
            Resource::DiskBandwidth => "disk bandwidth",
            Resource::DiskSpace => "disk space",
            Resource::NetworkIn => "network in",
            Resource::NetworkOut => "network out",
            Resource::Connections => "connections",
        }
    }
}

/// One resource's side of the plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Constraint {
    pub resource: Resource,
    /// Demand that divides between nodes (the region's total).
    pub divisible: f64,
    /// Of `divisible`, what does not grow with the flows (the broadcast the region publishes):
    /// all of it one node's when one node carries the region.
    pub divisible_without_flows: f64,
    /// Demand every node carries whatever their number.
    pub per_node_fixed: f64,
    /// What one node offers.
    pub capacity: f64,
    /// Nodes this resource alone needs; None: no number of nodes fits.
    pub nodes: Option<u32>,
}

impl Constraint {
    fn new(
        resource: Resource,
        divisible: f64,
        per_node_fixed: f64,
        capacity: f64,
        utilization: f64,
    ) -> Constraint {
        let usable = capacity * utilization - per_node_fixed;
        let nodes = if usable <= 0.0 {
            None
        } else if capacity.is_infinite() || divisible <= 0.0 {
            Some(1)
        } else {
            Some(((divisible / usable).ceil() as u32).max(1))
        };
        Constraint {
            resource,
            divisible,
            divisible_without_flows: 0.0,
            per_node_fixed,
            capacity,
            nodes,
        }
    }

    /// Share of a node's capacity used with `nodes` nodes.
    pub fn utilization_at(&self, nodes: u32) -> f64 {
        if self.capacity.is_infinite() {
            return 0.0;
        }
        (self.divisible / f64::from(nodes.max(1)) + self.per_node_fixed) / self.capacity
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub constraints: Vec<Constraint>,
    /// Nodes per region; None: the profile does not fit.
    pub nodes_per_region: Option<u32>,
    pub regions: u32,
    /// The resource that sets the node count (or that no node count satisfies).
    pub binding: Resource,
    /// What the region's brokers must carry (sized by [`crate::broker::plan_brokers`]).
    pub broker: Option<BrokerDemand>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("the calibration has no figures for sink `{sink}` (it has: {known})")]
    UnknownSink { sink: String, known: String },
    #[error("{0}")]
    Input(String),
}

/// What an exporter's connection holds of its node's memory while it waits for the next batch
/// (its 16 KiB read buffer and the rest): 2,000 of them grew a node's RSS by 41 KB each
/// (collector/tests/connections.rs, `connections_waiting_between_batches_hold_little_memory`).
const WAITING_CONNECTION_BYTES: f64 = 41e3;

pub fn plan(
    load: &Load,
    profile: &Profile,
    calibration: &Calibration,
    node_floor_bytes: f64,
) -> Result<Plan, PlanError> {
    let unknown = || PlanError::UnknownSink {
        sink: load.sink.clone(),
        known: calibration.sinks().join(", "),
    };
    let cpu_per_flow = calibration
        .cpu_seconds_per_million_flows
        .get(&load.sink)
        .ok_or_else(unknown)?
        / 1e6;
    let sink_bytes = *calibration
        .sink_bytes_per_flow
        .get(&load.sink)
        .ok_or_else(unknown)?;
    let sane = load.flows_per_second.is_finite()
        && load.flows_per_second > 0.0
        && (0.0..=1.0).contains(&load.cross_region_share);
    if !sane {
        return Err(PlanError::Input(
            "flows per second must be positive and the cross-region share between 0 and 1".into(),
        ));
    }
    if !(load.utilization > 0.0 && load.utilization <= 1.0) {
        return Err(PlanError::Input(
            "utilization must be above 0 and at most 1".into(),
        ));
    }
    let flows = load.flows_per_second;
    let forwarded = flows * load.cross_region_share;
    // Forwarded flows are ingested here and again in their region; as many come in.
    let ingested = flows + forwarded;
    let remote_sink = load.sink.starts_with("kafka");
    let local_sink = !remote_sink && load.sink != "discard";

    let cpu = Constraint::new(
        Resource::Cpu,
        ingested * cpu_per_flow,
        0.0,
        f64::from(profile.vcpus),
        load.utilization,
    );

    let segments = load.reassignments_per_second * load.retention.as_secs_f64();
    let map = load.active_ips * calibration.ownership_bytes_per_ip
        + segments * calibration.ownership_bytes_per_segment;
    let base = calibration.node_base_bytes_per_shard * f64::from(profile.vcpus);
    // The map is whole on every node; so are a node's own buffers. The exporters' connections,
    // waiting between batches, divide between the nodes.
    let memory = Constraint::new(
        Resource::Memory,
        load.exporters * WAITING_CONNECTION_BYTES,
        map + base + node_floor_bytes,
        profile.memory_bytes,
        load.utilization,
    );

    // Each buffered byte is written once and read once (O_DIRECT: no page cache); forwarded
    // flows also pass the forwarding spool; a local sink writes its output to the same disk.
    let delay_bytes = ingested * calibration.delay_bytes_per_flow * 2.0;
    let spool_bytes = forwarded * calibration.wire_bytes_per_flow * 2.0;
    let sink_disk = if local_sink { flows * sink_bytes } else { 0.0 };
    let disk_bandwidth = Constraint::new(
        Resource::DiskBandwidth,
        delay_bytes + spool_bytes + sink_disk,
        0.0,
        profile.disk_bytes_per_second,
        load.utilization,
    );
    let held = ingested * calibration.delay_bytes_per_flow * load.delay.as_secs_f64();
    let disk_space = Constraint::new(
        Resource::DiskSpace,
        held,
        0.0,
        profile.disk_bytes,
        load.utilization,
    );

    // Every active IP's range is extended once per publish interval by the node its exporter
    // reaches, and every reassignment is one more range; every node reads them all.
    let ranges_per_second = load.active_ips / load.publish_interval.as_secs_f64().max(1e-3)
        + load.reassignments_per_second;
    let broadcast = ranges_per_second * calibration.broadcast_bytes_per_range;
    // A profile's bandwidth holds for each direction at once (AWS: "up to 10 Gbps for inbound
    // traffic and, simultaneously, up to 10 Gbps for outbound"), so each direction is a
    // constraint of its own. In: the flows ingested (the exporters' and those other regions
    // forward here) and the whole broadcast. Out: the flows forwarded, the Kafka sink's
    // output, and the node's share of what the region publishes.
    let network_in = Constraint::new(
        Resource::NetworkIn,
        ingested * calibration.wire_bytes_per_flow,
        broadcast,
        profile.network_bytes_per_second,
        load.utilization,
    );
    let network_out = Constraint {
        divisible_without_flows: broadcast,
        ..Constraint::new(
            Resource::NetworkOut,
            forwarded * calibration.wire_bytes_per_flow
                + if remote_sink { flows * sink_bytes } else { 0.0 }
                + broadcast,
            0.0,
            profile.network_bytes_per_second,
            load.utilization,
        )
    };

    // A node's exporters move to the others when it is lost: connections keep the headroom too.
    let connections = Constraint::new(
        Resource::Connections,
        load.exporters,
        0.0,
        load.max_connections_per_node,
        load.utilization,
    );

    let constraints = vec![
        cpu,
        memory,
        disk_bandwidth,
        disk_space,
        network_in,
        network_out,
        connections,
    ];
    let infeasible = constraints
        .iter()
        .find(|constraint| constraint.nodes.is_none());
    let (nodes_per_region, binding) = match infeasible {
        Some(constraint) => (None, constraint.resource),
        None => {
            let nodes = constraints
                .iter()
                .filter_map(|constraint| constraint.nodes)
                .max()
                .unwrap_or(1);
            // Of the resources that need that many nodes, the one closest to its limit there.
            let binding = constraints
                .iter()
                .filter(|constraint| constraint.nodes == Some(nodes))
                .max_by(|a, b| a.utilization_at(nodes).total_cmp(&b.utilization_at(nodes)))
                .expect("one constraint sets the count");
            (Some(nodes), binding.resource)
        }
    };
    let broker = nodes_per_region.map(|nodes| BrokerDemand {
        broadcast_write_bytes_per_second: broadcast,
        broadcast_read_bytes_per_second: broadcast * f64::from(nodes),
        sink_bytes_per_second: if remote_sink { flows * sink_bytes } else { 0.0 },
        collector_shards: nodes * profile.vcpus,
    });
    Ok(Plan {
        constraints,
        nodes_per_region,
        regions: load.regions.max(1),
        binding,
        broker,
    })
}

impl Plan {
    /// The most flows per second one node of the profile carries (within the utilization),
    /// and the resource that stops it: every divisible demand but connections (and what a
    /// constraint holds apart as not growing with them) grows with the flows, so each
    /// resource's limit is its usable capacity over its demand per flow.
    pub fn node_capacity(&self, load: &Load) -> Option<(f64, Resource)> {
        self.constraints
            .iter()
            // Connections follow the hosts, not the flows.
            .filter(|constraint| constraint.resource != Resource::Connections)
            .filter(|constraint| constraint.divisible > 0.0 && constraint.capacity.is_finite())
            .map(|constraint| {
                let per_flow = (constraint.divisible - constraint.divisible_without_flows)
                    / load.flows_per_second;
                let usable = constraint.capacity * load.utilization
                    - constraint.per_node_fixed
                    - constraint.divisible_without_flows;
                (usable.max(0.0) / per_flow, constraint.resource)
            })
            .min_by(|a, b| a.0.total_cmp(&b.0))
    }

    pub fn constraint(&self, resource: Resource) -> &Constraint {
        self.constraints
            .iter()
            .find(|constraint| constraint.resource == resource)
            .expect("every resource has a constraint")
    }

    pub fn total_nodes(&self) -> Option<u32> {
        self.nodes_per_region.map(|nodes| nodes * self.regions)
    }
}
