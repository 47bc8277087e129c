//! The planner against cases computed by hand, with round figures in place of a measured
//! calibration so each expectation can be checked with a pencil.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use flowattr_tuning::broker::{BrokerCluster, BrokerDemand, BrokerResource, plan_brokers};
use flowattr_tuning::calibration::{Calibration, Measured};
use flowattr_tuning::plan::{Load, PlanError, Resource, plan};
use flowattr_tuning::profile::{self, Profile};

fn calibration() -> Calibration {
    Calibration {
        measured: Measured {
            command: "by hand".into(),
            machine: "paper".into(),
            date: "-".into(),
            commit: "-".into(),
        },
        // 1 µs of CPU per flow without a sink, 2 µs with JSON lines.
        cpu_seconds_per_million_flows: BTreeMap::from([
            ("discard".into(), 1.0),
            ("json-file".into(), 2.0),
        ]),
        offered_flows_per_second: BTreeMap::new(),
        sink_bytes_per_flow: BTreeMap::from([("discard".into(), 0.0), ("json-file".into(), 400.0)]),
        wire_bytes_per_flow: 50.0,
        delay_bytes_per_flow: 20.0,
        ownership_bytes_per_ip: 100.0,
        ownership_bytes_per_segment: 50.0,
        broadcast_bytes_per_range: 10.0,
        node_base_bytes_per_shard: 1e6,
        disk_ceiling_bytes_per_second: 100e6,
    }
}

/// 8 vCPU, 16 GiB, 1 GB/s of network, 100 MB/s and 100 GB of disk.
fn node() -> Profile {
    Profile {
        name: "paper".into(),
        vcpus: 8,
        memory_bytes: 16.0 * (1u64 << 30) as f64,
        network_bytes_per_second: 1e9,
        network_burst_bytes_per_second: 1e9,
        disk_bytes_per_second: 100e6,
        disk_burst_bytes_per_second: 100e6,
        disk_bytes: 100e9,
        source: "by hand".into(),
    }
}

fn load(flows: f64, sink: &str) -> Load {
    Load {
        flows_per_second: flows,
        active_ips: 1e6,
        reassignments_per_second: 0.0,
        retention: Duration::from_secs(3600),
        delay: Duration::from_secs(60),
        publish_interval: Duration::from_secs(5),
        exporters: 1000.0,
        max_connections_per_node: 4096.0,
        regions: 1,
        cross_region_share: 0.0,
        sink: sink.into(),
        utilization: 1.0,
    }
}

#[test]
fn the_disk_binds_before_the_cpu_when_every_buffered_byte_is_written_and_read() {
    // 10M flows/s: CPU 10 cores / 8 = 2 nodes; the delay buffer 10M x 20 B written and read
    // = 400 MB/s / 100 MB/s = 4 nodes; space 10M x 20 B x 60 s = 12 GB of 100: 1 node.
    let planned = plan(&load(10e6, "discard"), &node(), &calibration(), 0.0).unwrap();
    assert_eq!(planned.constraint(Resource::Cpu).nodes, Some(2));
    assert_eq!(planned.constraint(Resource::DiskBandwidth).nodes, Some(4));
    assert_eq!(planned.constraint(Resource::DiskSpace).nodes, Some(1));
    assert_eq!(
        (planned.nodes_per_region, planned.binding),
        (Some(4), Resource::DiskBandwidth)
    );
    // CPU at 4 nodes: 10 / 4 / 8.
    assert!((planned.constraint(Resource::Cpu).utilization_at(4) - 0.3125).abs() < 1e-9);
    // One node: the disk's 100 MB/s over 40 B a flow (written and read) = 2.5M flows/s,
    // before the CPU's 8M.
    let (flows, resource) = planned.node_capacity(&load(10e6, "discard")).unwrap();
    assert_eq!(resource, Resource::DiskBandwidth);
    assert!((flows - 2.5e6).abs() < 1.0, "{flows}");
}

