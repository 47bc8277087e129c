//! The collector's systemd unit (deploy/systemd/flowattr-collector.service) passes
//! `systemd-analyze verify` with this build's binary, without a warning.

#[test]
fn the_systemd_unit_verifies() {
    flowattr_bench::systemd::verify(
        "flowattr-collector.service",
        flowattr_bench::systemd::COLLECTOR_UNIT,
        "flowattr-collector",
        std::path::Path::new(env!("CARGO_BIN_EXE_flowattr-collector")),
    )
    .unwrap_or_else(|said| panic!("systemd-analyze verify: {said}"));
}
