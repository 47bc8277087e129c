//! Edge counts by minute of activity, so the console can ask about a window ("the last 15
//! minutes") and not only about everything since the node started. A report counts in the
//! minute its connection was last active (the report's end). The newest [`RETAINED_MINUTES`]
//! minutes are kept apart; older ones are folded into one total, so the all-time graph never
//! loses a connection and memory follows the edges, not the node's uptime.
//!
//! Each edge also keeps the last [`SAMPLES_PER_EDGE`] connections counted for it in each
//! minute, overwritten in turn: what the console lists when an edge is clicked.

use std::collections::VecDeque;

use flowattr_common::{CanonicalIp, FlowState, Timestamp};
use rustc_hash::FxHashMap;

use super::{ConnectionReport, EdgeCount, End};

pub const MINUTE_NANOS: u64 = 60 * 1_000_000_000;
/// An hour of minutes: the longest window the console offers.
pub const RETAINED_MINUTES: u64 = 60;
pub const SAMPLES_PER_EDGE: usize = 2;

/// One connection of an edge, client and server as the counting report saw them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleFlow {
    pub client: (CanonicalIp, u16),
    pub server: (CanonicalIp, u16),
    pub start: Timestamp,
    pub end: Timestamp,
    pub bytes: u64,
    pub state: FlowState,
}

impl SampleFlow {
    pub(super) fn of(report: &ConnectionReport) -> SampleFlow {
        let local = (report.local_ip, report.local_port);
        let remote = (report.remote_ip, report.remote_port);
        let (client, server) = match report.direction {
            flowattr_common::Direction::Outbound => (local, remote),
            flowattr_common::Direction::Inbound => (remote, local),
        };
        SampleFlow {
            client,
            server,
            start: report.start,
            end: report.end,
            bytes: report.bytes,
            state: report.state,
        }
    }
}

#[derive(Debug, Default, Clone)]
pub(super) struct EdgeEntry {
    pub count: EdgeCount,
    samples: [Option<SampleFlow>; SAMPLES_PER_EDGE],
    next_sample: u8,
}

impl EdgeEntry {
    pub(super) fn sample(&mut self, flow: SampleFlow) {
        self.samples[usize::from(self.next_sample)] = Some(flow);
        self.next_sample = (self.next_sample + 1) % SAMPLES_PER_EDGE as u8;
    }

    pub(super) fn samples(&self) -> impl Iterator<Item = &SampleFlow> {
        self.samples.iter().flatten()
    }
}

#[derive(Debug)]
struct Minute {
    /// Minutes since the Unix epoch.
    index: u64,
    edges: FxHashMap<(End, End), EdgeEntry>,
}

/// Which minutes a question covers: `[from, to)` in minutes since the epoch, or all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    All,
    Minutes { from: u64, to: u64 },
}

impl Window {
    /// The minutes that overlap `[from, to)`.
    pub fn between(from: Timestamp, to: Timestamp) -> Window {
        Window::Minutes {
            from: from.as_nanos() / MINUTE_NANOS,
            to: to.as_nanos().div_ceil(MINUTE_NANOS),
        }
    }

    fn holds(self, minute: u64) -> bool {
        match self {
            Window::All => true,
            Window::Minutes { from, to } => (from..to).contains(&minute),
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct EdgeMinutes {
    /// Oldest first, at most [`RETAINED_MINUTES`] apart.
    minutes: VecDeque<Minute>,
    /// Everything counted before the oldest retained minute.
    older: FxHashMap<(End, End), EdgeEntry>,
}

impl EdgeMinutes {
    /// The entry of `edge` in the minute of `at`. Reports come roughly in time order, so the
    /// newest minute is the one almost always asked for.
    pub(super) fn entry(&mut self, edge: (End, End), at: Timestamp) -> &mut EdgeEntry {
        let index = at.as_nanos() / MINUTE_NANOS;
        let newest = self.minutes.back().map(|minute| minute.index);
        if newest.is_none_or(|newest| index > newest) {
            self.minutes.push_back(Minute {
                index,
                edges: FxHashMap::default(),
            });
            while let Some(oldest) = self.minutes.front()
                && oldest.index + RETAINED_MINUTES <= index
            {
                let oldest = self.minutes.pop_front().expect("just seen");
                self.fold(oldest);
            }
        }
        let position = self
            .minutes
            .iter()
            .rposition(|minute| minute.index <= index);
        let minutes = match position {
            None => return self.older.entry(edge).or_default(),
            Some(position) if self.minutes[position].index == index => {
                &mut self.minutes[position].edges
            }
            Some(position) => {
                self.minutes.insert(
                    position + 1,
                    Minute {
                        index,
                        edges: FxHashMap::default(),
                    },
                );
                &mut self.minutes[position + 1].edges
            }
        };
        minutes.entry(edge).or_default()
    }

    fn fold(&mut self, minute: Minute) {
        for (edge, entry) in minute.edges {
            let older = self.older.entry(edge).or_default();
            older.count.add(entry.count);
            for sample in entry.samples() {
                older.sample(*sample);
            }
        }
    }

    /// Every edge counted in `window`, with its counts summed and up to
    /// [`SAMPLES_PER_EDGE`] samples from each minute, newest minutes first. `window` reaches
    /// the folded total only when it is [`Window::All`].
    pub(super) fn sum(
        &self,
        window: Window,
    ) -> FxHashMap<(End, End), (EdgeCount, Vec<SampleFlow>)> {
        let mut sum: FxHashMap<(End, End), (EdgeCount, Vec<SampleFlow>)> = FxHashMap::default();
        let retained = self
            .minutes
            .iter()
            .rev()
            .filter(|minute| window.holds(minute.index))
            .map(|minute| &minute.edges);
        let older = (window == Window::All).then_some(&self.older);
        for edges in retained.chain(older) {
            for (edge, entry) in edges {
                let (count, samples) = sum.entry(*edge).or_default();
                count.add(entry.count);
                samples.extend(entry.samples().copied());
            }
        }
        sum
    }
}
