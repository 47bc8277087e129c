//! flowattr, driven through the collector library at simulated time: every batch passes the
//! duplicate filter and the evidence gate a node runs, its heartbeats go into the same
//! [`Attributor`] a shard owns, and its flows wait the configured delay (and retries) before
//! the same attribution rule answers them. Only the disk, the sockets and the clock are left
//! out: time here is the simulation's.

use std::collections::{HashMap, VecDeque};

use flowattr_collector::attribution::{Attributor, Decision};
use flowattr_collector::config::{Config, EVICTION_PERIOD};
use flowattr_collector::delay::codec::{BlockHeader, BufferedFlow};
use flowattr_collector::events::{EventCompleteness, IpEvent};
use flowattr_collector::evidence::EvidenceGate;
use flowattr_collector::ownership::{Attribution, Host, SourceId};
use flowattr_collector::shard::{BeatRecord, DuplicateFilter};
use std::time::Duration;

use flowattr_common::Timestamp;
use flowattr_common::wire::{FrameDecoder, RefusedRecord, ValidFlowBatch, encode_message};

use super::{Answers, Strategy, Verdict};
use crate::simulate::fleet::ServiceId;
use crate::simulate::observe::{Batch, InventoryEvent};

/// A flow waiting for its attempt.
struct Held {
    id: u32,
    host: Host,
    arrival: Timestamp,
    flow: BufferedFlow,
}

pub struct Flowattr {
    config: Config,
    attributor: Attributor,
    gate: EvidenceGate,
    seen: DuplicateFilter,
    /// Service names as exporters report them, and back.
    names: Vec<String>,
    by_name: HashMap<String, ServiceId>,
    /// One queue per attempt: due times only grow within each.
    attempts: Vec<VecDeque<(Timestamp, Held)>>,
    next_eviction: Option<Timestamp>,
    /// How far the inventory's events are complete: the node's rule, with the simulation's
    /// clock as the time the topic was last read through.
    events_complete: EventCompleteness,
    frame: Vec<u8>,
    refused: Vec<RefusedRecord>,
}

impl Flowattr {
    /// `config`: the node's settings (delay, retries, slack, the event fallback's CIDRs);
    /// `names`: each service's name, by id.
    pub fn new(config: Config, names: Vec<String>) -> Self {
        let by_name = names
            .iter()
            .enumerate()
            .map(|(id, name)| (name.clone(), id as ServiceId))
            .collect();
        Flowattr {
            attributor: Attributor::new(&config),
            gate: EvidenceGate::new(&config),
            seen: DuplicateFilter::default(),
            attempts: (0..=config.delay.max_retries)
                .map(|_| VecDeque::new())
                .collect(),
            events_complete: EventCompleteness::new(&config.events),
            config,
            names,
            by_name,
            next_eviction: None,
            frame: Vec::new(),
            refused: Vec::new(),
        }
    }

    fn verdict(&self, attribution: Attribution) -> Verdict {
        match attribution {
            Attribution::Owner(owner) => {
                let name = self
                    .attributor
                    .names
                    .identity(owner)
                    .unwrap_or_default()
                    .name;
                // Every name the map holds came from a batch or an event of this fleet.
                Verdict::Owner(self.by_name[name])
            }
            Attribution::Unattributed(reason) => Verdict::Unattributed(reason.as_str()),
        }
    }
}

impl Strategy for Flowattr {
    fn name(&self) -> String {
        "flowattr".into()
    }

