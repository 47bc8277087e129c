//! What the tests hold the operators' artefacts to: Prometheus' own linter (`promtool`, from
//! Debian's prometheus package) on the binaries' `/metrics` and on the Grafana dashboard's
//! queries, and the dashboard's series against what the binaries really export.

use std::io::Write as _;
use std::process::{Command, Stdio};

/// The committed dashboard (deploy/grafana/flowattr.json).
pub const DASHBOARD: &str = include_str!("../../deploy/grafana/flowattr.json");

/// Every query of every panel of `dashboard` (Grafana's JSON model).
pub fn expressions(dashboard: &str) -> Vec<String> {
    let model: serde_json::Value = serde_json::from_str(dashboard).expect("the dashboard is JSON");
    let panels = model["panels"].as_array().map_or(&[][..], Vec::as_slice);
    panels
        .iter()
        .flat_map(|panel| panel["targets"].as_array().map_or(&[][..], Vec::as_slice))
        .filter_map(|target| target["expr"].as_str().map(str::to_owned))
        .collect()
}

/// The series `expression` reads: its identifiers named like ours (`flowattr_*`) or like the
/// process collector's (`process_*`).
pub fn series_names(expression: &str) -> Vec<&str> {
    expression
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| word.starts_with("flowattr_") || word.starts_with("process_"))
        .collect()
}

/// Whether the Prometheus text `text` declares the series `name` (a `# TYPE` line of it, or
/// of the histogram it is part of) or holds a sample of it. A family labelled by what has
/// happened (refusals by exporter) is declared before it has samples.
pub fn exports(text: &str, name: &str) -> bool {
    let family = ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .unwrap_or(name);
    text.lines().any(|line| {
        line.strip_prefix(name)
            .is_some_and(|rest| rest.starts_with(['{', ' ']))
            || [name, family].iter().any(|declared| {
                line.strip_prefix("# TYPE ")
                    .and_then(|rest| rest.strip_prefix(declared))
                    .is_some_and(|rest| rest.starts_with(' '))
            })
    })
}

/// Runs `promtool` with `args` and `input` on its standard input: Ok if it says nothing but
/// success, else what it said.
pub fn promtool(args: &[&str], input: &str) -> Result<(), String> {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| {
            format!("promtool (Debian's prometheus package, which scripts/test installs): {error}")
        })?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes())
        .map_err(|error| error.to_string())?;
    let output = child
        .wait_with_output()
        .map_err(|error| error.to_string())?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    match output.status.success() {
        true => Ok(()),
        false => Err(said),
    }
}

/// `promtool check metrics` on `/metrics` text: Prometheus' naming and format conventions.
pub fn check_metrics(text: &str) -> Result<(), String> {
    promtool(&["check", "metrics"], text)
}

/// Parses every one of `expressions` as PromQL, through `promtool check rules` (one recording
/// rule each, in a file of its own).
pub fn check_queries(expressions: &[String]) -> Result<(), String> {
    let rules = expressions
        .iter()
        .enumerate()
        .map(|(index, expression)| {
            format!(
                "      - record: flowattr:dashboard_query_{index}\n        expr: {}\n",
                serde_json::Value::from(expression.as_str())
            )
        })
        .collect::<String>();
    let dir = tempfile::tempdir().map_err(|error| error.to_string())?;
    let file = dir.path().join("dashboard-rules.yml");
    std::fs::write(
        &file,
        format!("groups:\n  - name: dashboard\n    rules:\n{rules}"),
    )
    .map_err(|error| error.to_string())?;
    promtool(
        &[
            "check",
            "rules",
            file.to_str().expect("a UTF-8 temporary path"),
        ],
        "",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dashboards_queries_parse_and_name_our_series() {
        let expressions = expressions(DASHBOARD);
        assert!(expressions.len() >= 20, "{expressions:?}");
        assert_eq!(
            series_names("sum by (le) (rate(flowattr_x_bucket{a=\"b\"}[5m])) / process_y"),
            ["flowattr_x_bucket", "process_y"]
        );
        assert!(
            expressions
                .iter()
                .all(|expression| !series_names(expression).is_empty()),
            "{expressions:?}"
        );
        let text = "# TYPE a_seconds histogram\na_seconds_bucket{le=\"+Inf\"} 1\n# TYPE b_total counter\nc 1\n";
        assert!(
            exports(text, "a_seconds_bucket")
                && exports(text, "a_seconds_count")
                && exports(text, "b_total")
                && exports(text, "c")
        );
        assert!(!exports(text, "b") && !exports(text, "a_sec") && !exports(text, "d"));
        check_queries(&expressions).unwrap();
        // And a query that does not parse is caught.
        assert!(check_queries(&["sum(rate(flowattr_x[5m])".to_owned()]).is_err());
    }
}
