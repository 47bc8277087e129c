//! What the console's health view draws over time: every [`SAMPLE_EVERY`] a thread of the
//! control plane reads the shards' counters (flows emitted, unattributed by reason, the delay
//! buffer) and keeps the last hour, so the page shows a trend from the moment it opens
//! (`GET /v1/health/history`). Prometheus keeps the long history; this is the console's.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowattr_common::Timestamp;
use serde::Serialize;

use crate::node_state::NodeShared;
use crate::ownership::Reason;

pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// An hour of samples.
const SAMPLES_KEPT: usize = 360;

#[derive(Debug, Clone, Serialize)]
pub struct HealthSample {
    pub at_ns: u64,
    pub flows_attributed: u64,
    /// Totals since the start, by reason, every reason present.
    pub flows_unattributed: Vec<(&'static str, u64)>,
    pub buffered_flows: u64,
    pub buffered_bytes: u64,
}

#[derive(Debug, Default)]
pub struct HealthHistory {
    samples: Mutex<VecDeque<HealthSample>>,
}

impl HealthHistory {
    /// Starts sampling `node` on a thread of its own, the first sample at once, until the
    /// node is gone.
    pub fn start(node: &Arc<NodeShared>) -> std::io::Result<Arc<HealthHistory>> {
        let history = Arc::new(HealthHistory::default());
        let kept = Arc::downgrade(&history);
        let node = Arc::downgrade(node);
        std::thread::Builder::new()
            .name("health-history".into())
            .spawn(move || {
                while let (Some(node), Some(kept)) = (node.upgrade(), kept.upgrade()) {
                    kept.record(sample(&node));
                    drop((node, kept));
                    std::thread::sleep(SAMPLE_EVERY);
                }
            })?;
        Ok(history)
    }

    fn record(&self, sample: HealthSample) {
        let mut samples = self
            .samples
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if samples.len() == SAMPLES_KEPT {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// The samples kept, oldest first, as JSON.
    pub fn to_json(&self) -> String {
        let samples = self
            .samples
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        serde_json::json!({
            "interval_seconds": SAMPLE_EVERY.as_secs(),
            "samples": *samples,
        })
        .to_string()
    }
}

fn sample(node: &NodeShared) -> HealthSample {
    let total = |read: &dyn Fn(&crate::metrics::ShardMetrics) -> u64| {
        node.metrics.iter().map(read).sum::<u64>()
    };
    HealthSample {
        at_ns: Timestamp::now().as_nanos(),
        flows_attributed: total(&|metrics| metrics.flows_attributed.get()),
        flows_unattributed: Reason::ALL
            .iter()
            .map(|&reason| {
                (
                    reason.as_str(),
                    total(&|metrics| metrics.unattributed(reason).get()),
                )
            })
            .collect(),
        buffered_flows: total(&|metrics| metrics.buffered_flows.get()),
        buffered_bytes: total(&|metrics| metrics.buffered_bytes.get()),
    }
}
