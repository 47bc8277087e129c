//! Capacity planning for flowattr collectors: how many nodes of an instance profile a region
//! needs, and which resource binds first. The planner holds no per-flow figure of its own:
//! CPU seconds per million flows, bytes per flow on the wire, in the delay buffer and out of the
//! sink, bytes per IP in the ownership map and per broadcast range all come from a calibration
//! file that `flowattr-bench calibrate` writes from measured runs ([`calibration`]); machine
//! capacities come from profiles ([`profile`]). [`plan`] is the model, [`broker`] sizes the
//! Kafka brokers it leans on, [`report`] is its table, JSON and plot. The host settings a node
//! needs are applied by `tuning/host-tuning.sh` and checked by the collector at start.

pub mod broker;
pub mod calibration;
pub mod plan;
pub mod profile;
pub mod report;
