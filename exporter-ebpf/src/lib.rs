//! Nothing lives here: the library target exists so the exporter can name this crate as a build
//! dependency (cargo then rebuilds the exporter when the eBPF program changes). The program is
//! `src/main.rs`, compiled for `bpfel-unknown-none` by the exporter's build script.
#![no_std]
