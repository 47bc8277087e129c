//! A collector node: one glommio executor per configured CPU, pinned, each running a
//! [`Shard`] and an ingest listener on the shared port; the control plane on its own thread.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use glommio::channels::channel_mesh::MeshBuilder;
use glommio::{CpuSet, LocalExecutorPoolBuilder, PoolPlacement, PoolThreadHandles};

use crate::broadcast::{Broadcast, BroadcastError, PEER_QUEUE};
use crate::config::{Config, ConfigError, StorageKind};
use crate::connection_slots::ConnectionSlots;
use crate::events::{EventDelivery, EventsStatus};
use crate::http::ControlPlane;
use crate::memory::MemoryCap;
use crate::metrics::ShardMetrics;
use crate::node_state::{NodeShared, ShardView};
use crate::partial_frames::PartialFrameBudget;
use crate::peer_message::PeerMessage;
use crate::region::{Forwarding, start_forwarders};
use crate::shard::{Shard, ShardQuery};
use crate::shard_router::ShardRouter;
use crate::sink::{SinkError, SinkSet};
use crate::tls::NodeTls;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Broadcast(#[from] BroadcastError),
    #[error("delay buffer directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "delay buffer directory {path} was written by a node with {found} shards; this one has {configured}. Start with --cpus {found} to drain it, or move it away"
    )]
    ShardCountChanged {
        path: PathBuf,
        found: usize,
        configured: usize,
    },
    #[error("http.bearer_token_file {path}: {source}")]
    BearerToken {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    IoUring(#[from] crate::io_uring_probe::IoUringRefused),
    #[error("starting executors: {0}")]
    Executors(String),
    #[error("shard {shard} failed to start: {reason}")]
    ShardStart { shard: usize, reason: String },
    #[error(transparent)]
    Tls(#[from] flowattr_common::tls::TlsError),
}

/// A running node.
pub struct Node {
    pub ingest_addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    pub shared: Arc<NodeShared>,
    executors: PoolThreadHandles<()>,
}

/// Queue length of each mesh channel, in messages (batch parts, not flows).
const MESH_QUEUE: usize = 64;

impl Node {
    pub fn start(config: Config) -> Result<Node, NodeError> {
        crate::io_uring_probe::check()?;
        config.validate()?;
        let shards = config.executor_count();
        let tls = config.tls.as_ref().map(NodeTls::load).transpose()?;
        let bearer_token = config
            .http
            .bearer_token()
            .map_err(|source| NodeError::BearerToken {
                path: config.http.bearer_token_file.clone().unwrap_or_default(),
                source,
            })?;
        let sinks = SinkSet::open(&config.sinks, config.node.region.as_deref())?;
        if config.delay.storage == StorageKind::Disk {
            prepare_data_dir(&config, shards)?;
        }
        // Bound but not listening: it reserves the port (a `:0` listen address becomes a real
        // one) while the executors bind it with SO_REUSEPORT.
        let reservation = reserve_port(config.ingest.listen)?;
        let ingest_addr = reservation
            .local_addr()
            .ok()
            .and_then(|addr| addr.as_socket())
            .ok_or_else(|| NodeError::Listen {
                addr: config.ingest.listen,
                source: std::io::Error::other("no local address"),
            })?;
        let mut peer_senders = Vec::with_capacity(shards);
        let mut peer_receivers = Vec::with_capacity(shards);
        for _ in 0..shards {
            let (sender, receiver) = mpsc::sync_channel::<PeerMessage>(PEER_QUEUE);
            peer_senders.push(sender);
            peer_receivers.push(Some(receiver));
        }
        let (broadcast, events) = match config.cluster.brokers.clone() {
            Some(brokers) => {
                let broadcast = Broadcast::start(&config, &brokers, peer_senders.clone())?;
                let events = Arc::new(EventsStatus::new(broadcast.status.reader_restarts.clone()));
                if config.events.enabled() {
                    let router = ShardRouter::new(peer_senders.len());
                    let deliver = move |delivery| match delivery {
                        // Blocks while the shard is behind: nothing is dropped.
                        EventDelivery::Event(event) => {
                            let _ = peer_senders[router.shard_of(event.ip)]
                                .send(PeerMessage::Events(vec![event]));
                        }
                        EventDelivery::CaughtUp => {
                            for shard in &peer_senders {
                                let _ = shard.send(PeerMessage::CaughtUp);
                            }
                        }
                    };
                    crate::events::start_consumer(
                        &config,
                        &brokers,
                        broadcast.node_id,
                        deliver,
                        events.clone(),
                    )
                    .map_err(|source| BroadcastError::Thread {
                        thread: "events",
                        source,
                    })?;
                }
                (Some(broadcast), Some(events))
            }
            None => (None, None),
        };
        let peer_receivers = Arc::new(Mutex::new(peer_receivers));
        let forwarding = Forwarding::new(&config).map_err(|source| NodeError::DataDir {
            path: config.delay.dir.join("forward"),
            source,
        })?;
        if let Some(forwarding) = &forwarding {
            start_forwarders(
                forwarding,
                config.node.region.as_deref(),
                tls.as_ref().map(|tls| tls.client().clone()),
            )
            .map_err(|error| NodeError::Executors(error.to_string()))?;
        }
        let shared = Arc::new(NodeShared {
            shards,
            metrics: (0..shards).map(|_| ShardMetrics::default()).collect(),
            views: (0..shards)
                .map(|_| {
                    Mutex::new(ShardView {
                        edges: Vec::new(),
                        extra_latency: crate::metrics::new_milliseconds_histogram(),
                    })
                })
                .collect(),
            sinks,
            connection_slots: ConnectionSlots::new(
                config.ingest.max_connections,
                config.ingest.max_connections_per_address,
            ),
            partial_frames: PartialFrameBudget::new(config.ingest.max_partial_frame_bytes),
            memory: MemoryCap::start(config.node.max_memory_bytes),
            broadcast,
            events,
            forwarding,
            tls,
            config,
        });
        let mut query_senders = Vec::with_capacity(shards);
        let mut query_receivers = Vec::with_capacity(shards);
        for _ in 0..shards {
            let (sender, receiver) = mpsc::channel::<ShardQuery>();
            query_senders.push(sender);
            query_receivers.push(Some(receiver));
        }
        let query_receivers = Arc::new(Mutex::new(query_receivers));
        let (started, startup) = mpsc::channel::<(usize, Result<(), String>)>();
        let data_mesh = MeshBuilder::full(shards, MESH_QUEUE);
        let control_mesh = MeshBuilder::full(shards, MESH_QUEUE);
        let node = shared.clone();
        let accepting = Arc::new(AtomicBool::new(false));
        let open_gate = accepting.clone();
        // Sink threads (and the forwarding spool's writes) float over every core: formatting
        // and writing must not take turns with attribution on the shard's own core. One more
        // than the batches a shard keeps in flight, so a spool write never waits behind them.
        let blocking_threads = shared.config.output.threads_per_shard + 1;
        let executors = LocalExecutorPoolBuilder::new(placement(shards)?)
            .name(crate::threads::SHARD)
            .blocking_thread_pool_placement(PoolPlacement::Unbound(blocking_threads))
            .on_all_shards(move || {
                let node = node.clone();
                let started = started.clone();
                let query_receivers = query_receivers.clone();
                let peer_receivers = peer_receivers.clone();
                let accepting = accepting.clone();
                async move {
                    let data = data_mesh.join().await;
                    let control = control_mesh.join().await;
                    let (data, control) = match (data, control) {
                        (Ok(data), Ok(control)) => (data, control),
                        _ => {
                            let _ =
                                started.send((usize::MAX, Err("joining the channel mesh".into())));
                            return;
                        }
                    };
                    let id = data.0.peer_id();
                    let queries = query_receivers.lock().expect("not poisoned")[id]
                        .take()
                        .expect("one receiver per shard");
                    let peers = peer_receivers.lock().expect("not poisoned")[id]
                        .take()
                        .expect("one receiver per shard");
                    let (shard, inboxes) = Shard::new(node, data, control);
                    let listener = match glommio::net::TcpListener::bind(ingest_addr) {
                        Ok(listener) => listener,
                        Err(error) => {
                            let _ =
                                started.send((id, Err(format!("binding {ingest_addr}: {error}"))));
                            return;
                        }
                    };
                    if let Err(error) = shard.clone().run(inboxes, queries, peers).await {
                        let _ = started
                            .send((id, Err(format!("recovering the delay buffer: {error}"))));
                        return;
                    }
                    let _ = started.send((id, Ok(())));
                    // No shard takes connections until every shard has replayed: a retried
                    // batch that reached a shard still replaying would not be recognised as a
                    // duplicate of the copy in its segments, and would be stored twice.
                    while !accepting.load(Ordering::Acquire) {
                        glommio::timer::sleep(Duration::from_millis(2)).await;
                    }
                    crate::ingest::accept_loop(listener, shard).await;
                }
            })
            .map_err(|error| NodeError::Executors(error.to_string()))?;
        for _ in 0..shards {
            match startup.recv_timeout(Duration::from_secs(300)) {
                Ok((_, Ok(()))) => {}
                Ok((shard, Err(reason))) => return Err(NodeError::ShardStart { shard, reason }),
                Err(_) => {
                    return Err(NodeError::Executors(
                        "an executor stopped before it was ready".into(),
                    ));
                }
            }
        }
        open_gate.store(true, Ordering::Release);
        drop(reservation);
        let http_addr = match shared.config.http.listen {
            Some(addr) => Some(
                ControlPlane::start(addr, bearer_token, shared.clone(), query_senders)
                    .map_err(|source| NodeError::Listen { addr, source })?,
            ),
            None => None,
        };
        Ok(Node {
            ingest_addr,
            http_addr,
            shared,
            executors,
        })
    }

    /// Flows emitted so far, over all shards.
    pub fn flows_emitted(&self) -> u64 {
        self.shared
            .metrics
            .iter()
            .map(ShardMetrics::flows_emitted)
            .sum()
    }

    pub fn open_connections(&self) -> usize {
        self.shared.connection_slots.open()
    }

    /// Blocks while the node runs (until the process is stopped).
    pub fn wait(self) {
        let _ = self.executors.join_all();
    }
}

fn reserve_port(addr: SocketAddr) -> Result<socket2::Socket, NodeError> {
    let listen_error = |source| NodeError::Listen { addr, source };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(listen_error)?;
    socket.set_reuse_port(true).map_err(listen_error)?;
    socket.set_reuse_address(true).map_err(listen_error)?;
    socket.bind(&addr.into()).map_err(listen_error)?;
    Ok(socket)
}

/// Creates the per-shard directories and checks (or writes) the manifest recording how many
/// shards the buffered segments were routed for.
///
/// A node must always start again after a crash, including one during this function: the
/// manifest is written only when missing or different, through a temporary file that is synced
/// and renamed over it (and the directory synced), so it is the old one or the new one, never
/// empty. An empty or unreadable manifest with no segment beside it describes nothing and is
/// treated as absent.
fn prepare_data_dir(config: &Config, shards: usize) -> Result<(), NodeError> {
    let dir = &config.delay.dir;
    let io_error = |source| NodeError::DataDir {
        path: dir.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io_error)?;
    let manifest = dir.join("manifest");
    let wanted = format!("shards={shards}\n");
    let has_segments = |count: usize| {
        (0..count).any(|shard| {
            std::fs::read_dir(dir.join(format!("shard-{shard}")))
                .map(|entries| {
                    entries
                        .flatten()
                        .any(|entry| entry.path().extension().is_some_and(|ext| ext == "seg"))
                })
                .unwrap_or(false)
        })
    };
    let current = match std::fs::read(&manifest) {
        // Bytes that are not text are as garbled as text that is not `shards=N`.
        Ok(bytes) => Some(String::from_utf8_lossy(&bytes).into_owned()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
        Err(error) => return Err(io_error(error)),
    };
    match current.as_deref().map(|text| {
        text.trim()
            .strip_prefix("shards=")
            .and_then(|n| n.parse::<usize>().ok())
    }) {
        Some(Some(found)) if found == shards => {}
        Some(Some(found)) if has_segments(found) => {
            return Err(NodeError::ShardCountChanged {
                path: dir.clone(),
                found,
                configured: shards,
            });
        }
        Some(None) if has_segments(MANIFEST_SCAN_SHARDS) => {
            return Err(io_error(std::io::Error::other(format!(
                "manifest {} is not `shards=N` and segments are buffered beside it: write the shard count that wrote them into it",
                manifest.display()
            ))));
        }
        _ => flowattr_common::durable::replace_file(&manifest, wanted.as_bytes())
            .map_err(io_error)?,
    }
    for shard in 0..shards {
        std::fs::create_dir_all(dir.join(format!("shard-{shard}"))).map_err(io_error)?;
    }
    Ok(())
}

/// How many shard directories are searched for segments when the manifest cannot say.
const MANIFEST_SCAN_SHARDS: usize = 1024;

/// One executor per CPU, spread across cores and packages, within the CPUs this process may
/// run on: glommio picks from every online CPU, and an executor pinned outside a container's
/// cpuset fails to start (outside a taskset mask, it runs where the operator said not to).
/// More shards than allowed CPUs share them (the host check warns at start).
fn placement(shards: usize) -> Result<PoolPlacement, NodeError> {
    let online = CpuSet::online()
        .map_err(|error| NodeError::Executors(format!("reading the CPU topology: {error}")))?;
    let allowed = match crate::host::allowed_cpus() {
        Some(allowed) => online.filter(|location| allowed.contains(&location.cpu)),
        None => online,
    };
    if allowed.len() < shards {
        Ok(PoolPlacement::Fenced(shards, allowed))
    } else {
        Ok(PoolPlacement::MaxSpread(shards, Some(allowed)))
    }
}
