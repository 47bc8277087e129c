//! Events about IPs that run no exporter come from whatever publishes on the events topic: the
//! parser must answer any bytes with an event or a reason, never a panic, and an event it
//! accepts must keep the rules it checks.
#![no_main]

use flowattr_collector::events::parse_event;
use flowattr_common::Timestamp;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let latest = Timestamp::from_nanos(2_000_000_000_000_000_000);
    if let Ok(event) = parse_event(input, latest) {
        assert!(event.at <= latest);
        assert!(!event.ip.is_host_local());
        if let Some(owner) = &event.owner {
            assert!(flowattr_common::check_workload_name(owner).is_ok());
        }
    }
});
