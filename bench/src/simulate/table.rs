//! The results in the shape of the reference study: strategy by strategy, wrong dependencies
//! and unattributed flows.

use std::fmt::Write;

use super::score::Score;

fn percent(share: f64) -> String {
    format!("{:.2}%", share * 100.0)
}

/// A Markdown table, one row per strategy.
pub fn markdown_table(scores: &[Score]) -> String {
    let mut out = String::from(
        "| strategy | flows misattributed | flows unattributed | wrong dependencies, gateway | wrong dependencies, all | missed dependencies, all |\n\
         | --- | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for score in scores {
        let deps = &score.dependencies;
        let _ = writeln!(
            out,
            "| {} | {} ({}) | {} | {} ({} of {}) | {} ({} of {}) | {} |",
            score.strategy,
            score.misattributed,
            percent(score.misattributed_share),
            percent(score.unattributed_share),
            percent(deps.gateway.wrong_share),
            deps.gateway.wrong,
            deps.gateway.reported,
            percent(deps.overall.wrong_share),
            deps.overall.wrong,
            deps.overall.reported,
            percent(deps.overall.missed_share),
        );
    }
    out
}
