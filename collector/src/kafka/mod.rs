//! Kafka, in one place: the settings every Kafka client of a node starts from (the brokers, then
//! the operator's properties: security, SASL, TLS, compression), the region's topics made and
//! checked as attribution needs them ([`topic_admin`]), and a whole topic read the way every
//! node reads one ([`topic`], [`read_progress`]), in a child process of its own
//! ([`reader_process`]). The broadcast, the event stream and the Kafka sink are its users.

mod read_progress;
mod reader_process;
mod topic;
mod topic_admin;

use rdkafka::config::ClientConfig;

pub(crate) use reader_process::read_topic_isolated;
pub use reader_process::run_if_reader;
pub(crate) use topic::TopicMessage;
pub(crate) use topic_admin::prepare_topic;

use crate::config::ClusterConfig;

/// A Kafka client of the cluster that could not be made.
#[derive(Debug, thiserror::Error)]
#[error("cluster Kafka client for {brokers}: {reason}")]
pub struct ClientError {
    pub brokers: String,
    pub reason: String,
}

impl ClientError {
    pub fn new(brokers: &str, error: impl std::fmt::Display) -> ClientError {
        ClientError {
            brokers: brokers.to_owned(),
            reason: error.to_string(),
        }
    }
}

/// The settings a client of `brokers` starts from: the brokers, then `properties` (librdkafka
/// settings the operator gave, which win over nothing but the caller's own after this).
pub fn client_config<'a>(
    brokers: &str,
    properties: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (key, value) in properties {
        config.set(key, value);
    }
    config
}

/// The settings every client of the region's cluster uses (`[cluster.kafka]`).
pub fn cluster_config(cluster: &ClusterConfig, brokers: &str) -> ClientConfig {
    client_config(brokers, &cluster.kafka)
}
