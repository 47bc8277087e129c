//! `flowattr-plan`: how many collector nodes a region needs, and which resource binds first.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use flowattr_collector::config::Config;
use flowattr_tuning::broker::{BrokerCluster, plan_brokers};
use flowattr_tuning::calibration::Calibration;
use flowattr_tuning::plan::{Load, plan};
use flowattr_tuning::profile::{self, Profile};
use flowattr_tuning::report;

/// Plans flowattr collector nodes for a region's load, from measured per-flow costs
/// (a calibration file written by `flowattr-bench calibrate`; the committed one by default).
#[derive(Debug, Parser)]
#[command(name = "flowattr-plan", version)]
struct Args {
    /// Flows per second in one region.
    #[arg(long)]
    flows_per_second: f64,
    /// Instance profile: c7i.2xlarge, c7i.4xlarge, c6id.2xlarge, this-machine, or one from
    /// --profiles.
    #[arg(long, default_value = "c7i.2xlarge")]
    profile: String,
    /// More profiles: a TOML file of [[profile]] tables (name, vcpus, memory_gib, network_gbps,
    /// disk_mb_per_second, disk_gb; optional network_burst_gbps, disk_burst_mb_per_second, source).
    #[arg(long)]
    profiles: Option<PathBuf>,
    /// IPs with ownership evidence within retention [default: flows per second / 10].
    #[arg(long)]
    active_ips: Option<f64>,
    /// IP reassignments per second in the region.
    #[arg(long, default_value_t = 10.0)]
    reassignments_per_second: f64,
    /// Ownership history kept (`ownership.retention`).
    #[arg(long, default_value = "2h", value_parser = humantime::parse_duration)]
    retention: Duration,
    /// Time flows wait in the delay buffer (`delay.delay`).
    #[arg(long, default_value = "75s", value_parser = humantime::parse_duration)]
    delay: Duration,
    /// Hosts running the exporter in the region [default: flows per second / 1000].
    #[arg(long)]
    exporters: Option<f64>,
    /// Regions (planned alike).
    #[arg(long, default_value_t = 1)]
    regions: u32,
    /// Share of a region's flows whose remote side is in another region.
    #[arg(long, default_value_t = 0.0)]
    cross_region_share: f64,
    /// The sink, as the calibration names it (discard, json-file, parquet, kafka,
    /// kafka-columns).
    #[arg(long, default_value = "json-file")]
    sink: String,
    /// The most of any resource a node may use (headroom for bursts and a node's loss).
    #[arg(long, default_value_t = 0.7)]
    utilization: f64,
    /// Disk space for the delay buffer per node, GB, instead of the profile's.
    #[arg(long)]
    disk_gb: Option<f64>,
    /// vCPUs per node instead of the profile's (e.g. a node pinned to part of a machine).
    #[arg(long)]
    vcpus: Option<u32>,
    /// The machine a Kafka broker runs on (any profile name, as --profile): its network and
    /// disk bandwidth size the broker cluster.
    #[arg(long, default_value = "c7i.2xlarge")]
    broker_profile: String,
    /// Replicas of each partition of the broadcast and sink topics.
    #[arg(long, default_value_t = 3)]
    replication_factor: u32,
    /// Partition replicas one broker carries well. The default is what Amazon MSK recommends
    /// for 8-vCPU brokers (kafka.m5.2xlarge, kafka.m7g.2xlarge); it lists 1,000 for 2-4 vCPU
    /// and 4,000 for 16 or more.
    #[arg(long, default_value_t = 2000)]
    broker_partitions: u32,
    /// Partitions of the broadcast topic [default: the collector's `cluster.partitions`].
    #[arg(long)]
    broadcast_partitions: Option<u32>,
    /// Partitions of a Kafka sink's topic [default: one per collector shard].
    #[arg(long)]
    sink_partitions: Option<u32>,
    /// Calibration file [default: the committed tuning/calibration.toml].
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
    /// Also draw nodes against flows per second (a tenth to twice the load) as SVG.
    #[arg(long)]
    plot: Option<PathBuf>,
}

