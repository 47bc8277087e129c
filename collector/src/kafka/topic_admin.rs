//! Topics as the node wants them: created with the cluster's partitions, replication and
//! retention when missing, and an existing one's settings checked against what attribution
//! needs.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;

use super::cluster_config;
use crate::config::ClusterConfig;

/// Creates `topic_name` if it is missing: the cluster's partitions and replication, deletion
/// (never compaction: messages have no key) and twice `read_back` of retention, the history a
/// starting node reads. Says at once if an existing topic keeps less than `read_back` or
/// compacts. Returns its partition count (the configured one if the brokers cannot say yet).
pub(crate) fn prepare_topic(
    cluster: &ClusterConfig,
    brokers: &str,
    topic_name: &str,
    read_back: Duration,
) -> u32 {
    let admin: Result<AdminClient<DefaultClientContext>, _> =
        cluster_config(cluster, brokers).create();
    let Ok(admin) = admin else {
        return cluster.partitions;
    };
    let retention_ms = (read_back.as_millis() * 2).to_string();
    let topic = NewTopic::new(
        topic_name,
        cluster.partitions as i32,
        TopicReplication::Fixed(i32::from(cluster.replication_factor.max(1))),
    )
    .set("cleanup.policy", "delete")
    .set("retention.ms", &retention_ms);
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    match futures_lite::future::block_on(admin.create_topics([&topic], &options)) {
        Ok(results) => {
            for result in results {
                match result {
                    Ok(name) => tracing::info!(
                        "created topic {name} with {} partitions, kept {retention_ms} ms",
                        cluster.partitions
                    ),
                    Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {
                        check_topic_settings(&admin, topic_name, read_back, &options)
                    }
                    Err((name, code)) => tracing::warn!("creating topic {name}: {code}"),
                }
            }
        }
        Err(error) => tracing::warn!("creating topic {topic_name}: {error}"),
    }
    match admin
        .inner()
        .fetch_metadata(Some(topic_name), Duration::from_secs(10))
    {
        Ok(metadata) => metadata
            .topics()
            .first()
            .map(|topic| topic.partitions().len() as u32)
            .filter(|&count| count > 0)
            .unwrap_or(cluster.partitions),
        Err(_) => cluster.partitions,
    }
}

/// Says what in an existing topic's settings would cost attribution: a retention shorter than
/// the history a starting node reads, or compaction. Brokers that cannot describe topics are
/// taken at their word.
fn check_topic_settings(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
    read_back: Duration,
    options: &AdminOptions,
) {
    let described = futures_lite::future::block_on(
        admin.describe_configs([&ResourceSpecifier::Topic(topic)], options),
    );
    let Ok(Some(Ok(resource))) = described.map(|mut results| results.pop()) else {
        return;
    };
    let value = |name: &str| resource.get(name).and_then(|entry| entry.value.clone());
    if let Some(kept) = value("retention.ms").and_then(|text| text.parse::<i64>().ok())
        && kept >= 0
        && (kept as u128) < read_back.as_millis()
    {
        tracing::warn!(
            "topic {topic} keeps messages {kept} ms, less than the {} ms a starting node reads back: a restarted node learns less than a long-running one knows; set its retention.ms to at least {}",
            read_back.as_millis(),
            read_back.as_millis() * 2
        );
    }
    if value("cleanup.policy").is_some_and(|policy| policy.contains("compact")) {
        tracing::warn!(
            "topic {topic} is compacted: its messages have no key, so compaction loses them; set its cleanup.policy to delete"
        );
    }
}
