//! Compiles `flowattr-exporter-ebpf` for the BPF target and leaves the object in `OUT_DIR`, where
//! `src/lib.rs` embeds it. aya-build runs `cargo +nightly build -Z build-std=core --target
//! bpfel-unknown-none`, which needs nightly's rust-src and bpf-linker
//! (`.ci/install-ebpf-toolchain` installs both).
use anyhow::{Context as _, anyhow};

const EBPF_PACKAGE: &str = "flowattr-exporter-ebpf";

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let package = metadata
        .packages
        .into_iter()
        .find(|package| package.name.as_str() == EBPF_PACKAGE)
        .ok_or_else(|| anyhow!("{EBPF_PACKAGE} is not in the workspace"))?;
    let root_dir = package
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("{EBPF_PACKAGE} manifest has no parent directory"))?;
    let package = aya_build::Package {
        name: EBPF_PACKAGE,
        root_dir: root_dir.as_str(),
        no_default_features: false,
        features: &[],
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default()).with_context(|| {
        format!("building {EBPF_PACKAGE}: is bpf-linker installed (.ci/install-ebpf-toolchain)?")
    })
}
