//! Parquet files: one row per flow, columns typed, workload names dictionary-encoded (each
//! batch carries its names once; the file stores each distinct name once per column chunk).
//! The schema is in docs/operations.md.
//!
//! A file is written under a hidden temporary name (`.flows-….parquet.tmp`) and renamed to
//! `flows-….parquet` once complete (past `max_file_bytes`, or `max_file_age` after it opened),
//! so readers never see a partial file. Until then its rows are not durable: a Parquet file
//! without its footer cannot be read. Each write therefore returns the number of the file it
//! went into, and the flows' delay-buffer segment is deleted only once that file is complete
//! ([`ParquetSink::complete_through`]). Temporary files left by a crash are removed at start:
//! their flows' segments were never deleted, and are written again. A file that cannot be
//! written or completed (a full disk) stops the node for the same replay ([`stop_node`]).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arrow_array::types::{Int8Type, UInt32Type};
use arrow_array::{
    ArrayRef, BinaryArray, DictionaryArray, Int8Array, RecordBatch, StringArray,
    TimestampNanosecondArray, UInt8Array, UInt16Array, UInt32Array, UInt64Array,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use flowattr_common::{CanonicalIp, Direction, FlowState, RoundTrip, WorkloadIdentity};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

use super::record::{EmittedBatch, Provenance, RemoteName, direction_name, ip_bytes, state_name};
use crate::ownership::Reason;

/// Rows per row group: large enough for good compression and column statistics, small enough
/// that the rows buffered before a row group is flushed stay a few tens of MB.
const ROW_GROUP_ROWS: usize = 256 * 1024;

pub(super) struct ParquetSink {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    max_file_bytes: u64,
    max_file_age: Duration,
    schema: SchemaRef,
    properties: WriterProperties,
    open: Mutex<Option<OpenFile>>,
    /// Every file numbered up to this one is complete (files complete in order).
    complete_through: AtomicU64,
    next_number: AtomicU64,
    /// Distinguishes this run's files from an earlier run's in the same directory.
    run: u64,
}

struct OpenFile {
    writer: ArrowWriter<File>,
    number: u64,
    temporary: PathBuf,
    opened: Instant,
}

impl ParquetSink {
    pub(super) fn open(
        dir: &Path,
        max_file_bytes: u64,
        max_file_age: Duration,
    ) -> std::io::Result<ParquetSink> {
        std::fs::create_dir_all(dir)?;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".flows-") && name.ends_with(".parquet.tmp") {
                std::fs::remove_file(entry.path())?;
            }
        }
        let inner = Arc::new(Inner {
            dir: dir.to_owned(),
            max_file_bytes,
            max_file_age,
            schema: schema(),
            properties: writer_properties(),
            open: Mutex::new(None),
            complete_through: AtomicU64::new(0),
            next_number: AtomicU64::new(1),
            run: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_nanos() as u64),
        });
        // Completes files by age when no write comes to do it; ends with the sink.
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("flowattr-parquet".into())
            .spawn(move || complete_by_age(weak))?;
        Ok(ParquetSink { inner })
    }

    /// Adds `batch`'s rows to the open file (opening one if needed), completing it if it has
    /// grown past its size. Returns the file's number: its rows are durable once
    /// [`Self::complete_through`] reaches it.
    pub(super) fn write(&self, batch: &EmittedBatch) -> Result<u64, String> {
        let rows = record_batch(&self.inner.schema, batch).map_err(|error| error.to_string())?;
        let mut open = self.inner.lock();
        if open.is_none() {
            *open = Some(self.inner.open_file().map_err(|error| {
                format!("opening a file in {}: {error}", self.inner.dir.display())
            })?);
        }
        let file = open.as_mut().expect("opened above");
        let number = file.number;
        if let Err(error) = file.writer.write(&rows) {
            stop_node(&format!("writing {}", file.temporary.display()), error);
        }
        let size = file.writer.bytes_written() + file.writer.in_progress_size();
        if size as u64 >= self.inner.max_file_bytes {
            self.inner.complete(&mut open);
        }
        Ok(number)
    }

    /// Every file numbered up to this is complete.
    pub(super) fn complete_through(&self) -> u64 {
        self.inner.complete_through.load(Ordering::Acquire)
    }
}

