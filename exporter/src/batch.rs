//! The batch being gathered: kernel records turned into wire records, each local side named
//! as captured, and, with a runtime watcher, named again from the runtime's history at the cut.

use flowattr_common::kernel::{DIRECTION_INBOUND, OpenSocket, SocketCounters};
use flowattr_common::wire::{FlowRecord, WorkloadIndex};
use flowattr_common::{Direction, FlowState, RoundTrip, Timestamp};
use flowattr_exporter::platform::{LocalName, PlatformIdentity};

/// A flow taken out of a batch to wait for the next: its record, round trip and captured name.
pub(crate) type CarriedFlow = (FlowRecord, Option<RoundTrip>, Option<String>);

/// Converts kernel records to wire records, naming local workloads.
pub(crate) struct BatchBuilder {
    pub(crate) workloads: Vec<String>,
    pub(crate) flows: Vec<FlowRecord>,
    /// One per record of `flows`, in order.
    pub(crate) round_trips: Vec<Option<RoundTrip>>,
}

impl BatchBuilder {
    pub(crate) fn new() -> Self {
        BatchBuilder {
            workloads: Vec::new(),
            flows: Vec::new(),
            round_trips: Vec::new(),
        }
    }

    /// The records from `from` on, with their round trips.
    pub(crate) fn since(&self, from: usize) -> (&[FlowRecord], &[Option<RoundTrip>]) {
        (&self.flows[from..], &self.round_trips[from..])
    }

    pub(crate) fn index_of(&mut self, name: &str) -> WorkloadIndex {
        let position = self.workloads.iter().position(|known| known == name);
        WorkloadIndex(position.unwrap_or_else(|| {
            self.workloads.push(name.to_owned());
            self.workloads.len() - 1
        }) as u32)
    }

    /// Names every flow's local side from the runtime's history (see [`PlatformIdentity`]):
    /// the name captured from the eBPF map stands only where the history agrees or has no say.
    pub(crate) fn name_from_runtime(&mut self, identity: &PlatformIdentity) {
        let lookup = identity.lookup();
        for index in 0..self.flows.len() {
            let flow = self.flows[index];
            let captured = flow
                .local_workload
                .and_then(|at| self.workloads.get(at.0 as usize))
                .map(String::as_str);
            match lookup.local_name(&flow, captured) {
                LocalName::Keep => {}
                LocalName::Named(name) => {
                    self.flows[index].local_workload = Some(self.index_of(&name))
                }
                LocalName::Unnamed(_) => self.flows[index].local_workload = None,
            }
        }
    }

    /// Removes the closed flows that ended after `through`, with their captured names.
    pub(crate) fn take_closed_after(&mut self, through: Timestamp) -> Vec<CarriedFlow> {
        let mut taken = Vec::new();
        let mut kept = 0;
        for index in 0..self.flows.len() {
            let flow = self.flows[index];
            if flow.state == FlowState::Closed && flow.end > through {
                let name = flow
                    .local_workload
                    .and_then(|at| self.workloads.get(at.0 as usize))
                    .cloned();
                taken.push((flow, self.round_trips[index], name));
            } else {
                self.flows[kept] = flow;
                self.round_trips[kept] = self.round_trips[index];
                kept += 1;
            }
        }
        self.flows.truncate(kept);
        self.round_trips.truncate(kept);
        taken
    }

    /// A record a previous run captured (from the journal), its workload given by name.
    pub(crate) fn add_record(
        &mut self,
        mut record: FlowRecord,
        round_trip: Option<RoundTrip>,
        local_name: Option<&str>,
    ) {
        record.local_workload = local_name.map(|name| self.index_of(name));
        self.flows.push(record);
        self.round_trips.push(round_trip);
    }

    /// A report of `socket` counting `counters` (what happened since its previous report).
    pub(crate) fn add(
        &mut self,
        socket: &OpenSocket,
        start: Timestamp,
        end: Timestamp,
        counters: SocketCounters,
        state: FlowState,
        local_name: Option<&str>,
    ) {
        let local_workload = local_name.map(|name| self.index_of(name));
        self.flows.push(FlowRecord {
            local_ip: socket.local_ip,
            remote_ip: socket.remote_ip,
            local_port: socket.local_port,
            remote_port: socket.remote_port,
            local_workload,
            local_shared: socket.shared == 1,
            start,
            end: end.max(start),
            bytes_sent: counters.bytes_acked,
            bytes_received: counters.bytes_received,
            segments_sent: counters.segs_out,
            segments_received: counters.segs_in,
            retransmits: counters.total_retrans,
            direction: if socket.direction == DIRECTION_INBOUND {
                Direction::Inbound
            } else {
                Direction::Outbound
            },
            state,
        });
        // A closed socket's as of its close; an open one's as of the cut (its handshake's when
        // it became established since the refresh, or no refresh could run).
        self.round_trips
            .push(RoundTrip::from_kernel(socket.srtt_us_x8, socket.mdev_us_x4));
    }
}
