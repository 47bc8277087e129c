//! Workload identity from the container platform: a watcher inside `flowattr-exporter run`
//! follows the host's container runtime and keeps two things in step with it, so that no name
//! is typed by hand:
//! - the eBPF IP -> workload map ([`map_sync`]), which names a flow's local side at capture;
//! - the [`history`] of which container held which address when, complete through a known
//!   instant, against which every batch's local names are checked at its cut. The map can be
//!   late (a container connects before its start is handled) or stale (an address handed on
//!   before the stop is handled); the history is only trusted where it is complete, and a
//!   flow it cannot vouch for leaves with no local workload, never a guessed one.
//!
//! [`docker`] watches a Docker daemon through its Engine API ([`docker_api`]); [`cri`] a
//! Kubernetes node's pods through its runtime's CRI ([`cri_api`]), their owners told by
//! [`kubernetes_owner`]; names come from a [`name_template`].

pub mod cri;
pub mod cri_api;
pub mod docker;
pub mod docker_api;
pub mod history;
pub mod host_ports;
pub mod kubernetes_owner;
pub mod map_sync;
pub mod name_template;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use flowattr_common::wire::FlowRecord;
use flowattr_common::{Timestamp, WorkloadIdentity};

use crate::registration::LocalAddress;

use history::{IdentityHistory, LocalOwner, Unknown};

/// The container runtime a watcher follows: named as in `--runtime`, `[identity] runtime` and
/// the metrics' `runtime` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum Runtime {
    Docker,
    /// A Kubernetes node's runtime (containerd, CRI-O) through CRI.
    Cri,
}

impl Runtime {
    pub const ALL: [Runtime; 2] = [Runtime::Docker, Runtime::Cri];

    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Docker => "docker",
            Runtime::Cri => "cri",
        }
    }

    /// Where the runtime's API listens by default (containerd's, for CRI).
    pub fn default_socket(self) -> &'static str {
        match self {
            Runtime::Docker => "/var/run/docker.sock",
            Runtime::Cri => "/run/containerd/containerd.sock",
        }
    }

    pub fn default_template(self) -> &'static str {
        match self {
            Runtime::Docker => name_template::DOCKER_DEFAULT,
            Runtime::Cri => name_template::KUBERNETES_DEFAULT,
        }
    }
}

impl std::str::FromStr for Runtime {
    type Err = String;

    fn from_str(text: &str) -> Result<Runtime, String> {
        Runtime::ALL
            .into_iter()
            .find(|runtime| runtime.as_str() == text)
            .ok_or_else(|| {
                let known: Vec<&str> = Runtime::ALL
                    .iter()
                    .map(|runtime| runtime.as_str())
                    .collect();
                format!(
                    "`{text}` is not a runtime this exporter follows ({})",
                    known.join(", ")
                )
            })
    }
}

impl TryFrom<String> for Runtime {
    type Error = String;

    fn try_from(text: String) -> Result<Runtime, String> {
        text.parse()
    }
}

/// How long the history is kept: a batch's flows are at most an interval old at its cut, and
/// a journal recovered after a crash a little more.
pub const HISTORY_KEPT: Duration = Duration::from_secs(3600);

/// What the watcher has done, for `/metrics` and `/healthz`.
#[derive(Debug, Default)]
pub struct WatcherStatus {
    pub connected: AtomicBool,
    pub resyncs: AtomicU64,
    /// Addresses a listing found the history wrong about (missed events).
    pub corrected: AtomicU64,
    pub events: AtomicU64,
    /// Times a manual registration kept an address Docker gave a container.
    pub manual_kept: AtomicU64,
    /// Flows whose local name the cut changed from another captured one (the map was stale).
    pub flows_renamed: AtomicU64,
    /// Flows captured with no local name that the cut named (the map was late).
    pub flows_named_late: AtomicU64,
    /// Cuts that went ahead without the history reaching them (the runtime slow or away).
    pub cuts_unconfirmed: AtomicU64,
    /// Flows the cut left with no local workload, per [`Unknown`] reason.
    pub flows_unnamed: [AtomicU64; 6],
    /// Addresses a manual registration holds, as the watcher last found: their flows keep the
    /// captured name.
    manual: Mutex<BTreeSet<LocalAddress>>,
}

