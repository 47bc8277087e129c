//! The flowattr bench: a fleet simulator with ground truth, a load generator speaking the wire
//! format, and the benchmarks that measure the collector. Filled in by later issues; the
//! ownership map's micro-benchmarks are criterion benches in `collector/benches/`.
