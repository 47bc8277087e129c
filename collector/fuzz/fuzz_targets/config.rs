//! The config file is read from disk and may be anything: any text must give a config or one
//! error, never a panic, and a config that validates must keep the rules validation states
//! (so nothing downstream meets a zero delay or a retention that evicts evidence too early).
#![no_main]

use flowattr_collector::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else { return };
    let Ok(config) = Config::from_toml(text) else { return };
    // Everything start-up derives from a parsed config, valid or not, before it refuses it.
    let minimum = config.minimum_retention();
    let _ = (minimum.total(), minimum.to_string(), config.warnings(), config.lookup_reach(), config.max_clock_skew());
    if config.validate().is_ok() {
        assert!(!config.delay.delay.is_zero());
        assert!(!config.delay.segment_span.is_zero() && config.delay.segment_span <= config.delay.delay);
        assert!(config.ownership.retention >= minimum.total());
        assert!(config.max_clock_skew() <= config.delay.delay || config.ingest.max_clock_skew.is_none());
    }
});
