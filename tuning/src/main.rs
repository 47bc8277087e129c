use clap::Parser;

/// Plans flowattr collector capacity for a fleet (not implemented yet).
#[derive(Debug, Parser)]
#[command(name = "flowattr-plan", version)]
struct Args {}

fn main() {
    let _args = Args::parse();
    eprintln!("flowattr-plan: capacity planning is not implemented yet; see --help");
    std::process::exit(2);
}