impl Drop for ParquetSink {
    /// A node that stops completes its open file, so nothing waits for the next start.
    fn drop(&mut self) {
        let mut open = self.inner.lock();
        self.inner.complete(&mut open);
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<OpenFile>> {
        self.open
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn open_file(&self) -> std::io::Result<OpenFile> {
        let number = self.next_number.fetch_add(1, Ordering::Relaxed);
        let temporary = self
            .dir
            .join(format!(".flows-{}-{number:06}.parquet.tmp", self.run));
        let file = File::create(&temporary)?;
        let writer = ArrowWriter::try_new(file, self.schema.clone(), Some(self.properties.clone()))
            .map_err(std::io::Error::other)?;
        Ok(OpenFile {
            writer,
            number,
            temporary,
            opened: Instant::now(),
        })
    }

    /// Writes the open file's footer, syncs it, renames it to its final name and syncs the
    /// directory: then, and only then, its rows count as written.
    fn complete(&self, open: &mut Option<OpenFile>) {
        let Some(file) = open.take() else { return };
        let final_path = self
            .dir
            .join(format!("flows-{}-{:06}.parquet", self.run, file.number));
        let result = (|| -> std::io::Result<()> {
            let inner = file.writer.into_inner().map_err(std::io::Error::other)?;
            inner.sync_all()?;
            std::fs::rename(&file.temporary, &final_path)?;
            File::open(&self.dir)?.sync_all()
        })();
        match result {
            Ok(()) => self.complete_through.store(file.number, Ordering::Release),
            Err(error) => stop_node(&format!("completing {}", final_path.display()), error),
        }
    }
}

/// A file that cannot be written or completed holds rows of earlier writes that were already
/// reported done; the next file's completion would count for them too, and their segments would
/// be deleted with their rows in no file. Only the replay at start writes them again (their
/// segments are still on disk, and the temporary file is removed then), so the node stops here,
/// as a crash would. A full disk therefore stops the node until there is room, losing nothing.
fn stop_node(what: &str, error: impl std::fmt::Display) -> ! {
    tracing::error!(
        "parquet sink: {what}: {error}; stopping: the flows of this file are written again from the delay buffer when the node starts"
    );
    std::process::exit(75)
}

fn complete_by_age(inner: Weak<Inner>) {
    loop {
        let Some(inner) = inner.upgrade() else { return };
        let tick =
            (inner.max_file_age / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        {
            let mut open = inner.lock();
            if open
                .as_ref()
                .is_some_and(|file| file.opened.elapsed() >= inner.max_file_age)
            {
                inner.complete(&mut open);
            }
        }
        drop(inner);
        std::thread::sleep(tick);
    }
}

/// Dictionary encoding only where values repeat (names and labels): on addresses, ports,
/// times and counters the encoder would hash every value into a dictionary it then abandons
/// for being too large, which cost a third of the node's CPU when it was on everywhere.
fn writer_properties() -> WriterProperties {
    let dictionary_columns = [
        "direction",
        "state",
        "local_workload",
        "local_namespace",
        "local_instance",
        "local_owner_kind",
        "remote_workload",
        "remote_namespace",
        "remote_owner_kind",
        "unattributed",
        "provenance",
        "host_name",
        "region",
    ];
    dictionary_columns
        .into_iter()
        .fold(
            WriterProperties::builder().set_dictionary_enabled(false),
            |builder, column| builder.set_column_dictionary_enabled(ColumnPath::from(column), true),
        )
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(1).expect("a valid level"),
        ))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .build()
}

fn schema() -> SchemaRef {
    let names = || DataType::Dictionary(Box::new(DataType::UInt32), Box::new(DataType::Utf8));
    let label = || DataType::Dictionary(Box::new(DataType::Int8), Box::new(DataType::Utf8));
    let time = || DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("exporter", DataType::UInt64, false),
        Field::new("sequence", DataType::UInt64, false),
        Field::new("index", DataType::UInt32, false),
        Field::new("start", time(), false),
        Field::new("end", time(), false),
        Field::new("local_ip", DataType::Binary, false),
        Field::new("local_port", DataType::UInt16, false),
        Field::new("remote_ip", DataType::Binary, false),
        Field::new("remote_port", DataType::UInt16, false),
        Field::new("direction", label(), false),
        Field::new("state", label(), false),
        Field::new("bytes_sent", DataType::UInt64, false),
        Field::new("bytes_received", DataType::UInt64, false),
        Field::new("segments_sent", DataType::UInt32, false),
        Field::new("segments_received", DataType::UInt32, false),
        Field::new("retransmits", DataType::UInt32, false),
        Field::new("local_workload", names(), true),
        Field::new("remote_workload", names(), true),
        Field::new("unattributed", label(), true),
        Field::new("provenance", label(), true),
        Field::new("retries", DataType::UInt8, false),
        Field::new("local_namespace", names(), true),
        Field::new("local_instance", names(), true),
        Field::new("local_owner_kind", names(), true),
        Field::new("remote_namespace", names(), true),
        Field::new("remote_owner_kind", names(), true),
        Field::new("host_name", names(), true),
        Field::new("region", names(), true),
        Field::new("rtt_us", DataType::UInt32, true),
        Field::new("rtt_deviation_us", DataType::UInt32, true),
    ]))
}

