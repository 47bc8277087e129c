//! The few calls of the Docker Engine API the watcher makes, over the daemon's Unix socket:
//! plain HTTP/1.1 GETs, one connection each, the answer read whole (JSON) or, for the event
//! stream, line by line as it arrives. A blocking client of its own: the watcher runs on its
//! own threads, and an async runtime for a handful of GETs would be most of the agent's code.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("Docker daemon at {socket}: {source}")]
    Io {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("Docker daemon at {socket}: GET {path} answered {status}: {body}")]
    Status {
        socket: PathBuf,
        path: String,
        status: u16,
        body: String,
    },
    #[error("Docker daemon at {socket}: GET {path}: {reason}")]
    Garbled {
        socket: PathBuf,
        path: String,
        reason: String,
    },
}

/// The Engine API version asked for: 1.41 is Docker 20.10's, and every later daemon serves it.
const API_VERSION: &str = "v1.41";

/// A head longer than this is not Docker's.
const HEAD_BYTES_MAX: usize = 64 << 10;
/// An answer body longer than this is refused (a listing of thousands of containers is a few MB).
const BODY_BYTES_MAX: usize = 64 << 20;

#[derive(Debug, Clone)]
pub struct DockerApi {
    socket: PathBuf,
}

impl DockerApi {
    pub fn new(socket: &Path) -> DockerApi {
        DockerApi {
            socket: socket.to_owned(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET path` (under the API version), its JSON answer; `None` for 404.
    pub fn get(&self, path: &str) -> Result<Option<serde_json::Value>, DockerError> {
        let mut body = self.request(path, Some(Duration::from_secs(10)))?;
        let mut bytes = Vec::new();
        body.by_ref()
            .take(BODY_BYTES_MAX as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| self.io(source))?;
        if bytes.len() > BODY_BYTES_MAX {
            return Err(self.garbled(path, "an answer over 64 MiB".into()));
        }
        if body.status == 404 {
            return Ok(None);
        }
        if body.status != 200 {
            return Err(DockerError::Status {
                socket: self.socket.clone(),
                path: path.to_owned(),
                status: body.status,
                body: String::from_utf8_lossy(&bytes)
                    .trim()
                    .chars()
                    .take(200)
                    .collect(),
            });
        }
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|error| self.garbled(path, error.to_string()))
    }

    /// `GET path` whose answer is a stream of JSON lines (`/events`): `each` for every line
    /// until the daemon ends the answer (Ok) or the connection fails (Err). A read timeout of
    /// `idle` (if given) ends it with an error.
    pub fn stream(
        &self,
        path: &str,
        idle: Option<Duration>,
        mut each: impl FnMut(serde_json::Value),
    ) -> Result<(), DockerError> {
        let body = self.request(path, idle)?;
        if body.status != 200 {
            return Err(DockerError::Status {
                socket: self.socket.clone(),
                path: path.to_owned(),
                status: body.status,
                body: String::new(),
            });
        }
        let mut lines = BufReader::new(body);
        let mut line = Vec::new();
        loop {
            line.clear();
            let read = lines
                .by_ref()
                .take(BODY_BYTES_MAX as u64)
                .read_until(b'\n', &mut line)
                .map_err(|source| self.io(source))?;
            if read == 0 {
                return Ok(());
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let value = serde_json::from_slice(&line).map_err(|error| {
                self.garbled(path, format!("an event that is not JSON: {error}"))
            })?;
            each(value);
        }
    }

    fn request(&self, path: &str, timeout: Option<Duration>) -> Result<Body, DockerError> {
        let mut stream = UnixStream::connect(&self.socket).map_err(|source| self.io(source))?;
        stream
            .set_read_timeout(timeout)
            .map_err(|source| self.io(source))?;
        stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .map_err(|source| self.io(source))?;
        let request = format!(
            "GET /{API_VERSION}{path} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .map_err(|source| self.io(source))?;
        let mut reader = BufReader::new(stream);
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let read = reader
                .by_ref()
                .take(HEAD_BYTES_MAX as u64)
                .read_until(b'\n', &mut head)
                .map_err(|source| self.io(source))?;
            if read == 0 || head.len() >= HEAD_BYTES_MAX {
                return Err(
                    self.garbled(path, "the answer's head ended early or is too long".into())
                );
            }
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&head) {
            Ok(httparse::Status::Complete(_)) => {}
            _ => return Err(self.garbled(path, "not an HTTP answer".into())),
        }
        let status = response.code.unwrap_or(0);
        let header = |name: &str| {
            response
                .headers
                .iter()
                .find(|header| header.name.eq_ignore_ascii_case(name))
                .map(|header| {
                    String::from_utf8_lossy(header.value)
                        .trim()
                        .to_ascii_lowercase()
                })
        };
        let framing = if header("transfer-encoding").is_some_and(|value| value.contains("chunked"))
        {
            Framing::Chunked {
                left: 0,
                done: false,
            }
        } else if let Some(length) = header("content-length") {
            Framing::Length(
                length
                    .parse()
                    .map_err(|_| self.garbled(path, format!("a content length `{length}`")))?,
            )
        } else {
            Framing::UntilClose
        };
        Ok(Body {
            reader,
            framing,
            status,
        })
    }

    fn io(&self, source: std::io::Error) -> DockerError {
        DockerError::Io {
            socket: self.socket.clone(),
            source,
        }
    }

    fn garbled(&self, path: &str, reason: String) -> DockerError {
        DockerError::Garbled {
            socket: self.socket.clone(),
            path: path.to_owned(),
            reason,
        }
    }
}

/// An answer's body, its framing undone.
struct Body {
    reader: BufReader<UnixStream>,
    framing: Framing,
    status: u16,
}

enum Framing {
    Length(u64),
    /// `left` bytes of the current chunk remain.
    Chunked {
        left: u64,
        done: bool,
    },
    UntilClose,
}

impl Read for Body {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let bad =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
        match &mut self.framing {
            Framing::UntilClose => self.reader.read(out),
            Framing::Length(left) => {
                if *left == 0 {
                    return Ok(0);
                }
                let want = out.len().min(*left as usize);
                let read = self.reader.read(&mut out[..want])?;
                if read == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                *left -= read as u64;
                Ok(read)
            }
            Framing::Chunked { left, done } => {
                if *done {
                    return Ok(0);
                }
                if *left == 0 {
                    let mut size = String::new();
                    self.reader.by_ref().take(1024).read_line(&mut size)?;
                    let digits = size.trim().split(';').next().unwrap_or("");
                    let size = u64::from_str_radix(digits, 16)
                        .map_err(|_| bad("a chunk size that is not hex"))?;
                    if size == 0 {
                        *done = true;
                        return Ok(0);
                    }
                    *left = size;
                }
                let want = out.len().min(*left as usize);
                let read = self.reader.read(&mut out[..want])?;
                if read == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                *left -= read as u64;
                if *left == 0 {
                    let mut end = [0u8; 2];
                    self.reader.read_exact(&mut end)?;
                    if &end != b"\r\n" {
                        return Err(bad("a chunk not ended by CRLF"));
                    }
                }
                Ok(read)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A one-answer server on a socket in `dir`, answering every connection with `answer`.
    fn serve(dir: &Path, answer: &'static [u8]) -> DockerApi {
        let path = dir.join("docker.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request);
                let _ = stream.write_all(answer);
            }
        });
        DockerApi::new(&path)
    }

    #[test]
    fn chunked_and_sized_answers_read_back_and_404_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let api = serve(
            dir.path(),
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n",
        );
        assert_eq!(api.get("/x").unwrap(), Some(serde_json::json!({"a": 1})));
        let dir = tempfile::tempdir().unwrap();
        let api = serve(
            dir.path(),
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}",
        );
        assert_eq!(api.get("/x").unwrap(), None);
    }

    #[test]
    fn a_stream_hands_over_each_line_and_garbage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let api = serve(
            dir.path(),
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n{\"n\":1}\n\r\n8\r\n{\"n\":2}\n\r\n0\r\n\r\n",
        );
        let mut seen = Vec::new();
        api.stream("/events", None, |value| {
            seen.push(value["n"].as_u64().unwrap())
        })
        .unwrap();
        assert_eq!(seen, vec![1, 2]);
        for answer in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"[..],
            b"garbage\r\n\r\n",
            b"HTTP/1.1 500 Oops\r\nContent-Length: 4\r\n\r\nfail",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n{x}",
        ] {
            let dir = tempfile::tempdir().unwrap();
            let answer: &'static [u8] = Box::leak(answer.to_vec().into_boxed_slice());
            let api = serve(dir.path(), answer);
            let error = api.get("/x").unwrap_err().to_string();
            assert!(error.starts_with("Docker daemon at "), "{error}");
        }
        let api = DockerApi::new(&dir.path().join("absent.sock"));
        assert!(
            api.get("/x")
                .unwrap_err()
                .to_string()
                .contains("absent.sock")
        );
    }
}
