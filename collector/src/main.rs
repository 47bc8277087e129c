use clap::Parser;

/// Attributes the remote side of every TCP flow to the workload that owned the IP at the flow's
/// start (not implemented yet: the ownership map is the library today).
#[derive(Debug, Parser)]
#[command(name = "flowattr-collector", version)]
struct Args {}

fn main() {
    let _args = Args::parse();
    eprintln!("flowattr-collector: the pipeline is not implemented yet; see --help");
    std::process::exit(2);
}
