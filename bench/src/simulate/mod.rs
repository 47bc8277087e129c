//! `flowattr-bench simulate`: how often is each attribution strategy wrong, on one simulated
//! fleet with ground truth? The fleet ([`fleet`]) is observed as a real one is ([`observe`]):
//! exporters' batches with loss, delay, duplication, reordering, clock skew and restarts, and
//! an inventory's assign/unassign events with heavy-tailed delay and loss. Every strategy
//! ([`strategy`]) is fed the same arrivals in the same order, and its answers are scored
//! against the truth ([`score`]), per flow and per service dependency. [`sweep`] repeats the
//! run over a range of one setting and plots the results.

pub mod fleet;
pub mod observe;
pub mod score;
pub mod strategy;
pub mod sweep;
mod table;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use flowattr_collector::config::Config;
use indicatif::{ProgressBar, ProgressStyle};

use fleet::{Fleet, FleetShape, LOAD_BALANCER_CIDR};
use observe::{Arrival, Delivery, Observations};
use score::Score;
use strategy::{Answers, ClaimPolicy, CurrentStateCache, EventMap, Flowattr, Strategy};

pub use table::markdown_table;

#[derive(Debug, Clone, Args)]
pub struct SimulateArgs {
    /// Makes every run reproducible: the same seed, the same fleet and the same faults.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Simulated time.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Services besides the gateway and the load balancers.
    #[arg(long, default_value_t = 40)]
    pub services: usize,
    #[arg(long, default_value_t = 60)]
    pub hosts: usize,
    /// Share of hosts that run no exporter.
    #[arg(long, default_value_t = 0.0)]
    pub hosts_without_exporter: f64,
    #[arg(long, default_value_t = 300.0)]
    pub connections_per_second: f64,
    /// Mean life of a container.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub container_life: Duration,
    /// How long a freed IP rests before it is reused (0s: at once).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub ip_cooldown: Duration,
    #[arg(long, default_value_t = 1024)]
    pub ip_pool: u32,
    /// Largest clock error of a host, either way.
    #[arg(long, default_value = "5ms", value_parser = humantime::parse_duration)]
    pub max_skew: Duration,
    /// Exporters' batch interval.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    #[arg(long, default_value_t = 0.01)]
    pub batch_loss: f64,
    /// Mean delivery delay of a batch.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub batch_delay: Duration,
    #[arg(long, default_value_t = 0.001)]
    pub duplication: f64,
    #[arg(long, default_value_t = 0.01)]
    pub reordering: f64,
    #[arg(long, default_value_t = 0.1)]
    pub restarts_per_hour: f64,
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub event_delay_p50: Duration,
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    pub event_delay_p99: Duration,
    #[arg(long, default_value_t = 0.001)]
    pub event_loss: f64,
    /// Exporters send the clock offset their acks measured with each batch, and the collector
    /// corrects by it (false: neither, as before exporters measured it).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub clock_readings: bool,
    /// flowattr's fast-reuse guard (ownership.reuse_guard); false only to measure what it costs.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub reuse_guard: bool,
    /// The event-based strategy's hold-back variant waits this long before answering.
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    pub hold_back: Duration,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also run the sweeps, writing their plots (SVG), data (JSON) and tables (Markdown) here.
    #[arg(long)]
    pub sweeps: Option<PathBuf>,
}

impl SimulateArgs {
    /// Every setting at its default, as the command line gives them.
    pub fn defaults() -> SimulateArgs {
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            args: SimulateArgs,
        }
        <Defaults as clap::Parser>::parse_from(["simulate"]).args
    }

    pub fn fleet_shape(&self) -> FleetShape {
        FleetShape {
            seed: self.seed,
            duration: self.duration,
            services: self.services,
            hosts: self.hosts,
            hosts_without_exporter: self.hosts_without_exporter,
            connections_per_second: self.connections_per_second,
            container_life: self.container_life,
            ip_cooldown: self.ip_cooldown,
            ip_pool: self.ip_pool,
            max_skew: self.max_skew,
            ..FleetShape::default()
        }
    }

    pub fn delivery(&self) -> Delivery {
        Delivery {
            interval: self.interval,
            batch_loss: self.batch_loss,
            batch_delay: self.batch_delay,
            duplication: self.duplication,
            reordering: self.reordering,
            restarts_per_hour: self.restarts_per_hour,
            event_delay_p50: self.event_delay_p50,
            event_delay_p99: self.event_delay_p99,
            event_loss: self.event_loss,
            clock_readings: self.clock_readings,
        }
    }
}

