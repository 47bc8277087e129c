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

/// Wall-clock origin of the synthetic timeline (2023-11-14T22:13:20Z).
const EPOCH_NS: u64 = 1_700_000_000_000_000_000;

pub fn timestamp(seconds: f64) -> Timestamp {
    Timestamp::from_nanos(EPOCH_NS + (seconds * 1e9) as u64)
}

impl SyntheticFleet {
    pub fn generate(shape: FleetShape) -> Self {
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
        while flows.len() < shape.flows {
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
        SyntheticFleet {
            workload_names,
            tenures,
            flows,
        }
    }
}
