//! The control plane's HTTP/1.1 server. A thread per connection, bounded in number (in all and
//! per client address), each connection with one deadline to send its request and one to read
//! the answer: an idle, slow or non-reading client holds one thread for a bounded time and
//! never delays another client's request, a probe's `/healthz` included. One request per
//! connection (`Connection: close`): the control plane is polled, not streamed.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::connection_slots::ConnectionSlots;

/// What a client may take.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_address: usize,
    /// From accept to the end of the request's head.
    pub request_timeout: Duration,
    /// For the whole answer to be written.
    pub response_timeout: Duration,
    pub max_head_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 64,
            max_connections_per_address: 16,
            request_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(10),
            max_head_bytes: 16 << 10,
        }
    }
}

/// A request's head, as the handler sees it.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: String,
    /// The `Authorization` header, if it was sent.
    pub authorization: Option<String>,
}

/// An answer: status, content type, body.
pub type Reply = (u16, &'static str, String);

/// Connections turned away, by why.
#[derive(Debug, Default)]
pub struct ServerCounters {
    pub refused_busy: AtomicU64,
    pub timed_out: AtomicU64,
    pub bad_requests: AtomicU64,
    pub unauthorized: AtomicU64,
}

type Handler = dyn Fn(&Request) -> Reply + Send + Sync;

/// Serves `listener` on a thread of its own; `handle` answers each request (on the
/// connection's thread).
pub fn serve(
    listener: TcpListener,
    limits: Limits,
    counters: Arc<ServerCounters>,
    handle: Arc<Handler>,
) -> io::Result<()> {
    let slots = ConnectionSlots::new(limits.max_connections, limits.max_connections_per_address);
    std::thread::Builder::new()
        .name("flowattr-http".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let Ok(peer) = stream.peer_addr() else {
                    continue;
                };
                let Ok(slot) = slots.take(peer.ip()) else {
                    counters.refused_busy.fetch_add(1, Ordering::Relaxed);
                    refuse_busy(stream);
                    continue;
                };
                let (for_connection, handle) = (counters.clone(), handle.clone());
                let spawned = std::thread::Builder::new()
                    .name("flowattr-http-conn".into())
                    .spawn(move || {
                        let _slot = slot;
                        serve_connection(stream, &limits, &for_connection, &*handle);
                    });
                if spawned.is_err() {
                    counters.refused_busy.fetch_add(1, Ordering::Relaxed);
                }
            }
        })?;
    Ok(())
}

/// Tells a client over its limits so, without waiting on it: the answer fits in the socket's
/// buffer, and a client that does not read it loses it.
fn refuse_busy(stream: TcpStream) {
    let body = "too many control-plane connections\n";
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.set_nonblocking(true);
    let _ = (&stream).write(answer.as_bytes());
}

fn serve_connection(
    mut stream: TcpStream,
    limits: &Limits,
    counters: &ServerCounters,
    handle: &Handler,
) {
    let request = match read_request(&mut stream, limits) {
        Ok(request) => request,
        Err(ReadError::TimedOut) => {
            counters.timed_out.fetch_add(1, Ordering::Relaxed);
            return;
        }
        Err(ReadError::Closed) => return,
        Err(ReadError::Bad(status, message)) => {
            counters.bad_requests.fetch_add(1, Ordering::Relaxed);
            let reply = (status, "text/plain", format!("{message}\n"));
            let _ = write_reply(
                &mut stream,
                &reply,
                Instant::now() + limits.response_timeout,
            );
            return;
        }
    };
    let reply = handle(&request);
    if let Err(error) = write_reply(
        &mut stream,
        &reply,
        Instant::now() + limits.response_timeout,
    ) && error.kind() == io::ErrorKind::TimedOut
    {
        counters.timed_out.fetch_add(1, Ordering::Relaxed);
    }
}

enum ReadError {
    TimedOut,
    Closed,
    Bad(u16, &'static str),
}

/// Reads the request's head (a body, if any, is not read: every endpoint is a GET), all of it
/// before the request deadline.
fn read_request(stream: &mut TcpStream, limits: &Limits) -> Result<Request, ReadError> {
    let deadline = Instant::now() + limits.request_timeout;
    let mut head = vec![0u8; limits.max_head_bytes];
    let mut filled = 0;
    loop {
        if filled == head.len() {
            return Err(ReadError::Bad(431, "request head too large"));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ReadError::TimedOut);
        }
        let _ = stream.set_read_timeout(Some(left));
        match stream.read(&mut head[filled..]) {
            Ok(0) => return Err(ReadError::Closed),
            Ok(read) => filled += read,
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ReadError::TimedOut);
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Err(ReadError::Closed),
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&head[..filled]) {
            Ok(httparse::Status::Partial) => continue,
            Ok(httparse::Status::Complete(_)) => {
                let target = parsed.path.unwrap_or("/");
                let (path, query) = target.split_once('?').unwrap_or((target, ""));
                let authorization = parsed
                    .headers
                    .iter()
                    .find(|header| header.name.eq_ignore_ascii_case("authorization"))
                    .and_then(|header| std::str::from_utf8(header.value).ok())
                    .map(str::to_owned);
                return Ok(Request {
                    method: parsed.method.unwrap_or("").to_owned(),
                    path: path.to_owned(),
                    query: query.to_owned(),
                    authorization,
                });
            }
            Err(httparse::Error::TooManyHeaders) => {
                return Err(ReadError::Bad(431, "too many request headers"));
            }
            Err(_) => return Err(ReadError::Bad(400, "not an HTTP/1.1 request")),
        }
    }
}

fn write_reply(
    stream: &mut TcpStream,
    (status, content_type, body): &Reply,
    deadline: Instant,
) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n{}\r\n",
        reason_phrase(*status),
        body.len(),
        if *status == 401 {
            "WWW-Authenticate: Bearer\r\n"
        } else {
            ""
        },
    );
    write_all_by(stream, head.as_bytes(), deadline)?;
    write_all_by(stream, body.as_bytes(), deadline)
}

/// `write_all`, giving up at `deadline` however the client paces its reads.
fn write_all_by(stream: &mut TcpStream, mut bytes: &[u8], deadline: Instant) -> io::Result<()> {
    while !bytes.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        stream.set_write_timeout(Some(left))?;
        match stream.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => bytes = &bytes[written..],
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::ErrorKind::TimedOut.into());
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    }
}
