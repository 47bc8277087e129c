//! Upkeep and the control plane: eviction, the views `/metrics` and `/v1/deps` read, and
//! answers to `/v1/owner`.

use std::rc::Rc;
use std::sync::mpsc;
use std::time::Duration;

use flowattr_common::Timestamp;

use super::PeerMessage;
use super::{
    ClaimantView, EvidenceView, OwnerAnswer, OwnerQuery, PlatformFields, SegmentView, Shard,
    ShardQuery,
};
use crate::config::EVICTION_PERIOD;
use crate::node_state::ShardView;
use crate::ownership::{Attribution, Holder, Segment};

impl Shard {
    pub(super) async fn upkeep_loop(
        self: Rc<Self>,
        queries: mpsc::Receiver<ShardQuery>,
        peers: mpsc::Receiver<PeerMessage>,
    ) {
        let mut ticks = 0u64;
        let publish_ticks =
            (self.node.config.cluster.publish_interval.as_millis() / 5).max(1) as u64;
        loop {
            glommio::timer::sleep(Duration::from_millis(5)).await;
            while let Ok(query) = queries.try_recv() {
                match query {
                    ShardQuery::Owner(query) => {
                        let answer = self.answer(&query);
                        let _ = query.reply.try_send(answer);
                    }
                    ShardQuery::Deps(query) => {
                        let state = self.state.borrow();
                        let edges = state.deps.snapshot(&state.attributor.names, query.window);
                        let _ = query.reply.try_send(edges);
                    }
                }
            }
            self.apply_peer_messages(&peers);
            ticks += 1;
            if ticks.is_multiple_of(publish_ticks) {
                self.publish_learned();
            }
            if ticks.is_multiple_of(200) {
                self.publish();
            }
            if ticks.is_multiple_of(EVICTION_TICKS) {
                let now = Timestamp::now();
                let mut state = self.state.borrow_mut();
                state.attributor.evict(now);
                state
                    .deps
                    .forget_idle(now.saturating_sub(self.node.config.ownership.retention));
                state
                    .seen
                    .forget_before(now.saturating_sub(self.node.config.ingest.dedup_window));
            }
        }
    }

    /// Publishes the shard's graph, latency and map size for the control plane.
    fn publish(&self) {
        let mut state = self.state.borrow_mut();
        let usage = state.attributor.map.memory_usage();
        self.metrics().ownership_keys.set(usage.keys as u64);
        self.metrics().ownership_bytes.set(usage.bytes() as u64);
        self.metrics()
            .host_local_keys
            .set(state.attributor.host_local.key_count() as u64);
        self.metrics().set_reuse(state.attributor.map.reuse());
        // Every shard bridges as little as the most cautious one: a handover seen on any key
        // says how fast the platform reuses all of them.
        let shortest = self
            .node
            .metrics
            .iter()
            .filter_map(|shard| shard.reuse().shortest_handover)
            .min();
        if let Some(shortest) = shortest {
            state.attributor.map.heard_of_handover(shortest);
            // Kept for the next run by one shard, when it shortens (rarely: a blocking write
            // of a few bytes is fine here). Only a handover the guard acts on is worth it.
            let config = &self.node.config;
            if self.id == 0
                && config.delay.storage == crate::config::StorageKind::Disk
                && shortest <= config.ownership.merge_gap
                && state.kept_handover.is_none_or(|kept| shortest < kept)
            {
                // Tried once per value: a failure is said, and the next shorter one tries again.
                state.kept_handover = Some(shortest);
                if let Err(error) =
                    crate::ownership::keep_shortest_handover(&config.delay.dir, shortest)
                {
                    tracing::warn!(
                        "keeping the shortest handover in {}: {error}; a restart bridges up to ownership.merge_gap again until it sees one",
                        config.delay.dir.display()
                    );
                }
            }
        }
        let view = ShardView {
            edges: state
                .deps
                .snapshot(&state.attributor.names, crate::deps::Window::All),
            extra_latency: state.extra_latency.clone(),
        };
        *self.node.views[self.id]
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = view;
    }

    fn answer(&self, query: &OwnerQuery) -> OwnerAnswer {
        let state = self.state.borrow();
        let this_node = self
            .node
            .broadcast
            .as_ref()
            .map(|broadcast| broadcast.node_id);
        let evidence = |source| {
            state
                .sources
                .get(source)
                .map(|seen| EvidenceView::of(seen, this_node))
        };
        let view = |segment: &Segment| {
            let (state_name, holder) = match segment.holder() {
                Holder::Workload(id) => ("held", state.attributor.names.identity(id)),
                Holder::Contested => ("contested", None),
                Holder::Unnamed => ("unnamed", None),
            };
            let claimants = (segment.holder() == Holder::Contested).then(|| {
                state
                    .attributor
                    .map
                    .claimants(query.ip, query.port, segment)
            });
            SegmentView {
                start_ns: segment.start.as_nanos(),
                end_ns: segment.end.as_nanos(),
                state: state_name,
                holder: holder.map(|identity| identity.name.to_owned()),
                holder_platform: holder.and_then(PlatformFields::of),
                evidence: evidence(segment.source),
                claimants_complete: claimants.as_ref().map(|claimants| claimants.complete),
                claimants: claimants.map_or_else(Vec::new, |claimants| {
                    claimants
                        .owners
                        .into_iter()
                        .map(|(owner, source)| ClaimantView {
                            workload: state
                                .attributor
                                .names
                                .identity(owner)
                                .map_or_else(String::new, |identity| identity.name.to_owned()),
                            evidence: evidence(source),
                        })
                        .collect()
                }),
            }
        };
        if query.ip.is_host_local() {
            // One per host: no fleet-wide owner, and no evidence kept under the address alone.
            return OwnerAnswer {
                owner: None,
                owner_platform: None,
                unattributed: Some(crate::ownership::Reason::HostLocal.as_str()),
                segments: Vec::new(),
                horizon_ns: state.attributor.map.horizon().as_nanos(),
            };
        }
        let (owner, unattributed) = match query.at {
            None => (None, None),
            // As a flow at that instant would be named: not before the evidence is complete.
            Some(at) => match state.attributor.owner_at(query.ip, query.port, at).0 {
                Attribution::Owner(id) => (state.attributor.names.identity(id), None),
                Attribution::Unattributed(reason) => (None, Some(reason.as_str())),
            },
        };
        OwnerAnswer {
            owner: owner.map(|identity| identity.name.to_owned()),
            owner_platform: owner.and_then(PlatformFields::of),
            unattributed,
            segments: state
                .attributor
                .map
                .segments(query.ip, query.port)
                .iter()
                .map(view)
                .collect(),
            horizon_ns: state.attributor.map.horizon().as_nanos(),
        }
    }
}

/// The upkeep loop ticks every 5 ms; eviction runs every [`EVICTION_PERIOD`].
const EVICTION_TICKS: u64 = (EVICTION_PERIOD.as_millis() / 5) as u64;
