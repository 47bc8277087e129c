//! The few calls of the Kubernetes Container Runtime Interface (`runtime.v1`) the watcher
//! makes, over the runtime's Unix socket (containerd's or CRI-O's): unary gRPC calls on one
//! HTTP/2 connection, made again after any failure.
//!
//! gRPC needs HTTP/2, so this client runs [`h2`] on a single-threaded tokio runtime of its own,
//! driven by the watcher's thread; only the messages and fields the watcher reads are declared
//! here (protobuf skips the rest), with the field numbers of `runtime.v1`'s `api.proto`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("container runtime at {socket}: {reason}")]
    Connect { socket: PathBuf, reason: String },
    #[error("container runtime at {socket}: {method}: {reason}")]
    Call {
        socket: PathBuf,
        method: &'static str,
        reason: String,
    },
    /// The runtime answered with a gRPC error status.
    #[error("container runtime at {socket}: {method} answered gRPC status {code}: {message}")]
    Status {
        socket: PathBuf,
        method: &'static str,
        code: u32,
        message: String,
    },
}

impl CriError {
    /// The gRPC status code of an answered error (5 is NOT_FOUND).
    pub fn status_code(&self) -> Option<u32> {
        match self {
            CriError::Status { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// How long one call may take before the connection is given up.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// An answer longer than this is refused (a listing of a node's pods is far smaller).
const ANSWER_BYTES_MAX: usize = 64 << 20;

/// `NamespaceMode::NODE`: a pod on the host's network.
pub const NAMESPACE_MODE_NODE: i32 = 2;
/// `PodSandboxState::SANDBOX_READY`.
pub const SANDBOX_READY: i32 = 0;

pub struct CriApi {
    socket: PathBuf,
    runtime: tokio::runtime::Runtime,
    connection: Option<h2::client::SendRequest<Bytes>>,
}

impl CriApi {
    pub fn new(socket: &Path) -> std::io::Result<CriApi> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?;
        Ok(CriApi {
            socket: socket.to_owned(),
            runtime,
            connection: None,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Calls `method` (`runtime.v1.RuntimeService/<method>`) with `request`.
    pub fn call<Answer: prost::Message + Default>(
        &mut self,
        method: &'static str,
        request: &impl prost::Message,
    ) -> Result<Answer, CriError> {
        let socket = self.socket.clone();
        let connection = self.connection.take();
        let runtime = &self.runtime;
        let result = runtime.block_on(async {
            let connection = match connection {
                Some(connection) => connection,
                None => connect(&socket).await?,
            };
            let call = unary(connection.clone(), method, request.encode_to_vec());
            match tokio::time::timeout(CALL_TIMEOUT, call).await {
                Ok(Ok(bytes)) => Ok((connection, bytes)),
                Ok(Err(reason)) => Err(reason),
                Err(_) => Err(CallFailure::Broken(format!(
                    "no answer within {CALL_TIMEOUT:?}"
                ))),
            }
        });
        match result {
            Ok((connection, bytes)) => {
                self.connection = Some(connection);
                Answer::decode(bytes).map_err(|error| CriError::Call {
                    socket,
                    method,
                    reason: format!("undecodable answer: {error}"),
                })
            }
            Err(CallFailure::Connect(reason)) => Err(CriError::Connect { socket, reason }),
            Err(CallFailure::Broken(reason)) => Err(CriError::Call {
                socket,
                method,
                reason,
            }),
            Err(CallFailure::Status {
                code,
                message,
                connection,
            }) => {
                // The connection is sound: the runtime answered.
                self.connection = Some(connection);
                Err(CriError::Status {
                    socket,
                    method,
                    code,
                    message,
                })
            }
        }
    }
}

enum CallFailure {
    Connect(String),
    /// The connection is not to be used again.
    Broken(String),
    Status {
        code: u32,
        message: String,
        connection: h2::client::SendRequest<Bytes>,
    },
}

async fn connect(socket: &Path) -> Result<h2::client::SendRequest<Bytes>, CallFailure> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|error| CallFailure::Connect(error.to_string()))?;
    let (sender, connection) = h2::client::handshake(stream)
        .await
        .map_err(|error| CallFailure::Connect(format!("HTTP/2 handshake: {error}")))?;
    // The connection's own task: it ends when the connection does, and a broken one fails the
    // next call, which connects again.
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!("CRI connection ended: {error}");
        }
    });
    Ok(sender)
}

async fn unary(
    connection: h2::client::SendRequest<Bytes>,
    method: &'static str,
    message: Vec<u8>,
) -> Result<Bytes, CallFailure> {
    let broken = |error: h2::Error| CallFailure::Broken(error.to_string());
    let mut sender = connection.clone().ready().await.map_err(broken)?;
    let request = http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://localhost/runtime.v1.RuntimeService/{method}"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("a well-formed request");
    let (answer, mut body) = sender.send_request(request, false).map_err(broken)?;
    // gRPC's framing: not compressed (0), then the message's length, big-endian.
    let mut framed = BytesMut::with_capacity(5 + message.len());
    framed.put_u8(0);
    framed.put_u32(message.len() as u32);
    framed.put_slice(&message);
    body.send_data(framed.freeze(), true).map_err(broken)?;
    let answer = answer.await.map_err(broken)?;
    let (head, mut answer_body) = answer.into_parts();
    if head.status != http::StatusCode::OK {
        return Err(CallFailure::Broken(format!("HTTP status {}", head.status)));
    }
    // A call refused outright carries its status in the headers, with no body.
    if let Some(status) = grpc_status(&head.headers) {
        return Err(CallFailure::Status {
            code: status.0,
            message: status.1,
            connection,
        });
    }
    let mut received = BytesMut::new();
    while let Some(chunk) = answer_body.data().await {
        let chunk = chunk.map_err(broken)?;
        let _ = answer_body.flow_control().release_capacity(chunk.len());
        if received.len() + chunk.len() > ANSWER_BYTES_MAX + 5 {
            return Err(CallFailure::Broken("an answer over 64 MiB".into()));
        }
        received.extend_from_slice(&chunk);
    }
    let trailers = answer_body
        .trailers()
        .await
        .map_err(broken)?
        .unwrap_or_default();
    match grpc_status(&trailers) {
        Some((0, _)) => {}
        Some((code, message)) => {
            return Err(CallFailure::Status {
                code,
                message,
                connection,
            });
        }
        None => {
            return Err(CallFailure::Broken(
                "an answer without a gRPC status".into(),
            ));
        }
    }
    let mut received = received.freeze();
    if received.len() < 5 || received[0] != 0 {
        return Err(CallFailure::Broken(
            "an answer not framed as one uncompressed gRPC message".into(),
        ));
    }
    received.advance(1);
    let length = received.get_u32() as usize;
    if length != received.len() {
        return Err(CallFailure::Broken(format!(
            "an answer of {} bytes framed as {length}",
            received.len()
        )));
    }
    Ok(received)
}

fn grpc_status(headers: &http::HeaderMap) -> Option<(u32, String)> {
    let code = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    let message = headers
        .get("grpc-message")
        .and_then(|value| value.to_str().ok())
        // gRPC percent-encodes its status message.
        .map(|text| {
            percent_encoding::percent_decode_str(text)
                .decode_utf8_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    Some((code, message))
}

// The messages, with only the fields read or sent. Field numbers are `runtime.v1`'s.

#[derive(Clone, PartialEq, prost::Message)]
pub struct ListPodSandboxRequest {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ListPodSandboxResponse {
    #[prost(message, repeated, tag = "1")]
    pub items: Vec<PodSandbox>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandbox {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(message, optional, tag = "2")]
    pub metadata: Option<PodSandboxMetadata>,
    #[prost(int32, tag = "3")]
    pub state: i32,
    /// Nanoseconds since the epoch.
    #[prost(int64, tag = "4")]
    pub created_at: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxMetadata {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub uid: String,
    #[prost(string, tag = "3")]
    pub namespace: String,
    #[prost(uint32, tag = "4")]
    pub attempt: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxStatusRequest {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
    /// Asks for `info` too (containerd: `info` holds JSON with the sandbox's `pid`).
    #[prost(bool, tag = "2")]
    pub verbose: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxStatusResponse {
    #[prost(message, optional, tag = "1")]
    pub status: Option<PodSandboxStatus>,
    #[prost(map = "string, string", tag = "2")]
    pub info: HashMap<String, String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ListContainersRequest {
    #[prost(message, optional, tag = "1")]
    pub filter: Option<ContainerFilter>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerFilter {
    #[prost(string, tag = "3")]
    pub pod_sandbox_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ListContainersResponse {
    #[prost(message, repeated, tag = "1")]
    pub containers: Vec<Container>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Container {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub pod_sandbox_id: String,
    #[prost(int32, tag = "6")]
    pub state: i32,
}

/// `ContainerState.CONTAINER_RUNNING`.
pub const CONTAINER_RUNNING: i32 = 1;

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerStatusRequest {
    #[prost(string, tag = "1")]
    pub container_id: String,
    #[prost(bool, tag = "2")]
    pub verbose: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerStatusResponse {
    #[prost(map = "string, string", tag = "2")]
    pub info: HashMap<String, String>,
}

/// The process id in a verbose answer's `info` (containerd and CRI-O put JSON with a `pid`
/// under `info`).
pub fn info_pid(info: &HashMap<String, String>) -> Option<u32> {
    let json: serde_json::Value = serde_json::from_str(info.get("info")?).ok()?;
    json["pid"]
        .as_u64()
        .and_then(|pid| u32::try_from(pid).ok())
        .filter(|pid| *pid > 0)
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxStatus {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(message, optional, tag = "2")]
    pub metadata: Option<PodSandboxMetadata>,
    #[prost(int32, tag = "3")]
    pub state: i32,
    #[prost(int64, tag = "4")]
    pub created_at: i64,
    #[prost(message, optional, tag = "5")]
    pub network: Option<PodSandboxNetworkStatus>,
    #[prost(message, optional, tag = "6")]
    pub linux: Option<LinuxPodSandboxStatus>,
    #[prost(map = "string, string", tag = "7")]
    pub labels: HashMap<String, String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxNetworkStatus {
    #[prost(string, tag = "1")]
    pub ip: String,
    #[prost(message, repeated, tag = "2")]
    pub additional_ips: Vec<PodIp>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodIp {
    #[prost(string, tag = "1")]
    pub ip: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LinuxPodSandboxStatus {
    #[prost(message, optional, tag = "1")]
    pub namespaces: Option<Namespace>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Namespace {
    #[prost(message, optional, tag = "2")]
    pub options: Option<NamespaceOption>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct NamespaceOption {
    #[prost(int32, tag = "1")]
    pub network: i32,
}