/// The values of the provenance column, in the order its keys index them.
const PROVENANCES: [&str; 3] = ["heartbeat", "event", "forwarded"];

fn record_batch(
    schema: &SchemaRef,
    batch: &EmittedBatch,
) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let flows = batch.flows();
    let column = |values: Vec<u64>| Arc::new(UInt64Array::from(values)) as ArrayRef;
    let u32s = |values: Vec<u32>| Arc::new(UInt32Array::from(values)) as ArrayRef;
    let ports = |values: Vec<u16>| Arc::new(UInt16Array::from(values)) as ArrayRef;
    let round_trips = |part: fn(RoundTrip) -> u32| {
        Arc::new(UInt32Array::from_iter(
            flows.iter().map(|flow| flow.flow.round_trip.map(part)),
        )) as ArrayRef
    };
    let time = |values: Vec<i64>| {
        Arc::new(TimestampNanosecondArray::from(values).with_timezone("UTC")) as ArrayRef
    };
    let ips = |ip: fn(&super::EmittedFlow) -> CanonicalIp| {
        Arc::new(BinaryArray::from_iter_values(
            flows.iter().map(|flow| ip_bytes(ip(flow))),
        )) as ArrayRef
    };
    let label =
        |keys: Vec<Option<i8>>, values: &[&str]| -> Result<ArrayRef, arrow_schema::ArrowError> {
            let values = Arc::new(StringArray::from(values.to_vec())) as ArrayRef;
            Ok(Arc::new(DictionaryArray::<Int8Type>::try_new(
                Int8Array::from(keys),
                values,
            )?))
        };
    let dictionary =
        |keys: Vec<Option<u32>>, values: ArrayRef| -> Result<ArrayRef, arrow_schema::ArrowError> {
            Ok(Arc::new(DictionaryArray::<UInt32Type>::try_new(
                UInt32Array::from(keys),
                values,
            )?))
        };
    // One column per identity field, keyed by the batch's identities; a field the identity
    // lacks is null.
    let identities: Vec<WorkloadIdentity<'_>> = (0..batch.identity_count())
        .map(|index| batch.identity(index))
        .collect();
    let local_keys: Vec<Option<u32>> = flows.iter().map(|flow| flow.flow.local_workload).collect();
    let remote_keys: Vec<Option<u32>> = flows
        .iter()
        .map(|flow| match flow.remote {
            RemoteName::Workload { name, .. } => Some(name),
            RemoteName::Unattributed(_) => None,
        })
        .collect();
    let identity_field =
        |keys: &[Option<u32>], field: for<'a> fn(&WorkloadIdentity<'a>) -> &'a str| {
            let values =
                Arc::new(StringArray::from_iter_values(identities.iter().map(field))) as ArrayRef;
            let keys = keys
                .iter()
                .map(|key| key.filter(|&key| !field(&identities[key as usize]).is_empty()))
                .collect();
            dictionary(keys, values)
        };
    let host_names = Arc::new(StringArray::from_iter_values(
        batch.host_names().iter().map(|host| &**host),
    )) as ArrayRef;
    let region = Arc::new(StringArray::from_iter_values(batch.region())) as ArrayRef;
    let region_key = batch.region().map(|_| 0);
    let columns: Vec<ArrayRef> = vec![
        column(flows.iter().map(|flow| flow.exporter).collect()),
        column(flows.iter().map(|flow| flow.sequence).collect()),
        u32s(flows.iter().map(|flow| flow.flow.index).collect()),
        time(
            flows
                .iter()
                .map(|flow| flow.flow.start.as_nanos() as i64)
                .collect(),
        ),
        time(
            flows
                .iter()
                .map(|flow| flow.flow.end.as_nanos() as i64)
                .collect(),
        ),
        ips(|flow| flow.flow.local_ip),
        ports(flows.iter().map(|flow| flow.flow.local_port).collect()),
        ips(|flow| flow.flow.remote_ip),
        ports(flows.iter().map(|flow| flow.flow.remote_port).collect()),
        label(
            flows
                .iter()
                .map(|flow| Some(i8::from(flow.flow.direction == Direction::Inbound)))
                .collect(),
            &[
                direction_name(Direction::Outbound),
                direction_name(Direction::Inbound),
            ],
        )?,
        label(
            flows
                .iter()
                .map(|flow| Some(i8::from(flow.flow.state == FlowState::Closed)))
                .collect(),
            &[state_name(FlowState::Open), state_name(FlowState::Closed)],
        )?,
        column(flows.iter().map(|flow| flow.flow.bytes_sent).collect()),
        column(flows.iter().map(|flow| flow.flow.bytes_received).collect()),
        u32s(flows.iter().map(|flow| flow.flow.segments_sent).collect()),
        u32s(
            flows
                .iter()
                .map(|flow| flow.flow.segments_received)
                .collect(),
        ),
        u32s(flows.iter().map(|flow| flow.flow.retransmits).collect()),
        identity_field(&local_keys, |identity| identity.name)?,
        identity_field(&remote_keys, |identity| identity.name)?,
        label(
            flows
                .iter()
                .map(|flow| match flow.remote {
                    RemoteName::Unattributed(reason) => Some(
                        Reason::ALL
                            .iter()
                            .position(|known| *known == reason)
                            .expect("listed") as i8,
                    ),
                    RemoteName::Workload { .. } => None,
                })
                .collect(),
            &Reason::ALL.map(Reason::as_str),
        )?,
        label(
            flows
                .iter()
                .map(|flow| match flow.remote {
                    RemoteName::Workload { provenance, .. } => Some(match provenance {
                        Provenance::Heartbeat => 0,
                        Provenance::Event => 1,
                        Provenance::Forwarded => 2,
                    }),
                    RemoteName::Unattributed(_) => None,
                })
                .collect(),
            &PROVENANCES,
        )?,
        Arc::new(UInt8Array::from(
            flows
                .iter()
                .map(|flow| flow.flow.retries)
                .collect::<Vec<_>>(),
        )),
        identity_field(&local_keys, |identity| identity.namespace)?,
        identity_field(&local_keys, |identity| identity.instance)?,
        identity_field(&local_keys, |identity| identity.owner_kind)?,
        identity_field(&remote_keys, |identity| identity.namespace)?,
        identity_field(&remote_keys, |identity| identity.owner_kind)?,
        dictionary(
            flows.iter().map(|flow| flow.host_name).collect(),
            host_names,
        )?,
        dictionary(vec![region_key; flows.len()], region)?,
        round_trips(|trip| trip.smoothed_us),
        round_trips(|trip| trip.deviation_us),
    ];
    RecordBatch::try_new(schema.clone(), columns)
}
