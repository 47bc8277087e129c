//! The region's map for the console: this node's graph and every other node's
//! (`http.region_nodes`), asked in parallel with this node's bearer token. A node that does not
//! answer in time is listed as missing, never counted as zero: its connections are simply not
//! in the map, and the page says so.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use flowattr_common::collector_address::CollectorAddress;
use serde::Serialize;

use crate::deps::{self, Edge};

/// How long a peer has to answer, connection included.
const PEER_DEADLINE: Duration = Duration::from_secs(3);
/// A peer's graph is a few MB at most; a larger answer is not a graph.
const MAX_ANSWER_BYTES: u64 = 64 << 20;

#[derive(Debug, Serialize)]
pub struct RegionNode {
    /// `this` or the peer's address as configured.
    pub node: String,
    /// `ok` or `missing`.
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct RegionGraph {
    pub nodes: Vec<RegionNode>,
    pub edges: Vec<Edge>,
}

/// Merges `own` with what each peer's `/v1/deps?QUERY` says.
pub fn region_graph(
    own: Vec<Edge>,
    peers: &[CollectorAddress],
    query: &str,
    authorization: Option<&str>,
) -> RegionGraph {
    let answers: Vec<Result<Vec<Edge>, String>> = std::thread::scope(|scope| {
        let asks: Vec<_> = peers
            .iter()
            .map(|peer| scope.spawn(move || ask_peer(peer, query, authorization)))
            .collect();
        asks.into_iter()
            .map(|ask| {
                ask.join()
                    .unwrap_or_else(|_| Err("the asking thread failed".into()))
            })
            .collect()
    });
    let mut nodes = vec![RegionNode {
        node: "this".to_owned(),
        status: "ok",
        error: None,
    }];
    let mut graphs = vec![own];
    for (peer, answer) in peers.iter().zip(answers) {
        match answer {
            Ok(edges) => {
                nodes.push(RegionNode {
                    node: peer.to_string(),
                    status: "ok",
                    error: None,
                });
                graphs.push(edges);
            }
            Err(error) => nodes.push(RegionNode {
                node: peer.to_string(),
                status: "missing",
                error: Some(error),
            }),
        }
    }
    RegionGraph {
        nodes,
        edges: deps::merge(graphs),
    }
}

fn ask_peer(
    peer: &CollectorAddress,
    query: &str,
    authorization: Option<&str>,
) -> Result<Vec<Edge>, String> {
    let addresses = peer
        .resolve()
        .map_err(|error| format!("resolving: {error}"))?;
    let address = addresses.first().ok_or("resolves to no address")?;
    let mut stream = TcpStream::connect_timeout(address, PEER_DEADLINE)
        .map_err(|error| format!("connecting: {error}"))?;
    stream
        .set_read_timeout(Some(PEER_DEADLINE))
        .and_then(|()| stream.set_write_timeout(Some(PEER_DEADLINE)))
        .map_err(|error| error.to_string())?;
    let separator = if query.is_empty() { "" } else { "?" };
    let credentials = authorization
        .map(|value| format!("Authorization: {value}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET /v1/deps{separator}{query} HTTP/1.1\r\nHost: {peer}\r\n{credentials}Connection: close\r\n\r\n"
    )
    .map_err(|error| format!("asking: {error}"))?;
    let mut answer = Vec::new();
    stream
        .take(MAX_ANSWER_BYTES)
        .read_to_end(&mut answer)
        .map_err(|error| format!("reading the answer: {error}"))?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("the answer is not HTTP")?;
    let status = head.split(' ').nth(1).unwrap_or("");
    if status != "200" {
        let first_line = head.lines().next().unwrap_or("");
        return Err(format!("answered {first_line}: {}", body.trim()));
    }
    serde_json::from_str(body).map_err(|error| format!("the answer is not a graph: {error}"))
}
