//! `flowattr-exporter`: flow capture is being built (issue 4); today the binary describes itself.
use clap::Parser;

/// Captures TCP flows with eBPF on this host, attributes their local side to the owning workload
/// and ships them to the regional flowattr collector.
#[derive(Debug, Parser)]
#[command(name = "flowattr-exporter", version)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _args = Args::parse();
    println!(
        "flowattr-exporter: eBPF object of {} bytes embedded; capture is not implemented yet (see --help)",
        flowattr_exporter::EBPF_OBJECT.len()
    );
    Ok(())
}
