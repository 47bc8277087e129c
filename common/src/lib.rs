//! The vocabulary every part of flowattr speaks: the eBPF program, the per-host exporter and the
//! collector all depend on this crate, so a type defined here means the same thing on both sides
//! of the kernel boundary and of the wire.
//!
//! Without features the crate is `no_std` and holds only plain `#[repr(C)]` values the eBPF
//! program can use ([`Timestamp`], [`CanonicalIp`], [`WorkloadId`], [`Direction`]). The `std`
//! feature adds [`wire`]: the rkyv payloads exchanged between exporters and collectors and
//! between collector nodes, and the checksummed framing around them. Every decoder in [`wire`]
//! validates before it trusts a byte, never panics and never allocates more than the frame it was
//! handed, because its input comes from the network. [`client`] is the protocol's client side,
//! plain or over [`tls`].
#![cfg_attr(not(feature = "std"), no_std)]
#![deny(unsafe_op_in_unsafe_fn)]

mod flow;
mod identity;
mod ip;
pub mod kernel;
mod time;
mod workload;

#[cfg(feature = "std")]
pub mod backoff;
#[cfg(feature = "std")]
pub mod client;
#[cfg(feature = "std")]
pub mod collector_address;
#[cfg(feature = "std")]
pub mod dead_letter;
#[cfg(feature = "std")]
pub mod durable;
#[cfg(feature = "std")]
mod error_line;
#[cfg(feature = "metrics")]
pub mod exposition;
#[cfg(feature = "logging")]
pub mod logging;
#[cfg(feature = "std")]
pub mod proc_stat;
#[cfg(feature = "std")]
pub mod process_metrics;
#[cfg(feature = "std")]
pub mod tls;
#[cfg(feature = "std")]
pub mod wire;

#[cfg(feature = "std")]
pub use error_line::error_line;
#[cfg(feature = "std")]
pub use flow::ArchivedRoundTrip;
pub use flow::{Direction, FlowState, RoundTrip};
pub use identity::{
    IDENTITY_FIELD_BYTES_MAX, IDENTITY_KEY_BYTES_MAX, IDENTITY_SEPARATOR, WorkloadIdentity,
    check_identity_key,
};
pub use ip::CanonicalIp;
pub use time::{Timestamp, duration_nanos};
pub use workload::{
    NameProblem, WORKLOAD_NAME_BYTES_MAX, WorkloadId, check_identifier, check_workload_name,
};
