//! The Kafka brokers a region's collectors lean on. The broadcast topic carries every node's
//! learned ranges and every node reads all of it, so its read side grows with the node count;
//! a Kafka sink adds the region's output, written once and read once downstream. Replication
//! multiplies what each broker writes and sends. A broker cluster is sized here from the same
//! instance profiles as the nodes, plus the partitions a broker can carry, which is an
//! operator's figure (MSK publishes one per broker size), not one this project can measure.

use serde::Serialize;

use crate::profile::Profile;

/// What the collectors of one region ask of its brokers (computed by [`crate::plan::plan`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BrokerDemand {
    /// Broadcast bytes the region's nodes publish per second, before replication.
    pub broadcast_write_bytes_per_second: f64,
    /// Broadcast bytes read per second: every node reads the whole topic.
    pub broadcast_read_bytes_per_second: f64,
    /// Kafka sink bytes per second (0 when the sink is not Kafka); one consumer group reads
    /// them once.
    pub sink_bytes_per_second: f64,
    /// The region's collector shards: each produces to the sink topic.
    pub collector_shards: u32,
}

/// The broker cluster the plan is checked against.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerCluster {
    /// The machine a broker runs on: its network and disk bandwidth count.
    pub profile: Profile,
    /// Replicas of every partition (both topics).
    pub replication: u32,
    /// Partition replicas one broker carries well.
    pub partitions_per_broker: u32,
    /// The broadcast topic's partitions (`cluster.partitions`).
    pub broadcast_partitions: u32,
    /// The Kafka sink topic's partitions; None: one per collector shard, so every shard's
    /// producer has a partition of its own and a consumer group can read as wide.
    pub sink_partitions: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BrokerResource {
    NetworkIn,
    NetworkOut,
    Disk,
    Partitions,
    /// No fewer brokers than replicas of a partition.
    Replication,
}

impl BrokerResource {
    pub fn name(self) -> &'static str {
        match self {
            BrokerResource::NetworkIn => "broker network in",
            BrokerResource::NetworkOut => "broker network out",
            BrokerResource::Disk => "broker disk",
            BrokerResource::Partitions => "broker partitions",
            BrokerResource::Replication => "replication factor",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BrokerConstraint {
    pub resource: BrokerResource,
    /// The cluster's total demand: bytes/s, or partition replicas.
    pub demand: f64,
    /// What one broker offers within the plan's utilization.
    pub per_broker: f64,
    pub brokers: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BrokerPlan {
    pub profile: String,
    pub replication: u32,
    /// Partitions of both topics (leaders; each has `replication` replicas).
    pub partitions: u32,
    pub constraints: Vec<BrokerConstraint>,
    /// Brokers per region.
    pub brokers: u32,
    pub binding: BrokerResource,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{0}")]
pub struct BrokerError(String);

pub fn plan_brokers(
    demand: &BrokerDemand,
    cluster: &BrokerCluster,
    utilization: f64,
) -> Result<BrokerPlan, BrokerError> {
    if cluster.replication == 0
        || cluster.partitions_per_broker == 0
        || cluster.broadcast_partitions == 0
    {
        return Err(BrokerError("the replication factor, partitions per broker and broadcast partitions must be at least 1".into()));
    }
    let rf = f64::from(cluster.replication);
    let written = demand.broadcast_write_bytes_per_second + demand.sink_bytes_per_second;
    let read = demand.broadcast_read_bytes_per_second + demand.sink_bytes_per_second;
    // In: the producers' bytes at the leader and the followers' copies (rf x written). Out: the
    // consumers' reads and the leaders' bytes to rf - 1 followers. A profile's bandwidth holds
    // for each direction at once, as for the nodes.
    let network_in = written * rf;
    let network_out = read + written * (rf - 1.0);
    // Every replica lands on a disk; consumers that keep up read from the page cache.
    let disk = written * rf;
    let sink_partitions = if demand.sink_bytes_per_second > 0.0 {
        cluster
            .sink_partitions
            .unwrap_or(demand.collector_shards.max(1))
    } else {
        0
    };
    let partitions = cluster.broadcast_partitions + sink_partitions;
    let replicas = f64::from(partitions) * rf;
    let need = |demand: f64, per_broker: f64| -> u32 {
        if demand <= 0.0 || per_broker.is_infinite() {
            1
        } else {
            (demand / per_broker).ceil() as u32
        }
    };
    let mut constraints = Vec::new();
    for (resource, demand, capacity) in [
        (
            BrokerResource::NetworkIn,
            network_in,
            cluster.profile.network_bytes_per_second,
        ),
        (
            BrokerResource::NetworkOut,
            network_out,
            cluster.profile.network_bytes_per_second,
        ),
        (
            BrokerResource::Disk,
            disk,
            cluster.profile.disk_bytes_per_second,
        ),
    ] {
        let per_broker = capacity * utilization;
        constraints.push(BrokerConstraint {
            resource,
            demand,
            per_broker,
            brokers: need(demand, per_broker),
        });
    }
    let per_broker = f64::from(cluster.partitions_per_broker);
    constraints.push(BrokerConstraint {
        resource: BrokerResource::Partitions,
        demand: replicas,
        per_broker,
        brokers: need(replicas, per_broker),
    });
    constraints.push(BrokerConstraint {
        resource: BrokerResource::Replication,
        demand: rf,
        per_broker: 1.0,
        brokers: cluster.replication,
    });
    let binding = constraints
        .iter()
        .max_by(|a, b| {
            a.brokers
                .cmp(&b.brokers)
                .then((a.demand / a.per_broker).total_cmp(&(b.demand / b.per_broker)))
        })
        .expect("four constraints");
    Ok(BrokerPlan {
        profile: cluster.profile.name.clone(),
        replication: cluster.replication,
        partitions,
        brokers: binding.brokers,
        binding: binding.resource,
        constraints,
    })
}
