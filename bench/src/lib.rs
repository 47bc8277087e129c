//! The flowattr bench: the fleet simulator with ground truth, the main job, load generators
//! speaking the wire format and the benchmarks that measure the collector and the exporter as
//! wholes. [`simulate`] measures how often flowattr and today's strategies misattribute on one
//! simulated fleet; [`demo`] feeds that fleet to real collector nodes and checks their every
//! answer; [`pipeline`] runs a real collector process and feeds it over loopback; [`exporter`]
//! measures the exporter's overhead under a connection-churn load; [`broadcast`] measures the
//! cluster's broadcast on a real broker; [`disk`] measures the disk's ceiling for the delay
//! buffer's pattern; [`dashboard`] holds the tests' checks of `/metrics` and of the Grafana
//! dashboard with Prometheus' own `promtool`; [`systemd`] the units' checks. The ownership map's micro-benchmarks are
//! criterion benches in `collector/benches/`.
pub mod architecture;
pub mod broadcast;
pub mod calibrate;
pub mod dashboard;
pub mod demo;
pub mod disk;
pub mod exporter;
pub mod pipeline;
pub mod pki;
pub mod process;
pub mod simulate;
pub mod synthetic;
pub mod systemd;