impl WatcherStatus {
    pub fn unnamed(&self, why: Unknown) -> &AtomicU64 {
        &self.flows_unnamed[why as usize]
    }
}

/// Maps `address` to the workload of identity `key` for a watcher: the eBPF maps name
/// workloads, the history (and so each batch) their instances. A manual registration that
/// holds the address is kept, counted and told.
fn register_address(
    maps: &mut map_sync::MapSync,
    status: &WatcherStatus,
    address: LocalAddress,
    key: &str,
) {
    let identity = WorkloadIdentity::of_checked_key(key);
    let workload = identity.workload().key();
    let workload = workload.as_str();
    match maps.register(address, workload) {
        Ok(map_sync::Registered::Set) => {
            status.manual.lock().expect("not poisoned").remove(&address);
        }
        Ok(map_sync::Registered::ManualKept { holder }) => {
            status.manual.lock().expect("not poisoned").insert(address);
            status.manual_kept.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                "{address} is registered by hand to {}; kept, although the container runtime gives it to {}",
                holder.as_deref().unwrap_or("an unnamed workload"),
                identity.name
            );
        }
        Err(error) => tracing::warn!("registering {address} for {}: {error}", identity.name),
    }
}

/// Writes what a port scan of host-network containers asks ([`host_ports::HostNetworked::scan`]).
/// The doubt goes into the history first: a cut must never trust the map's name for a time the
/// scan found in doubt.
fn apply_port_changes(
    maps: &mut map_sync::MapSync,
    status: &WatcherStatus,
    history: &Mutex<IdentityHistory>,
    changes: Vec<host_ports::EntryChange>,
) {
    let now = Timestamp::now();
    for change in changes {
        let (ip, port, doubt_from) = change.doubted();
        history
            .lock()
            .expect("not poisoned")
            .doubt_port(ip, port, doubt_from, now);
        let address = LocalAddress::Shared(ip, port);
        match change {
            host_ports::EntryChange::Register { workload, .. } => {
                register_address(maps, status, address, &workload)
            }
            host_ports::EntryChange::Unregister { .. } => unregister_address(maps, address),
            host_ports::EntryChange::Contested { .. } => {}
        }
    }
}

/// The entries a watcher wrote that neither an address in `held` nor a host-network
/// container's port accounts for: what a resync removes.
fn stale_entries(
    maps: &map_sync::MapSync,
    host_networked: &host_ports::HostNetworked,
    held: impl IntoIterator<Item = LocalAddress>,
) -> Vec<LocalAddress> {
    let mut held: BTreeSet<LocalAddress> = held.into_iter().collect();
    held.extend(
        host_networked
            .written()
            .map(|(ip, port)| LocalAddress::Shared(ip, port)),
    );
    maps.written()
        .filter(|address| !held.contains(address))
        .collect()
}

/// Removes a watcher's entry for `ip`, if it is still the one it wrote.
fn unregister_address(maps: &mut map_sync::MapSync, address: LocalAddress) {
    if let Err(error) = maps.unregister(address) {
        tracing::warn!("unregistering {address}: {error}");
    }
}

/// What a watcher is started with.
#[derive(Debug, Clone)]
pub struct WatcherSettings {
    pub runtime: Runtime,
    pub socket: PathBuf,
    pub template: name_template::NameTemplate,
    /// The node's pod address ranges (CRI only): an address inside them no pod is known to
    /// hold is left unnamed, never given the host's name.
    pub pod_cidrs: Vec<ipnet::IpNet>,
}

/// A running watcher: its history and status.
#[derive(Debug, Clone)]
pub struct PlatformIdentity {
    pub runtime: Runtime,
    pub socket: PathBuf,
    history: Arc<Mutex<IdentityHistory>>,
    pub status: Arc<WatcherStatus>,
}

/// What the cut does with one flow's local name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalName {
    /// The captured name stands (not a container address, or registered by hand).
    Keep,
    Named(Arc<str>),
    Unnamed(Unknown),
}

