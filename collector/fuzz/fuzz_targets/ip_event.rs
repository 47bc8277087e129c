//! Events about IPs that run no exporter come from whatever publishes on the events topic: the
//! parser must answer any bytes with an event, a watermark or a reason, never a panic, and what
//! it accepts must keep the rules it checks.
#![no_main]

use flowattr_collector::events::{EventMessage, parse_event};
use flowattr_common::Timestamp;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let latest = Timestamp::from_nanos(2_000_000_000_000_000_000);
    match parse_event(input, latest) {
        Ok(EventMessage::Ip(event)) => {
            assert!(event.at <= latest);
            assert!(!event.ip.is_host_local());
            if let Some(owner) = &event.owner {
                assert!(flowattr_common::check_workload_name(owner).is_ok());
            }
        }
        Ok(EventMessage::Watermark { producer, at }) => {
            assert!(at <= latest);
            assert!(flowattr_common::check_workload_name(&producer).is_ok());
        }
        Err(_) => {}
    }
});
