use clap::Parser;

/// Simulates a fleet and measures a flowattr collector against ground truth (not implemented yet).
#[derive(Debug, Parser)]
#[command(name = "flowattr-bench", version)]
struct Args {}

fn main() {
    let _args = Args::parse();
    eprintln!("flowattr-bench: the pipeline benchmark is not implemented yet; see --help");
    std::process::exit(2);
}