impl PlatformIdentity {
    /// Starts the watcher's thread; it runs until `stop`.
    pub fn start(
        settings: WatcherSettings,
        maps: map_sync::MapSync,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<PlatformIdentity> {
        let WatcherSettings {
            runtime,
            socket,
            template,
            pod_cidrs,
        } = settings;
        let history = Arc::new(Mutex::new(IdentityHistory::new(HISTORY_KEPT)));
        let status = Arc::new(WatcherStatus::default());
        let run: Box<dyn FnOnce() + Send> = match runtime {
            Runtime::Docker => {
                let watcher = docker::DockerWatcher::new(
                    docker_api::DockerApi::new(&socket),
                    template,
                    history.clone(),
                    maps,
                    status.clone(),
                );
                Box::new(move || watcher.run(&stop))
            }
            Runtime::Cri => {
                let watcher = cri::CriWatcher::new(
                    cri_api::CriApi::new(&socket)?,
                    template,
                    pod_cidrs,
                    history.clone(),
                    maps,
                    status.clone(),
                );
                Box::new(move || watcher.run(&stop))
            }
        };
        std::thread::Builder::new()
            .name("flowattr-identity".into())
            .spawn(run)?;
        Ok(PlatformIdentity {
            runtime,
            socket,
            history,
            status,
        })
    }

    /// The instant through which the history is complete.
    pub fn known_through(&self) -> Option<Timestamp> {
        self.history.lock().expect("not poisoned").known_through()
    }

    /// Holds the history for naming one batch's flows.
    pub fn lookup(&self) -> CutLookup<'_> {
        let mut history = self.history.lock().expect("not poisoned");
        history.forget_before(Timestamp::now());
        CutLookup {
            history,
            manual: self.status.manual.lock().expect("not poisoned"),
            status: &self.status,
        }
    }
}

pub struct CutLookup<'a> {
    history: MutexGuard<'a, IdentityHistory>,
    manual: MutexGuard<'a, BTreeSet<LocalAddress>>,
    status: &'a WatcherStatus,
}

impl CutLookup<'_> {
    /// The local workload of `flow`, captured as `captured`: the container that held its local
    /// address from the flow's start through its end (the flow is that container's evidence
    /// for all of it). A socket cannot change network namespace, so a flow that began before
    /// the history does, and was still open when it begins, is named by who held the address
    /// from then.
    pub fn local_name(&self, flow: &FlowRecord, captured: Option<&str>) -> LocalName {
        if let Some(v4) = flow.local_ip.to_v4()
            && self
                .history
                .port_doubted(v4, flow.local_port, flow.start, flow.end)
        {
            self.status
                .unnamed(Unknown::PortUnconfirmed)
                .fetch_add(1, Ordering::Relaxed);
            return LocalName::Unnamed(Unknown::PortUnconfirmed);
        }
        if flow.local_shared
            || self
                .manual
                .contains(&LocalAddress::Ip(flow.local_ip.to_ip_addr()))
        {
            return LocalName::Keep;
        }
        let mut at = flow.start;
        if let Some(from) = self.history.known_from()
            && at < from
            && flow.end >= from
        {
            at = from;
        }
        match self.history.owner_over(flow.local_ip, at, flow.end) {
            LocalOwner::NotManaged => LocalName::Keep,
            // The map holds the workload; the history adds its instance.
            LocalOwner::Owner(key)
                if captured.is_some_and(|captured| {
                    WorkloadIdentity::of_checked_key(captured)
                        == WorkloadIdentity::of_checked_key(&key).workload()
                }) =>
            {
                LocalName::Named(key)
            }
            LocalOwner::Owner(name) => {
                let counter = if captured.is_some() {
                    &self.status.flows_renamed
                } else {
                    &self.status.flows_named_late
                };
                counter.fetch_add(1, Ordering::Relaxed);
                LocalName::Named(name)
            }
            LocalOwner::Unknown(why) => {
                self.status.unnamed(why).fetch_add(1, Ordering::Relaxed);
                LocalName::Unnamed(why)
            }
        }
    }
}
