//! Acks: a batch is acked to its exporter once every shard that buffers part of it has made
//! that part durable.

use std::rc::Rc;

use flowattr_common::Timestamp;
use flowattr_common::wire::{Ack, AckStatus, ExporterId, RefusedRecord};
use glommio::channels::local_channel::LocalSender;
use glommio::sync::Semaphore;

use super::{ControlMessage, DataMessage, Dictionary, FlowPart, Shard, SplitBatch};
use crate::delay::codec::BlockHeader;

/// Where an ack goes once every part of its batch is durable.
struct ConnectionAcks {
    acks: LocalSender<Ack>,
    /// Bounds the batches a connection has in flight; a permit returns with each ack.
    unacked: Semaphore,
    capacity: u64,
}

pub struct ConnectionHandle(Rc<ConnectionAcks>);

impl ConnectionHandle {
    /// Sends an answer that waits for nothing (a refused batch), outside the in-flight bound.
    pub fn answer_now(&self, ack: Ack) {
        // The connection may be gone; its exporter will resend and be answered again.
        let _ = self.0.acks.try_send(ack);
    }

    /// Whether a batch read from this connection still waits for its ack.
    pub fn in_flight(&self) -> bool {
        self.0.unacked.available() < self.0.capacity
    }
}

/// What an ack says besides its status, fixed when the batch is read.
#[derive(Debug)]
pub struct AckDetails {
    pub frame_checksum: u32,
    pub refused: Vec<RefusedRecord>,
    pub collector_time: Timestamp,
    pub max_skew_ns: u64,
}

pub(super) struct PendingBatch {
    exporter: ExporterId,
    sequence: u64,
    remaining: usize,
    duplicate: bool,
    flows: u64,
    details: AckDetails,
    connection: Rc<ConnectionAcks>,
}

/// What the writer hands back when bytes are durable.
pub(super) enum Completion {
    Part {
        origin: usize,
        ticket: u64,
        status: AckStatus,
    },
    Local(Rc<std::cell::Cell<bool>>),
}

impl Shard {
    pub fn new_connection(&self, acks: LocalSender<Ack>) -> ConnectionHandle {
        let capacity = self.node.config.ingest.max_unacked_batches as u64;
        ConnectionHandle(Rc::new(ConnectionAcks {
            acks,
            unacked: Semaphore::new(capacity),
            capacity,
        }))
    }

    /// Sends one validated batch on its way: heartbeats to their local IPs' shards, flows to
    /// their remote IPs' shards. The connection's ack follows once every part is durable.
    pub async fn dispatch(
        &self,
        connection: &ConnectionHandle,
        header: BlockHeader,
        workloads: Dictionary,
        split: SplitBatch,
        details: AckDetails,
    ) {
        // The permit comes back when the ack is sent: at most `max_unacked_batches` in flight.
        let _ = connection.0.unacked.acquire(1).await;
        let forward_parts = split
            .forward
            .iter()
            .filter(|flows| !flows.is_empty())
            .count();
        let parts = split.flows.iter().filter(|flows| !flows.is_empty()).count() + forward_parts;
        let flows: u64 = split.flows.iter().map(|flows| flows.len() as u64).sum();
        let ticket = {
            let mut state = self.state.borrow_mut();
            let ticket = state.next_ticket;
            state.next_ticket += 1;
            state.pending.insert(
                ticket,
                PendingBatch {
                    exporter: ExporterId(header.exporter),
                    sequence: header.sequence,
                    remaining: parts,
                    duplicate: true,
                    flows,
                    details,
                    connection: connection.0.clone(),
                },
            );
            ticket
        };
        self.send_heartbeats(header.host(), &workloads, split.beats)
            .await;
        if parts == 0 {
            // Nothing to buffer: a batch with no flows is durable as it stands.
            self.finish_part(ticket, AckStatus::Accepted);
            return;
        }
        for (to, flows) in split.flows.into_iter().enumerate() {
            if !flows.is_empty() {
                let part = FlowPart {
                    origin: self.id,
                    ticket,
                    header: header.clone(),
                    workloads: workloads.clone(),
                    flows,
                };
                self.send_data(to, DataMessage::Flows(part)).await;
            }
        }
        // After the local parts, so they are on their way while this connection waits for the
        // spool's sync.
        for (region, flows) in split.forward.into_iter().enumerate() {
            if !flows.is_empty() {
                self.spool_forwarded(ticket, &header, &workloads, region, flows)
                    .await;
            }
        }
    }

    pub(super) fn finish_part(&self, ticket: u64, status: AckStatus) {
        let mut state = self.state.borrow_mut();
        let Some(pending) = state.pending.get_mut(&ticket) else {
            return;
        };
        pending.remaining = pending.remaining.saturating_sub(1);
        pending.duplicate &= status == AckStatus::Duplicate;
        if pending.remaining > 0 {
            return;
        }
        let pending = state.pending.remove(&ticket).expect("present above");
        drop(state);
        let status = if pending.duplicate && pending.flows > 0 {
            self.metrics().batches_duplicate.add(1);
            AckStatus::Duplicate
        } else {
            self.metrics().batches_accepted.add(1);
            self.metrics().flows_received.add(pending.flows);
            AckStatus::Accepted
        };
        let AckDetails {
            frame_checksum,
            refused,
            collector_time,
            max_skew_ns,
        } = pending.details;
        let ack = Ack {
            exporter: pending.exporter,
            sequence: pending.sequence,
            frame_checksum,
            status,
            refused,
            collector_time,
            max_skew_ns,
        };
        // The connection may be gone; its exporter will resend and get `Duplicate`.
        let _ = pending.connection.acks.try_send(ack);
        pending.connection.unacked.signal(1);
    }

    pub(super) fn handle_control(&self, message: ControlMessage) {
        match message {
            ControlMessage::Durable(tickets) => {
                for (ticket, status) in tickets {
                    self.finish_part(ticket, status);
                }
            }
        }
    }

    pub(super) async fn complete(&self, completions: Vec<Completion>) {
        let mut by_origin: Vec<Vec<(u64, AckStatus)>> = vec![Vec::new(); self.router.shards()];
        for completion in completions {
            match completion {
                Completion::Part {
                    origin,
                    ticket,
                    status,
                } => by_origin[origin].push((ticket, status)),
                Completion::Local(done) => done.set(true),
            }
        }
        for (origin, tickets) in by_origin.into_iter().enumerate() {
            if tickets.is_empty() {
                continue;
            }
            if origin == self.id {
                self.handle_control(ControlMessage::Durable(tickets));
            } else {
                self.send_control(origin, ControlMessage::Durable(tickets))
                    .await;
            }
        }
    }
}
