//! The control plane: a small HTTP server on threads of its own, off the executors
//! ([`server`]: bounded connections, each with deadlines). It reads the shards' metrics and
//! published views, and asks the shard that owns an IP about it through a channel that shard
//! polls (the executors never block on it). With `http.bearer_token_file`, every endpoint but
//! `/healthz` wants `Authorization: Bearer <token>`.
//!
//! - `GET /`: the console (service map, ownership lookups, health), served without a token.
//! - `GET /v1/region/deps[?window=..|from=..&to=..]`: the graph of this node and of every node
//!   in `http.region_nodes`, and which of them answered.
//! - `GET /v1/health/history`: the last hour of the console's health samples.
//! - `GET /metrics`: Prometheus text.
//! - `GET /healthz`: 200 `ok` (with a `degraded:` line per silent peer, per peer whose stream
//!   is known complete only far back, and while the platform is seen reusing IPs faster than
//!   `ownership.merge_gap`, among others), or 503 while the
//!   delay buffer cannot write (the node is not acking) or the node is still catching up with
//!   its region's broadcast topic (it releases nothing).
//! - `GET /v1/owner?ip=IP&at=TIME[&port=P]`: who owned IP at TIME, with the evidence.
//! - `GET /v1/history?ip=IP[&port=P]`: every ownership segment held for IP.
//! - `GET /v1/deps[?format=json|dot][&window=15m | &from=TIME[&to=TIME]]`: the dependency
//!   graph, everything since the start or the minutes of a window (the last hour is kept by
//!   minute; each edge lists a few of its connections).
//!
//! TIME is nanoseconds since the Unix epoch or RFC 3339 with any offset
//! (`2026-11-23T10:00:00Z`, `2026-11-23T11:00:00%2B01:00`). Parameters are percent-decoded.

mod console;
mod health;
mod health_history;
mod node_metrics;
mod region;
mod server;

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::time::Duration;

use flowattr_common::CanonicalIp;
use flowattr_common::exposition::{self, Registry};

use server::{Limits, Reply, Request, ServerCounters};

use crate::deps;
use crate::deps::Window;
use crate::instant_text::parse_instant;
use crate::node_state::NodeShared;
use crate::shard::{DepsQuery, OwnerQuery, ShardQuery};
use crate::shard_router::ShardRouter;

pub struct ControlPlane {
    node: Arc<NodeShared>,
    router: ShardRouter,
    queries: Vec<mpsc::Sender<ShardQuery>>,
    /// `Bearer <token>`, as the `Authorization` header must read.
    authorization: Option<String>,
    counters: Arc<ServerCounters>,
    metrics: Registry,
    history: Arc<health_history::HealthHistory>,
}

