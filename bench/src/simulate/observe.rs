//! What the attribution side sees of the fleet, and when: exporters' batches (every interval,
//! both ends of every connection, open connections again at every interval) and the
//! inventory's assign/unassign events, each delivered with the faults a real fleet has. The
//! ground truth of every report is kept apart from what a strategy may read.

use std::collections::HashMap;
use std::time::Duration;

use flowattr_common::wire::{
    ClockReading, ExporterId, FlowBatch, FlowRecord, MeasuredFlowBatch, WorkloadIndex,
};
use flowattr_common::{CanonicalIp, Direction, FlowState, Timestamp};

use super::fleet::{EPOCH, Fleet, InstanceId, ServiceId, ServiceKind};

/// How the fleet's observations are delivered.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Exporters cut a batch this often.
    pub interval: Duration,
    /// Share of batches lost on the way.
    pub batch_loss: f64,
    /// Mean delivery delay of a batch (exponentially distributed).
    pub batch_delay: Duration,
    /// Share of batches delivered twice.
    pub duplication: f64,
    /// Share of batches held back one to three intervals (so they arrive out of order).
    pub reordering: f64,
    /// Exporter restarts per host per hour: each loses the interval it held in memory.
    pub restarts_per_hour: f64,
    /// Inventory events' delivery delay: median and 99th percentile (log-normal).
    pub event_delay_p50: Duration,
    pub event_delay_p99: Duration,
    /// Share of inventory events lost.
    pub event_loss: f64,
    /// Exporters send the clock offset they measured (a probe at connect, then acks) with each
    /// batch, as real ones do; false: as exporters before it did.
    pub clock_readings: bool,
}

impl Default for Delivery {
    fn default() -> Self {
        Delivery {
            interval: Duration::from_secs(60),
            batch_loss: 0.01,
            batch_delay: Duration::from_secs(2),
            duplication: 0.001,
            reordering: 0.01,
            restarts_per_hour: 0.1,
            event_delay_p50: Duration::from_secs(2),
            event_delay_p99: Duration::from_secs(120),
            event_loss: 0.001,
            clock_readings: true,
        }
    }
}

/// One end's report of one connection, as its exporter wrote it (its clock's error included).
#[derive(Debug, Clone, Copy)]
pub struct Report {
    /// Names the report for scoring; a batch delivered twice repeats its reports' ids.
    pub id: u32,
    pub local_ip: CanonicalIp,
    pub local_port: u16,
    pub remote_ip: CanonicalIp,
    pub remote_port: u16,
    pub local_service: ServiceId,
    pub direction: Direction,
    pub start: Timestamp,
    pub end: Timestamp,
    /// Still open at the cut: reported again at the next.
    pub open: bool,
}

#[derive(Debug, Clone)]
pub struct Batch {
    pub exporter: u64,
    pub sequence: u64,
    pub reports: Vec<Report>,
    /// What the exporter knew of its clock's offset when it cut the batch.
    pub clock: Option<ClockReading>,
}

impl Batch {
    /// What an exporter sends: the batch with its host's name, its clock reading and each
    /// connection's round trip (drawn from the batch's name, so a batch delivered twice
    /// carries the same ones).
    pub fn to_measured_batch(&self, names: &[String], shift: Duration) -> MeasuredFlowBatch {
        let mut rng = fastrand::Rng::with_seed(self.exporter ^ self.sequence.rotate_left(32));
        MeasuredFlowBatch {
            host: Some(format!("host-{}", self.exporter)),
            clock: self.clock,
            batch: self.to_wire(names, shift),
            round_trips: self
                .reports
                .iter()
                .map(|_| crate::synthetic::round_trip(&mut rng))
                .collect(),
        }
    }

