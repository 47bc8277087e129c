//! The simulated fleet and its ground truth: services in a dependency graph (one gateway that
//! calls many of them, as an edge proxy does), their instances on hosts or in containers, IPs
//! that go back to a pool when an instance stops and are reused after a cool-down, load
//! balancers that run no exporter, and the connections between instances.
//!
//! Times are nanoseconds on a fixed epoch, so a seed gives the same fleet on every machine.
//! Instances that were running before the simulated window starts begin before it, as they
//! would in a fleet that was running before anyone watched.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::Duration;

use flowattr_common::{CanonicalIp, Timestamp};

/// The start of the simulated window (2026-01-01T00:00:00Z).
pub const EPOCH: Timestamp = Timestamp::from_nanos(1_767_225_600_000_000_000);

/// The fleet goes on changing this long after the window: strategies that answer late (a
/// hold-back) see the inventory as it is then, not frozen at the window's end.
pub const RUNS_ON_AFTER: Duration = Duration::from_secs(3600);

/// Load balancers' addresses: the CIDR the event fallback covers.
pub const LOAD_BALANCER_CIDR: &str = "10.200.0.0/16";

pub type ServiceId = u32;
pub type InstanceId = u32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceKind {
    /// The edge proxy: calls many services and every load balancer.
    Gateway,
    /// Long-lived processes on their hosts' own IPs.
    HostNetwork,
    /// Containers with IPs from the pool, replaced as they stop.
    Container,
    /// Containers that run to completion and are replaced: their objects linger after they
    /// finish, and some inventories keep them.
    BatchJob,
    /// Runs no exporter; known only from assign/unassign events. Calls its backend.
    LoadBalancer,
}

#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    pub kind: ServiceKind,
    pub callees: Vec<ServiceId>,
}

#[derive(Debug, Clone, Copy)]
pub struct Instance {
    pub service: ServiceId,
    pub ip: CanonicalIp,
    /// The host whose exporter reports it; None for a load balancer.
    pub host: Option<u32>,
    pub start: Timestamp,
    /// Past the window's end for an instance that outlives it.
    pub end: Timestamp,
}

#[derive(Debug, Clone, Copy)]
pub struct Host {
    pub ip: CanonicalIp,
    /// False: no exporter runs there (its instances are reported by nobody).
    pub exporter: bool,
    /// Its clock's error: every time its exporter reports is off by this much.
    pub skew_ns: i64,
}

/// One TCP connection between two instances, client to server.
#[derive(Debug, Clone, Copy)]
pub struct Connection {
    pub client: InstanceId,
    pub server: InstanceId,
    pub start: Timestamp,
    pub end: Timestamp,
}

/// What the fleet looks like; every knob of the simulation's ground truth.
#[derive(Debug, Clone)]
pub struct FleetShape {
    pub seed: u64,
    /// The simulated window.
    pub duration: Duration,
    /// Services besides the gateway and the load balancers.
    pub services: usize,
    /// Replicas per service, inclusive range.
    pub replicas: (usize, usize),
    /// Share of the services on their hosts' network.
    pub host_network_share: f64,
    /// Share of the services that are batch jobs.
    pub batch_job_share: f64,
    pub load_balancers: usize,
    pub hosts: usize,
    /// Share of the hosts that run no exporter.
    pub hosts_without_exporter: f64,
    /// Mean life of a container (batch jobs: a fifth of it); exponentially distributed.
    pub container_life: Duration,
    /// Mean time between two reassignments of a load balancer's IP.
    pub load_balancer_life: Duration,
    /// How long a freed IP rests in the pool before it is handed out again (0: at once).
    pub ip_cooldown: Duration,
    /// Container IPs in the pool.
    pub ip_pool: u32,
    /// New connections per second, fleet-wide.
    pub connections_per_second: f64,
    /// Share of the connections the gateway opens.
    pub gateway_share: f64,
    /// Largest clock error of a host, either way.
    pub max_skew: Duration,
}

