//! What each open connection's reports have counted so far. A connection is reported open at
//! every cut while it lives, then closed: each report carries what happened since the one
//! before (as IPFIX's delta counts do), so a connection's reports add up to its totals and a
//! sum over reports counts every byte once.

use std::collections::HashMap;

use flowattr_common::CanonicalIp;
use flowattr_common::kernel::{OpenSocket, SocketCounters};

/// One connection: its addresses, ports and start (the kernel's monotonic time), which the
/// open entries and the close event of the same connection share.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Connection {
    local_ip: CanonicalIp,
    remote_ip: CanonicalIp,
    local_port: u16,
    remote_port: u16,
    start_ns: u64,
}

impl Connection {
    fn of(socket: &OpenSocket) -> Connection {
        Connection {
            local_ip: socket.local_ip,
            remote_ip: socket.remote_ip,
            local_port: socket.local_port,
            remote_port: socket.remote_port,
            start_ns: socket.start_ns,
        }
    }
}

#[derive(Default)]
pub(crate) struct ReportedCounters {
    /// Counted so far, and the cut that last saw the connection open.
    counted: HashMap<Connection, (SocketCounters, u64)>,
    cut: u64,
}

impl ReportedCounters {
    /// An open report of `socket` (its counters as of now): what it adds to the earlier ones.
    pub(crate) fn open(&mut self, socket: &OpenSocket) -> SocketCounters {
        if socket.counters == SocketCounters::default() {
            return SocketCounters::default();
        }
        let cut = self.cut;
        let (counted, seen) = self
            .counted
            .entry(Connection::of(socket))
            .or_insert((SocketCounters::default(), cut));
        *seen = cut;
        let since = since(&socket.counters, counted);
        *counted = socket.counters;
        since
    }

    /// The close of `socket` (its final counters): what is left after its open reports.
    pub(crate) fn closed(&mut self, socket: &OpenSocket) -> SocketCounters {
        // Most connections close before any cut saw them open: no key to hash.
        if self.counted.is_empty() {
            return socket.counters;
        }
        match self.counted.remove(&Connection::of(socket)) {
            Some((counted, _)) => since(&socket.counters, &counted),
            None => socket.counters,
        }
    }

    /// After a cut's open reports: forgets connections seen open neither at this cut nor at
    /// the one before. Their close came after its event left the ring, within one drain; one
    /// not seen for a whole interval closed unseen (the kernel skipped the program's run).
    pub(crate) fn end_cut(&mut self) {
        let cut = self.cut;
        self.counted.retain(|_, (_, seen)| *seen + 1 >= cut);
        self.cut += 1;
    }
}

fn since(now: &SocketCounters, before: &SocketCounters) -> SocketCounters {
    SocketCounters {
        bytes_acked: now.bytes_acked.saturating_sub(before.bytes_acked),
        bytes_received: now.bytes_received.saturating_sub(before.bytes_received),
        segs_out: now.segs_out.saturating_sub(before.segs_out),
        segs_in: now.segs_in.saturating_sub(before.segs_in),
        total_retrans: now.total_retrans.saturating_sub(before.total_retrans),
        _pad: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowattr_common::WorkloadId;
    use flowattr_common::kernel::CHECKED_ALIVE;

    fn socket(start_ns: u64, bytes: u64) -> OpenSocket {
        OpenSocket {
            start_ns,
            local_ip: CanonicalIp::from_octets([1; 16]),
            remote_ip: CanonicalIp::from_octets([2; 16]),
            local_port: 40_000,
            remote_port: 443,
            direction: 0,
            shared: 0,
            checked: CHECKED_ALIVE,
            _pad: 0,
            workload: WorkloadId::new(0),
            srtt_us_x8: 0,
            mdev_us_x4: 0,
            _pad2: 0,
            counters: SocketCounters {
                bytes_acked: bytes,
                bytes_received: bytes * 2,
                segs_out: bytes as u32 / 10,
                segs_in: bytes as u32 / 5,
                total_retrans: 1,
                _pad: 0,
            },
        }
    }

    #[test]
    fn a_connections_reports_add_up_to_its_totals() {
        let mut reported = ReportedCounters::default();
        let first = reported.open(&socket(7, 100));
        reported.end_cut();
        let second = reported.open(&socket(7, 250));
        reported.end_cut();
        let last = reported.closed(&socket(7, 400));
        assert_eq!(
            [first.bytes_acked, second.bytes_acked, last.bytes_acked],
            [100, 150, 150]
        );
        assert_eq!(
            first.bytes_received + second.bytes_received + last.bytes_received,
            800
        );
        assert_eq!(
            [first.segs_out, second.segs_out, last.segs_out],
            [10, 15, 15]
        );
        assert_eq!(
            [
                first.total_retrans,
                second.total_retrans,
                last.total_retrans
            ],
            [1, 0, 0]
        );
        assert!(reported.counted.is_empty());
    }

    #[test]
    fn a_connection_never_reported_open_closes_with_its_totals() {
        let mut reported = ReportedCounters::default();
        reported.open(&socket(1, 100));
        assert_eq!(reported.closed(&socket(2, 300)).bytes_acked, 300);
    }

    #[test]
    fn a_connection_whose_close_was_never_seen_is_forgotten_after_an_interval() {
        let mut reported = ReportedCounters::default();
        reported.open(&socket(1, 100));
        reported.end_cut();
        // Gone from the open sockets: its close may still be on its way for one interval.
        reported.end_cut();
        assert_eq!(reported.counted.len(), 1);
        reported.end_cut();
        assert!(reported.counted.is_empty());
    }
}
