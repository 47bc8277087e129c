//! A blocking connection to a collector's ingest port: send [`FlowBatch`] frames, read [`Ack`]s.
//! The exporter, the load generator and the tests all speak to a collector through it, so the
//! protocol's client side exists once. The connection is plain TCP or, given a [`ClientTls`],
//! mutual TLS.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::collector_address::CollectorAddress;
use crate::tls::ClientTls;

use crate::Timestamp;
use rkyv::api::high::HighValidator;
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor;

use crate::wire::{
    Ack, BATCH_FLOWS_MAX, CLOCK_PROBE_SEQUENCE, EncodeError, FlowBatch, FrameDecoder, FrameError,
    FrameKind, Message, PayloadError, checksum_of, encode_frame, encode_message,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("collector connection: {0}")]
    Io(#[from] io::Error),
    #[error("encoding a batch: {0}")]
    Encode(#[from] EncodeError),
    #[error("collector sent a bad frame: {0}")]
    Frame(#[from] FrameError),
    #[error("collector sent a bad ack: {0}")]
    Payload(#[from] PayloadError),
    #[error("the collector closed the connection")]
    Closed,
    #[error("TLS with the collector: {0}")]
    Tls(#[from] rustls::Error),
    #[error("resolving collector {address}: {source}")]
    Resolve { address: String, source: io::Error },
}

/// The byte stream under the protocol.
enum Transport {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Transport {
    fn tcp(&self) -> &TcpStream {
        match self {
            Transport::Plain(stream) => stream,
            Transport::Tls(tls) => tls.get_ref(),
        }
    }
}

impl Read for Transport {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(stream) => stream.read(buffer),
            Transport::Tls(tls) => tls.read(buffer),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(stream) => stream.write(bytes),
            Transport::Tls(tls) => tls.write(bytes),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Transport::Plain(stream) => stream.flush(),
            Transport::Tls(tls) => tls.flush(),
        }
    }
}

/// One TCP connection to a collector. Batches may be pipelined: send several, then read their
/// acks, which arrive in the order the collector made each batch durable (not necessarily the
/// order sent).
pub struct CollectorConnection {
    stream: Transport,
    decoder: FrameDecoder,
    inbound: Vec<u8>,
    outbound: Vec<u8>,
}

impl CollectorConnection {
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<Self, ClientError> {
        Self::connect_with(addr, timeout, None)
    }

    /// Connects, over mutual TLS when `tls` is given. The handshake completes here, so a
    /// collector that refuses this client's certificate is an error of the connect, not of a
    /// later send.
    pub fn connect_with(
        addr: SocketAddr,
        timeout: Duration,
        tls: Option<&ClientTls>,
    ) -> Result<Self, ClientError> {
        Self::connect_to(&addr.into(), timeout, tls)
    }

    /// Connects to `collector`, resolving its name now and trying each of its addresses in
    /// turn (each within `timeout`). Under TLS the collector's certificate must carry its DNS
    /// name (or IP), unless the [`ClientTls`] names another.
    pub fn connect_to(
        collector: &CollectorAddress,
        timeout: Duration,
        tls: Option<&ClientTls>,
    ) -> Result<Self, ClientError> {
        let addrs = collector.resolve().map_err(|source| ClientError::Resolve {
            address: collector.to_string(),
            source,
        })?;
        let mut failure = None;
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, timeout) {
                Ok(tcp) => {
                    tcp.set_read_timeout(Some(timeout))?;
                    tcp.set_write_timeout(Some(timeout))?;
                    return Self::over(tcp, tls.map(|tls| (tls, collector, addr)));
                }
                Err(error) => failure = Some(error),
            }
        }
        Err(failure.expect("resolve gives at least one address").into())
    }

    /// Speaks plain TCP on a socket connected by the caller (bound to a source address of
    /// its choosing, with its own timeouts).
    pub fn from_stream(tcp: TcpStream) -> Result<Self, ClientError> {
        Self::over(tcp, None)
    }

    fn over(
        tcp: TcpStream,
        tls: Option<(&ClientTls, &CollectorAddress, SocketAddr)>,
    ) -> Result<Self, ClientError> {
        tcp.set_nodelay(true)?;
        let stream = match tls {
            None => Transport::Plain(tcp),
            Some((tls, collector, addr)) => {
                let mut tls = rustls::StreamOwned::new(tls.connection(collector, addr)?, tcp);
                while tls.conn.is_handshaking() {
                    tls.conn.complete_io(&mut tls.sock)?;
                }
                Transport::Tls(Box::new(tls))
            }
        };
        Ok(CollectorConnection {
            stream,
            decoder: FrameDecoder::default(),
            inbound: Vec::with_capacity(4096),
            outbound: Vec::new(),
        })
    }

    /// Encodes and sends one batch (a [`FlowBatch`] or a [`super::wire::HostFlowBatch`]).
    pub fn send<M: Message>(&mut self, batch: &M) -> Result<(), ClientError>
    where
        M::Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>,
    {
        self.outbound.clear();
        encode_message(batch, &mut self.outbound)?;
        self.stream.write_all(&self.outbound)?;
        self.stream.flush()?;
        Ok(())
    }

    /// Sends bytes that are already framed (pre-encoded batches, or deliberately broken frames
    /// in tests).
    pub fn send_raw(&mut self, frames: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(frames)?;
        self.stream.flush()?;
        Ok(())
    }

    /// Blocks until the next ack arrives (or the read timeout passes).
    pub fn recv_ack(&mut self) -> Result<Ack, ClientError> {
        loop {
            if let Some((frame, used)) = self.decoder.decode(&self.inbound)? {
                let archived = frame.access::<Ack>()?;
                if archived.refused.len() > BATCH_FLOWS_MAX {
                    return Err(ClientError::Payload(PayloadError::Malformed {
                        kind: FrameKind::Ack,
                        reason: format!("{} refused records in one ack", archived.refused.len()),
                    }));
                }
                let ack =
                    rkyv::deserialize::<Ack, rkyv::rancor::Error>(archived).map_err(|error| {
                        PayloadError::Malformed {
                            kind: FrameKind::Ack,
                            reason: error.to_string(),
                        }
                    })?;
                self.inbound.drain(..used);
                return Ok(ack);
            }
            let mut chunk = [0u8; 4096];
            // A signal to this thread (a child exiting, a timer) is not the connection's end.
            let read = match self.stream.read(&mut chunk) {
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                read => read?,
            };
            if read == 0 {
                return Err(ClientError::Closed);
            }
            self.inbound.extend_from_slice(&chunk[..read]);
        }
    }

    /// Asks the collector for its clock ([`FrameKind::ClockProbe`]): returns when the probe
    /// was sent, when its answer came, and the answer. Only on a connection with no batch
    /// waiting for its ack.
    pub fn probe_clock(&mut self) -> Result<(Timestamp, Timestamp, Ack), ClientError> {
        self.outbound.clear();
        encode_frame(FrameKind::ClockProbe, &[], &mut self.outbound)?;
        let checksum = checksum_of(&self.outbound);
        let sent = Timestamp::now();
        self.stream.write_all(&self.outbound)?;
        self.stream.flush()?;
        loop {
            let ack = self.recv_ack()?;
            if ack.sequence == CLOCK_PROBE_SEQUENCE && Some(ack.frame_checksum) == checksum {
                return Ok((sent, Timestamp::now(), ack));
            }
        }
    }

    /// Sends one batch and waits for its ack.
    pub fn send_and_wait(&mut self, batch: &FlowBatch) -> Result<Ack, ClientError> {
        self.send(batch)?;
        self.recv_ack()
    }

    /// Sends every batch keeping at most `window` unacked, and returns all the acks in the
    /// order they arrived.
    pub fn send_all<M: Message>(
        &mut self,
        batches: &[M],
        window: usize,
    ) -> Result<Vec<Ack>, ClientError>
    where
        M::Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>,
    {
        let frames = batches
            .iter()
            .map(|batch| {
                let mut frame = Vec::new();
                encode_message(batch, &mut frame).map(|()| frame)
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.send_all_frames(&frames, window)
    }

    /// Sends every frame (each a whole, encoded batch) keeping at most `window` unacked, and
    /// returns all the acks in the order they arrived.
    pub fn send_all_frames(
        &mut self,
        frames: &[Vec<u8>],
        window: usize,
    ) -> Result<Vec<Ack>, ClientError> {
        let mut acks = Vec::with_capacity(frames.len());
        for (sent, frame) in frames.iter().enumerate() {
            if sent >= acks.len() + window.max(1) {
                acks.push(self.recv_ack()?);
            }
            self.send_raw(frame)?;
        }
        while acks.len() < frames.len() {
            acks.push(self.recv_ack()?);
        }
        Ok(acks)
    }

    /// Whether the collector has closed this connection (an idle one, mostly), seen without
    /// blocking: sending on it would only fail after the bytes were written.
    pub fn closed_by_peer(&self) -> bool {
        let tcp = self.stream.tcp();
        if tcp.set_nonblocking(true).is_err() {
            return true;
        }
        let peeked = tcp.peek(&mut [0u8; 1]);
        let restored = tcp.set_nonblocking(false);
        restored.is_err()
            || match peeked {
                Ok(0) => true,
                Ok(_) => false,
                Err(error) => error.kind() != io::ErrorKind::WouldBlock,
            }
    }

    /// The TCP socket under the connection (under TLS too).
    pub fn stream(&self) -> &TcpStream {
        self.stream.tcp()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_the_collector_closed_is_seen_closed_before_sending_and_an_open_one_is_not() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let open = CollectorConnection::connect(addr, Duration::from_secs(5)).unwrap();
        let (_kept, _) = listener.accept().unwrap();
        let closed = CollectorConnection::connect(addr, Duration::from_secs(5)).unwrap();
        drop(listener.accept().unwrap());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !closed.closed_by_peer() {
            assert!(
                std::time::Instant::now() < deadline,
                "the close was never seen"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!open.closed_by_peer());
        // The check leaves the socket blocking, with its timeouts.
        assert_eq!(
            open.stream().read_timeout().unwrap(),
            Some(Duration::from_secs(5))
        );
        let mut byte = [0u8; 1];
        assert!(
            (&mut open.stream()).read(&mut byte).is_err(),
            "a blocking read times out"
        );
    }
}
