-- DuckDB over the Parquet sink's files (docs/operations.md, "Parquet sink"): a view of every
-- complete file, and the dependency graph as clients see it. Replace PARQUET_DIR with the
-- sink's `dir`; files still being written (`.parquet.tmp`) are left out. Exercised by
-- collector/tests/parquet.rs against the sink's real output.

CREATE OR REPLACE VIEW flows AS
SELECT * FROM read_parquet('PARQUET_DIR/flows-*.parquet');

-- One row per (client, server): the workload that opened the connections, the workload that
-- held the remote address at their start (or `unattributed:REASON`), flows and bytes both ways.
CREATE OR REPLACE VIEW dependencies AS
SELECT local_workload AS client,
       coalesce(remote_workload, 'unattributed:' || unattributed) AS server,
       count(*) AS flows,
       sum(bytes_sent + bytes_received) AS bytes
FROM flows
WHERE direction = 'outbound'
GROUP BY ALL;
