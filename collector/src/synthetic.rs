//! A synthetic fleet with ground truth: IPs handed from workload to workload over time, flows
//! between them, and the heartbeats their exporters would report. It feeds the collector's
//! built-in demo and tests; the load generator in `bench/` builds on it.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use flowattr_common::wire::{ExporterId, FlowBatch, FlowRecord, WorkloadIndex};
use flowattr_common::{CanonicalIp, Direction, FlowState, Timestamp};

/// One workload's tenure on one IP: it held `ip` throughout `[start_s, end_s)` (seconds).
#[derive(Debug, Clone, Copy)]
pub struct Tenure {
    pub ip: CanonicalIp,
    pub workload: usize,
    pub start_s: f64,
    pub end_s: f64,
}

/// A connection between two tenures, both alive for its whole life.
#[derive(Debug, Clone, Copy)]
pub struct SyntheticFlow {
    pub local: Tenure,
    pub remote: Tenure,
    pub start: Timestamp,
    pub end: Timestamp,
}

#[derive(Debug, Clone)]
pub struct SyntheticFleet {
    pub workload_names: Vec<String>,
    pub tenures: Vec<Tenure>,
    pub flows: Vec<SyntheticFlow>,
}

/// Shape of a synthetic fleet.
#[derive(Debug, Clone, Copy)]
pub struct FleetShape {
    pub ips: u32,
    pub workloads: usize,
    pub duration_s: f64,
    /// Each tenure lasts uniformly between these, then the IP idles `idle_s` before its next.
    pub tenure_s: (f64, f64),
    pub idle_s: f64,
    pub flows: usize,
    pub seed: u64,
}