impl Default for FleetShape {
    fn default() -> Self {
        FleetShape {
            seed: 1,
            duration: Duration::from_secs(600),
            services: 40,
            replicas: (2, 6),
            host_network_share: 0.15,
            batch_job_share: 0.1,
            load_balancers: 4,
            hosts: 60,
            hosts_without_exporter: 0.0,
            container_life: Duration::from_secs(600),
            load_balancer_life: Duration::from_secs(3600),
            ip_cooldown: Duration::from_secs(30),
            ip_pool: 1024,
            connections_per_second: 300.0,
            gateway_share: 0.3,
            max_skew: Duration::from_millis(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(
        "the IP pool of {pool} addresses ran dry at {at_s:.1} s: raise --ip-pool or lower the cool-down"
    )]
    PoolExhausted { pool: u32, at_s: f64 },
    #[error("a fleet needs at least one service and one host")]
    Empty,
    #[error("{0} hosts for {1} host-network instances: each needs a host of its own")]
    TooFewHosts(usize, usize),
}

/// A fleet with everything that happened in it.
#[derive(Debug, Clone)]
pub struct Fleet {
    pub shape: FleetShape,
    pub services: Vec<Service>,
    pub hosts: Vec<Host>,
    pub instances: Vec<Instance>,
    pub connections: Vec<Connection>,
}

impl Fleet {
    pub fn generate(shape: FleetShape) -> Result<Fleet, FleetError> {
        if shape.services == 0 || shape.hosts == 0 {
            return Err(FleetError::Empty);
        }
        let mut rng = fastrand::Rng::with_seed(shape.seed);
        let services = services(&shape, &mut rng);
        let hosts = (0..shape.hosts)
            .map(|index| Host {
                ip: host_ip(index),
                exporter: rng.f64() >= shape.hosts_without_exporter,
                skew_ns: ((rng.f64() * 2.0 - 1.0) * shape.max_skew.as_nanos() as f64) as i64,
            })
            .collect();
        let instances = instances(&shape, &services, &mut rng)?;
        let mut fleet = Fleet {
            shape,
            services,
            hosts,
            instances,
            connections: Vec::new(),
        };
        fleet.connections = connections(&fleet, &mut rng);
        Ok(fleet)
    }

    pub fn end(&self) -> Timestamp {
        EPOCH.saturating_add(self.shape.duration)
    }

    pub fn service_of(&self, instance: InstanceId) -> ServiceId {
        self.instances[instance as usize].service
    }

    pub fn service_name(&self, service: ServiceId) -> &str {
        &self.services[service as usize].name
    }

    pub fn gateway(&self) -> ServiceId {
        0
    }
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> CanonicalIp {
    CanonicalIp::from(std::net::IpAddr::V4(Ipv4Addr::new(a, b, c, d)))
}

/// The gateway first, then the services, then the load balancers. Service `i` calls a few
/// services after it (a dependency graph without cycles); the gateway calls half of them and
/// every load balancer; each load balancer fronts one service.
fn services(shape: &FleetShape, rng: &mut fastrand::Rng) -> Vec<Service> {
    let mut services = vec![Service {
        name: "gateway".into(),
        kind: ServiceKind::Gateway,
        callees: Vec::new(),
    }];
    for index in 0..shape.services {
        let roll = rng.f64();
        let kind = if roll < shape.host_network_share {
            ServiceKind::HostNetwork
        } else if roll < shape.host_network_share + shape.batch_job_share {
            ServiceKind::BatchJob
        } else {
            ServiceKind::Container
        };
        let prefix = match kind {
            ServiceKind::HostNetwork => "host",
            ServiceKind::BatchJob => "job",
            _ => "svc",
        };
        services.push(Service {
            name: format!("{prefix}-{index:02}"),
            kind,
            callees: Vec::new(),
        });
    }
    let first = 1;
    let last = services.len();
    for index in first..last {
        let later: Vec<ServiceId> = ((index + 1)..last)
            .filter(|&callee| services[callee].kind != ServiceKind::BatchJob)
            .map(|callee| callee as ServiceId)
            .collect();
        let count = rng.usize(1..=4).min(later.len());
        let mut callees: Vec<ServiceId> = (0..count)
            .map(|_| later[rng.usize(..later.len())])
            .collect();
        callees.sort_unstable();
        callees.dedup();
        services[index].callees = callees;
    }
    let servers: Vec<ServiceId> = (first..last)
        .filter(|&index| services[index].kind != ServiceKind::BatchJob)
        .map(|index| index as ServiceId)
        .collect();
    for index in 0..shape.load_balancers {
        let backend = servers[rng.usize(..servers.len())];
        services.push(Service {
            name: format!("lb-{index:02}"),
            kind: ServiceKind::LoadBalancer,
            callees: vec![backend],
        });
    }
    let mut gateway: Vec<ServiceId> = servers.iter().copied().filter(|_| rng.bool()).collect();
    gateway.extend((last..services.len()).map(|index| index as ServiceId));
    services[0].callees = gateway;
    services
}

/// One replica slot's life: instances back to back, each replaced the moment it stops.
struct Life {
    service: ServiceId,
    start: Timestamp,
    end: Timestamp,
}

fn instances(
    shape: &FleetShape,
    services: &[Service],
    rng: &mut fastrand::Rng,
) -> Result<Vec<Instance>, FleetError> {
    let window_end = EPOCH.saturating_add(shape.duration);
    let lives_until = window_end.saturating_add(RUNS_ON_AFTER);
    let forever = window_end.saturating_add(Duration::from_secs(365 * 86_400));
    let mut instances = Vec::new();
    let mut lives = Vec::new();
    let mut next_host = 0usize;
    let host_network: usize = services
        .iter()
        .filter(|service| matches!(service.kind, ServiceKind::HostNetwork))
        .count()
        * shape.replicas.1;
    if host_network > shape.hosts {
        return Err(FleetError::TooFewHosts(shape.hosts, host_network));
    }
    for (id, service) in services.iter().enumerate() {
        let id = id as ServiceId;
        let replicas = rng.usize(shape.replicas.0..=shape.replicas.1.max(shape.replicas.0));
        let mean = match service.kind {
            ServiceKind::HostNetwork => {
                for _ in 0..replicas {
                    // Its host's IP for the whole window: it never changes hands.
                    let host = next_host % shape.hosts;
                    next_host += 1;
                    instances.push(Instance {
                        service: id,
                        ip: host_ip(host),
                        host: Some(host as u32),
                        start: EPOCH.saturating_sub(shape.duration),
                        end: forever,
                    });
                }
                continue;
            }
            ServiceKind::LoadBalancer => {
                lives.extend(slot_lives(
                    id,
                    1,
                    shape.load_balancer_life,
                    EPOCH,
                    lives_until,
                    rng,
                ));
                continue;
            }
            ServiceKind::BatchJob => shape.container_life / 5,
            ServiceKind::Gateway | ServiceKind::Container => shape.container_life,
        };
        lives.extend(slot_lives(id, replicas, mean, EPOCH, lives_until, rng));
    }
    // Hand out IPs in time order: every stop frees an IP before a start at the same instant
    // takes one, so a cool-down of 0 reuses an IP at once.
    lives.sort_by_key(|life| life.start);
    let mut pool = IpPool::new(shape.ip_pool, 1, shape.ip_cooldown);
    let mut lb_pool = IpPool::new(256, 200, shape.ip_cooldown);
    let mut running: std::collections::BinaryHeap<std::cmp::Reverse<(Timestamp, InstanceId)>> =
        Default::default();
    for life in lives {
        while let Some(std::cmp::Reverse((end, instance))) = running.peek().copied() {
            if end > life.start {
                break;
            }
            running.pop();
            let instance = &instances[instance as usize];
            let pool = if services[instance.service as usize].kind == ServiceKind::LoadBalancer {
                &mut lb_pool
            } else {
                &mut pool
            };
            pool.free(instance.ip, end);
        }
        let load_balancer = services[life.service as usize].kind == ServiceKind::LoadBalancer;
        let ip = if load_balancer {
            lb_pool.take(life.start, rng)
        } else {
            pool.take(life.start, rng)
        };
        let ip = ip.ok_or(FleetError::PoolExhausted {
            pool: shape.ip_pool,
            at_s: seconds_into(life.start),
        })?;
        let id = instances.len() as InstanceId;
        instances.push(Instance {
            service: life.service,
            ip,
            host: (!load_balancer).then(|| rng.u32(..shape.hosts as u32)),
            start: life.start,
            end: life.end.min(forever),
        });
        running.push(std::cmp::Reverse((life.end, id)));
    }
    Ok(instances)
}

pub fn host_ip(host: usize) -> CanonicalIp {
    v4(10, 0, (host / 250) as u8, (host % 250) as u8 + 1)
}

/// Seconds from the window's start (negative before it).
pub fn seconds_into(at: Timestamp) -> f64 {
    (at.as_nanos() as i128 - EPOCH.as_nanos() as i128) as f64 / 1e9
}

fn slot_lives(
    service: ServiceId,
    replicas: usize,
    mean: Duration,
    from: Timestamp,
    until: Timestamp,
    rng: &mut fastrand::Rng,
) -> Vec<Life> {
    let mut lives = Vec::new();
    let mean_s = mean.as_secs_f64().max(1.0);
    for _ in 0..replicas {
        // Already running when the window opens, for part of a life.
        let mut start = from.saturating_sub(Duration::from_secs_f64(rng.f64() * mean_s));
        while start < until {
            let life = Duration::from_secs_f64((exponential(rng) * mean_s).max(1.0));
            let end = start.saturating_add(life);
            lives.push(Life {
                service,
                start,
                end,
            });
            start = end;
        }
    }
    lives
}

/// A draw from the exponential distribution of mean 1.
pub fn exponential(rng: &mut fastrand::Rng) -> f64 {
    -(1.0 - rng.f64()).ln()
}

/// Free IPs in the order they were freed. A start takes the most recently freed IP whose
/// cool-down is over, as address managers with a warm pool do, so reuse is as quick as the
/// cool-down allows.
struct IpPool {
    free: VecDeque<(Timestamp, CanonicalIp)>,
    cooldown: Duration,
}

impl IpPool {
    fn new(size: u32, second_octet: u8, cooldown: Duration) -> IpPool {
        let free = (0..size)
            .map(|index| {
                (
                    Timestamp::from_nanos(0),
                    v4(10, second_octet, (index >> 8) as u8, (index & 0xff) as u8),
                )
            })
            .collect();
        IpPool { free, cooldown }
    }

    fn free(&mut self, ip: CanonicalIp, at: Timestamp) {
        self.free.push_back((at, ip));
    }

    fn take(&mut self, at: Timestamp, rng: &mut fastrand::Rng) -> Option<CanonicalIp> {
        let ready = self
            .free
            .partition_point(|(freed, _)| freed.saturating_add(self.cooldown) <= at);
        if ready == 0 {
            return None;
        }
        // Never-used addresses (freed at 0) go in random order; reused ones newest first.
        let index = if self.free[ready - 1].0 == Timestamp::from_nanos(0) {
            rng.usize(..ready)
        } else {
            ready - 1
        };
        self.free.remove(index).map(|(_, ip)| ip)
    }
}

/// Connections: arrivals at a steady rate; the gateway's go to its callees, the others' from
/// a random service to one of its callees; a connection to a load balancer is carried on by
/// one from the load balancer to its backend. Durations run from milliseconds to hours, cut
/// short when either end stops.
fn connections(fleet: &Fleet, rng: &mut fastrand::Rng) -> Vec<Connection> {
    let shape = &fleet.shape;
    let mut by_service: Vec<Vec<InstanceId>> = vec![Vec::new(); fleet.services.len()];
    for (id, instance) in fleet.instances.iter().enumerate() {
        by_service[instance.service as usize].push(id as InstanceId);
    }
    let callers: Vec<ServiceId> = (1..fleet.services.len() as ServiceId)
        .filter(|&service| {
            let service = &fleet.services[service as usize];
            !service.callees.is_empty() && service.kind != ServiceKind::LoadBalancer
        })
        .collect();
    let live = |service: ServiceId, at: Timestamp, rng: &mut fastrand::Rng| -> Option<InstanceId> {
        let candidates: Vec<InstanceId> = by_service[service as usize]
            .iter()
            .copied()
            .filter(|&id| {
                let instance = &fleet.instances[id as usize];
                instance.start <= at && at < instance.end
            })
            .collect();
        (!candidates.is_empty()).then(|| candidates[rng.usize(..candidates.len())])
    };
    let mut connections = Vec::new();
    let mut at_s = 0.0;
    let duration_s = shape.duration.as_secs_f64();
    loop {
        at_s += exponential(rng) / shape.connections_per_second.max(1e-3);
        if at_s >= duration_s {
            break;
        }
        let at = EPOCH.saturating_add(Duration::from_secs_f64(at_s));
        let client_service = if rng.f64() < shape.gateway_share || callers.is_empty() {
            fleet.gateway()
        } else {
            callers[rng.usize(..callers.len())]
        };
        let callees = &fleet.services[client_service as usize].callees;
        if callees.is_empty() {
            continue;
        }
        let server_service = callees[rng.usize(..callees.len())];
        let (Some(client), Some(server)) =
            (live(client_service, at, rng), live(server_service, at, rng))
        else {
            continue;
        };
        let length = connection_length(rng);
        let end_of = |instance: InstanceId| fleet.instances[instance as usize].end;
        let end = at
            .saturating_add(length)
            .min(end_of(client))
            .min(end_of(server));
        connections.push(Connection {
            client,
            server,
            start: at,
            end,
        });
        if fleet.services[server_service as usize].kind == ServiceKind::LoadBalancer {
            let backend_service = fleet.services[server_service as usize].callees[0];
            if let Some(backend) = live(backend_service, at, rng) {
                let end = end.min(end_of(backend));
                connections.push(Connection {
                    client: server,
                    server: backend,
                    start: at,
                    end,
                });
            }
        }
    }
    connections.sort_by_key(|connection| connection.start);
    connections
}

/// 70% of connections last 10 ms to 5 s, 25% 5 s to 5 min, 5% 5 min to 2 h (log-uniform
/// within each band).
fn connection_length(rng: &mut fastrand::Rng) -> Duration {
    let roll = rng.f64();
    let (low, high): (f64, f64) = if roll < 0.70 {
        (0.01, 5.0)
    } else if roll < 0.95 {
        (5.0, 300.0)
    } else {
        (300.0, 7200.0)
    };
    Duration::from_secs_f64((low.ln() + rng.f64() * (high.ln() - low.ln())).exp())
}
