//! Workload identity from a Kubernetes node's container runtime through CRI: a real containerd
//! with its CRI plugin and the CNI bridge plugin runs pods in churn, the way a kubelet asks for
//! them (no kubelet or API server: the test speaks CRI itself). Each pod belongs to a
//! Deployment of its own (told by the `pod-template-hash` label, as a ReplicaSet sets it), and
//! the pods' addresses come from a range as small as the pods running at once, so each address
//! passes straight from one workload to another. The pods keep connecting to each other. No address is registered by hand: every
//! flow the collector writes names each side as the owner of the pod that held the address at
//! the flow's start, or leaves it unnamed. The agent is SIGKILLed and containerd restarted
//! meanwhile.
//!
//! Needs root, Debian's `containerd`, `containernetworking-plugins` and `busybox-static` (the
//! pods' one binary, in an image built here: no registry is reachable). `.ci/run` installs
//! them.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flowattr_common::Timestamp;
use flowattr_exporter::platform::cri_api::{self, CriApi};
use serde_json::Value;
use support::holdings::{Holdings, Platform};
use support::service::Service;
use support::{Scratch, assert_promtool_clean, require_root};

const SUBNET: &str = "172.31.251";
/// Pods take addresses .10 to .15: as many as run at once, so that a pod that stops hands its
/// address straight to the one started next, of another workload.
const FIRST_HOST: usize = 10;
const ADDRESSES: usize = SLOTS;
/// Pods running at once.
const SLOTS: usize = 6;
const GENERATIONS: usize = 3;
const GENERATIONS_MAX: usize = 12;
const FLOWS_WANTED: usize = 300;
const NAMESPACE: &str = "shop";
const IMAGE: &str = "flowattr.test/pod:1";
const BRIDGE: &str = "cni-flowattr0";

/// A containerd of the test's own: its own root, state, socket and CNI configuration.
struct Containerd {
    dir: PathBuf,
    service: Option<Service>,
}