impl Default for FleetShape {
    fn default() -> Self {
        FleetShape {
            ips: 200,
            workloads: 20,
            duration_s: 3600.0,
            tenure_s: (300.0, 900.0),
            idle_s: 30.0,
            flows: 20_000,
            seed: 7,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetError {
    #[error("a fleet needs at least 2 IPs and 1 workload, got {ips} IPs and {workloads} workloads")]
    TooSmall { ips: u32, workloads: usize },
    #[error(
        "placed only {placed} of {wanted} flows in {attempts} attempts: too few tenures overlap for 2 s"
    )]
    TooFewOverlaps {
        placed: usize,
        wanted: usize,
        attempts: usize,
    },
}

/// Tries per wanted flow to find two tenures alive together long enough. Realistic shapes need
/// a handful; the bound turns a shape with no overlaps into an error instead of a hang.
const PLACEMENT_ATTEMPTS_PER_FLOW: usize = 1_000;

/// Wall-clock origin of the synthetic timeline (2023-11-14T22:13:20Z).
const EPOCH_NS: u64 = 1_700_000_000_000_000_000;

/// The exporter of the host at `ip`: each host reports as its own exporter.
pub fn exporter_of(ip: CanonicalIp) -> ExporterId {
    ExporterId(u64::from_le_bytes(ip.octets()[8..].try_into().expect("8 bytes")))
}

pub fn timestamp(seconds: f64) -> Timestamp {
    Timestamp::from_nanos(EPOCH_NS + (seconds * 1e9) as u64)
}

impl SyntheticFleet {
    pub fn generate(shape: FleetShape) -> Result<Self, FleetError> {
        if shape.ips < 2 || shape.workloads == 0 {
            return Err(FleetError::TooSmall {
                ips: shape.ips,
                workloads: shape.workloads,
            });
        }
        let mut rng = fastrand::Rng::with_seed(shape.seed);
        let workload_names = (0..shape.workloads)
            .map(|i| format!("svc-{i:02}"))
            .collect();
        let mut tenures = Vec::new();
        for index in 0..shape.ips {
            let ip = CanonicalIp::from(Ipv4Addr::from(0x0A00_0000 + index));
            let mut at = rng.f64() * shape.tenure_s.0;
            while at < shape.duration_s {
                let length = shape.tenure_s.0 + rng.f64() * (shape.tenure_s.1 - shape.tenure_s.0);
                let end_s = (at + length).min(shape.duration_s);
                tenures.push(Tenure {
                    ip,
                    workload: rng.usize(..shape.workloads),
                    start_s: at,
                    end_s,
                });
                at = end_s + shape.idle_s;
            }
        }
        let mut flows = Vec::with_capacity(shape.flows);
        // No tenure at all (a duration shorter than the first tenure's offset): nothing to try.
        let attempts = if tenures.is_empty() {
            0
        } else {
            shape.flows.saturating_mul(PLACEMENT_ATTEMPTS_PER_FLOW)
        };
        for _ in 0..attempts {
            if flows.len() == shape.flows {
                break;
            }
            let local = tenures[rng.usize(..tenures.len())];
            let remote = tenures[rng.usize(..tenures.len())];
            let (start_s, end_s) = (
                local.start_s.max(remote.start_s),
                local.end_s.min(remote.end_s),
            );
            if local.ip == remote.ip || end_s - start_s < 2.0 {
                continue;
            }
            let start = start_s + rng.f64() * (end_s - start_s - 1.0);
            let end = (start + 0.05 + rng.f64() * 30.0).min(end_s);
            flows.push(SyntheticFlow {
                local,
                remote,
                start: timestamp(start),
                end: timestamp(end),
            });
        }
        if flows.len() < shape.flows {
            return Err(FleetError::TooFewOverlaps {
                placed: flows.len(),
                wanted: shape.flows,
                attempts,
            });
        }
        Ok(SyntheticFleet {
            workload_names,
            tenures,
            flows,
        })
    }
}

/// How the fleet's hosts report their flows to a collector.
#[derive(Debug, Clone, Copy)]
pub struct FeedShape {
    /// Added to every timestamp: moves the fleet's timeline (which starts at a fixed epoch)
    /// to where the collector's clock expects it.
    pub shift: Duration,
    /// Fraction of IPs with no agent (load balancers, say): they never report, so flows to
    /// them have no evidence.
    pub silent: f64,
    /// Largest clock skew of one host, applied to every timestamp it reports.
    pub skew: Duration,
    pub flows_per_batch: usize,
    pub seed: u64,
}

/// Flow batches as the fleet's exporters would send them, with the ground truth for every
/// record: who owned its remote IP at its start.
#[derive(Debug, Clone)]
pub struct Feed {
    pub batches: Vec<FlowBatch>,
    /// (exporter, sequence, index) -> the remote workload's name.
    pub truth: HashMap<(u64, u64, u32), String>,
}

impl Feed {
    pub fn records(&self) -> usize {
        self.batches.iter().map(|batch| batch.flows.len()).sum()
    }
}

impl SyntheticFleet {
    /// Turns the fleet into exporter batches: one exporter per IP (its host), reporting every
    /// flow it took part in from its own side (outbound from the connecting side, inbound
    /// from the other), in the order its flows ended, on its own skewed clock.
    pub fn feed(&self, shape: FeedShape) -> Feed {
        let mut rng = fastrand::Rng::with_seed(shape.seed);
        let mut hosts: HashMap<CanonicalIp, (bool, Duration)> = HashMap::new();
        for tenure in &self.tenures {
            hosts.entry(tenure.ip).or_insert_with(|| {
                let silent = rng.f64() < shape.silent;
                let skew = Duration::from_nanos(rng.u64(..=shape.skew.as_nanos() as u64));
                (silent, skew)
            });
        }
        let mut per_host: HashMap<CanonicalIp, Vec<(Timestamp, FlowRecord, String, String)>> =
            HashMap::new();
        for flow in &self.flows {
            for (local, remote, direction) in [
                (flow.local, flow.remote, Direction::Outbound),
                (flow.remote, flow.local, Direction::Inbound),
            ] {
                let (silent, skew) = hosts[&local.ip];
                if silent {
                    continue;
                }
                let at = |t: Timestamp| t.saturating_add(shape.shift + skew);
                let record = FlowRecord {
                    local_ip: local.ip,
                    remote_ip: remote.ip,
                    local_port: if direction == Direction::Outbound { 40_000 } else { 443 },
                    remote_port: if direction == Direction::Outbound { 443 } else { 40_000 },
                    local_workload: Some(WorkloadIndex(0)),
                    local_shared: false,
                    start: at(flow.start),
                    end: at(flow.end),
                    bytes_sent: rng.u64(100..100_000),
                    bytes_received: rng.u64(100..100_000),
                    segments_sent: rng.u32(1..100),
                    segments_received: rng.u32(1..100),
                    retransmits: 0,
                    direction,
                    state: FlowState::Closed,
                };
                per_host.entry(local.ip).or_default().push((
                    record.end,
                    record,
                    self.workload_names[local.workload].clone(),
                    self.workload_names[remote.workload].clone(),
                ));
            }
        }
        let mut hosts: Vec<_> = per_host.into_iter().collect();
        hosts.sort_by_key(|(ip, _)| *ip);
        let mut batches = Vec::new();
        let mut truth = HashMap::new();
        for (host, mut records) in hosts {
            records.sort_by_key(|(end, ..)| *end);
            let ExporterId(exporter) = exporter_of(host);
            for (sequence, chunk) in records.chunks(shape.flows_per_batch.max(1)).enumerate() {
                let mut workloads: Vec<String> = Vec::new();
                let mut flows = Vec::with_capacity(chunk.len());
                for (index, (_, record, local, remote)) in chunk.iter().enumerate() {
                    // A host's IP changes hands: each record names its own local workload.
                    let position = workloads.iter().position(|name| name == local);
                    let position = position.unwrap_or_else(|| {
                        workloads.push(local.clone());
                        workloads.len() - 1
                    });
                    flows.push(FlowRecord {
                        local_workload: Some(WorkloadIndex(position as u32)),
                        ..*record
                    });
                    truth.insert((exporter, sequence as u64, index as u32), remote.clone());
                }
                batches.push(FlowBatch {
                    exporter: ExporterId(exporter),
                    sequence: sequence as u64,
                    region: "synthetic".into(),
                    workloads,
                    flows,
                });
            }
        }
        // Interleave the hosts as a collector would see them: by when each batch was cut.
        batches.sort_by_key(|batch| batch.flows.last().map(|flow| flow.end));
        Feed { batches, truth }
    }