    /// The batch as its exporter sends it, every time moved `shift` later; `names` are the
    /// services' names by id.
    pub fn to_wire(&self, names: &[String], shift: Duration) -> FlowBatch {
        let mut workloads: Vec<String> = Vec::new();
        let mut index_of: HashMap<ServiceId, u32> = HashMap::new();
        let flows = self
            .reports
            .iter()
            .map(|report| {
                let index = *index_of.entry(report.local_service).or_insert_with(|| {
                    workloads.push(names[report.local_service as usize].clone());
                    workloads.len() as u32 - 1
                });
                FlowRecord {
                    local_ip: report.local_ip,
                    remote_ip: report.remote_ip,
                    local_port: report.local_port,
                    remote_port: report.remote_port,
                    local_workload: Some(WorkloadIndex(index)),
                    local_shared: false,
                    start: report.start.saturating_add(shift),
                    end: report.end.saturating_add(shift),
                    bytes_sent: 1_000,
                    bytes_received: 1_000,
                    segments_sent: 10,
                    segments_received: 10,
                    retransmits: 0,
                    direction: report.direction,
                    state: if report.open {
                        FlowState::Open
                    } else {
                        FlowState::Closed
                    },
                }
            })
            .collect();
        FlowBatch {
            exporter: ExporterId(self.exporter),
            sequence: self.sequence,
            region: "simulated".into(),
            workloads,
            flows,
        }
    }
}

/// An inventory event about one instance's IP, at the time it happened.
#[derive(Debug, Clone, Copy)]
pub struct InventoryEvent {
    pub ip: CanonicalIp,
    pub instance: InstanceId,
    pub service: ServiceId,
    /// False: the instance stopped and its IP went back to the pool.
    pub assigned: bool,
    /// The stop of a batch job that ran to completion: its object lingers in inventories.
    pub finished_job: bool,
    pub at: Timestamp,
}

#[derive(Debug, Clone)]
pub enum Arrival {
    Batch(Batch),
    Event(InventoryEvent),
}

/// What really happened behind one report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truth {
    pub local: ServiceId,
    pub remote: ServiceId,
    /// The report comes from the connection's client.
    pub client_side: bool,
}

impl Truth {
    /// The dependency, client -> server, with `remote` as the report's remote side.
    pub fn edge_with(&self, remote: ServiceId) -> (ServiceId, ServiceId) {
        if self.client_side {
            (self.local, remote)
        } else {
            (remote, self.local)
        }
    }
}

/// Everything delivered, in order of arrival, and the truth to score answers against.
#[derive(Debug)]
pub struct Observations {
    pub arrivals: Vec<(Timestamp, Arrival)>,
    /// By report id.
    pub truth: Vec<Truth>,
}

impl Observations {
    pub fn reports(&self) -> usize {
        self.truth.len()
    }
}

