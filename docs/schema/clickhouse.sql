-- ClickHouse over the Kafka sink's protobuf messages (docs/schema/flows.proto). Each Kafka
-- message is one FlowBatch with no length prefix, which ClickHouse reads as one row of
-- format ProtobufSingle, the flows as a Nested column; a materialized view unrolls them into a
-- MergeTree table, and the dependency graph is a query of that table. Put flows.proto in the
-- server's format_schema_path, and set the broker list and topic. collector/tests/kafka.rs
-- runs this file against the sink's real messages with chdb (the embedded ClickHouse), the
-- Kafka table made a Memory table that the messages are inserted into: the Kafka engine itself
-- needs a server.

CREATE TABLE flows
(
    exporter UInt64,
    sequence UInt64,
    `index` UInt32,
    start_ns UInt64,
    end_ns UInt64,
    local_ip String,
    local_port UInt16,
    remote_ip String,
    remote_port UInt16,
    direction Enum8('DIRECTION_UNSPECIFIED' = 0, 'DIRECTION_OUTBOUND' = 1, 'DIRECTION_INBOUND' = 2),
    state Enum8('STATE_UNSPECIFIED' = 0, 'STATE_OPEN' = 1, 'STATE_CLOSED' = 2),
    bytes_sent UInt64,
    bytes_received UInt64,
    segments_sent UInt32,
    segments_received UInt32,
    retransmits UInt32,
    local_workload LowCardinality(String),
    remote_workload LowCardinality(String),
    unattributed Enum8('UNATTRIBUTED_NONE' = 0, 'UNATTRIBUTED_NO_EVIDENCE' = 1, 'UNATTRIBUTED_CONFLICT' = 2,
        'UNATTRIBUTED_AMBIGUOUS' = 3, 'UNATTRIBUTED_EXPIRED' = 4, 'UNATTRIBUTED_HOST_LOCAL' = 5,
        'UNATTRIBUTED_INCOMPLETE' = 6, 'UNATTRIBUTED_UNANSWERED' = 7, 'UNATTRIBUTED_UNNAMED' = 8),
    provenance Enum8('PROVENANCE_NONE' = 0, 'PROVENANCE_HEARTBEAT' = 1, 'PROVENANCE_EVENT' = 2,
        'PROVENANCE_FORWARDED' = 3),
    retries UInt32,
    local_namespace LowCardinality(String),
    local_instance String,
    local_owner_kind LowCardinality(String),
    remote_namespace LowCardinality(String),
    remote_owner_kind LowCardinality(String),
    host_name LowCardinality(String),
    region LowCardinality(String),
    rtt_us UInt32,
    rtt_deviation_us UInt32
)
ENGINE = MergeTree
ORDER BY (start_ns, exporter, sequence, `index`);

CREATE TABLE flows_queue
(
    flows Nested(
        exporter UInt64,
        sequence UInt64,
        `index` UInt32,
        start_ns UInt64,
        end_ns UInt64,
        local_ip String,
        local_port UInt16,
        remote_ip String,
        remote_port UInt16,
        direction Enum8('DIRECTION_UNSPECIFIED' = 0, 'DIRECTION_OUTBOUND' = 1, 'DIRECTION_INBOUND' = 2),
        state Enum8('STATE_UNSPECIFIED' = 0, 'STATE_OPEN' = 1, 'STATE_CLOSED' = 2),
        bytes_sent UInt64,
        bytes_received UInt64,
        segments_sent UInt32,
        segments_received UInt32,
        retransmits UInt32,
        local_workload String,
        remote_workload String,
        unattributed Enum8('UNATTRIBUTED_NONE' = 0, 'UNATTRIBUTED_NO_EVIDENCE' = 1, 'UNATTRIBUTED_CONFLICT' = 2,
            'UNATTRIBUTED_AMBIGUOUS' = 3, 'UNATTRIBUTED_EXPIRED' = 4, 'UNATTRIBUTED_HOST_LOCAL' = 5,
            'UNATTRIBUTED_INCOMPLETE' = 6, 'UNATTRIBUTED_UNANSWERED' = 7, 'UNATTRIBUTED_UNNAMED' = 8),
        provenance Enum8('PROVENANCE_NONE' = 0, 'PROVENANCE_HEARTBEAT' = 1, 'PROVENANCE_EVENT' = 2,
            'PROVENANCE_FORWARDED' = 3),
        retries UInt32,
        local_namespace String,
        local_instance String,
        local_owner_kind String,
        remote_namespace String,
        remote_owner_kind String,
        host_name String,
        region String,
        rtt_us UInt32,
        rtt_deviation_us UInt32)
)
ENGINE = Kafka
SETTINGS kafka_broker_list = 'h1:9092', kafka_topic_list = 'flows', kafka_group_name = 'clickhouse',
    kafka_format = 'ProtobufSingle', format_schema = 'flows.proto:FlowBatch';

CREATE MATERIALIZED VIEW flows_from_kafka TO flows AS
SELECT flow.exporter AS exporter, flow.sequence AS sequence, flow.`index` AS `index`,
       flow.start_ns AS start_ns, flow.end_ns AS end_ns, flow.local_ip AS local_ip,
       flow.local_port AS local_port, flow.remote_ip AS remote_ip, flow.remote_port AS remote_port,
       flow.direction AS direction, flow.state AS state, flow.bytes_sent AS bytes_sent,
       flow.bytes_received AS bytes_received, flow.segments_sent AS segments_sent,
       flow.segments_received AS segments_received, flow.retransmits AS retransmits,
       flow.local_workload AS local_workload, flow.remote_workload AS remote_workload,
       flow.unattributed AS unattributed, flow.provenance AS provenance, flow.retries AS retries,
       flow.local_namespace AS local_namespace, flow.local_instance AS local_instance,
       flow.local_owner_kind AS local_owner_kind, flow.remote_namespace AS remote_namespace,
       flow.remote_owner_kind AS remote_owner_kind, flow.host_name AS host_name, flow.region AS region,
       flow.rtt_us AS rtt_us, flow.rtt_deviation_us AS rtt_deviation_us
FROM flows_queue ARRAY JOIN flows AS flow;

-- The dependency graph: one row per (client, server), the server `unattributed:REASON` where
-- no workload held the address at the connections' start.
SELECT local_workload AS client,
       if(remote_workload = '', concat('unattributed:', lower(replaceOne(toString(unattributed), 'UNATTRIBUTED_', ''))), remote_workload) AS server,
       count() AS flows,
       sum(bytes_sent + bytes_received) AS bytes
FROM flows
WHERE direction = 'DIRECTION_OUTBOUND'
GROUP BY client, server
ORDER BY client, server;
