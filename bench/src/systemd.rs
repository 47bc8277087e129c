//! What the tests hold the systemd units in deploy/systemd to: `systemd-analyze verify` (from
//! Debian's systemd package) in a root of their own, where each unit's binary is the one just
//! built, and every word it says counts as a failure (it only warns about an unknown key).

use std::path::Path;
use std::process::Command;

/// The committed units.
pub const COLLECTOR_UNIT: &str = include_str!("../../deploy/systemd/flowattr-collector.service");
pub const EXPORTER_UNIT: &str = include_str!("../../deploy/systemd/flowattr-exporter.service");

/// Verifies `unit` (its file name and text) with its `ExecStart` binary at
/// /usr/local/bin/`binary_name`, a copy of `binary`. Err: what systemd-analyze said.
pub fn verify(unit_name: &str, unit: &str, binary_name: &str, binary: &Path) -> Result<(), String> {
    let root = tempfile::tempdir().map_err(|error| error.to_string())?;
    let bin = root.path().join("usr/local/bin");
    let units = root.path().join("etc/systemd/system");
    for dir in [&bin, &units] {
        std::fs::create_dir_all(dir).map_err(|error| error.to_string())?;
    }
    std::fs::copy(binary, bin.join(binary_name))
        .map_err(|error| format!("copying {}: {error}", binary.display()))?;
    std::fs::write(units.join(unit_name), unit).map_err(|error| error.to_string())?;
    // systemd's own units (sysinit.target and the rest a service is ordered after).
    std::fs::create_dir_all(root.path().join("usr/lib/systemd"))
        .map_err(|error| error.to_string())?;
    let copied = Command::new("cp")
        .args(["-a", "/usr/lib/systemd/system"])
        .arg(root.path().join("usr/lib/systemd"))
        .status();
    if !copied.is_ok_and(|status| status.success()) {
        return Err("cannot copy /usr/lib/systemd/system: is systemd installed?".to_owned());
    }
    let output = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", root.path().display()))
        .arg(unit_name)
        .output()
        .map_err(|error| format!("systemd-analyze (Debian's systemd package): {error}"))?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(said)
    }
}

/// The capabilities a unit's `CapabilityBoundingSet=` keeps, lower case without `CAP_` (as
/// `setpriv --bounding-set` takes them).
pub fn bounding_set(unit: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|line| line.strip_prefix("CapabilityBoundingSet="))
        .flat_map(|caps| caps.split_whitespace())
        .map(|cap| cap.trim_start_matches("CAP_").to_ascii_lowercase())
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_exporter_keeps_three_capabilities_and_the_collector_none() {
        assert_eq!(
            super::bounding_set(super::EXPORTER_UNIT),
            ["bpf", "perfmon", "sys_ptrace"]
        );
        assert!(super::bounding_set(super::COLLECTOR_UNIT).is_empty());
    }
}
