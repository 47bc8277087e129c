//! The flowattr collector: it receives flow batches from the exporters of its region, learns
//! from every flow that the flow's local workload held the flow's local IP for the flow's
//! lifetime, and attributes each flow's remote IP to the workload that held it when the flow
//! started, or reports it unattributed with the reason, never a guess.
//!
//! [`ownership`] is the heart: the per-IP ownership time ranges and the lookup rules;
//! [`attribution`] holds every kind of evidence a shard keeps and answers from it. A
//! [`node`] runs one [`shard`] per pinned executor (glommio, thread-per-core), each owning a
//! slice of the IP space: [`ingest`] reads exporter connections and [`evidence`] checks what
//! they claim, [`delay`] holds flows on disk until their remote side's heartbeats have arrived,
//! [`sink`] emits attributed flows, [`deps`] counts the service dependency graph, and [`http`]
//! is the control plane; [`broadcast`] shares what each node learned with the other nodes of
//! its region over Kafka, [`events`] is the fallback for IPs that run no exporter, and
//! [`region`] forwards flows whose remote IP belongs to another region. [`memory`] keeps the
//! node under its RSS cap. [`config`] is the TOML and flag surface. The fleet simulator with ground truth, and the demo that feeds
//! nodes from it, are in the bench crate.
pub mod attribution;
pub mod broadcast;
pub mod config;
pub mod connection_slots;
pub mod delay;
pub mod deps;
pub mod events;
pub mod evidence;
pub mod host;
pub mod http;
pub mod ingest;
mod instant_text;
pub mod io_uring_probe;
pub mod kafka;
pub mod memory;
pub mod metrics;
pub mod node;
pub mod node_state;
pub mod ownership;
pub mod partial_frames;
pub mod peer_message;
pub mod region;
pub mod shard;
pub mod shard_router;
pub mod sink;
pub mod threads;
pub mod tls;
