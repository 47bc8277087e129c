//! The Docker watcher: keeps the [`IdentityHistory`] and the eBPF map in step with the Docker
//! daemon on this host.
//!
//! It lists the networks and running containers at start (and after any doubt), then follows
//! the daemon's events in windows: every [`POLL_PERIOD`] it asks for the events from the end
//! of the last window until shortly before now (`/events?since=..&until=..`). The daemon
//! answers such a window from its own event log and closes it, so each answer is complete for
//! its window, and the history is known through the window's end: that is what lets a batch's
//! cut trust it. A window that fails, or comes back as full as the daemon's log (older events
//! may have been dropped from it), is a doubt: the time since the last complete window is
//! marked missed, and everything is listed again (counted as a resync, with what it
//! corrected).
//!
//! A container on the host's network has no address of its own: at every window, before the
//! history is said complete through it, the watcher registers the ports its processes listen
//! on as (host IPv4, port) entries of the shared-address map ([`host_ports`](super::host_ports)),
//! removes those it stopped listening on, and tells the history when each port's name was in
//! doubt, so that no cut trusts the map's name for a flow of that time.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowattr_common::{CanonicalIp, Timestamp};
use ipnet::IpNet;
use serde_json::Value;

use super::docker_api::{DockerApi, DockerError};
use super::history::IdentityHistory;
use super::host_ports::HostNetworked;
use super::map_sync::MapSync;
use super::name_template::{ContainerFields, NameTemplate};
use super::{WatcherStatus, stale_entries};
use crate::registration::LocalAddress;

/// How often the daemon is asked for the latest window of events.
const POLL_PERIOD: Duration = Duration::from_millis(250);
/// Windows end this far before now: an event stamped just before a window's end may reach the
/// daemon's log a moment after it.
const SETTLE: Duration = Duration::from_millis(100);
/// The daemon keeps its latest 256 events for such questions; a window as full may have lost
/// some.
const DAEMON_LOG_EVENTS: usize = 256;

/// One container address as the daemon lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Attachment {
    network: String,
    ip: CanonicalIp,
}

/// What the watcher knows of a container.
#[derive(Debug, Clone)]
struct Container {
    workload: String,
    attachments: Vec<Attachment>,
    /// On the host's network (`--network host`): named by the ports it listens on.
    host_network: bool,
    /// When Docker started it.
    started: Timestamp,
}

pub struct DockerWatcher {
    api: DockerApi,
    template: NameTemplate,
    history: Arc<Mutex<IdentityHistory>>,
    maps: MapSync,
    status: Arc<WatcherStatus>,
    /// The end of the last complete window.
    since: Option<Timestamp>,
    host_networked: HostNetworked,
}

impl DockerWatcher {
    pub fn new(
        api: DockerApi,
        template: NameTemplate,
        history: Arc<Mutex<IdentityHistory>>,
        maps: MapSync,
        status: Arc<WatcherStatus>,
    ) -> DockerWatcher {
        DockerWatcher {
            api,
            template,
            history,
            maps,
            status,
            since: None,
            host_networked: HostNetworked::default(),
        }
    }