#[test]
fn the_cpu_binds_on_a_fast_local_disk_and_headroom_is_respected() {
    let fast = Profile {
        disk_bytes_per_second: 10e9,
        ..node()
    };
    // JSON lines: 2 µs a flow, 10M flows/s = 20 cores: 3 nodes at full use, 5 at 70%
    // (8 x 0.7 = 5.6 cores a node; 20 / 5.6 = 3.6).
    let plan_full = plan(&load(10e6, "json-file"), &fast, &calibration(), 0.0).unwrap();
    assert_eq!(
        (plan_full.nodes_per_region, plan_full.binding),
        (Some(3), Resource::Cpu)
    );
    let planned = plan(
        &Load {
            utilization: 0.7,
            ..load(10e6, "json-file")
        },
        &fast,
        &calibration(),
        0.0,
    )
    .unwrap();
    assert_eq!(
        (planned.nodes_per_region, planned.binding),
        (Some(4), Resource::Cpu)
    );
    // The JSON lines go to the same disk: 10M x 400 B = 4 GB/s, plus the buffer's 0.4 GB/s, of
    // 10 GB/s at 70%: 1 node.
    assert_eq!(planned.constraint(Resource::DiskBandwidth).nodes, Some(1));
    assert!((planned.constraint(Resource::DiskBandwidth).divisible - 4.4e9).abs() < 1.0);
}

#[test]
fn memory_binds_when_the_map_every_node_holds_outgrows_one_node() {
    // 200M IPs x 100 B = 20 GB of map on every node, over 16 GiB: no number of nodes fits.
    let big = Load {
        active_ips: 200e6,
        ..load(1e6, "discard")
    };
    let planned = plan(&big, &node(), &calibration(), 0.0).unwrap();
    assert_eq!(
        (planned.nodes_per_region, planned.binding),
        (None, Resource::Memory)
    );
    assert_eq!(planned.constraint(Resource::Memory).nodes, None);
    assert!((planned.constraint(Resource::Memory).per_node_fixed - (20e9 + 8e6)).abs() < 1.0);
    // Reassignments add a segment each for the retention: 1,000/s x 3,600 s x 50 B = 180 MB.
    let churn = Load {
        reassignments_per_second: 1000.0,
        ..load(1e6, "discard")
    };
    let planned = plan(&churn, &node(), &calibration(), 0.0).unwrap();
    let fixed = planned.constraint(Resource::Memory).per_node_fixed;
    assert!((fixed - (100e6 + 180e6 + 8e6)).abs() < 1.0, "{fixed}");
}

#[test]
fn the_broadcast_every_node_reads_is_not_divided_and_forwarded_flows_go_in_and_out() {
    // 1M IPs extended every 5 s: 200K ranges/s x 10 B = 2 MB/s read by every node.
    let slow = Profile {
        network_bytes_per_second: 1.5e6,
        ..node()
    };
    let plan_slow = plan(&load(1e3, "discard"), &slow, &calibration(), 0.0).unwrap();
    assert_eq!(
        (plan_slow.nodes_per_region, plan_slow.binding),
        (None, Resource::NetworkIn)
    );
    // Half the flows cross regions: 1.5x ingested, so 1.5x the CPU. In: the ingested flows
    // and the broadcast, read by every node; out: the forwarded flows and the broadcast the
    // region publishes, shared between its nodes.
    let crossing = Load {
        cross_region_share: 0.5,
        ..load(8e6, "discard")
    };
    let planned = plan(&crossing, &node(), &calibration(), 0.0).unwrap();
    assert!((planned.constraint(Resource::Cpu).divisible - 12.0).abs() < 1e-9);
    let network_in = planned.constraint(Resource::NetworkIn);
    assert_eq!(
        (network_in.divisible, network_in.per_node_fixed),
        (12e6 * 50.0, 2e6)
    );
    let network_out = planned.constraint(Resource::NetworkOut);
    assert_eq!(
        (network_out.divisible, network_out.per_node_fixed),
        (4e6 * 50.0 + 2e6, 0.0)
    );
    // Every node reads the whole broadcast: 2 MB/s written, 2 MB/s x the nodes read.
    let broker = planned.broker.as_ref().unwrap();
    let nodes = planned.nodes_per_region.unwrap();
    assert_eq!(
        (
            broker.broadcast_write_bytes_per_second,
            broker.broadcast_read_bytes_per_second
        ),
        (2e6, 2e6 * f64::from(nodes))
    );
    assert_eq!(
        (broker.sink_bytes_per_second, broker.collector_shards),
        (0.0, nodes * 8)
    );
}