    fn batch(&mut self, now: Timestamp, batch: &Batch, answers: &mut Answers) {
        self.frame.clear();
        encode_message(
            &batch.to_measured_batch(&self.names, Duration::ZERO),
            &mut self.frame,
        )
        .expect("a simulated batch fits a frame");
        let decoder = FrameDecoder::new(self.config.ingest.max_frame_bytes);
        let (frame, _) = decoder
            .decode(&self.frame)
            .expect("a frame just encoded")
            .expect("whole");
        let valid = ValidFlowBatch::from_frame(&frame).expect("a batch just encoded");
        let mut header = BlockHeader::of_exporter(batch.exporter, batch.sequence, now);
        header.frame_checksum = frame.checksum;
        self.refused.clear();
        let mut admitted = Vec::new();
        let names = &mut self.attributor.names;
        self.gate
            .check_batch(&valid, now, None, &mut self.refused, |record, flow| {
                let owner = valid
                    .local_workload_name(record)
                    .map(|name| names.intern(name));
                admitted.push((flow, owner));
            });
        header.refused = (!self.refused.is_empty())
            .then(|| self.refused.iter().map(|refused| refused.record).collect());
        // A batch delivered again is a duplicate but for what the gate refused before: decided
        // by the collector shards' own filter.
        let new = self.seen.admit(&header, now);
        let due = now.saturating_add(self.config.delay.delay);
        let (attributor, queue) = (&mut self.attributor, &mut self.attempts[0]);
        for (flow, owner) in admitted {
            if !new.includes(flow.index) {
                continue;
            }
            let beat = BeatRecord::of(&flow);
            let _ = attributor.learn(
                header.host(),
                beat.heartbeat(owner, SourceId::UNKNOWN),
                beat.shared,
            );
            let id = batch.reports[flow.index as usize].id;
            queue.push_back((
                due,
                Held {
                    id,
                    host: header.host(),
                    arrival: now,
                    flow,
                },
            ));
        }
        for refused in &self.refused {
            answers.push((
                batch.reports[refused.record as usize].id,
                Verdict::Unattributed(refused.reason.as_str()),
            ));
        }
    }

    fn event(&mut self, now: Timestamp, event: &InventoryEvent, _answers: &mut Answers) {
        // Events matter only inside the fallback CIDRs, and only where heartbeats say nothing.
        if !self.config.events.covers(event.ip.to_ip_addr()) {
            return;
        }
        self.events_complete.observe(event.at, now);
        self.attributor.learn_event(&IpEvent {
            ip: event.ip,
            owner: event
                .assigned
                .then(|| self.names[event.service as usize].clone().into_boxed_str()),
            at: event.at,
        });
    }

    fn advance(&mut self, now: Timestamp, answers: &mut Answers) {
        let eviction = *self
            .next_eviction
            .get_or_insert(now.saturating_add(EVICTION_PERIOD));
        if now >= eviction {
            self.attributor.evict(now);
            self.seen
                .forget_before(now.saturating_sub(self.config.ingest.dedup_window));
            self.next_eviction = Some(now.saturating_add(EVICTION_PERIOD));
        }
        loop {
            // The earliest due flow of any attempt.
            let next = (0..self.attempts.len())
                .filter_map(|attempt| {
                    self.attempts[attempt]
                        .front()
                        .map(|(due, _)| (*due, attempt))
                })
                .min();
            let Some((due, attempt)) = next.filter(|(due, _)| *due <= now) else {
                break;
            };
            let (_, held) = self.attempts[attempt].pop_front().expect("a front");
            self.attributor
                .set_events_complete_through(self.events_complete.complete_through(now));
            match self
                .attributor
                .attribute(held.host, held.arrival, &held.flow)
            {
                Decision::Retry => {
                    let flow = BufferedFlow {
                        retries: held.flow.retries + 1,
                        ..held.flow
                    };
                    let again = due.saturating_add(self.config.delay.retry_delay);
                    self.attempts[attempt + 1].push_back((again, Held { flow, ..held }));
                }
                Decision::Emit(attribution, _) => {
                    answers.push((held.id, self.verdict(attribution)))
                }
            }
        }
    }

    fn finish(&mut self, answers: &mut Answers) {
        // Step through the remaining due times: jumping to the end of time would evict all
        // evidence before the last flows are looked up.
        while let Some(due) = self
            .attempts
            .iter()
            .filter_map(|queue| queue.front().map(|(due, _)| *due))
            .min()
        {
            self.advance(due, answers);
        }
    }
}
