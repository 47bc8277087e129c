//! The flowattr collector.
pub mod ownership;