#[test]
fn each_direction_of_the_network_has_the_profile_s_whole_bandwidth() {
    // A Kafka sink of 20 B a flow; CPU and disk made no limit. 15M flows/s: in 15M x 50 B +
    // 2 MB/s of broadcast = 752 MB/s, out 15M x 20 B + 2 MB/s = 302 MB/s. Together they are
    // more than the node's 1 GB/s; each direction alone fits, and a NIC carries both at once.
    let mut with_kafka = calibration();
    with_kafka
        .cpu_seconds_per_million_flows
        .insert("kafka".into(), 0.1);
    with_kafka.sink_bytes_per_flow.insert("kafka".into(), 20.0);
    let roomy = Profile {
        disk_bytes_per_second: 1e12,
        ..node()
    };
    let planned = plan(&load(15e6, "kafka"), &roomy, &with_kafka, 0.0).unwrap();
    assert_eq!(planned.nodes_per_region, Some(1));
    let used = |resource| planned.constraint(resource).utilization_at(1);
    assert!((used(Resource::NetworkIn) - 0.752).abs() < 1e-9);
    assert!((used(Resource::NetworkOut) - 0.302).abs() < 1e-9);
    // The sink's bytes only go out: at 25M flows/s the inbound side needs 2 nodes first.
    let planned = plan(&load(25e6, "kafka"), &roomy, &with_kafka, 0.0).unwrap();
    assert_eq!(
        (planned.nodes_per_region, planned.binding),
        (Some(2), Resource::NetworkIn)
    );
    assert_eq!(planned.constraint(Resource::NetworkOut).nodes, Some(1));
    // A sink of 200 B a flow binds one node's outbound side at (1 GB/s - the 2 MB/s it
    // publishes) / 200 B: the broadcast is the node's whole, not a share per flow.
    with_kafka.sink_bytes_per_flow.insert("kafka".into(), 200.0);
    let planned = plan(&load(15e6, "kafka"), &roomy, &with_kafka, 0.0).unwrap();
    let (flows, resource) = planned.node_capacity(&load(15e6, "kafka")).unwrap();
    assert_eq!(resource, Resource::NetworkOut);
    assert!((flows - (1e9 - 2e6) / 200.0).abs() < 1.0, "{flows}");
}

fn brokers(partitions_per_broker: u32) -> BrokerCluster {
    BrokerCluster {
        // 100 MB/s of network and 20 MB/s of disk a broker.
        profile: Profile {
            network_bytes_per_second: 100e6,
            disk_bytes_per_second: 20e6,
            ..node()
        },
        replication: 3,
        partitions_per_broker,
        broadcast_partitions: 16,
        sink_partitions: None,
    }
}

#[test]
fn brokers_are_sized_by_replicated_writes_fan_out_reads_and_partitions() {
    let demand = BrokerDemand {
        broadcast_write_bytes_per_second: 10e6,
        broadcast_read_bytes_per_second: 100e6,
        sink_bytes_per_second: 0.0,
        collector_shards: 64,
    };
    // Network in: 10 MB/s x 3 replicas = 30 MB/s: 1 broker; out: 100 MB/s read + 10 x 2 to
    // the followers = 120 MB/s: 2; disk: 10 x 3 = 30 MB/s: 2; partitions: 16 x 3 = 48
    // replicas: 1; yet 3 replicas need 3 brokers.
    let planned = plan_brokers(&demand, &brokers(2000), 1.0).unwrap();
    let count = |resource| {
        planned
            .constraints
            .iter()
            .find(|c| c.resource == resource)
            .unwrap()
            .brokers
    };
    assert_eq!(
        (
            count(BrokerResource::NetworkIn),
            count(BrokerResource::NetworkOut),
            count(BrokerResource::Disk),
            count(BrokerResource::Partitions)
        ),
        (1, 2, 2, 1)
    );
    assert_eq!(
        (planned.brokers, planned.binding, planned.partitions),
        (3, BrokerResource::Replication, 16)
    );
    // A Kafka sink: 40 MB/s more written and read once; its topic gets one partition per
    // collector shard (64). Network in 50 x 3 = 150 MB/s: 2, out 140 + 50 x 2 = 240 MB/s: 3;
    // disk 150 MB/s: 8 at full use, 11 at 70% (14 MB/s a broker); 80 partitions x 3 = 240
    // replicas of 100 a broker: 3.
    let with_sink = BrokerDemand {
        sink_bytes_per_second: 40e6,
        ..demand.clone()
    };
    let planned = plan_brokers(&with_sink, &brokers(100), 1.0).unwrap();
    assert_eq!(
        (planned.brokers, planned.binding, planned.partitions),
        (8, BrokerResource::Disk, 80)
    );
    let planned = plan_brokers(&with_sink, &brokers(100), 0.7).unwrap();
    assert_eq!(
        (planned.brokers, planned.binding),
        (11, BrokerResource::Disk)
    );
    // Many small partitions on small brokers: 80 x 3 replicas over 20 a broker = 12.
    let planned = plan_brokers(&with_sink, &brokers(20), 1.0).unwrap();
    assert_eq!(
        (planned.brokers, planned.binding),
        (12, BrokerResource::Partitions)
    );
    assert!(
        plan_brokers(
            &demand,
            &BrokerCluster {
                replication: 0,
                ..brokers(10)
            },
            1.0
        )
        .is_err()
    );
}

