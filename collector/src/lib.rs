//! The flowattr collector.
pub mod ownership;
pub mod synthetic;
