//! Synthetic flows: the batches the load generator sends and the codec benchmarks encode, and
//! the distributions they draw from, in one place so that both measure the same kind of flow.

use std::net::Ipv4Addr;
use std::time::Duration;

use flowattr_common::wire::{FlowRecord, WorkloadIndex};
use flowattr_common::{CanonicalIp, Direction, FlowState, RoundTrip, Timestamp, WorkloadIdentity};

/// Log-normal with the given median and a spread of `sigma` (natural log units): durations,
/// byte counts and round trips all have a long tail.
pub fn log_normal(rng: &mut fastrand::Rng, median: f64, sigma: f64) -> f64 {
    // Box-Muller.
    let (u1, u2) = (rng.f64().max(f64::MIN_POSITIVE), rng.f64());
    let normal = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
    median * (sigma * normal).exp()
}

/// In-region round trips: a few hundred µs with a long tail; one connection in 50 never
/// answered.
pub fn round_trip(rng: &mut fastrand::Rng) -> Option<RoundTrip> {
    (rng.u8(..50) != 0).then(|| {
        let smoothed = log_normal(rng, 300.0, 0.8).clamp(1.0, 1e6);
        RoundTrip {
            smoothed_us: smoothed as u32,
            deviation_us: (smoothed * rng.f64() / 2.0) as u32,
        }
    })
}

/// A batch's records and each one's round trip.
pub type Flows = (Vec<FlowRecord>, Vec<Option<RoundTrip>>);

/// The 64 workloads' identities as a Kubernetes node's exporter sends them (name, namespace,
/// pod, owner kind), by the indexes the batches' flows name them with.
pub fn workload_identities() -> Vec<String> {
    (0..64)
        .map(|i| {
            let (name, pod) = (
                format!("shop/svc-{i:02}"),
                format!("svc-{i:02}-7d9f8b6c5d-x2x9q"),
            );
            WorkloadIdentity {
                name: &name,
                namespace: "shop",
                instance: &pod,
                owner_kind: "Deployment",
            }
            .key()
        })
        .collect()
}

/// The address of pod `pod` of host `host`, in the host shape: 10.64.0.0/16, 32 per host.
fn pod_ip(host: u32, pod: u32) -> CanonicalIp {
    CanonicalIp::from(Ipv4Addr::from(POD_BASE + host * 32 + pod + 1))
}

const POD_BASE: u32 = 0x0A40_0000;

/// Which of the 64 workloads pod `pod` of host `host` runs, in the host shape.
fn pod_workload(host: u32, pod: u32) -> u32 {
    (host * 7 + pod) % 64
}

/// Which of the 64 workloads the host shape's pod at `ip` runs: what heartbeats from its host
/// would attribute it to. `None` for an address outside the pods' range (from 10.64.0.1, the
/// first 30 of every 32).
pub fn host_shape_workload(ip: CanonicalIp) -> Option<u32> {
    let offset = u32::from(ip.to_v4()?).checked_sub(POD_BASE + 1)?;
    (offset % 32 < PODS_PER_HOST).then(|| pod_workload(offset / 32, offset % 32))
}

/// Pods per simulated host, in the host shape.
pub const PODS_PER_HOST: u32 = 30;

/// One batch of `flows` flows per host of a fleet of `hosts` hosts, as exporters send them:
/// every pod of a host one of 64 workloads serving one port; every connection from a pod of
/// one host to a pod of another and reported by both ends, so each batch holds its host's
/// outbound calls (ephemeral local port, the callee's service port) and inbound ones (to its
/// pods' service ports), in the order they closed within the minute before `now`, with
/// durations, bytes and round trips log-normal. What repeats in a batch is what a host
/// repeats, so bytes per flow measured on them are what a fleet's would be.
pub fn host_batches(
    hosts: u32,
    flows: usize,
    now: Timestamp,
    rng: &mut fastrand::Rng,
) -> Vec<Flows> {
    let workload = |host: u32, pod: u32| WorkloadIndex(pod_workload(host, pod));
    let service_ports = [443u16, 8080, 9090, 5432, 6379, 3306, 8443, 50051];
    let service_port = |host: u32, pod: u32| service_ports[((host + pod) % 8) as usize];
    let mut batches: Vec<Vec<(FlowRecord, Option<RoundTrip>)>> =
        vec![Vec::with_capacity(flows); hosts as usize];
    while batches.iter().any(|batch| batch.len() < flows) {
        // Busy pods call more and are called more.
        let pod = |rng: &mut fastrand::Rng| (rng.f64().powi(2) * f64::from(PODS_PER_HOST)) as u32;
        let (client, client_pod) = (rng.u32(..hosts), pod(rng));
        let server = (client + rng.u32(1..hosts)) % hosts;
        let server_pod = pod(rng);
        let end = now.saturating_sub(Duration::from_micros(rng.u64(1_000_000..60_000_000)));
        let duration = log_normal(rng, 50e6, 2.0).min(50e9) as u64;
        let sent = log_normal(rng, 2_000.0, 1.5) as u64;
        let received = log_normal(rng, 8_000.0, 1.5) as u64;
        let outbound = FlowRecord {
            local_ip: pod_ip(client, client_pod),
            remote_ip: pod_ip(server, server_pod),
            local_port: rng.u16(32768..61000),
            remote_port: service_port(server, server_pod),
            local_workload: Some(workload(client, client_pod)),
            local_shared: false,
            start: end.saturating_sub(Duration::from_nanos(duration)),
            end,
            bytes_sent: sent,
            bytes_received: received,
            segments_sent: (sent / 1448 + 2) as u32,
            segments_received: (received / 1448 + 2) as u32,
            retransmits: u32::from(rng.u8(..100) == 0) * rng.u32(1..4),
            direction: Direction::Outbound,
            state: if rng.u8(..20) == 0 {
                FlowState::Open
            } else {
                FlowState::Closed
            },
        };
        let inbound = mirror(&outbound, workload(server, server_pod));
        // Both ends of a connection see about the same round trip.
        let trip = round_trip(rng);
        batches[client as usize].push((outbound, trip));
        batches[server as usize].push((inbound, trip));
    }
    batches
        .into_iter()
        .map(|mut batch| {
            batch.truncate(flows);
            // An exporter cuts flows in the order they close.
            batch.sort_by_key(|(flow, _)| flow.end);
            batch.into_iter().unzip()
        })
        .collect()
}

