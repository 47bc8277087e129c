//! A synthetic fleet with ground truth: IPs handed from workload to workload over time, flows
//! between them, and the heartbeats their exporters would report. It feeds the collector's
//! built-in demo and tests; the load generator in `bench/` builds on it.

use std::net::Ipv4Addr;

use flowattr_common::{CanonicalIp, Timestamp};

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
