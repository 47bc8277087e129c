//! `pipeline --against SINK --rounds N`: the pipeline run with two sinks in turn, round by
//! round, and the flows `--sink` carries per collector core-second at the steady state
//! ([`PipelineResult::flows_per_core_second`]) as a share of what the other does.
//! Runs minutes apart on a shared machine differ by a fifth; a pair of runs seconds apart
//! shares most of that drift, and the median of the rounds' shares keeps what is left of it
//! out of the figure.

use super::{PipelineArgs, PipelineResult, measure, print};

pub fn run(args: &PipelineArgs, against: &str) -> anyhow::Result<()> {
    let shares = compare(args, against, |args| {
        let result = measure_fresh(args)?;
        print(args, &result);
        Ok(result)
    })?;
    let rounds: Vec<String> = shares.iter().map(|share| format!("{share:.2}")).collect();
    println!(
        "{} against {against}, flows per collector core-second at the steady state: {} (rounds), median {:.2}",
        args.sink,
        rounds.join(" / "),
        median(&shares)
    );
    Ok(())
}

/// Each round's share, in round order, from `measure` run on `--sink` and on `against` in
/// turn.
fn compare(
    args: &PipelineArgs,
    against: &str,
    mut measure: impl FnMut(&PipelineArgs) -> anyhow::Result<PipelineResult>,
) -> anyhow::Result<Vec<f64>> {
    let baseline_args = PipelineArgs {
        sink: against.to_owned(),
        ..args.clone()
    };
    let mut shares = Vec::new();
    for round in 1..=args.rounds.max(1) {
        println!("round {round}:");
        // Which sink goes first alternates, so that neither always runs on a machine warmed
        // (page cache, clock speed) by the other.
        let (baseline, measured) = if round % 2 == 1 {
            let baseline = measure(&baseline_args)?;
            (baseline, measure(args)?)
        } else {
            let measured = measure(args)?;
            (measure(&baseline_args)?, measured)
        };
        let share = measured.flows_per_core_second() / baseline.flows_per_core_second();
        println!(
            "round {round}: {} carries {share:.2}x what {against} does per collector core-second",
            args.sink
        );
        shares.push(share);
    }
    Ok(shares)
}

/// The middle value (the upper of the two middle ones of an even count).
pub(crate) fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// A run on an empty delay buffer, so that no run starts by replaying the previous one's
/// flows: under `--data-dir`, in a `comparison` directory of its own, emptied first (the
/// directory given may hold anything else).
fn measure_fresh(args: &PipelineArgs) -> anyhow::Result<PipelineResult> {
    let Some(dir) = &args.data_dir else {
        return measure(args);
    };
    let dir = dir.join("comparison");
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => anyhow::bail!("emptying {}: {error}", dir.display()),
    }
    measure(&PipelineArgs {
        data_dir: Some(dir),
        ..args.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(flows: f64, cores_used: f64) -> PipelineResult {
        swinging(flows, flows, cores_used)
    }

    fn swinging(accepted: f64, emitted: f64, cores_used: f64) -> PipelineResult {
        PipelineResult {
            seconds: 1.0,
            accepted,
            emitted,
            attributed_share: 1.0,
            cores_used,
            cores_by_work: Default::default(),
            broker_cores: None,
            delay_bytes_per_flow: 0.0,
            wire_bytes_per_flow: 0.0,
            framing_ns_per_flow: 0.0,
            sink_bytes_per_flow: None,
            kafka_transmitted_bytes_per_flow: None,
            p50_ms: 0.0,
            p99_ms: 0.0,
            resident_bytes: 0.0,
            ceiling: None,
        }
    }

    fn kafka_against_discard(rounds: usize) -> PipelineArgs {
        PipelineArgs {
            sink: "kafka".into(),
            against: Some("discard".into()),
            rounds,
            ..PipelineArgs::defaults()
        }
    }

    #[test]
    fn sinks_alternate_which_runs_first_and_each_round_is_its_own_pair() {
        let args = kafka_against_discard(3);
        let mut order = Vec::new();
        // Per collector core-second: discard 1M in every round; kafka 0.8M, 0.6M, then 0.9M.
        let mut kafka = [0.8, 0.6, 0.9].into_iter();
        let shares = compare(&args, "discard", |args| {
            order.push(args.sink.clone());
            Ok(match args.sink.as_str() {
                "discard" => result(2e6, 2.0),
                _ => result(kafka.next().unwrap() * 1e6, 1.0),
            })
        })
        .unwrap();
        assert_eq!(
            order,
            ["discard", "kafka", "kafka", "discard", "discard", "kafka"]
        );
        let rounded: Vec<f64> = shares.iter().map(|s| (s * 100.0).round() / 100.0).collect();
        assert_eq!(rounded, [0.8, 0.6, 0.9]);
        assert_eq!(median(&shares), shares[0]);
    }

    /// A window that caught the discard run taking in more than it released and the Kafka run
    /// the reverse: by emitted flows alone Kafka would carry 1.33x what discard does; at the
    /// steady state (the two rates' mean) it carries 0.9x.
    #[test]
    fn the_share_is_of_the_steady_state_not_of_a_window_s_swing() {
        let args = kafka_against_discard(1);
        let shares = compare(&args, "discard", |args| {
            Ok(match args.sink.as_str() {
                "discard" => swinging(1.1e6, 0.9e6, 1.0),
                _ => swinging(0.6e6, 1.2e6, 1.0),
            })
        })
        .unwrap();
        assert!((shares[0] - 0.9).abs() < 1e-9, "{shares:?}");
    }

    #[test]
    fn a_failed_run_ends_the_comparison_with_its_error() {
        let args = PipelineArgs {
            against: Some("discard".into()),
            ..PipelineArgs::defaults()
        };
        let error = compare(&args, "discard", |_| anyhow::bail!("no broker")).unwrap_err();
        assert_eq!(error.to_string(), "no broker");
    }
}
