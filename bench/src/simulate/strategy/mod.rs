//! The ways to attribute a flow's remote side that the simulator compares, each behind
//! [`Strategy`]: flowattr itself (driven through the collector library), and the strategies
//! users run today, which map an IP to a workload from a current-state view of an inventory's
//! events. A user adds their own by implementing the trait.

mod flowattr;
mod inventory;

pub use flowattr::Flowattr;
pub use inventory::{ClaimPolicy, CurrentStateCache, EventMap};

use flowattr_common::Timestamp;

use super::fleet::ServiceId;
use super::observe::{Batch, InventoryEvent};

/// A strategy's answer for one report's remote side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Owner(ServiceId),
    /// No answer, and why (a short snake_case reason).
    Unattributed(&'static str),
}

/// Answers, by report id.
pub type Answers = Vec<(u32, Verdict)>;

/// One attribution strategy, fed what the fleet delivers in order of arrival. It may answer a
/// report as soon as it arrives or hold it and answer later (flowattr holds every flow for its
/// delay); every report must be answered by the end of [`Strategy::finish`].
pub trait Strategy {
    fn name(&self) -> String;
    /// An exporter's batch arrives at `now`.
    fn batch(&mut self, now: Timestamp, batch: &Batch, answers: &mut Answers);
    /// An inventory event arrives at `now`.
    fn event(&mut self, now: Timestamp, event: &InventoryEvent, answers: &mut Answers);
    /// Time has reached `now`: answer whatever is due. Called before every arrival.
    fn advance(&mut self, now: Timestamp, answers: &mut Answers);
    /// The end: answer everything still held.
    fn finish(&mut self, answers: &mut Answers);
}

/// Reports held back until a moment, answered in order: arrivals come in time order, so a
/// queue keeps them sorted by due time.
#[derive(Debug, Default)]
pub struct HoldBack<T> {
    queue: std::collections::VecDeque<(Timestamp, T)>,
}

impl<T> HoldBack<T> {
    pub fn push(&mut self, due: Timestamp, item: T) {
        self.queue.push_back((due, item));
    }

    /// The next item due by `now`.
    pub fn pop_due(&mut self, now: Timestamp) -> Option<(Timestamp, T)> {
        if self.queue.front().is_some_and(|(due, _)| *due <= now) {
            return self.queue.pop_front();
        }
        None
    }

    pub fn next_due(&self) -> Option<Timestamp> {
        self.queue.front().map(|(due, _)| *due)
    }
}