#[test]
fn every_exporter_keeps_a_connection_and_a_lost_node_s_move_to_the_others() {
    // 1,000 flows/s from 50,000 hosts: nothing else is busy, but 4,096 connections a node at
    // 70% take 50,000 / 2,867 = 17.4, so 18 nodes.
    let many = Load {
        exporters: 50_000.0,
        utilization: 0.7,
        ..load(1e3, "discard")
    };
    let planned = plan(&many, &node(), &calibration(), 0.0).unwrap();
    assert_eq!(
        (planned.nodes_per_region, planned.binding),
        (Some(18), Resource::Connections)
    );
    assert_eq!(planned.constraint(Resource::Cpu).nodes, Some(1));
}

#[test]
fn bad_inputs_are_refused_with_what_would_be_right() {
    let error = plan(&load(1e6, "avro"), &node(), &calibration(), 0.0).unwrap_err();
    assert_eq!(
        error,
        PlanError::UnknownSink {
            sink: "avro".into(),
            known: "discard, json-file".into()
        }
    );
    assert!(
        plan(
            &Load {
                utilization: 0.0,
                ..load(1e6, "discard")
            },
            &node(),
            &calibration(),
            0.0
        )
        .is_err()
    );
    assert!(plan(&load(0.0, "discard"), &node(), &calibration(), 0.0).is_err());
    let zero = "wire_bytes_per_flow = 0.0";
    let text = flowattr_tuning::calibration::DEFAULT
        .lines()
        .map(|line| {
            if line.starts_with("wire_bytes_per_flow") {
                zero
            } else {
                line
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let error = Calibration::parse(&text, "x").unwrap_err().to_string();
    assert!(error.contains("wire_bytes_per_flow"), "{error}");
}

#[test]
fn user_profiles_are_read_in_their_units_and_checked() {
    let profiles = profile::parse(
        "[[profile]]\nname = \"metal\"\nvcpus = 64\nmemory_gib = 256\nnetwork_gbps = 25\ndisk_mb_per_second = 2000\ndisk_gb = 3800\n",
    )
    .unwrap();
    assert_eq!(profiles[0].vcpus, 64);
    assert_eq!(profiles[0].network_bytes_per_second, 25e9 / 8.0);
    assert_eq!(profiles[0].disk_bytes, 3.8e12);
    assert!(profile::parse("[[profile]]\nname = \"x\"\nvcpus = 0\nmemory_gib = 1\nnetwork_gbps = 1\ndisk_mb_per_second = 1\ndisk_gb = 1\n").is_err());
    assert!(
        profile::parse("[[profile]]\nname = \"x\"\nvcpu = 1\n")
            .unwrap_err()
            .contains("vcpu")
    );
}

#[test]
fn the_binary_prints_the_table_and_names_the_binding_resource() {
    let out = Command::new(env!("CARGO_BIN_EXE_flowattr-plan"))
        .args(["--flows-per-second", "5000000", "--profile", "c7i.2xlarge"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for row in [
        "cpu",
        "memory",
        "disk bandwidth",
        "disk space",
        "network",
        "connections",
        "binding:",
        "broker network",
        "broker partitions",
        "brokers:",
        "calibration:",
    ] {
        assert!(text.contains(row), "no `{row}` in\n{text}");
    }
    let json = Command::new(env!("CARGO_BIN_EXE_flowattr-plan"))
        .args([
            "--flows-per-second",
            "5000000",
            "--profile",
            "c6id.2xlarge",
            "--json",
        ])
        .output()
        .unwrap();
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert!(
        value["plan"]["nodes_per_region"].as_u64().unwrap() >= 1,
        "{value}"
    );
    let unknown = Command::new(env!("CARGO_BIN_EXE_flowattr-plan"))
        .args(["--flows-per-second", "1", "--profile", "m1.small"])
        .output()
        .unwrap();
    let error = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        !unknown.status.success() && error.contains("c7i.4xlarge") && error.lines().count() == 1,
        "{error}"
    );
}
