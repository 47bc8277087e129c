//! The Kubernetes watcher: keeps the [`IdentityHistory`] and the eBPF map in step with the pods
//! of this node, as its container runtime tells them through CRI ([`cri_api`](super::cri_api)).
//!
//! CRI has no event stream every runtime serves, so the watcher lists the node's pod sandboxes
//! every [`POLL_PERIOD`]; each listing is complete for the instant it was asked, and the
//! history is known through it. A pod's hold on its addresses is taken as narrowly as the
//! listings prove it:
//! - from the sandbox's creation: the runtime stamps it before it sets up the pod's network,
//!   so no address can be the pod's before then;
//! - through the last listing that found the sandbox ready: a ready sandbox has its network,
//!   while a stopping one may have handed its addresses on already.
//!
//! A flow of a pod's last moments (after the last listing that found it ready) therefore
//! leaves unnamed, as does one of an address two pods' holds overlap on; none is named after
//! the wrong pod. A pod's own addresses are only its own; a pod on the host's network has none,
//! and is named by the ports its processes listen on ([`host_ports`](super::host_ports)).
//! Which addresses are pods' at all is told by the node's pod CIDRs: an address inside them
//! that no listed pod holds is unnamed, never the host's.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowattr_common::{CanonicalIp, Timestamp};
use ipnet::IpNet;

use super::cri_api::{self, CriApi, CriError};
use super::history::IdentityHistory;
use super::host_ports::{self, HostNetworked};
use super::kubernetes_owner::pod_owner;
use super::map_sync::MapSync;
use super::name_template::{ContainerFields, NameTemplate};
use super::{WatcherStatus, stale_entries};
use crate::registration::LocalAddress;

/// How often the node's pod sandboxes are listed.
const POLL_PERIOD: Duration = Duration::from_millis(250);

/// The gRPC status of a sandbox that is gone.
const NOT_FOUND: u32 = 5;

/// The one network a pod's addresses are held on, for the history.
const POD_NETWORK: &str = "pod";

/// A ready pod with addresses of its own, or on the host's network (none of its own: named by
/// the ports it listens on, [`host_ports`](super::host_ports)).
#[derive(Debug)]
struct Pod {
    workload: String,
    ips: Vec<CanonicalIp>,
    host_network: bool,
    /// The last listing that found it ready.
    last_ready: Timestamp,
}

pub struct CriWatcher {
    api: CriApi,
    template: NameTemplate,
    pod_cidrs: Vec<IpNet>,
    history: Arc<Mutex<IdentityHistory>>,
    maps: MapSync,
    status: Arc<WatcherStatus>,
    pods: BTreeMap<String, Pod>,
    /// Ready sandboxes already looked at that name nothing (no address, not on the host's
    /// network), not asked about again.
    others: BTreeSet<String>,
    host_networked: HostNetworked,
    /// Whether the last listing succeeded: after a failure, what happened meanwhile is in
    /// doubt, and the map is made to agree with the next listing whole.
    in_step: bool,
}

impl CriWatcher {
    pub fn new(
        api: CriApi,
        template: NameTemplate,
        pod_cidrs: Vec<IpNet>,
        history: Arc<Mutex<IdentityHistory>>,
        maps: MapSync,
        status: Arc<WatcherStatus>,
    ) -> CriWatcher {
        CriWatcher {
            api,
            template,
            pod_cidrs,
            history,
            maps,
            status,
            pods: BTreeMap::new(),
            others: BTreeSet::new(),
            host_networked: HostNetworked::default(),
            in_step: false,
        }
    }