/// The same connection as its other end reports it.
fn mirror(flow: &FlowRecord, workload: WorkloadIndex) -> FlowRecord {
    FlowRecord {
        local_ip: flow.remote_ip,
        remote_ip: flow.local_ip,
        local_port: flow.remote_port,
        remote_port: flow.local_port,
        local_workload: Some(workload),
        bytes_sent: flow.bytes_received,
        bytes_received: flow.bytes_sent,
        segments_sent: flow.segments_received,
        segments_received: flow.segments_sent,
        direction: match flow.direction {
            Direction::Outbound => Direction::Inbound,
            Direction::Inbound => Direction::Outbound,
        },
        ..*flow
    }
}

/// `count` flows between any two of `ips` addresses, each connection reported by both ends
/// side by side (the record from the remote's side is its heartbeat), named by `workloads`
/// workloads: nothing repeats, the worst case for bytes.
pub fn random_batch(
    ips: u32,
    count: usize,
    now: Timestamp,
    rng: &mut fastrand::Rng,
    workloads: u32,
) -> Flows {
    let mut flows: Vec<FlowRecord> = Vec::with_capacity(count);
    let ip = |i: u32| CanonicalIp::from(Ipv4Addr::from(0x0A00_0000 + i));
    while flows.len() < count {
        let local = rng.u32(..ips);
        let remote = rng.u32(..ips);
        let start = now.saturating_sub(Duration::from_millis(rng.u64(1_000..60_000)));
        let outbound = FlowRecord {
            local_ip: ip(local),
            remote_ip: ip(remote),
            local_port: rng.u16(1024..),
            remote_port: 443,
            local_workload: Some(WorkloadIndex(local % workloads)),
            local_shared: false,
            start,
            end: start.saturating_add(Duration::from_millis(rng.u64(1..500))),
            bytes_sent: rng.u64(100..50_000),
            bytes_received: rng.u64(100..50_000),
            segments_sent: rng.u32(1..60),
            segments_received: rng.u32(1..60),
            retransmits: u32::from(rng.u8(..100) == 0),
            direction: Direction::Outbound,
            state: FlowState::Closed,
        };
        flows.push(outbound);
        flows.push(mirror(&outbound, WorkloadIndex(remote % workloads)));
    }
    flows.truncate(count);
    let round_trips = flows.iter().map(|_| round_trip(rng)).collect();
    (flows, round_trips)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;

    /// Every flow of the host shape names, on both sides, the workload its address gives.
    #[test]
    fn a_pod_address_gives_the_workload_its_host_reports_for_it() {
        let now = Timestamp::from_nanos(1_800_000_000_000_000_000);
        let batches = host_batches(40, 500, now, &mut fastrand::Rng::with_seed(3));
        for (records, _) in &batches {
            for record in records {
                let local = record.local_workload.map(|workload| workload.0);
                assert_eq!(host_shape_workload(record.local_ip), local);
                assert!(host_shape_workload(record.remote_ip).is_some());
            }
        }
        for outside in [
            CanonicalIp::from(Ipv4Addr::new(10, 64, 0, 0)),
            CanonicalIp::from(Ipv4Addr::new(10, 64, 0, 31)),
            CanonicalIp::from(Ipv4Addr::new(10, 63, 255, 255)),
            CanonicalIp::from(Ipv6Addr::LOCALHOST),
        ] {
            assert_eq!(host_shape_workload(outside), None, "{outside:?}");
        }
    }
}
