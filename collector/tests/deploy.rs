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

/// The Kubernetes manifests (deploy/kubernetes) against the API's schemas (kubernetes-validate,
/// strict: an unknown field fails), offline; the PodMonitor, a Prometheus operator kind with no
/// schema there, is only parsed. The collector's config in its ConfigMap is one this build takes.
#[test]
fn the_kubernetes_manifests_validate_and_carry_a_config_the_collector_takes() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
    let mut manifests: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    manifests.sort();
    assert!(manifests.len() >= 4, "{manifests:?}");
    let library = std::env::var_os("FLOWATTR_KUBERNETES_VALIDATE_PATH").expect(
        "FLOWATTR_KUBERNETES_VALIDATE_PATH must name a directory holding kubernetes-validate (scripts/fetch-kubernetes-validate installs it)",
    );
    let output = std::process::Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict"])
        .args(&manifests)
        .env("PYTHONPATH", library)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{said}");
    let passed = said
        .lines()
        .filter(|line| line.contains(" passed for resource "))
        .count();
    assert_eq!(passed, 6, "{said}");
    for line in said.lines().filter(|line| line.starts_with("WARN")) {
        assert!(line.contains("kind PodMonitor"), "{said}");
    }

    let collector = std::fs::read_to_string(dir.join("collector.yaml")).unwrap();
    let (_, after) = collector
        .split_once("collector.toml: |\n")
        .expect("the ConfigMap holds collector.toml");
    let toml: String = after
        .lines()
        .take_while(|line| line.starts_with("    ") || line.is_empty())
        .map(|line| format!("{}\n", line.strip_prefix("    ").unwrap_or(line)))
        .collect();
    let config = flowattr_collector::config::Config::from_toml(&toml)
        .unwrap_or_else(|error| panic!("{error}\n{toml}"));
    config
        .validate()
        .unwrap_or_else(|error| panic!("{error}\n{toml}"));
    assert_eq!(config.ingest.listen.port(), 7400);
}