    /// Watches until `stop`.
    pub fn run(mut self, stop: &std::sync::atomic::AtomicBool) {
        let mut said: Option<String> = None;
        while !stop.load(Ordering::Relaxed) {
            let result = match self.since {
                None => self.list_everything(),
                Some(since) => self.follow(since),
            };
            match result {
                Ok(()) => {
                    if said.take().is_some() {
                        tracing::info!(
                            "Docker daemon at {} answers again",
                            self.api.socket().display()
                        );
                    }
                    self.status.connected.store(true, Ordering::Relaxed);
                }
                Err(error) => {
                    // What happened since the last complete window is in doubt until the
                    // next full listing; flows of that time are said to be the runtime's
                    // absence, not just not yet known.
                    self.since = None;
                    self.history
                        .lock()
                        .expect("not poisoned")
                        .missed_until(Timestamp::now());
                    self.status.connected.store(false, Ordering::Relaxed);
                    let text = error.to_string();
                    if said.as_deref() != Some(text.as_str()) {
                        tracing::warn!(
                            "{text}; capture goes on, and flows of container addresses from now until it answers are sent with no local workload"
                        );
                        said = Some(text);
                    }
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            }
            std::thread::sleep(POLL_PERIOD);
        }
    }

    /// Lists networks and running containers, and makes the history and the map agree with
    /// them.
    fn list_everything(&mut self) -> Result<(), DockerError> {
        let at = Timestamp::now();
        let (subnets, gateways) = self.networks()?;
        let listed = self.api.get("/containers/json")?.unwrap_or(Value::Null);
        let mut containers = BTreeMap::new();
        for entry in listed.as_array().into_iter().flatten() {
            let Some(id) = entry["Id"].as_str() else {
                continue;
            };
            if let Some(container) = self.inspect(id)? {
                containers.insert(id.to_owned(), container);
            }
        }
        let mut history = self.history.lock().expect("not poisoned");
        let first = history.known_through().is_none();
        history.missed_until(at);
        history.set_networks(subnets, gateways);
        let mut corrected = 0u64;
        for (container, network, ip) in history.open() {
            let still = containers.get(&*container).is_some_and(|listed| {
                listed
                    .attachments
                    .iter()
                    .any(|attachment| attachment.network == *network && attachment.ip == ip)
            });
            if !still {
                history.detached(&container, Some(&network), at);
                corrected += 1;
            }
        }
        let mut attached = Vec::new();
        let open = history.open();
        for (id, container) in &containers {
            for attachment in &container.attachments {
                let known = open.iter().any(|(holder, network, ip)| {
                    **holder == **id && **network == *attachment.network && *ip == attachment.ip
                });
                if !known {
                    history.attached(
                        id,
                        &attachment.network,
                        attachment.ip,
                        &container.workload,
                        at,
                    );
                    corrected += u64::from(!first);
                }
                attached.push((attachment.ip, container.workload.clone()));
            }
        }
        drop(history);
        // Containers on the host's network: their ports, scanned before the history is said
        // complete.
        self.host_networked.retain(|id| {
            containers
                .get(id)
                .is_some_and(|container| container.host_network)
        });
        for (id, container) in containers
            .iter()
            .filter(|(_, container)| container.host_network)
        {
            self.host_networked
                .add(id, &container.workload, container.started);
        }
        self.scan_host_ports();
        self.history
            .lock()
            .expect("not poisoned")
            .complete_through(at);
        // Every entry this watcher wrote for an address no listed container holds goes (the
        // detachments above among them); the listed ones are written again below.
        let stale = stale_entries(
            &self.maps,
            &self.host_networked,
            attached.iter().map(|(ip, _)| LocalAddress::from(*ip)),
        );
        for address in stale {
            self.unregister(address);
        }
        for (ip, workload) in attached {
            self.register(ip, &workload);
        }
        self.status.resyncs.fetch_add(1, Ordering::Relaxed);
        self.status
            .corrected
            .fetch_add(corrected, Ordering::Relaxed);
        if !first {
            tracing::info!("Docker: listed every container again; {corrected} addresses corrected");
        }
        self.since = Some(at);
        Ok(())
    }

    /// Reads the events of the window from `since` until shortly before now, and applies them.
    fn follow(&mut self, since: Timestamp) -> Result<(), DockerError> {
        let until = Timestamp::now().saturating_sub(SETTLE);
        if until <= since {
            return Ok(());
        }
        let filters = r#"{"type":["container","network"]}"#;
        let path = format!(
            "/events?since={}&until={}&filters={}",
            docker_time(Timestamp::from_nanos(since.as_nanos() + 1)),
            docker_time(until),
            form_urlencoded::byte_serialize(filters.as_bytes()).collect::<String>()
        );
        let mut events = Vec::new();
        self.api
            .stream(&path, Some(Duration::from_secs(30)), |event| {
                events.push(event)
            })?;
        if events.len() >= DAEMON_LOG_EVENTS {
            tracing::warn!(
                "Docker: {} events in one window, as many as the daemon keeps: some may be lost; listing everything again",
                events.len()
            );
            self.history
                .lock()
                .expect("not poisoned")
                .missed_until(until);
            self.since = None;
            return Ok(());
        }
        for event in &events {
            self.apply(event)?;
        }
        self.status
            .events
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        self.scan_host_ports();
        self.history
            .lock()
            .expect("not poisoned")
            .complete_through(until);
        self.since = Some(until);
        Ok(())
    }

    fn apply(&mut self, event: &Value) -> Result<(), DockerError> {
        let at = Timestamp::from_nanos(event["timeNano"].as_u64().unwrap_or(0));
        let action = event["Action"].as_str().unwrap_or("");
        let actor = event["Actor"]["ID"].as_str().unwrap_or("");
        match (event["Type"].as_str().unwrap_or(""), action) {
            ("network", "connect") => {
                let Some(container_id) = event["Actor"]["Attributes"]["container"].as_str() else {
                    return Ok(());
                };
                // Gone already: its address is not known, and stays unnamed for that time.
                let Some(container) = self.inspect(container_id)? else {
                    return Ok(());
                };
                if container.host_network {
                    self.host_networked
                        .add(container_id, &container.workload, container.started);
                }
                for attachment in container
                    .attachments
                    .iter()
                    .filter(|attachment| attachment.network == actor)
                {
                    self.history.lock().expect("not poisoned").attached(
                        container_id,
                        actor,
                        attachment.ip,
                        &container.workload,
                        at,
                    );
                    self.register(attachment.ip, &container.workload);
                }
            }
            ("network", "disconnect") => {
                let Some(container_id) = event["Actor"]["Attributes"]["container"].as_str() else {
                    return Ok(());
                };
                let released = self.history.lock().expect("not poisoned").detached(
                    container_id,
                    Some(actor),
                    at,
                );
                for ip in released {
                    self.unregister(ip);
                }
            }
            ("container", "start") => {
                if let Some(container) = self.inspect(actor)?
                    && container.host_network
                {
                    self.host_networked
                        .add(actor, &container.workload, container.started);
                }
            }
            ("network", "create" | "destroy") => {
                let (subnets, gateways) = self.networks()?;
                self.history
                    .lock()
                    .expect("not poisoned")
                    .set_networks(subnets, gateways);
            }
            ("container", "destroy") => {
                let released = self
                    .history
                    .lock()
                    .expect("not poisoned")
                    .detached(actor, None, at);
                for ip in released {
                    self.unregister(ip);
                }
                self.host_networked.retain(|id| id != actor);
            }
            _ => {}
        }
        Ok(())
    }

    /// The subnets and gateways of every network containers get addresses on.
    fn networks(&self) -> Result<(Vec<IpNet>, Vec<CanonicalIp>), DockerError> {
        let listed = self.api.get("/networks")?.unwrap_or(Value::Null);
        let (mut subnets, mut gateways) = (Vec::new(), Vec::new());
        for network in listed.as_array().into_iter().flatten() {
            for config in network["IPAM"]["Config"].as_array().into_iter().flatten() {
                if let Some(subnet) = config["Subnet"].as_str().and_then(|text| text.parse().ok()) {
                    subnets.push(subnet);
                }
                if let Some(gateway) = config["Gateway"]
                    .as_str()
                    .and_then(|text| text.parse::<std::net::IpAddr>().ok())
                {
                    gateways.push(CanonicalIp::from(gateway));
                }
            }
        }
        Ok((subnets, gateways))
    }

    /// A running container's name and addresses; None if it is gone or not running.
    fn inspect(&self, id: &str) -> Result<Option<Container>, DockerError> {
        let Some(inspected) = self.api.get(&format!("/containers/{id}/json"))? else {
            return Ok(None);
        };
        if inspected["State"]["Running"].as_bool() != Some(true) {
            return Ok(None);
        }
        let labels: BTreeMap<String, String> = inspected["Config"]["Labels"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(key, value)| Some((key.clone(), value.as_str()?.to_owned())))
            .collect();
        let name = inspected["Name"]
            .as_str()
            .unwrap_or("")
            .trim_start_matches('/');
        let label = |key: &str| labels.get(key).map_or("", String::as_str);
        let compose_service = !label("com.docker.compose.service").is_empty();
        let (workload, problem) = self.template.identity(&ContainerFields {
            name,
            id,
            labels: &labels,
            namespace: label("com.docker.compose.project"),
            owner: "",
            owner_kind: if compose_service {
                "ComposeService"
            } else {
                "Container"
            },
        });
        if let Some(problem) = problem {
            tracing::warn!("container {name}: {problem}; named {name}");
        }
        let mut attachments = Vec::new();
        for (_, network) in inspected["NetworkSettings"]["Networks"]
            .as_object()
            .into_iter()
            .flatten()
        {
            let Some(network_id) = network["NetworkID"].as_str() else {
                continue;
            };
            for key in ["IPAddress", "GlobalIPv6Address"] {
                if let Some(ip) = network[key]
                    .as_str()
                    .and_then(|text| text.parse::<std::net::IpAddr>().ok())
                {
                    attachments.push(Attachment {
                        network: network_id.to_owned(),
                        ip: CanonicalIp::from(ip),
                    });
                }
            }
        }
        let host_network = inspected["HostConfig"]["NetworkMode"].as_str() == Some("host");
        // Unreadable: from the start of time, which only leaves more flows unnamed.
        let started = inspected["State"]["StartedAt"]
            .as_str()
            .and_then(|text| humantime::parse_rfc3339_weak(text).ok())
            .and_then(|at| at.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(Timestamp::ZERO, |since| {
                Timestamp::from_nanos(flowattr_common::duration_nanos(since))
            });
        Ok(Some(Container {
            workload,
            attachments,
            host_network,
            started,
        }))
    }

    /// Brings the shared-map entries of the containers on the host's network in step with the
    /// ports their processes listen on now.
    fn scan_host_ports(&mut self) {
        if self.host_networked.is_empty() {
            return;
        }
        let api = &self.api;
        let changes = self
            .host_networked
            .scan(Path::new("/proc"), Timestamp::now(), |id| {
                match processes(api, id) {
                    Ok(pids) => Some(pids),
                    // The daemon is away: the entries stand until it answers (the run loop lists
                    // everything again then).
                    Err(DockerError::Io { .. }) => None,
                    // Not running: it listens on nothing.
                    Err(_) => Some(Vec::new()),
                }
            });
        super::apply_port_changes(&mut self.maps, &self.status, &self.history, changes);
    }

    fn register(&mut self, address: impl Into<LocalAddress>, workload: &str) {
        super::register_address(&mut self.maps, &self.status, address.into(), workload);
    }

    fn unregister(&mut self, address: impl Into<LocalAddress>) {
        super::unregister_address(&mut self.maps, address.into());
    }
}

/// The host PIDs of a running container's processes (`/containers/ID/top`); none if it is gone.
fn processes(api: &DockerApi, id: &str) -> Result<Vec<u32>, DockerError> {
    let Some(top) = api.get(&format!("/containers/{id}/top"))? else {
        return Ok(Vec::new());
    };
    let Some(column) = top["Titles"]
        .as_array()
        .and_then(|titles| titles.iter().position(|title| title == "PID"))
    else {
        return Ok(Vec::new());
    };
    Ok(top["Processes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|row| row.get(column)?.as_str()?.parse().ok())
        .collect())
}

/// An instant as the Engine API's `since` and `until` take it: seconds.nanoseconds.
fn docker_time(at: Timestamp) -> String {
    let nanos = at.as_nanos();
    format!("{}.{:09}", nanos / 1_000_000_000, nanos % 1_000_000_000)
}