    /// The shift that makes the fleet's timeline end at `now`.
    pub fn shift_to_end_at(&self, duration_s: f64, now: Timestamp) -> Duration {
        Duration::from_nanos(now.nanos_since(timestamp(duration_s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fleet_without_overlapping_tenures_is_an_error_not_a_hang() {
        let one_ip = FleetShape {
            ips: 1,
            ..FleetShape::default()
        };
        assert_eq!(
            SyntheticFleet::generate(one_ip).unwrap_err(),
            FleetError::TooSmall {
                ips: 1,
                workloads: 20
            }
        );
        // Tenures shorter than the 2 s a flow needs never overlap long enough.
        let blinks = FleetShape {
            tenure_s: (0.5, 1.0),
            flows: 3,
            ..FleetShape::default()
        };
        assert!(matches!(
            SyntheticFleet::generate(blinks),
            Err(FleetError::TooFewOverlaps {
                placed: 0,
                wanted: 3,
                ..
            })
        ));
        let instant = FleetShape {
            duration_s: 0.0,
            flows: 1,
            ..FleetShape::default()
        };
        assert_eq!(
            SyntheticFleet::generate(instant).unwrap_err(),
            FleetError::TooFewOverlaps {
                placed: 0,
                wanted: 1,
                attempts: 0
            }
        );
    }

    #[test]
    fn the_feed_reports_each_flow_from_both_ends_with_truth() {
        let fleet = SyntheticFleet::generate(FleetShape {
            flows: 300,
            ..FleetShape::default()
        })
        .unwrap();
        let feed = fleet.feed(FeedShape {
            shift: Duration::ZERO,
            silent: 0.0,
            skew: Duration::ZERO,
            flows_per_batch: 50,
            seed: 1,
        });
        assert_eq!(feed.records(), 600);
        assert_eq!(feed.truth.len(), 600);
        for batch in &feed.batches {
            assert!(batch.flows.len() <= 50);
            for (index, flow) in batch.flows.iter().enumerate() {
                let truth = &feed.truth[&(batch.exporter.0, batch.sequence, index as u32)];
                let owner = fleet
                    .tenures
                    .iter()
                    .find(|t| {
                        t.ip == flow.remote_ip
                            && timestamp(t.start_s) <= flow.start
                            && flow.start < timestamp(t.end_s)
                    })
                    .unwrap();
                assert_eq!(&fleet.workload_names[owner.workload], truth);
            }
        }
        let silent = fleet.feed(FeedShape {
            shift: Duration::ZERO,
            silent: 0.5,
            skew: Duration::ZERO,
            flows_per_batch: 50,
            seed: 1,
        });
        assert!(silent.records() < 500 && silent.records() > 100, "{}", silent.records());
    }

    #[test]
    fn flows_lie_inside_both_tenures() {
        let fleet = SyntheticFleet::generate(FleetShape {
            flows: 500,
            ..FleetShape::default()
        })
        .unwrap();
        assert_eq!(fleet.flows.len(), 500);
        for flow in &fleet.flows {
            assert_ne!(flow.local.ip, flow.remote.ip);
            for tenure in [flow.local, flow.remote] {
                assert!(
                    timestamp(tenure.start_s) <= flow.start && flow.end <= timestamp(tenure.end_s)
                );
            }
        }
    }
}
