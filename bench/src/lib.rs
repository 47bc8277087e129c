//! The flowattr bench: load generators speaking the wire format and the benchmarks that
//! measure the collector as a whole. [`pipeline`] runs a real collector process and feeds it
//! over loopback. The ownership map's micro-benchmarks are criterion benches in
//! `collector/benches/`; the fleet simulator with ground truth is
//! `flowattr_collector::synthetic`.
pub mod pipeline;
