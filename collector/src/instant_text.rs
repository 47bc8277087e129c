//! Instants as people write them: nanoseconds since the Unix epoch, or RFC 3339 with any
//! offset. The control plane's queries and the event stream take both.

use flowattr_common::Timestamp;

/// Nanoseconds since the epoch, or RFC 3339 (`2026-11-23T10:00:00Z`, `...+01:00`).
pub(crate) fn parse_instant(text: &str) -> Option<Timestamp> {
    use time::format_description::well_known::Rfc3339;
    if let Ok(nanos) = text.parse::<u64>() {
        return Some(Timestamp::from_nanos(nanos));
    }
    // An unencoded `+` in a query string decodes to a space; only an offset can hold one.
    let time = time::OffsetDateTime::parse(text, &Rfc3339)
        .or_else(|_| time::OffsetDateTime::parse(&text.replace(' ', "+"), &Rfc3339))
        .ok()?;
    u64::try_from(time.unix_timestamp_nanos())
        .ok()
        .map(Timestamp::from_nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_parse_as_nanoseconds_or_rfc3339_with_any_offset() {
        assert_eq!(
            parse_instant("1700000000000000000"),
            Some(Timestamp::from_nanos(1_700_000_000_000_000_000))
        );
        assert_eq!(
            parse_instant("2023-11-14T22:13:20Z"),
            Some(Timestamp::from_nanos(1_700_000_000_000_000_000))
        );
        for offset in [
            "2023-11-15T00:13:20+02:00",
            "2023-11-14T17:13:20-05:00",
            "2023-11-15T00:13:20 02:00",
        ] {
            assert_eq!(
                parse_instant(offset),
                Some(Timestamp::from_nanos(1_700_000_000_000_000_000)),
                "{offset}"
            );
        }
        assert_eq!(parse_instant("yesterday"), None);
        assert_eq!(parse_instant("1969-12-31T23:59:59Z"), None);
    }
}
