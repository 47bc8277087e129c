-- ClickHouse over the Kafka sink's `protobuf-columns` messages (docs/schema/flows.proto,
-- `FlowColumns`), into the `flows` table of clickhouse.sql: run that file first (its
-- FlowBatch queue and view too, if a topic of rows is also read), then this one. Each Kafka
-- message is one FlowColumns, which ClickHouse reads as one row of format ProtobufSingle, each
-- column an array; the materialized view looks the names up and rebuilds the times with
-- array functions, then unrolls the arrays side by side. Put flows.proto in the server's
-- format_schema_path, and set the broker list and topic. collector/tests/kafka.rs runs this
-- file against the sink's real messages with chdb, as it does clickhouse.sql.

CREATE TABLE flow_columns_queue
(
    workload Array(String),
    workload_namespace Array(String),
    workload_instance Array(String),
    workload_owner_kind Array(String),
    host_names Array(String),
    region String,
    endpoint_ip Array(String),
    endpoint_workload Array(UInt32),
    batch_exporter Array(UInt64),
    batch_sequence Array(UInt64),
    batch_host_name Array(UInt32),
    batch Array(UInt32),
    index_step Array(Int64),
    end_us_delta Array(Int64),
    duration_us Array(UInt64),
    local_endpoint Array(UInt32),
    remote_ips String,
    server_port Array(UInt16),
    client_ports String,
    direction Array(Enum8('DIRECTION_UNSPECIFIED' = 0, 'DIRECTION_OUTBOUND' = 1, 'DIRECTION_INBOUND' = 2)),
    state Array(Enum8('STATE_UNSPECIFIED' = 0, 'STATE_OPEN' = 1, 'STATE_CLOSED' = 2)),
    bytes_sent Array(UInt64),
    bytes_received Array(UInt64),
    segments_sent Array(UInt32),
    segments_received Array(UInt32),
    retransmits Array(UInt32),
    remote_workload Array(UInt32),
    unattributed Array(Enum8('UNATTRIBUTED_NONE' = 0, 'UNATTRIBUTED_NO_EVIDENCE' = 1, 'UNATTRIBUTED_CONFLICT' = 2,
        'UNATTRIBUTED_AMBIGUOUS' = 3, 'UNATTRIBUTED_EXPIRED' = 4, 'UNATTRIBUTED_HOST_LOCAL' = 5,
        'UNATTRIBUTED_INCOMPLETE' = 6, 'UNATTRIBUTED_UNANSWERED' = 7, 'UNATTRIBUTED_UNNAMED' = 8)),
    provenance Array(Enum8('PROVENANCE_NONE' = 0, 'PROVENANCE_HEARTBEAT' = 1, 'PROVENANCE_EVENT' = 2,
        'PROVENANCE_FORWARDED' = 3)),
    retries Array(UInt32),
    rtt_us Array(UInt32),
    rtt_deviation_us Array(UInt32)
)
ENGINE = Kafka
SETTINGS kafka_broker_list = 'h1:9092', kafka_topic_list = 'flow-columns', kafka_group_name = 'clickhouse',
    kafka_format = 'ProtobufSingle', format_schema = 'flows.proto:FlowColumns';

-- A position of 0 (none) reads as '' (an array's element 0 is the empty default). A local
-- endpoint's workload and an exporter batch's host name are positions too: looked up through
-- endpoint_workload and batch_host_name. A remote address is put back together from its bytes
-- (byte k of flow i at k * flows + i), 4 or 16 of them; an IPv4-mapped one is IPv4. A client
-- port likewise, from its high and its low byte.
CREATE MATERIALIZED VIEW flows_from_kafka_columns TO flows AS
WITH length(batch) AS flow_count, intDiv(length(remote_ips), flow_count) AS address_width
SELECT flow_exporter AS exporter, flow_sequence AS sequence, toUInt32(index_plus_one - 1) AS `index`,
       toUInt64(end_us - duration_us) * 1000 AS start_ns, toUInt64(end_us) * 1000 AS end_ns,
       local_ip, if(direction = 'DIRECTION_INBOUND', server_port, client_port) AS local_port,
       if(address_width = 16 AND startsWith(remote_address, unhex('00000000000000000000FFFF')),
          substring(remote_address, 13), remote_address) AS remote_ip,
       if(direction = 'DIRECTION_INBOUND', client_port, server_port) AS remote_port,
       direction, state, bytes_sent, bytes_received, segments_sent, segments_received,
       retransmits, local_name AS local_workload, remote_name AS remote_workload, unattributed,
       provenance, retries, local_namespace_name AS local_namespace,
       local_instance_name AS local_instance, local_owner_kind_name AS local_owner_kind,
       remote_namespace_name AS remote_namespace, remote_owner_kind_name AS remote_owner_kind,
       host AS host_name, region, rtt_us, rtt_deviation_us
FROM flow_columns_queue
ARRAY JOIN arrayMap(b -> batch_exporter[b], batch) AS flow_exporter,
       arrayMap(b -> batch_sequence[b], batch) AS flow_sequence, arrayCumSum(arrayMap(s -> s + 1, index_step)) AS index_plus_one,
       arrayCumSum(end_us_delta) AS end_us, duration_us,
       arrayMap(p -> endpoint_ip[p], local_endpoint) AS local_ip, server_port,
       arrayMap(i -> toUInt16(reinterpretAsUInt8(substring(client_ports, i, 1)) * 256
                              + reinterpretAsUInt8(substring(client_ports, flow_count + i, 1))),
                arrayEnumerate(batch)) AS client_port,
       arrayMap(i -> arrayStringConcat(arrayMap(k -> substring(remote_ips, k * flow_count + i, 1), range(address_width))),
                arrayEnumerate(batch)) AS remote_address,
       direction, state, bytes_sent, bytes_received, segments_sent,
       segments_received, retransmits,
       arrayMap(p -> workload[endpoint_workload[p]], local_endpoint) AS local_name,
       arrayMap(p -> workload[p], remote_workload) AS remote_name,
       unattributed, provenance, retries,
       arrayMap(p -> workload_namespace[endpoint_workload[p]], local_endpoint) AS local_namespace_name,
       arrayMap(p -> workload_instance[endpoint_workload[p]], local_endpoint) AS local_instance_name,
       arrayMap(p -> workload_owner_kind[endpoint_workload[p]], local_endpoint) AS local_owner_kind_name,
       arrayMap(p -> workload_namespace[p], remote_workload) AS remote_namespace_name,
       arrayMap(p -> workload_owner_kind[p], remote_workload) AS remote_owner_kind_name,
       arrayMap(b -> host_names[batch_host_name[b]], batch) AS host,
       rtt_us, rtt_deviation_us;
