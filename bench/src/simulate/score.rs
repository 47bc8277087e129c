//! Answers scored against the ground truth: per flow report (correct, misattributed,
//! unattributed by reason) and per dependency, the set of service -> service edges the
//! answers reconstruct against the true set, for the gateway and overall.

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;

use super::fleet::{Fleet, ServiceId};
use super::observe::{Arrival, Observations};
use super::strategy::{Answers, Verdict};

#[derive(Debug, Clone, Serialize)]
pub struct Score {
    pub strategy: String,
    /// Reports the exporters made (delivered or not).
    pub flows: usize,
    /// Reports in batches that were lost on the way: no strategy saw them.
    pub undelivered: usize,
    pub correct: usize,
    pub misattributed: usize,
    pub unattributed: usize,
    pub unattributed_by_reason: BTreeMap<String, usize>,
    /// Reports delivered but never answered: a strategy's bug.
    pub unanswered: usize,
    /// Answers beyond the first for one report (a batch delivered twice).
    pub answered_again: usize,
    pub misattributed_share: f64,
    /// Unattributed or unanswered, as a share of the delivered reports.
    pub unattributed_share: f64,
    pub dependencies: Dependencies,
}

#[derive(Debug, Clone, Serialize)]
pub struct Dependencies {
    pub overall: EdgeScore,
    /// Edges whose client is the gateway.
    pub gateway: EdgeScore,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct EdgeScore {
    pub true_edges: usize,
    pub reported: usize,
    /// Reported edges that are not true dependencies.
    pub wrong: usize,
    /// True dependencies no answer reported.
    pub missed: usize,
    pub wrong_share: f64,
    pub missed_share: f64,
}

impl EdgeScore {
    fn of(
        truth: &HashSet<(ServiceId, ServiceId)>,
        reported: &HashSet<(ServiceId, ServiceId)>,
    ) -> EdgeScore {
        let wrong = reported.difference(truth).count();
        let missed = truth.difference(reported).count();
        EdgeScore {
            true_edges: truth.len(),
            reported: reported.len(),
            wrong,
            missed,
            wrong_share: share(wrong, reported.len()),
            missed_share: share(missed, truth.len()),
        }
    }
}

fn share(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

pub fn score(
    strategy: String,
    fleet: &Fleet,
    observations: &Observations,
    answers: &Answers,
) -> Score {
    let mut first: Vec<Option<Verdict>> = vec![None; observations.reports()];
    let mut answered_again = 0;
    for &(id, verdict) in answers {
        match &mut first[id as usize] {
            Some(_) => answered_again += 1,
            slot => *slot = Some(verdict),
        }
    }
    let mut delivered = vec![false; observations.reports()];
    for (_, arrival) in &observations.arrivals {
        if let Arrival::Batch(batch) = arrival {
            for report in &batch.reports {
                delivered[report.id as usize] = true;
            }
        }
    }
    let (mut correct, mut misattributed, mut unanswered, mut undelivered) = (0, 0, 0, 0);
    let mut unattributed_by_reason: BTreeMap<String, usize> = BTreeMap::new();
    let mut true_edges = HashSet::new();
    let mut reported = HashSet::new();
    for ((truth, verdict), delivered) in observations.truth.iter().zip(&first).zip(delivered) {
        true_edges.insert(truth.edge_with(truth.remote));
        match verdict {
            Some(Verdict::Owner(owner)) => {
                if *owner == truth.remote {
                    correct += 1;
                } else {
                    misattributed += 1;
                }
                reported.insert(truth.edge_with(*owner));
            }
            Some(Verdict::Unattributed(reason)) => {
                *unattributed_by_reason
                    .entry((*reason).to_owned())
                    .or_default() += 1
            }
            None if delivered => unanswered += 1,
            None => undelivered += 1,
        }
    }
    let gateway = fleet.gateway();
    let from_gateway = |edges: &HashSet<(ServiceId, ServiceId)>| {
        edges
            .iter()
            .copied()
            .filter(|(client, _)| *client == gateway)
            .collect::<HashSet<_>>()
    };
    let flows = observations.reports();
    let unattributed: usize = unattributed_by_reason.values().sum();
    Score {
        strategy,
        flows,
        undelivered,
        correct,
        misattributed,
        unattributed,
        unattributed_by_reason,
        unanswered,
        answered_again,
        misattributed_share: share(misattributed, flows - undelivered),
        unattributed_share: share(unattributed + unanswered, flows - undelivered),
        dependencies: Dependencies {
            overall: EdgeScore::of(&true_edges, &reported),
            gateway: EdgeScore::of(&from_gateway(&true_edges), &from_gateway(&reported)),
        },
    }
}
