//! The committed eBPF object (exporter/ebpf) is built from today's sources: a build with only a
//! stable toolchain takes it, so a change to the program's sources without
//! `scripts/update-ebpf-object` must fail here, where the tests build it from source.

#[test]
fn the_committed_object_was_built_from_these_sources() {
    let committed = include_str!("../ebpf/source-hash").trim();
    assert_eq!(
        committed,
        env!("FLOWATTR_EBPF_SOURCE_HASH"),
        "the eBPF program's sources changed since exporter/ebpf/flowattr-exporter-ebpf.o was built: run scripts/update-ebpf-object and commit exporter/ebpf"
    );
}

/// The tests run the program compiled from its source, not the committed copy, so that what
/// they check is the source.
#[test]
fn the_tests_build_the_program_from_its_source() {
    assert_eq!(
        env!("FLOWATTR_EBPF_BUILT_FROM"),
        "source",
        "the tests need the eBPF program built from source: install nightly and bpf-linker (.ci/install-ebpf-toolchain)"
    );
}