    /// Watches until `stop`.
    pub fn run(mut self, stop: &AtomicBool) {
        let mut said: Option<String> = None;
        while !stop.load(Ordering::Relaxed) {
            match self.list() {
                Ok(()) => {
                    if said.take().is_some() {
                        tracing::info!(
                            "container runtime at {} answers again",
                            self.api.socket().display()
                        );
                    }
                    self.status.connected.store(true, Ordering::Relaxed);
                    std::thread::sleep(POLL_PERIOD);
                }
                Err(error) => {
                    self.history
                        .lock()
                        .expect("not poisoned")
                        .missed_until(Timestamp::now());
                    self.in_step = false;
                    self.status.connected.store(false, Ordering::Relaxed);
                    let text = error.to_string();
                    if said.as_deref() != Some(text.as_str()) {
                        tracing::warn!(
                            "{text}; capture goes on, and flows of pod addresses from now until it answers are sent with no local workload"
                        );
                        said = Some(text);
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    /// Lists the sandboxes, and brings the history and the map up to the listing.
    fn list(&mut self) -> Result<(), CriError> {
        let at = Timestamp::now();
        let listed: cri_api::ListPodSandboxResponse = self
            .api
            .call("ListPodSandbox", &cri_api::ListPodSandboxRequest {})?;
        let ready: BTreeMap<&str, &cri_api::PodSandbox> = listed
            .items
            .iter()
            .filter(|sandbox| sandbox.state == cri_api::SANDBOX_READY)
            .map(|sandbox| (sandbox.id.as_str(), sandbox))
            .collect();
        let mut new_pods = Vec::new();
        for (id, sandbox) in &ready {
            if self.pods.contains_key(*id) || self.others.contains(*id) {
                continue;
            }
            match self.inspect(sandbox)? {
                Some(pod) => new_pods.push(((*id).to_owned(), sandbox.created_at, pod)),
                None => {
                    self.others.insert((*id).to_owned());
                }
            }
        }
        self.others.retain(|id| ready.contains_key(id.as_str()));
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|id| !ready.contains_key(id.as_str()))
            .cloned()
            .collect();

        let mut history = self.history.lock().expect("not poisoned");
        history.set_networks(self.pod_cidrs.clone(), host_addresses());
        let mut released = Vec::new();
        for id in gone {
            let pod = self.pods.remove(&id).expect("listed above");
            // Its hold is proven through the last listing that found it ready, no further.
            history.detached(
                &id,
                None,
                Timestamp::from_nanos(pod.last_ready.as_nanos() + 1),
            );
            released.extend(pod.ips);
        }
        for pod in self.pods.values_mut() {
            pod.last_ready = at;
        }
        let mut attached = Vec::new();
        self.host_networked.retain(|id| ready.contains_key(id));
        for (id, created_at, mut pod) in new_pods {
            // From its creation, even when that came after this listing was asked for (the
            // runtime reads its state a moment later): a hold taken from before its creation
            // could claim its address while the previous pod still had it.
            let from = Timestamp::from_nanos(u64::try_from(created_at).unwrap_or(0));
            if pod.host_network {
                self.host_networked.add(&id, &pod.workload, from);
            }
            for &ip in &pod.ips {
                history.attached(&id, POD_NETWORK, ip, &pod.workload, from);
                attached.push((ip, pod.workload.clone()));
            }
            pod.last_ready = at;
            self.pods.insert(id, pod);
        }
        drop(history);
        // Pods on the host's network: their ports, scanned before the history is said complete.
        self.scan_host_ports();
        self.history
            .lock()
            .expect("not poisoned")
            .complete_through(at);

        self.status
            .events
            .fetch_add((released.len() + attached.len()) as u64, Ordering::Relaxed);
        for ip in released {
            // An address handed from one pod to another in the same listing stays registered.
            if !attached.iter().any(|(new, _)| *new == ip) {
                self.unregister(ip);
            }
        }
        if !self.in_step {
            // After a start or a failure: every entry this watcher wrote that no ready pod
            // holds goes, and every pod's is written again.
            let stale = stale_entries(
                &self.maps,
                &self.host_networked,
                self.pods
                    .values()
                    .flat_map(|pod| pod.ips.iter().map(|ip| LocalAddress::from(*ip))),
            );
            for ip in stale {
                self.unregister(ip);
            }
            attached = self
                .pods
                .values()
                .flat_map(|pod| pod.ips.iter().map(|ip| (*ip, pod.workload.clone())))
                .collect();
            self.status.resyncs.fetch_add(1, Ordering::Relaxed);
            self.in_step = true;
        }
        for (ip, workload) in attached {
            self.register(ip, &workload);
        }
        Ok(())
    }

    /// A ready sandbox's workload and addresses (none on the host's network); None if it is no
    /// longer ready, or has no address and is not on the host's network.
    fn inspect(&mut self, sandbox: &cri_api::PodSandbox) -> Result<Option<Pod>, CriError> {
        let request = cri_api::PodSandboxStatusRequest {
            pod_sandbox_id: sandbox.id.clone(),
            verbose: false,
        };
        let answer: cri_api::PodSandboxStatusResponse =
            match self.api.call("PodSandboxStatus", &request) {
                Ok(answer) => answer,
                Err(error) if error.status_code() == Some(NOT_FOUND) => return Ok(None),
                Err(error) => return Err(error),
            };
        let Some(status) = answer.status else {
            return Ok(None);
        };
        if status.state != cri_api::SANDBOX_READY {
            return Ok(None);
        }
        let host_network = status
            .linux
            .as_ref()
            .and_then(|linux| linux.namespaces.as_ref())
            .and_then(|namespaces| namespaces.options.as_ref())
            .is_some_and(|options| options.network == cri_api::NAMESPACE_MODE_NODE);
        let network = status.network.unwrap_or_default();
        let ips: Vec<CanonicalIp> = std::iter::once(network.ip.as_str())
            .chain(network.additional_ips.iter().map(|extra| extra.ip.as_str()))
            .filter_map(|text| text.parse::<std::net::IpAddr>().ok())
            .map(CanonicalIp::from)
            .collect();
        if host_network {
            // The node's own addresses, which keep the host's name but for the ports the pod
            // listens on.
            return Ok(Some(Pod {
                workload: self.workload(
                    &sandbox.id,
                    status.metadata.unwrap_or_default(),
                    status.labels,
                ),
                ips: Vec::new(),
                host_network: true,
                last_ready: Timestamp::ZERO,
            }));
        }
        if ips.is_empty() {
            return Ok(None);
        }
        Ok(Some(Pod {
            workload: self.workload(
                &sandbox.id,
                status.metadata.unwrap_or_default(),
                status.labels,
            ),
            ips,
            host_network: false,
            last_ready: Timestamp::ZERO,
        }))
    }

    /// A pod's identity key, from the name template.
    fn workload(
        &self,
        id: &str,
        metadata: cri_api::PodSandboxMetadata,
        labels: std::collections::HashMap<String, String>,
    ) -> String {
        let labels: BTreeMap<String, String> = labels.into_iter().collect();
        let (kind, owner) = pod_owner(&metadata.name, &labels);
        let (workload, problem) = self.template.identity(&ContainerFields {
            name: &metadata.name,
            id,
            labels: &labels,
            namespace: &metadata.namespace,
            owner: &owner,
            owner_kind: kind.as_str(),
        });
        if let Some(problem) = problem {
            tracing::warn!(
                "pod {}/{}: {problem}; named {}",
                metadata.namespace,
                metadata.name,
                metadata.name
            );
        }
        workload
    }

    /// Brings the shared-map entries of the pods on the host's network in step with the ports
    /// their processes listen on now.
    fn scan_host_ports(&mut self) {
        if self.host_networked.is_empty() {
            return;
        }
        let api = &mut self.api;
        let changes =
            self.host_networked.scan(
                Path::new("/proc"),
                Timestamp::now(),
                |id| match pod_processes(api, id) {
                    Ok(pids) => Some(host_ports::with_descendants(Path::new("/proc"), &pids)),
                    Err(error) if error.status_code() == Some(NOT_FOUND) => Some(Vec::new()),
                    // The runtime is away: the entries stand until it answers.
                    Err(_) => None,
                },
            );
        super::apply_port_changes(&mut self.maps, &self.status, &self.history, changes);
    }

    fn register(&mut self, address: impl Into<LocalAddress>, workload: &str) {
        super::register_address(&mut self.maps, &self.status, address.into(), workload);
    }

    fn unregister(&mut self, address: impl Into<LocalAddress>) {
        super::unregister_address(&mut self.maps, address.into());
    }
}

/// The processes a pod's sandbox and running containers started with, as the runtime's verbose
/// answers give them.
fn pod_processes(api: &mut CriApi, sandbox_id: &str) -> Result<Vec<u32>, CriError> {
    let sandbox: cri_api::PodSandboxStatusResponse = api.call(
        "PodSandboxStatus",
        &cri_api::PodSandboxStatusRequest {
            pod_sandbox_id: sandbox_id.to_owned(),
            verbose: true,
        },
    )?;
    let mut pids: Vec<u32> = cri_api::info_pid(&sandbox.info).into_iter().collect();
    let filter = cri_api::ContainerFilter {
        pod_sandbox_id: sandbox_id.to_owned(),
    };
    let listed: cri_api::ListContainersResponse = api.call(
        "ListContainers",
        &cri_api::ListContainersRequest {
            filter: Some(filter),
        },
    )?;
    for container in listed
        .containers
        .iter()
        .filter(|container| container.state == cri_api::CONTAINER_RUNNING)
    {
        let request = cri_api::ContainerStatusRequest {
            container_id: container.id.clone(),
            verbose: true,
        };
        match api.call::<cri_api::ContainerStatusResponse>("ContainerStatus", &request) {
            Ok(status) => pids.extend(cri_api::info_pid(&status.info)),
            Err(error) if error.status_code() == Some(NOT_FOUND) => {}
            Err(error) => return Err(error),
        }
    }
    Ok(pids)
}

/// Where CNI plugins find their configuration on a Kubernetes node.
pub const CNI_CONFIG_DIR: &str = "/etc/cni/net.d";

/// The address ranges the CNI configuration in `dir` hands pods (its IPAM's `subnet`s, as
/// host-local takes them); none if it names none (an IPAM that keeps its ranges elsewhere).
pub fn pod_cidrs_from_cni(dir: &std::path::Path) -> Vec<IpNet> {
    fn walk(value: &serde_json::Value, found: &mut Vec<IpNet>) {
        match value {
            serde_json::Value::Object(fields) => {
                for (key, value) in fields {
                    match (
                        key.as_str(),
                        value.as_str().and_then(|text| text.parse::<IpNet>().ok()),
                    ) {
                        ("subnet", Some(subnet)) => found.push(subnet.trunc()),
                        _ => walk(value, found),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|item| walk(item, found)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if !matches!(
            path.extension().and_then(|extension| extension.to_str()),
            Some("conf" | "conflist" | "json")
        ) {
            continue;
        }
        if let Some(config) = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        {
            walk(&config, &mut found);
        }
    }
    found.sort();
    found.dedup();
    found
}

/// The addresses of this host's own interfaces (a pod network's gateway among them): never a
/// pod's, so their flows keep the host's name.
fn host_addresses() -> Vec<CanonicalIp> {
    match if_addrs::get_if_addrs() {
        Ok(interfaces) => interfaces
            .iter()
            .map(|interface| CanonicalIp::from(interface.ip()))
            .collect(),
        Err(error) => {
            tracing::warn!("listing this host's addresses: {error}");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_ranges_are_read_from_host_local_configurations_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let bridge = r#"{"cniVersion":"0.4.0","name":"pods","plugins":[{"type":"bridge","ipam":{"type":"host-local",
            "ranges":[[{"subnet":"10.244.3.0/24"}],[{"subnet":"fd00:10:244:3::/64"}]]}},{"type":"portmap"}]}"#;
        std::fs::write(dir.path().join("10-bridge.conflist"), bridge).unwrap();
        std::fs::write(
            dir.path().join("20-old.conf"),
            r#"{"type":"bridge","ipam":{"type":"host-local","subnet":"10.88.0.1/16"}}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("30-calico.conflist"),
            r#"{"plugins":[{"type":"calico","ipam":{"type":"calico-ipam"}}]}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("README"), "subnet 1.2.3.0/24").unwrap();
        std::fs::write(dir.path().join("40-broken.conf"), "{not json").unwrap();
        let found: Vec<String> = pod_cidrs_from_cni(dir.path())
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            found,
            ["10.88.0.0/16", "10.244.3.0/24", "fd00:10:244:3::/64"]
        );
        assert!(pod_cidrs_from_cni(&dir.path().join("absent")).is_empty());
    }
}