pub fn observe(fleet: &Fleet, delivery: &Delivery, seed: u64) -> Observations {
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x5eed_0b5e);
    let mut truth = Vec::new();
    let mut arrivals = Vec::new();
    let interval = delivery.interval.max(Duration::from_millis(1));
    let last_cut = fleet.end().saturating_add(interval);
    // Every connection end, by the host that reports it.
    let mut ends: Vec<Vec<(usize, bool)>> = vec![Vec::new(); fleet.hosts.len()];
    for (index, connection) in fleet.connections.iter().enumerate() {
        for (instance, client_side) in [(connection.client, true), (connection.server, false)] {
            if let Some(host) = fleet.instances[instance as usize].host
                && fleet.hosts[host as usize].exporter
            {
                ends[host as usize].push((index, client_side));
            }
        }
    }
    for (host, ends) in ends.iter().enumerate() {
        let skew = fleet.hosts[host].skew_ns;
        let phase = Duration::from_secs_f64(rng.f64() * interval.as_secs_f64());
        let cuts: Vec<Timestamp> = (0..)
            .map(|k| EPOCH.saturating_add(phase + interval * k))
            .take_while(|cut| *cut <= last_cut)
            .collect();
        let mut batches: Vec<Vec<Report>> = vec![Vec::new(); cuts.len()];
        for &(index, client_side) in ends {
            let connection = &fleet.connections[index];
            let (local, remote) = if client_side {
                (connection.client, connection.server)
            } else {
                (connection.server, connection.client)
            };
            let (local, remote) = (
                &fleet.instances[local as usize],
                &fleet.instances[remote as usize],
            );
            let first = cuts.partition_point(|cut| *cut < connection.start);
            for (k, cut) in cuts.iter().enumerate().skip(first) {
                let open = connection.end > *cut;
                let id = truth.len() as u32;
                truth.push(Truth {
                    local: local.service,
                    remote: remote.service,
                    client_side,
                });
                let client_port = 32_768 + (index % 28_000) as u16;
                batches[k].push(Report {
                    id,
                    local_ip: local.ip,
                    local_port: if client_side { client_port } else { 443 },
                    remote_ip: remote.ip,
                    remote_port: if client_side { 443 } else { client_port },
                    local_service: local.service,
                    direction: if client_side {
                        Direction::Outbound
                    } else {
                        Direction::Inbound
                    },
                    start: skewed(connection.start, skew),
                    end: skewed(if open { *cut } else { connection.end }, skew),
                    open,
                });
                if !open {
                    break;
                }
            }
        }
        let restart_chance = delivery.restarts_per_hour * interval.as_secs_f64() / 3600.0;
        // An exporter reads its offset from the clock probe it opens each connection with, then
        // from acks. Drawn apart, so the batches' numbers stay the same whether readings are on.
        let mut clock_rng = fastrand::Rng::with_seed(seed ^ 0xc10c ^ host as u64);
        for (sequence, (cut, reports)) in cuts.iter().zip(batches).enumerate() {
            // Every batch draws the same numbers whatever the settings, so a sweep over one
            // fault changes only what that fault decides (common random numbers).
            let [lost, restarted, delay, reordered, held, duplicated, again] =
                [(); 7].map(|()| rng.f64());
            if reports.is_empty() || lost < delivery.batch_loss || restarted < restart_chance {
                continue;
            }
            // An ack's round trip on a LAN, the collector's durable write included: 1-10 ms;
            // the offset lies anywhere within half of it.
            let uncertainty_ns = clock_rng.u64(500_000..5_000_000);
            let error_ns = clock_rng.i64(-(uncertainty_ns as i64)..=uncertainty_ns as i64);
            let clock = delivery.clock_readings.then_some(ClockReading {
                offset_ns: skew + error_ns,
                uncertainty_ns,
            });
            let mut arrival = cut.saturating_add(Duration::from_secs_f64(
                -(1.0 - delay).ln() * delivery.batch_delay.as_secs_f64(),
            ));
            if reordered < delivery.reordering {
                arrival = arrival.saturating_add(interval.mul_f64(1.0 + 2.0 * held));
            }
            let batch = Batch {
                exporter: host as u64 + 1,
                sequence: sequence as u64,
                reports,
                clock,
            };
            if duplicated < delivery.duplication {
                let again = arrival.saturating_add(interval.mul_f64(2.0 * again));
                arrivals.push((again, Arrival::Batch(batch.clone())));
            }
            arrivals.push((arrival, Arrival::Batch(batch)));
        }
    }
    inventory_events(fleet, delivery, &mut rng, &mut arrivals);
    arrivals.sort_by_key(|(at, _)| *at);
    Observations { arrivals, truth }
}

fn skewed(at: Timestamp, skew_ns: i64) -> Timestamp {
    Timestamp::from_nanos((i128::from(at.as_nanos()) + i128::from(skew_ns)).max(0) as u64)
}

/// Every instance's assign at its start and unassign at its stop, as the inventory publishes
/// them: late by a heavy-tailed delay, some lost.
fn inventory_events(
    fleet: &Fleet,
    delivery: &Delivery,
    rng: &mut fastrand::Rng,
    arrivals: &mut Vec<(Timestamp, Arrival)>,
) {
    let median = delivery.event_delay_p50.as_secs_f64().max(1e-3);
    // p99 = median * exp(2.326 sigma) for a log-normal.
    let sigma = (delivery.event_delay_p99.as_secs_f64().max(median) / median).ln() / 2.326;
    let after = fleet.end().saturating_add(super::fleet::RUNS_ON_AFTER);
    for (id, instance) in fleet.instances.iter().enumerate() {
        let kind = fleet.services[instance.service as usize].kind;
        let mut changes = vec![(instance.start, true)];
        if instance.end <= after {
            changes.push((instance.end, false));
        }
        for (at, assigned) in changes {
            let (lost, spread) = (rng.f64(), normal(rng));
            if lost < delivery.event_loss {
                continue;
            }
            let delay = median * (sigma * spread).exp();
            arrivals.push((
                at.saturating_add(Duration::from_secs_f64(delay)),
                Arrival::Event(InventoryEvent {
                    ip: instance.ip,
                    instance: id as InstanceId,
                    service: instance.service,
                    assigned,
                    finished_job: !assigned && kind == ServiceKind::BatchJob,
                    at,
                }),
            ));
        }
    }
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut fastrand::Rng) -> f64 {
    let u = 1.0 - rng.f64();
    let v = rng.f64();
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}
