//! The local API, on its own threads: container runtimes register and unregister addresses as
//! containers start and stop; Prometheus scrapes `/metrics`.
//!
//! Registering renames an IP in the evidence the whole fleet trusts, so it is served on a Unix
//! socket that only root (and, if configured, one group) can open, as container runtimes'
//! own sockets are. A TCP listener is optional and serves only `/metrics` and `/healthz`,
//! unless `--tcp-api` says otherwise (any local user can then rename any IP).
//!
//! - `GET /metrics`, `GET /healthz` (200: `ok`, or a `degraded:` line per problem)
//! - `POST /v1/register?ip=IP&workload=NAME[&port=P]`
//! - `POST /v1/unregister?ip=IP[&port=P][&workload=NAME]` (with `workload`: only if the
//!   address is still that workload's)

use std::ffi::CString;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use flowattr_common::exposition::{self, Registry};
use flowattr_exporter::registration::{self, ExporterDirs, LocalAddress};
use tiny_http::{Header, Method, Request, Response, Server};

use crate::agent::AgentCounters;

pub struct LocalApi {
    dirs: ExporterDirs,
    counters: Arc<AgentCounters>,
    metrics: Registry,
    socket: PathBuf,
}

/// Binds the Unix socket at `path`, readable and writable by root and `group` only, and
/// serves it on a new thread.
pub fn serve_unix(api: Arc<LocalApi>, group: Option<&str>) -> anyhow::Result<()> {
    let path = api.socket.clone();
    if UnixStream::connect(&path).is_ok() {
        bail!("{} is in use: is another exporter running?", path.display());
    }
    let gid = group.map(group_id).transpose()?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    // Bound under a temporary name and renamed once its mode and group are set: at no
    // moment can another user connect to the final path.
    let temporary = path.with_extension(format!("{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&temporary);
    let listener = UnixListener::bind(&temporary)
        .with_context(|| format!("binding {}", temporary.display()))?;
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(mode))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(&temporary, Some(0), Some(gid))?;
    }
    std::fs::rename(&temporary, &path)
        .with_context(|| format!("moving the socket to {}", path.display()))?;
    let server = Server::from_listener(listener, None)
        .map_err(|error| anyhow::anyhow!("serving {}: {error}", path.display()))?;
    spawn(server, api, true)
}

/// Serves `/metrics` and `/healthz` (and, with `changes`, the registration endpoints) on TCP.
pub fn serve_tcp(
    api: Arc<LocalApi>,
    addr: SocketAddr,
    changes: bool,
) -> anyhow::Result<SocketAddr> {
    let server =
        Server::http(addr).map_err(|error| anyhow::anyhow!("listening on {addr}: {error}"))?;
    let bound = server.server_addr().to_ip().context("an IP listener")?;
    spawn(server, api, changes)?;
    Ok(bound)
}

fn spawn(server: Server, api: Arc<LocalApi>, changes: bool) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("flowattr-exporter-api".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let metrics = request.url() == "/metrics";
                let (status, body) = api.answer(&request, changes);
                let mut response = Response::from_string(body).with_status_code(status);
                if metrics && status == 200 {
                    response.add_header(
                        Header::from_bytes("Content-Type", exposition::CONTENT_TYPE)
                            .expect("a valid header"),
                    );
                }
                let _ = request.respond(response);
            }
        })?;
    Ok(())
}

fn group_id(name: &str) -> anyhow::Result<libc::gid_t> {
    if let Ok(gid) = name.parse() {
        return Ok(gid);
    }
    let c_name = CString::new(name).context("a group name without NUL")?;
    // SAFETY: a valid C string; getgrnam's result is read at once, before any other call
    // that could reuse its static buffer (this runs once, at start).
    let group = unsafe { libc::getgrnam(c_name.as_ptr()) };
    if group.is_null() {
        bail!("no group named {name}");
    }
    // SAFETY: non-null, so it points at a valid group entry.
    Ok(unsafe { (*group).gr_gid })
}

impl LocalApi {
    pub fn new(dirs: ExporterDirs, counters: Arc<AgentCounters>, socket: PathBuf) -> LocalApi {
        LocalApi {
            dirs,
            metrics: AgentCounters::registry(counters.clone()),
            counters,
            socket,
        }
    }

    fn answer(&self, request: &Request, changes: bool) -> (u16, String) {
        let url = request.url();
        let (path, query) = url.split_once('?').unwrap_or((url, ""));
        let wants = match path {
            "/metrics" | "/healthz" => Method::Get,
            "/v1/register" | "/v1/unregister" => Method::Post,
            _ => return (404, format!("no such endpoint: {path}\n")),
        };
        if *request.method() != wants {
            return (405, format!("{path} takes {wants}\n"));
        }
        match path {
            "/metrics" => (200, exposition::render(&self.metrics)),
            "/healthz" => {
                let lines = self
                    .counters
                    .identity
                    .get()
                    .map(crate::identity_report::health_lines)
                    .unwrap_or_default();
                (
                    200,
                    if lines.is_empty() {
                        "ok\n".into()
                    } else {
                        lines.join("\n") + "\n"
                    },
                )
            }
            _ if !changes => (
                403,
                format!(
                    "registration is served on the Unix socket {}\n",
                    self.socket.display()
                ),
            ),
            _ => match self.change(path == "/v1/register", query) {
                Ok(message) => (200, message + "\n"),
                Err(error) => (400, format!("{error:#}\n")),
            },
        }
    }

    fn change(&self, register: bool, query: &str) -> anyhow::Result<String> {
        let param = |name: &str| {
            form_urlencoded::parse(query.as_bytes())
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.into_owned())
        };
        let ip = param("ip").context("missing ip")?;
        let ip = ip
            .parse()
            .with_context(|| format!("ip `{ip}` is not an IP address"))?;
        let port = param("port")
            .map(|port| {
                port.parse::<u16>()
                    .with_context(|| format!("port `{port}` is not a port"))
            })
            .transpose()?;
        let address = LocalAddress::new(ip, port)?;
        let workload = param("workload");
        if register {
            let workload = workload.context("missing workload")?;
            let id = registration::register(&self.dirs, address, &workload)?;
            Ok(format!(
                "registered {address} as {workload} (id {})",
                id.get()
            ))
        } else {
            let outcome = registration::unregister(&self.dirs, address, workload.as_deref())?;
            Ok(outcome.describe(&address, workload.as_deref()))
        }
    }
}
