//! Metrics in the Prometheus text format (0.0.4), written by `prometheus-client`'s encoder: the
//! crate writes names, types, label escaping and numbers; the series themselves stay the relaxed
//! atomics each thread already bumps, read once per scrape, so no hot path takes a lock or a
//! registry handle. A part with metrics writes its families into a [`Scrape`]; a binary
//! registers its parts as collectors and renders them with [`render`].
//!
//! Counter names are given without `_total`, which the encoding adds.

use std::fmt;

use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeLabelSet, NoLabelSet,
};
use prometheus_client::metrics::MetricType;

pub use prometheus_client::collector::Collector;
pub use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
pub use prometheus_client::registry::Registry;

/// The label set of a series with none.
pub const NO_LABELS: [(&str, &str); 0] = [];

/// One scrape being written: families of counters, gauges, histograms and info series.
#[derive(Debug)]
pub struct Scrape<'a>(DescriptorEncoder<'a>);

impl<'a> Scrape<'a> {
    pub fn new(encoder: DescriptorEncoder<'a>) -> Scrape<'a> {
        Scrape(encoder)
    }

    /// A counter with no labels.
    pub fn counter(
        &mut self,
        name: &str,
        help: &str,
        value: impl EncodeCounterValue,
    ) -> fmt::Result {
        self.counters(name, help, [(NO_LABELS, value)])
    }

    /// A counter family, one series per label set.
    pub fn counters<L: EncodeLabelSet, V: EncodeCounterValue>(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (L, V)>,
    ) -> fmt::Result {
        debug_assert!(
            !name.ends_with("_total"),
            "{name}: the encoding adds _total to counters"
        );
        let mut family = self
            .0
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, value) in series {
            family
                .encode_family(&labels)?
                .encode_counter::<NoLabelSet, V, u64>(&value, None)?;
        }
        Ok(())
    }

    /// A gauge with no labels.
    pub fn gauge(&mut self, name: &str, help: &str, value: impl EncodeGaugeValue) -> fmt::Result {
        self.gauges(name, help, [(NO_LABELS, value)])
    }

    /// A gauge family, one series per label set (none at all is a family with no series).
    pub fn gauges<L: EncodeLabelSet, V: EncodeGaugeValue>(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (L, V)>,
    ) -> fmt::Result {
        let mut family = self
            .0
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, value) in series {
            family.encode_family(&labels)?.encode_gauge(&value)?;
        }
        Ok(())
    }

    /// A histogram with no labels: `buckets` holds each bucket's upper bound and the count in
    /// it alone (not cumulative; the encoding sums them), `count` all observations, over the
    /// last bound included.
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        buckets: &[(f64, u64)],
        sum: f64,
        count: u64,
    ) -> fmt::Result {
        let mut family = self
            .0
            .encode_descriptor(name, help, None, MetricType::Histogram)?;
        family.encode_histogram::<NoLabelSet>(sum, count, buckets, None)
    }

    /// An info series (`NAME_info{labels} 1`): `name` without `_info`, which the encoding adds.
    pub fn info(&mut self, name: &str, help: &str, labels: &impl EncodeLabelSet) -> fmt::Result {
        let mut family = self
            .0
            .encode_descriptor(name, help, None, MetricType::Info)?;
        family.encode_info(labels)
    }
}

/// Everything `registry` holds, as Prometheus text.
pub fn render(registry: &Registry) -> String {
    let mut out = String::with_capacity(32 << 10);
    // Writing to a String does not fail, and the collectors only pass the writer's errors on.
    prometheus_client::encoding::prometheus_text::encode(&mut out, registry)
        .expect("a String takes every write");
    out
}

/// A part's metrics as a collector: `write` is called at every scrape.
pub struct CollectWith<T> {
    part: T,
    write: fn(&T, &mut Scrape<'_>) -> fmt::Result,
}

impl<T> CollectWith<T> {
    pub fn new(part: T, write: fn(&T, &mut Scrape<'_>) -> fmt::Result) -> CollectWith<T> {
        CollectWith { part, write }
    }
}

impl<T> fmt::Debug for CollectWith<T> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("CollectWith")
    }
}

impl<T: Send + Sync + 'static> Collector for CollectWith<T> {
    fn encode(&self, encoder: DescriptorEncoder) -> fmt::Result {
        (self.write)(&self.part, &mut Scrape::new(encoder))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_come_out_in_the_text_format() {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(CollectWith::new((), |_, scrape| {
            scrape.counter("demo_requests", "requests served", 3u64)?;
            scrape.counters(
                "demo_refused",
                "refused, by reason",
                [([("reason", "a\"b")], 1u64)],
            )?;
            scrape.gauge("demo_lag_seconds", "lag", f64::INFINITY)?;
            scrape.histogram("demo_wait_seconds", "wait", &[(0.5, 2), (1.0, 1)], 1.25, 4)?;
            scrape.info("demo_build", "the build", &[("version", "1.2.3")])
        })));
        let text = render(&registry);
        for line in [
            "# TYPE demo_requests_total counter\ndemo_requests_total 3\n",
            "demo_refused_total{reason=\"a\\\"b\"} 1\n",
            "# TYPE demo_lag_seconds gauge\ndemo_lag_seconds +Inf\n",
            "demo_wait_seconds_bucket{le=\"0.5\"} 2\ndemo_wait_seconds_bucket{le=\"1\"} 3\ndemo_wait_seconds_bucket{le=\"+Inf\"} 4\ndemo_wait_seconds_sum 1.25\ndemo_wait_seconds_count 4\n",
            "demo_build_info{version=\"1.2.3\"} 1\n",
        ] {
            assert!(text.contains(line), "no {line:?} in:\n{text}");
        }
    }
}