impl Containerd {
    fn start(dir: &Path) -> Containerd {
        std::fs::create_dir_all(dir.join("net.d")).unwrap();
        std::fs::write(
            dir.join("config.toml"),
            format!(
                r#"version = 2
root = "{dir}/root"
state = "{dir}/state"
[grpc]
  address = "{dir}/containerd.sock"
[ttrpc]
  address = "{dir}/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{dir}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{IMAGE}"
  # A sandbox's processes ask for an OOM score below this test's own, which a machine that
  # runs the test inside a container of its own may refuse even to root.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{dir}/net.d"
"#,
                dir = dir.display()
            ),
        )
        .unwrap();
        // The bridge plugin, and the firewall plugin to let the pods' traffic through a host
        // whose forward policy is DROP (any host that has run Docker).
        std::fs::write(
            dir.join("net.d/10-flowattr.conflist"),
            serde_json::json!({
                "cniVersion": "0.4.0",
                "name": "flowattr-pods",
                "plugins": [
                    {
                        "type": "bridge",
                        "bridge": BRIDGE,
                        "isGateway": true,
                        "ipam": {
                            "type": "host-local",
                            "ranges": [[{
                                "subnet": format!("{SUBNET}.0/24"),
                                "rangeStart": format!("{SUBNET}.{FIRST_HOST}"),
                                "rangeEnd": format!("{SUBNET}.{}", FIRST_HOST + ADDRESSES - 1),
                                "gateway": format!("{SUBNET}.1"),
                            }]],
                            "dataDir": dir.join("ipam").display().to_string(),
                        },
                    },
                    { "type": "firewall" },
                ],
            })
            .to_string(),
        )
        .unwrap();
        let mut containerd = Containerd {
            dir: dir.to_owned(),
            service: None,
        };
        containerd.launch();
        containerd
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    fn launch(&mut self) {
        let mut command = Command::new("containerd");
        command.arg("--config").arg(self.dir.join("config.toml"));
        let mut api = CriApi::new(&self.socket()).unwrap();
        let ready = || {
            api.call::<cri_api::ListPodSandboxResponse>(
                "ListPodSandbox",
                &cri_api::ListPodSandboxRequest {},
            )
            .is_ok()
        };
        self.service = Some(Service::start(
            command,
            self.dir.join("containerd.log"),
            ready,
        ));
    }

    fn log(&self) -> String {
        self.service.as_ref().map(Service::log).unwrap_or_default()
    }

    /// Stops containerd, calls `while_away`, and starts it again: the pods run on (their shims
    /// outlive it), and CRI finds them again.
    fn restart(&mut self, while_away: impl FnOnce()) {
        self.service = None;
        while_away();
        self.launch();
    }

    fn ctr(&self, args: &[&str]) {
        let output = Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .args(["--namespace", "k8s.io"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "ctr {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.service.is_some() {
            let mut api = CriApi::new(&self.socket()).unwrap();
            if let Ok(listed) = api.call::<cri_api::ListPodSandboxResponse>(
                "ListPodSandbox",
                &cri_api::ListPodSandboxRequest {},
            ) {
                for sandbox in listed.items {
                    remove_pod(&mut api, &sandbox.id);
                }
            }
        }
        self.service = None;
        let _ = Command::new("umount")
            .arg("-R")
            .arg(self.dir.join("state"))
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", BRIDGE])
            .stderr(Stdio::null())
            .status();
    }
}

/// The messages the test sends to run pods as a kubelet would; the exporter reads none of
/// them, so they live here. Field numbers are `runtime.v1`'s.
mod kubelet {
    use std::collections::HashMap;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RunPodSandboxRequest {
        #[prost(message, optional, tag = "1")]
        pub config: Option<PodSandboxConfig>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxConfig {
        #[prost(message, optional, tag = "1")]
        pub metadata: Option<super::cri_api::PodSandboxMetadata>,
        #[prost(string, tag = "2")]
        pub hostname: String,
        #[prost(map = "string, string", tag = "6")]
        pub labels: HashMap<String, String>,
        #[prost(message, optional, tag = "8")]
        pub linux: Option<LinuxPodSandboxConfig>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LinuxPodSandboxConfig {
        #[prost(message, optional, tag = "2")]
        pub security_context: Option<LinuxSandboxSecurityContext>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LinuxSandboxSecurityContext {
        #[prost(message, optional, tag = "1")]
        pub namespace_options: Option<super::cri_api::NamespaceOption>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RunPodSandboxResponse {
        #[prost(string, tag = "1")]
        pub pod_sandbox_id: String,
    }

    /// Stop and Remove take the same request.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxId {
        #[prost(string, tag = "1")]
        pub pod_sandbox_id: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Empty {}
}

fn remove_pod(api: &mut CriApi, id: &str) {
    let request = kubelet::PodSandboxId {
        pod_sandbox_id: id.to_owned(),
    };
    let _ = api.call::<kubelet::Empty>("StopPodSandbox", &request);
    let _ = api.call::<kubelet::Empty>("RemovePodSandbox", &request);
}

/// Runs pod `name` of Deployment `owner` (its ReplicaSet's hash label, as a kubelet is given
/// it); returns its sandbox id and address.
fn run_pod(api: &mut CriApi, containerd: &Containerd, owner: &str, name: &str) -> (String, String) {
    let hash = "5d8f7c9b4";
    let request = kubelet::RunPodSandboxRequest {
        config: Some(kubelet::PodSandboxConfig {
            metadata: Some(cri_api::PodSandboxMetadata {
                name: format!("{owner}-{hash}-{name}"),
                uid: format!("uid-{owner}-{name}"),
                namespace: NAMESPACE.into(),
                attempt: 0,
            }),
            hostname: name.into(),
            labels: [
                ("pod-template-hash".to_owned(), hash.to_owned()),
                ("app".to_owned(), owner.to_owned()),
            ]
            .into(),
            linux: None,
        }),
    };
    let ran: kubelet::RunPodSandboxResponse =
        api.call("RunPodSandbox", &request).unwrap_or_else(|error| {
            panic!(
                "the pod runs: {error}; containerd's log ends: {}",
                containerd.log()
            )
        });
    let status: cri_api::PodSandboxStatusResponse = api
        .call(
            "PodSandboxStatus",
            &cri_api::PodSandboxStatusRequest {
                pod_sandbox_id: ran.pod_sandbox_id.clone(),
                verbose: false,
            },
        )
        .unwrap();
    let ip = status
        .status
        .and_then(|status| status.network)
        .map(|network| network.ip)
        .unwrap_or_default();
    assert!(ip.starts_with(SUBNET), "pod {name} got address {ip:?}");
    (ran.pod_sandbox_id, ip)
}

/// Runs pod `node-agent-x7k2p` of DaemonSet `node-agent` on the host's network (its labels as a
/// DaemonSet controller sets them); returns its sandbox id. Its process serves port 8080 of
/// every host address.
fn run_host_network_pod(api: &mut CriApi, containerd: &Containerd) -> String {
    let request = kubelet::RunPodSandboxRequest {
        config: Some(kubelet::PodSandboxConfig {
            metadata: Some(cri_api::PodSandboxMetadata {
                name: "node-agent-x7k2p".into(),
                uid: "uid-node-agent".into(),
                namespace: NAMESPACE.into(),
                attempt: 0,
            }),
            hostname: String::new(),
            labels: [
                (
                    "controller-revision-hash".to_owned(),
                    "6d4b75cb6d".to_owned(),
                ),
                ("pod-template-generation".to_owned(), "1".to_owned()),
            ]
            .into(),
            linux: Some(kubelet::LinuxPodSandboxConfig {
                security_context: Some(kubelet::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri_api::NamespaceOption {
                        network: cri_api::NAMESPACE_MODE_NODE,
                    }),
                }),
            }),
        }),
    };
    let ran: kubelet::RunPodSandboxResponse =
        api.call("RunPodSandbox", &request).unwrap_or_else(|error| {
            panic!(
                "the host-network pod runs: {error}; containerd's log ends: {}",
                containerd.log()
            )
        });
    ran.pod_sandbox_id
}

/// Writes `content` as a blob of the OCI layout at `layout`; returns its descriptor's digest
/// and size.
fn blob(layout: &Path, content: &[u8]) -> (String, usize) {
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    let file = layout.join("blob.tmp");
    std::fs::write(&file, content).unwrap();
    let output = Command::new("sha256sum").arg(&file).output().unwrap();
    let hex = String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    std::fs::rename(&file, layout.join("blobs/sha256").join(&hex)).unwrap();
    (format!("sha256:{hex}"), content.len())
}

/// An OCI image of one static busybox whose entrypoint is `script`, imported into containerd
/// from a tarball under the name the CRI plugin runs sandboxes from.
fn import_pod_image(containerd: &Containerd, dir: &Path, script: &str) {
    let root = dir.join("rootfs");
    support::busybox_rootfs(&root);
    let layer = dir.join("layer.tar");
    assert!(
        Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&layer)
            .arg(".")
            .status()
            .unwrap()
            .success()
    );
    let layout = dir.join("layout");
    let (layer_digest, layer_size) = blob(&layout, &std::fs::read(&layer).unwrap());
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Entrypoint": ["/bin/sh", "-c", script], "WorkingDir": "/" },
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
    });
    let (config_digest, config_size) = blob(&layout, config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_size }],
    });
    let (manifest_digest, manifest_size) = blob(&layout, manifest.to_string().as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
            "annotations": { "io.containerd.image.name": IMAGE, "org.opencontainers.image.ref.name": "1" },
        }],
    });
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let tarball = dir.join("image.tar");
    assert!(
        Command::new("tar")
            .arg("-C")
            .arg(&layout)
            .arg("-cf")
            .arg(&tarball)
            .args(["index.json", "oci-layout", "blobs"])
            .status()
            .unwrap()
            .success()
    );
    containerd.ctr(&["images", "import", &tarball.display().to_string()]);
}