impl ControlPlane {
    /// Binds `addr` and serves it on threads of its own. Returns the bound address.
    pub fn start(
        addr: SocketAddr,
        bearer_token: Option<String>,
        node: Arc<NodeShared>,
        queries: Vec<mpsc::Sender<ShardQuery>>,
    ) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr)?;
        let bound = listener.local_addr()?;
        let counters = Arc::new(ServerCounters::default());
        let plane = Arc::new(ControlPlane {
            router: ShardRouter::new(node.shards),
            metrics: node_metrics::registry(node.clone(), counters.clone()),
            history: health_history::HealthHistory::start(&node)?,
            node,
            queries,
            authorization: bearer_token.map(|token| format!("Bearer {token}")),
            counters: counters.clone(),
        });
        server::serve(
            listener,
            Limits::default(),
            counters,
            Arc::new(move |request: &Request| plane.serve(request)),
        )?;
        Ok(bound)
    }

    fn serve(&self, request: &Request) -> Reply {
        if request.method != "GET" {
            return (405, "text/plain", "only GET is served\n".to_owned());
        }
        // A probe asks for /healthz without credentials; it says nothing an attacker could use.
        // Nor does the console's page, which holds no data of its own.
        if let Some(asset) = console::asset(&request.path) {
            return asset;
        }
        if request.path != "/healthz"
            && let Some(expected) = &self.authorization
            && !request
                .authorization
                .as_deref()
                .is_some_and(|given| constant_time_eq(given.as_bytes(), expected.as_bytes()))
        {
            self.counters.unauthorized.fetch_add(1, Ordering::Relaxed);
            return (
                401,
                "application/json",
                json_error("a bearer token is required (Authorization: Bearer <token>)"),
            );
        }
        self.route(&request.path, &request.query)
    }

    fn route(&self, path: &str, query: &str) -> Reply {
        let result = match path {
            "/metrics" => Ok(self.metrics()),
            "/healthz" => Ok(health::report(&self.node)),
            "/v1/owner" => self.owner(query, true),
            "/v1/history" => self.owner(query, false),
            "/v1/deps" => self.deps(query),
            "/v1/region/deps" => self.region_deps(query),
            "/v1/health/history" => Ok((200, "application/json", self.history.to_json())),
            _ => Err((404, format!("no such endpoint: {path}"))),
        };
        result
            .unwrap_or_else(|(status, message)| (status, "application/json", json_error(&message)))
    }

    fn metrics(&self) -> Reply {
        (
            200,
            exposition::CONTENT_TYPE,
            exposition::render(&self.metrics),
        )
    }

    fn owner(&self, query: &str, needs_time: bool) -> Result<Reply, (u16, String)> {
        let ip: IpAddr = param(query, "ip")
            .ok_or((400, "missing ip".to_owned()))?
            .parse()
            .map_err(|_| (400, "ip is not an IP address".to_owned()))?;
        let port = match param(query, "port") {
            Some(port) => port
                .parse()
                .map_err(|_| (400, "port is not a port".to_owned()))?,
            None => 0,
        };
        let at = match (param(query, "at"), needs_time) {
            (Some(text), true) => Some(parse_instant(&text).ok_or((
                400,
                "at is neither nanoseconds since the epoch nor RFC 3339".to_owned(),
            ))?),
            (None, true) => return Err((400, "missing at".to_owned())),
            (_, false) => None,
        };
        let ip = CanonicalIp::from(ip);
        let (reply, answer) = mpsc::sync_channel(1);
        let shard = self.router.shard_of(ip);
        self.queries[shard]
            .send(ShardQuery::Owner(OwnerQuery {
                ip,
                port,
                at,
                reply,
            }))
            .map_err(|_| (503, "the shard is not running".to_owned()))?;
        let answer = answer
            .recv_timeout(Duration::from_secs(5))
            .map_err(|_| (503, "the shard did not answer in time".to_owned()))?;
        let body = serde_json::to_string(&answer).expect("serializable");
        Ok((200, "application/json", body))
    }

    fn deps(&self, query: &str) -> Result<Reply, (u16, String)> {
        let edges = self.graph(query)?;
        match param(query, "format").as_deref() {
            None | Some("json") => Ok((
                200,
                "application/json",
                serde_json::to_string(&edges).expect("serializable"),
            )),
            Some("dot") => Ok((200, "text/vnd.graphviz", deps::to_dot(&edges))),
            Some(other) => Err((400, format!("format {other} is neither json nor dot"))),
        }
    }

    /// This node's graph and every other node's of `http.region_nodes`, with the nodes that
    /// did not answer listed as missing.
    fn region_deps(&self, query: &str) -> Result<Reply, (u16, String)> {
        let own = self.graph(query)?;
        let mut peer_query = form_urlencoded::Serializer::new(String::new());
        for name in ["window", "from", "to"] {
            if let Some(value) = param(query, name) {
                peer_query.append_pair(name, &value);
            }
        }
        let graph = region::region_graph(
            own,
            &self.node.config.http.region_nodes,
            &peer_query.finish(),
            self.authorization.as_deref(),
        );
        Ok((
            200,
            "application/json",
            serde_json::to_string(&graph).expect("serializable"),
        ))
    }

    fn graph(&self, query: &str) -> Result<Vec<deps::Edge>, (u16, String)> {
        Ok(match deps_window(query)? {
            // Everything since the start: what the shards publish every second, no question
            // asked of them.
            Window::All => deps::merge(self.node.views.iter().map(|view| {
                view.lock()
                    .unwrap_or_else(|poison| poison.into_inner())
                    .edges
                    .clone()
            })),
            window => deps::merge(self.ask_every_shard(window)?),
        })
    }
}