/// The collector settings flowattr runs with in the simulation: the defaults, with the
/// exporters' interval, the fast-reuse guard as asked, and the load balancers' CIDR as the
/// event fallback.
pub fn collector_config(interval: Duration, reuse_guard: bool) -> anyhow::Result<Config> {
    let mut config = Config::default();
    config.ingest.exporter_interval = interval;
    config.ownership.reuse_guard = reuse_guard;
    config
        .validate()
        .context("the simulated collector's settings")?;
    // After validation, which asks a node for the brokers its events come from: here the
    // simulation hands them over.
    config.events.fallback_cidrs = vec![LOAD_BALANCER_CIDR.parse().expect("a CIDR")];
    Ok(config)
}

/// flowattr and the strategies users run today, fresh for one run.
pub fn strategies(fleet: &Fleet, config: &Config, hold_back: Duration) -> Vec<Box<dyn Strategy>> {
    let names = fleet
        .services
        .iter()
        .map(|service| service.name.clone())
        .collect();
    vec![
        Box::new(Flowattr::new(config.clone(), names)),
        Box::new(EventMap::new(Duration::ZERO)),
        Box::new(EventMap::new(hold_back)),
        Box::new(CurrentStateCache::new(ClaimPolicy::LastWriter)),
        Box::new(CurrentStateCache::new(ClaimPolicy::FirstLive {
            keep_finished_jobs: false,
        })),
        Box::new(CurrentStateCache::new(ClaimPolicy::FirstLive {
            keep_finished_jobs: true,
        })),
    ]
}

/// Feeds every strategy the same arrivals in order and scores their answers.
pub fn run_strategies(
    fleet: &Fleet,
    observations: &Observations,
    strategies: &mut [Box<dyn Strategy>],
    progress: &ProgressBar,
) -> Vec<Score> {
    let mut answers: Vec<Answers> = strategies.iter().map(|_| Vec::new()).collect();
    for (index, (at, arrival)) in observations.arrivals.iter().enumerate() {
        for (strategy, answers) in strategies.iter_mut().zip(&mut answers) {
            strategy.advance(*at, answers);
            match arrival {
                Arrival::Batch(batch) => strategy.batch(*at, batch, answers),
                Arrival::Event(event) => strategy.event(*at, event, answers),
            }
        }
        if index % 4096 == 0 {
            progress.inc(4096);
        }
    }
    strategies
        .iter_mut()
        .zip(answers)
        .map(|(strategy, mut answers)| {
            strategy.finish(&mut answers);
            score::score(strategy.name(), fleet, observations, &answers)
        })
        .collect()
}

/// One run: the fleet of `args`, observed, every strategy scored.
pub fn simulate_once(
    args: &SimulateArgs,
    progress: &ProgressBar,
) -> anyhow::Result<(Fleet, Vec<Score>)> {
    let fleet = Fleet::generate(args.fleet_shape())?;
    let observations = observe::observe(&fleet, &args.delivery(), args.seed);
    let config = collector_config(args.interval, args.reuse_guard)?;
    let mut strategies = strategies(&fleet, &config, args.hold_back);
    progress.set_length(observations.arrivals.len() as u64);
    let scores = run_strategies(&fleet, &observations, &mut strategies, progress);
    Ok((fleet, scores))
}

pub fn progress_bar(message: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {percent}% {elapsed}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(message.to_owned());
    bar
}

pub fn run(args: &SimulateArgs) -> anyhow::Result<()> {
    let progress = progress_bar("simulating");
    let (fleet, scores) = simulate_once(args, &progress)?;
    progress.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&scores)?);
    } else {
        println!(
            "{} services, {} instances, {} connections over {}; {} reports from both ends\n",
            fleet.services.len(),
            fleet.instances.len(),
            fleet.connections.len(),
            humantime::format_duration(args.duration),
            scores.first().map_or(0, |score| score.flows)
        );
        print!("{}", markdown_table(&scores));
    }
    if let Some(dir) = &args.sweeps {
        sweep::run_all(args, dir)?;
    }
    Ok(())
}
