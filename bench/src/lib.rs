//! The flowattr bench: load generators speaking the wire format and the benchmarks that
//! measure the collector and the exporter as wholes. [`pipeline`] runs a real collector
//! process and feeds it over loopback; [`exporter`] measures the exporter's overhead under a
//! connection-churn load; [`broadcast`] measures the cluster's broadcast on a real broker. The
//! ownership map's micro-benchmarks are criterion benches in
//! `collector/benches/`; the fleet simulator with ground truth is
//! `flowattr_collector::synthetic`.
pub mod broadcast;
pub mod exporter;
pub mod pipeline;
pub mod process;
pub mod simulate;
