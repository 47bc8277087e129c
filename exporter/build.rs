//! Leaves the eBPF object in `OUT_DIR`, where `src/lib.rs` embeds it: compiled from
//! `flowattr-exporter-ebpf`'s source, or the committed `ebpf/flowattr-exporter-ebpf.o`.
//!
//! - From source (`FLOWATTR_EBPF=source`, or by default when `bpf-linker` is on the PATH and
//!   rustup has a nightly toolchain with rust-src):
//!   aya-build runs `cargo +nightly build -Z build-std=core --target bpfel-unknown-none`, which
//!   needs nightly's rust-src and bpf-linker (`.ci/install-ebpf-toolchain` installs both).
//! - Committed (`FLOWATTR_EBPF=prebuilt`, or by default without them): a stable
//!   toolchain is enough. The object is only taken while `ebpf/source-hash` matches the hash of
//!   the sources it was built from (the eBPF crate, the `no_std` part of common, the aya-ebpf
//!   versions in Cargo.lock): after a change to them the build stops and says to run
//!   `scripts/update-ebpf-object`, so the object can never drift from its source. The tests
//!   hold the committed hash to the sources too (tests/ebpf_object.rs).
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};

const EBPF_PACKAGE: &str = "flowattr-exporter-ebpf";

/// What the eBPF object is built from, relative to the workspace root.
const EBPF_SOURCES: &[&str] = &[
    "exporter-ebpf/Cargo.toml",
    "exporter-ebpf/src/lib.rs",
    "exporter-ebpf/src/main.rs",
    "common/Cargo.toml",
    "common/src/lib.rs",
    "common/src/flow.rs",
    "common/src/identity.rs",
    "common/src/ip.rs",
    "common/src/kernel.rs",
    "common/src/time.rs",
    "common/src/workload.rs",
];

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=FLOWATTR_EBPF");
    println!("cargo:rerun-if-env-changed=PATH");
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir
        .parent()
        .context("the exporter is in a workspace")?
        .to_owned();
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let hash = source_hash(&workspace)?;
    std::fs::write(out_dir.join("source-hash"), format!("{hash}\n"))?;
    println!("cargo:rustc-env=FLOWATTR_EBPF_SOURCE_HASH={hash}");
    let committed_dir = manifest_dir.join("ebpf");
    println!("cargo:rerun-if-changed={}", committed_dir.display());
    let from_source = match std::env::var("FLOWATTR_EBPF").as_deref() {
        Ok("source") => true,
        Ok("prebuilt") => false,
        Ok(other) => bail!("FLOWATTR_EBPF={other}: use source or prebuilt"),
        Err(_) => on_path("bpf-linker") && nightly_with_rust_src(),
    };
    println!(
        "cargo:rustc-env=FLOWATTR_EBPF_BUILT_FROM={}",
        if from_source { "source" } else { "prebuilt" }
    );
    if from_source {
        return build_from_source();
    }
    let committed_hash =
        std::fs::read_to_string(committed_dir.join("source-hash")).unwrap_or_default();
    if committed_hash.trim() != hash {
        bail!(
            "the eBPF program's sources changed since exporter/ebpf/flowattr-exporter-ebpf.o was built: run scripts/update-ebpf-object (it needs the nightly toolchain and bpf-linker: .ci/install-ebpf-toolchain)"
        );
    }
    std::fs::copy(
        committed_dir.join("flowattr-exporter-ebpf.o"),
        out_dir.join(EBPF_PACKAGE),
    )
    .context("copying exporter/ebpf/flowattr-exporter-ebpf.o")?;
    Ok(())
}

fn build_from_source() -> anyhow::Result<()> {
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

/// Whether rustup has a nightly toolchain with the core library's source (`-Z build-std`).
fn nightly_with_rust_src() -> bool {
    let sysroot = std::process::Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()));
    sysroot.is_some_and(|sysroot| sysroot.join("lib/rustlib/src/rust/library/core").is_dir())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// FNV-1a (64 bits) over each source's path and bytes, and the aya-ebpf entries of Cargo.lock:
/// a change to any of them changes it (it guards against forgetting, not against an attacker).
fn source_hash(workspace: &Path) -> anyhow::Result<String> {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for byte in bytes {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for source in EBPF_SOURCES {
        let path = workspace.join(source);
        println!("cargo:rerun-if-changed={}", path.display());
        let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        feed(source.as_bytes());
        feed(&text);
    }
    let lock =
        std::fs::read_to_string(workspace.join("Cargo.lock")).context("reading Cargo.lock")?;
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("Cargo.lock").display()
    );
    for block in lock
        .split("[[package]]")
        .filter(|block| block.contains("name = \"aya-ebpf"))
    {
        feed(block.trim().as_bytes());
    }
    Ok(format!("{hash:016x}"))
}