impl ControlPlane {
    /// Every shard's part of the graph over `window`: a shard that does not answer fails the
    /// whole question, as a graph missing a shard's edges would read as fewer connections.
    fn ask_every_shard(&self, window: Window) -> Result<Vec<Vec<deps::Edge>>, (u16, String)> {
        let answers: Vec<_> = self
            .queries
            .iter()
            .map(|shard| {
                let (reply, answer) = mpsc::sync_channel(1);
                shard
                    .send(ShardQuery::Deps(DepsQuery { window, reply }))
                    .map_err(|_| (503, "a shard is not running".to_owned()))?;
                Ok(answer)
            })
            .collect::<Result<_, (u16, String)>>()?;
        answers
            .into_iter()
            .map(|answer| {
                answer
                    .recv_timeout(Duration::from_secs(5))
                    .map_err(|_| (503, "a shard did not answer in time".to_owned()))
            })
            .collect()
    }
}

/// The window `/v1/deps` is asked about: `window=DURATION` (the last 15m, 1h, ...), or
/// `from=TIME[&to=TIME]`, or nothing for everything since the node started.
fn deps_window(query: &str) -> Result<Window, (u16, String)> {
    let instant = |name: &str| -> Result<Option<flowattr_common::Timestamp>, (u16, String)> {
        param(query, name)
            .map(|text| {
                parse_instant(&text).ok_or((
                    400,
                    format!("{name} is neither nanoseconds since the epoch nor RFC 3339"),
                ))
            })
            .transpose()
    };
    let now = flowattr_common::Timestamp::now();
    match (param(query, "window"), instant("from")?, instant("to")?) {
        (None, None, None) => Ok(Window::All),
        (Some(text), None, None) => {
            let length = humantime::parse_duration(&text)
                .map_err(|error| (400, format!("window {text:?}: {error}")))?;
            Ok(Window::between(now.saturating_sub(length), now))
        }
        (None, Some(from), to) => {
            let to = to.unwrap_or(now);
            if to < from {
                return Err((400, "to is before from".to_owned()));
            }
            Ok(Window::between(from, to))
        }
        (None, None, Some(_)) => Err((400, "to needs from".to_owned())),
        (Some(_), _, _) => Err((400, "window and from/to exclude each other".to_owned())),
    }
}

/// Equality that takes as long whatever the first differing byte, so a token cannot be guessed
/// byte by byte from response times.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |differ, (x, y)| differ | (x ^ y)) == 0
}

fn json_error(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string()
}

/// The percent-decoded value of `name` in a query string.
fn param(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_percent_decoded() {
        assert_eq!(param("ip=10.0.0.1&at=5", "at").as_deref(), Some("5"));
        assert_eq!(param("ip=10.0.0.1", "at"), None);
        assert_eq!(
            param("at=2023-11-15T00%3A13%3A20%2B02%3A00", "at").as_deref(),
            Some("2023-11-15T00:13:20+02:00")
        );
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"Bearer abc", b"Bearer abc"));
        assert!(!constant_time_eq(b"Bearer abd", b"Bearer abc"));
        assert!(!constant_time_eq(b"Bearer ab", b"Bearer abc"));
        assert!(!constant_time_eq(b"", b"Bearer abc"));
    }
}
