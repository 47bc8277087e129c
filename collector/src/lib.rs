//! The flowattr collector: it receives flow batches from the exporters of its region, learns
//! from every flow that the flow's local workload held the flow's local IP for the flow's
//! lifetime, and attributes each flow's remote IP to the workload that held it when the flow
//! started, or reports it unattributed with the reason, never a guess.
//!
//! [`ownership`] is the heart: the per-IP ownership time ranges and the lookup rules.
//! [`synthetic`] is a fleet with ground truth that the built-in demo and the tests feed it.
//! The networked pipeline (shards, ingest, delay buffer, sinks, HTTP) builds on these.
pub mod ownership;
pub mod synthetic;