fn main() {
    if let Err(error) = run(Args::parse()) {
        eprintln!("flowattr-plan: {error:#}");
        std::process::exit(1);
    }
}

fn find_profile(
    args: &Args,
    profiles: &[Profile],
    calibration: &Calibration,
) -> anyhow::Result<Profile> {
    let mut chosen = named_profile(profiles, &args.profile, calibration)?;
    if let Some(vcpus) = args.vcpus {
        if vcpus == 0 {
            bail!("--vcpus must be at least 1");
        }
        chosen.vcpus = vcpus;
    }
    if let Some(gb) = args.disk_gb {
        if !(gb.is_finite() && gb > 0.0) {
            bail!("--disk-gb must be positive");
        }
        chosen.disk_bytes = gb * 1e9;
    }
    Ok(chosen)
}

/// The built-in profiles and those of --profiles.
fn known_profiles(args: &Args) -> anyhow::Result<Vec<Profile>> {
    let mut profiles = profile::builtin();
    if let Some(path) = &args.profiles {
        profiles.extend(profile::from_file(path).map_err(anyhow::Error::msg)?);
    }
    Ok(profiles)
}

/// One of `profiles`, or this machine.
fn named_profile(
    profiles: &[Profile],
    name: &str,
    calibration: &Calibration,
) -> anyhow::Result<Profile> {
    if name == "this-machine" {
        return Ok(profile::this_machine(
            calibration.disk_ceiling_bytes_per_second,
            &std::env::current_dir()?,
        ));
    }
    let names: Vec<&str> = profiles
        .iter()
        .map(|profile| profile.name.as_str())
        .collect();
    profiles
        .iter()
        .find(|profile| profile.name == name)
        .cloned()
        .with_context(|| {
            format!(
                "no profile `{name}` (known: {}, this-machine)",
                names.join(", ")
            )
        })
}

fn run(args: Args) -> anyhow::Result<()> {
    let calibration = match &args.calibration {
        Some(path) => Calibration::from_file(path)?,
        None => Calibration::default_measured(),
    };
    let profiles = known_profiles(&args)?;
    let profile = find_profile(&args, &profiles, &calibration)?;
    let load = Load {
        flows_per_second: args.flows_per_second,
        active_ips: args.active_ips.unwrap_or(args.flows_per_second / 10.0),
        reassignments_per_second: args.reassignments_per_second,
        retention: args.retention,
        delay: args.delay,
        publish_interval: Config::default().cluster.publish_interval,
        exporters: args.exporters.unwrap_or(args.flows_per_second / 1000.0),
        max_connections_per_node: Config::default().ingest.max_connections as f64,
        regions: args.regions,
        cross_region_share: args.cross_region_share,
        sink: args.sink.clone(),
        utilization: args.utilization,
    };
    let floor = node_floor(&profile);
    let planned = plan(&load, &profile, &calibration, floor)?;
    let cluster = BrokerCluster {
        profile: named_profile(&profiles, &args.broker_profile, &calibration)?,
        replication: args.replication_factor,
        partitions_per_broker: args.broker_partitions,
        broadcast_partitions: args
            .broadcast_partitions
            .unwrap_or(Config::default().cluster.partitions),
        sink_partitions: args.sink_partitions,
    };
    let brokers = planned
        .broker
        .as_ref()
        .map(|demand| plan_brokers(demand, &cluster, args.utilization))
        .transpose()?;
    if args.json {
        println!(
            "{}",
            report::json(&planned, brokers.as_ref(), &load, &profile)
        );
    } else {
        print!(
            "{}",
            report::table(&planned, brokers.as_ref(), &load, &profile, &calibration)
        );
    }
    if let Some(path) = &args.plot {
        report::plot(path, &load, &profile, &calibration, floor)?;
        eprintln!("flowattr-plan: plot written to {}", path.display());
    }
    Ok(())
}

/// What a node of this profile holds by the collector's own default bounds.
fn node_floor(profile: &Profile) -> f64 {
    let mut config = Config::default();
    config.node.cpus = profile.vcpus as usize;
    config.memory_held_by_bounds() as f64
}
