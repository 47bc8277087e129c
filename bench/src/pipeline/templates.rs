//! The batches the load generator sends, archived once before the run. Two shapes:
//!
//! - **host** (the default): each batch is one host's, as an exporter sends it. The fleet is
//!   `--templates` hosts of 30 pods each, every pod one workload serving one port; every
//!   connection goes from a pod of one host to a pod of another and is reported by both ends,
//!   so each batch holds its host's outbound calls (ephemeral local port, the callee's service
//!   port) and inbound ones (to its pods' service ports), in the order they closed, with
//!   durations and bytes log-normal. What repeats in a batch is what a host repeats, so bytes
//!   per flow on the wire and on disk are what a fleet's would be.
//! - **random**: flows between any two of `--ips` addresses, each batch a mix of all of them:
//!   nothing repeats, so the ownership map is large (the memory-bound case) and every byte
//!   figure is a worst case.

use std::net::Ipv4Addr;
use std::time::Duration;

use flowattr_common::wire::{
    ArchivedMeasuredFlowBatch, ExporterId, FlowBatch, FlowRecord, MeasuredFlowBatch, WorkloadIndex,
};
use flowattr_common::{CanonicalIp, Direction, FlowState, RoundTrip, Timestamp, WorkloadIdentity};

use super::PipelineArgs;
use crate::synthetic::{log_normal, round_trip};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BatchShape {
    Host,
    Random,
}

/// One batch, archived once; each send patches in a fresh sequence number and moves its
/// flows' times as late as the time since it was made, then re-frames it.
pub(super) struct Template {
    pub payload: Vec<u8>,
    pub sequence_at: usize,
    /// Where each flow's start and end (u64 nanoseconds, little-endian) sit in `payload`.
    pub times_at: Vec<usize>,
    pub flows: usize,
}

impl Template {
    /// Writes into `payload` this batch as sent `shift` after it was made, as number
    /// `sequence`: every flow exactly as old at the send as it was when made, so that the
    /// evidence moves forward in time as a fleet's does (a batch sent again with the same
    /// times would pile evidence on one minute).
    pub fn patch(&self, payload: &mut Vec<u8>, sequence: u64, shift: Duration) {
        payload.clear();
        payload.extend_from_slice(&self.payload);
        payload[self.sequence_at..self.sequence_at + 8].copy_from_slice(&sequence.to_le_bytes());
        let shift = shift.as_nanos() as u64;
        for &at in &self.times_at {
            let time = u64::from_le_bytes(payload[at..at + 8].try_into().expect("8 bytes"));
            payload[at..at + 8].copy_from_slice(&(time + shift).to_le_bytes());
        }
    }
}

/// A value no real field of a template batch holds: where it lands in the archive is where
/// the sequence lives.
const SEQUENCE_MARKER: u64 = 0x5EC0_ED5E_C0ED_5EC0;

/// Pods per simulated host, in the host shape.
const PODS_PER_HOST: u32 = 30;

pub(super) fn templates(args: &PipelineArgs, now: Timestamp) -> anyhow::Result<Vec<Template>> {
    let mut rng = fastrand::Rng::with_seed(42);
    // Identities as a Kubernetes node's exporter sends them: name, namespace, pod, owner kind.
    let workloads: Vec<String> = (0..64)
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
        .collect();
    let batches = match args.shape {
        BatchShape::Host => host_batches(args, now, &mut rng),
        BatchShape::Random => (0..args.templates.max(1))
            .map(|_| random_batch(args, now, &mut rng, workloads.len() as u32))
            .collect(),
    };
    batches
        .into_iter()
        .enumerate()
        .map(|(host, (flows, round_trips))| {
            let batch = MeasuredFlowBatch {
                host: Some(format!(
                    "ip-10-64-{}-{}.ec2.internal",
                    host / 256,
                    host % 256
                )),
                clock: None,
                batch: FlowBatch {
                    exporter: ExporterId(host as u64 + 1),
                    sequence: SEQUENCE_MARKER,
                    region: "bench".into(),
                    workloads: workloads.clone(),
                    flows,
                },
                round_trips,
            };
            archive(batch)
        })
        .collect()
}

fn archive(batch: MeasuredFlowBatch) -> anyhow::Result<Template> {
    let flows = batch.batch.flows.len();
    let archived = rkyv::to_bytes::<rkyv::rancor::Error>(&batch)?;
    let view = rkyv::access::<ArchivedMeasuredFlowBatch, rkyv::rancor::Error>(&archived)?;
    let base = archived.as_ptr().addr();
    let mut times_at = Vec::with_capacity(2 * flows);
    for (record, flow) in view.batch.flows.iter().zip(&batch.batch.flows) {
        for (archived_time, time) in [(&record.start, flow.start), (&record.end, flow.end)] {
            let at = std::ptr::from_ref(archived_time).addr() - base;
            anyhow::ensure!(
                archived[at..at + 8] == time.as_nanos().to_le_bytes(),
                "a flow time is not a little-endian u64 in the archive"
            );
            times_at.push(at);
        }
    }
    let payload = archived.to_vec();
    let marker = SEQUENCE_MARKER.to_le_bytes();
    let positions: Vec<usize> = payload
        .windows(8)
        .enumerate()
        .filter(|(_, window)| *window == marker)
        .map(|(at, _)| at)
        .collect();
    let [sequence_at] = positions[..] else {
        anyhow::bail!(
            "the sequence marker appears {} times in the archive",
            positions.len()
        );
    };
    Ok(Template {
        payload,
        sequence_at,
        times_at,
        flows,
    })
}

/// A batch's records and their round trips.
type Flows = (Vec<FlowRecord>, Vec<Option<RoundTrip>>);

/// One batch per host of the fleet (see the module docs).
fn host_batches(args: &PipelineArgs, now: Timestamp, rng: &mut fastrand::Rng) -> Vec<Flows> {
    let hosts = args.templates.max(2) as u32;
    let pod_ip =
        |host: u32, pod: u32| CanonicalIp::from(Ipv4Addr::from(0x0A40_0000 + host * 32 + pod + 1));
    let workload = |host: u32, pod: u32| WorkloadIndex((host * 7 + pod) % 64);
    let service_ports = [443u16, 8080, 9090, 5432, 6379, 3306, 8443, 50051];
    let service_port = |host: u32, pod: u32| service_ports[((host + pod) % 8) as usize];
    let mut batches: Vec<Vec<(FlowRecord, Option<RoundTrip>)>> =
        vec![Vec::with_capacity(args.batch_flows); hosts as usize];
    while batches.iter().any(|flows| flows.len() < args.batch_flows) {
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
        .map(|mut flows| {
            flows.truncate(args.batch_flows);
            // An exporter cuts flows in the order they close.
            flows.sort_by_key(|(flow, _)| flow.end);
            flows.into_iter().unzip()
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

/// Flows between any two of `--ips` addresses, each connection reported by both ends side
/// by side (the record from the remote's side is its heartbeat).
fn random_batch(
    args: &PipelineArgs,
    now: Timestamp,
    rng: &mut fastrand::Rng,
    workloads: u32,
) -> Flows {
    let mut flows: Vec<FlowRecord> = Vec::with_capacity(args.batch_flows);
    let ip = |i: u32| CanonicalIp::from(Ipv4Addr::from(0x0A00_0000 + i));
    while flows.len() < args.batch_flows {
        let local = rng.u32(..args.ips);
        let remote = rng.u32(..args.ips);
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
    flows.truncate(args.batch_flows);
    let round_trips = flows.iter().map(|_| round_trip(rng)).collect();
    (flows, round_trips)
}