/// An address of the pods' range (not the gateway's).
fn is_pod_address(ip: &Value) -> bool {
    let host = ip.as_str().and_then(|ip| {
        ip.strip_prefix(SUBNET)?
            .strip_prefix('.')?
            .parse::<usize>()
            .ok()
    });
    host.is_some_and(|host| (FIRST_HOST..FIRST_HOST + ADDRESSES).contains(&host))
}

#[test]
fn pods_in_churn_are_named_by_the_cri_watcher_and_never_wrongly() {
    require_root();
    let scratch = Scratch::new("kubernetes");
    let _ = Command::new("ip")
        .args(["link", "del", BRIDGE])
        .stderr(Stdio::null())
        .status();
    let mut containerd = Containerd::start(&scratch.dir.path().join("containerd"));
    // Every pod serves a page and fetches one from a random address of the range every 0.3 s.
    let script = format!(
        "httpd -p 8080 -h /www; while true; do printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {SUBNET}.$(({FIRST_HOST} + RANDOM % {ADDRESSES})) 8080 >/dev/null; sleep 0.3; done"
    );
    import_pod_image(&containerd, scratch.dir.path(), &script);

    let collector = scratch.start_collector("127.0.0.1:0".parse().unwrap());
    let socket = containerd.socket().display().to_string();
    let pod_cidr = format!("{SUBNET}.0/24");
    // The node's own name: its connections to pods leave from the pod bridge's gateway, an
    // address inside the pod range that is the host's, not a pod's.
    let host_identity = scratch.dir.path().join("host-identity");
    std::fs::write(&host_identity, "node-7\n").unwrap();
    let host_identity = host_identity.display().to_string();
    let watch = [
        "--runtime",
        "cri",
        "--runtime-socket",
        socket.as_str(),
        "--pod-cidr",
        pod_cidr.as_str(),
        "--host-identity",
        host_identity.as_str(),
    ];
    let stop_host = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let host_client = {
        let stop = stop_host.clone();
        std::thread::spawn(move || {
            let mut next = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Every third connection goes to the host-network pod, on loopback.
                let address: std::net::SocketAddr = if next % 3 == 2 {
                    "127.0.0.1:8080".parse().unwrap()
                } else {
                    format!("{SUBNET}.{}:8080", FIRST_HOST + next % ADDRESSES)
                        .parse()
                        .unwrap()
                };
                next += 1;
                if let Ok(mut stream) =
                    std::net::TcpStream::connect_timeout(&address, Duration::from_secs(1))
                {
                    use std::io::{Read, Write};
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
                    let _ = stream.write_all(b"GET / HTTP/1.0\r\n\r\n");
                    let _ = stream.read_to_end(&mut Vec::new());
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let mut exporter = Some(scratch.start_exporter_with(collector.ingest_addr, &watch));

    let mut api = CriApi::new(&containerd.socket()).unwrap();
    let host_network_pod = run_host_network_pod(&mut api, &containerd);
    let mut held = Holdings::default();
    let mut running: Vec<Option<(String, String)>> = vec![None; SLOTS];
    let (mut agent_restarted, mut runtime_restarted) = (false, false);
    let pod_flows = || {
        scratch
            .records()
            .iter()
            .filter(|record| {
                is_pod_address(&record["local_ip"]) && is_pod_address(&record["remote_ip"])
            })
            .count()
    };
    let mut pods = 0;
    #[allow(clippy::needless_range_loop)] // slots are pods, and the restarts come at one
    for generation in 0..GENERATIONS_MAX {
        if generation >= GENERATIONS && pod_flows() >= FLOWS_WANTED {
            break;
        }
        for slot in 0..SLOTS {
            if generation == 1 && slot == SLOTS / 2 && !agent_restarted {
                // SIGKILL mid-churn: the new agent lists every pod again.
                drop(exporter.take());
                exporter = Some(scratch.start_exporter_with(collector.ingest_addr, &watch));
                agent_restarted = true;
            }
            if generation == 2 && slot == SLOTS / 2 && !runtime_restarted {
                containerd.restart(|| {
                    exporter
                        .as_ref()
                        .expect("running")
                        .wait_until_runtime_seen_away("cri");
                });
                api = CriApi::new(&containerd.socket()).unwrap();
                runtime_restarted = true;
            }
            if let Some((id, ip)) = running[slot].take() {
                remove_pod(&mut api, &id);
                held.end(&ip, Timestamp::now());
            }
            // Each pod is a Deployment of its own: its address passes to another workload.
            let owner = format!("app-g{generation}-s{slot}");
            let from = Timestamp::now();
            let (id, ip) = run_pod(&mut api, &containerd, &owner, "x7k2p");
            let platform = Platform {
                namespace: NAMESPACE.into(),
                instance: format!("{owner}-5d8f7c9b4-x7k2p"),
                owner_kind: "Deployment".into(),
            };
            held.begin(&ip, &format!("{NAMESPACE}/{owner}"), platform, from);
            running[slot] = Some((id, ip));
            pods += 1;
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    std::thread::sleep(Duration::from_secs(3));
    stop_host.store(true, std::sync::atomic::Ordering::Relaxed);
    host_client.join().unwrap();
    let exporter = exporter.unwrap();
    let (_, health) = exporter.tcp_request("GET", "/healthz");
    assert_eq!(health, "ok\n");
    // With the runtime watcher's series too.
    assert_promtool_clean("the exporter's", &exporter.tcp_request("GET", "/metrics").1);
    for running in &mut running {
        if let Some((id, ip)) = running.take() {
            remove_pod(&mut api, &id);
            held.end(&ip, Timestamp::now());
        }
    }
    assert!(pods >= SLOTS * GENERATIONS, "{pods} pods");

    // The collector releases after its delay: wait for the output to stop growing.
    let mut count = 0;
    let settled = Instant::now() + Duration::from_secs(60);
    loop {
        std::thread::sleep(Duration::from_secs(3));
        let now = scratch.records().len();
        if now == count && now > 0 || Instant::now() > settled {
            break;
        }
        count = now;
    }

    let judgement = held.judge(&scratch.records(), is_pod_address);
    let gateway = format!("{SUBNET}.1");
    let from_host: Vec<Value> = scratch
        .records()
        .into_iter()
        .filter(|record| record["local_ip"] == gateway.as_str())
        .collect();
    let host_named = from_host
        .iter()
        .filter(|record| record["local_workload"] == "node-7")
        .count();
    let from_loopback: Vec<Value> = scratch
        .records()
        .into_iter()
        .filter(|record| {
            record["local_ip"] == "127.0.0.1"
                && (record["local_port"] == 8080 || record["remote_port"] == 8080)
        })
        .collect();
    let (_, metrics) = exporter.tcp_request("GET", "/metrics");
    let counts: Vec<&str> = metrics
        .lines()
        .filter(|line| line.starts_with("flowattr_exporter_identity_"))
        .collect();
    let resyncs =
        exporter.metric_value("flowattr_exporter_identity_resyncs_total{runtime=\"cri\"}");
    eprintln!(
        "{pods} pods on {ADDRESSES} addresses, {}; the host's connections to pods {}, named the host's {host_named}; the restarted agent's counts: {counts:?}",
        judgement.summary(),
        from_host.len()
    );
    judgement.assert_right(FLOWS_WANTED);
    assert!(
        !from_host.is_empty() && host_named == from_host.len(),
        "the gateway's flows keep the host's name: {:?}",
        &from_host[..from_host.len().min(3)]
    );
    assert!(
        resyncs >= 2.0,
        "containerd's restart made the watcher list every pod again: {resyncs}"
    );
    // The host-network pod's side of the host's connections to it: named by the port its
    // process listens on, as its DaemonSet; never anything else.
    let served: Vec<&Value> = from_loopback
        .iter()
        .filter(|record| record["direction"] == "inbound")
        .collect();
    let agent_named = served
        .iter()
        .filter(|record| record["local_workload"] == "shop/node-agent")
        .count();
    eprintln!(
        "the host-network pod served {} connections, {agent_named} named after its DaemonSet",
        served.len()
    );
    assert!(
        served
            .iter()
            .all(|record| record["local_workload"] == "shop/node-agent"
                || record["local_workload"].is_null()),
        "{served:?}"
    );
    assert!(
        agent_named >= served.len() / 2 && agent_named > 0,
        "{agent_named} of {} named",
        served.len()
    );
    assert!(
        served
            .iter()
            .filter(|record| !record["local_workload"].is_null())
            .all(|record| record["local_owner_kind"] == "DaemonSet"
                && record["local_namespace"] == NAMESPACE)
    );
    remove_pod(&mut api, &host_network_pod);
    drop(exporter);
    drop(containerd);
}
