//! What one flow, one IP and one heartbeat cost, as measured by `flowattr-bench calibrate` on a
//! real node. The planner multiplies these; it holds no per-flow constant of its own. The file
//! committed at `tuning/calibration.toml` names the command and the machine that produced it.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The committed default, measured on the project's machine (see its `[measured]` table).
pub const DEFAULT: &str = include_str!("../calibration.toml");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    pub measured: Measured,
    /// Collector CPU seconds per million flows through the whole pipeline (ingest, delay
    /// buffer, attribution, the sink's encoding and writes), by sink.
    pub cpu_seconds_per_million_flows: BTreeMap<String, f64>,
    /// The steady offered rate each sink's CPU figure was measured at (flows/s), for the
    /// record: the planner assumes the cost per flow holds at any rate a node sustains.
    #[serde(default)]
    pub offered_flows_per_second: BTreeMap<String, f64>,
    /// Bytes the sink writes per flow, by sink; for Kafka, what it sends the brokers after
    /// compression.
    pub sink_bytes_per_flow: BTreeMap<String, f64>,
    /// Bytes of the ingest protocol per flow (framing and archive, batches of the measured size).
    pub wire_bytes_per_flow: f64,
    /// Delay buffer bytes per flow (blocks and dictionaries); each is written once and read once.
    pub delay_bytes_per_flow: f64,
    /// Ownership map memory per IP with evidence (its key and first segment).
    pub ownership_bytes_per_ip: f64,
    /// Ownership map memory per further segment of an IP (one per reassignment held).
    pub ownership_bytes_per_segment: f64,
    /// Broadcast bytes per learned range (one per IP and owner change a node learns in a
    /// publish interval).
    pub broadcast_bytes_per_range: f64,
    /// Resident memory of an idle node, per shard (executor, buffers, channels).
    pub node_base_bytes_per_shard: f64,
    /// The measuring machine's disk, O_DIRECT writes (what the delay buffer does).
    pub disk_ceiling_bytes_per_second: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Measured {
    /// The command that produced the file.
    pub command: String,
    /// The machine: CPU model, cores, memory, disk.
    pub machine: String,
    pub date: String,
    /// The collector commit measured.
    pub commit: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CalibrationError {
    #[error("cannot read calibration {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("calibration {path}: {message}")]
    Parse { path: String, message: String },
    #[error("calibration {path}: {message}")]
    Invalid { path: String, message: String },
}

impl Calibration {
    pub fn from_file(path: &Path) -> Result<Calibration, CalibrationError> {
        let text = std::fs::read_to_string(path).map_err(|source| CalibrationError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Calibration::parse(&text, &path.display().to_string())
    }

    pub fn default_measured() -> Calibration {
        Calibration::parse(DEFAULT, "tuning/calibration.toml")
            .expect("the committed calibration is valid")
    }

    pub fn parse(text: &str, name: &str) -> Result<Calibration, CalibrationError> {
        let calibration: Calibration =
            toml::from_str(text).map_err(|error| CalibrationError::Parse {
                path: name.to_owned(),
                message: error.to_string(),
            })?;
        calibration
            .check()
            .map_err(|message| CalibrationError::Invalid {
                path: name.to_owned(),
                message,
            })?;
        Ok(calibration)
    }

    /// Every cost must be a positive, finite number: a zero cost would plan infinite capacity.
    fn check(&self) -> Result<(), String> {
        let scalars = [
            ("wire_bytes_per_flow", self.wire_bytes_per_flow),
            ("delay_bytes_per_flow", self.delay_bytes_per_flow),
            ("ownership_bytes_per_ip", self.ownership_bytes_per_ip),
            (
                "ownership_bytes_per_segment",
                self.ownership_bytes_per_segment,
            ),
            ("broadcast_bytes_per_range", self.broadcast_bytes_per_range),
            ("node_base_bytes_per_shard", self.node_base_bytes_per_shard),
            (
                "disk_ceiling_bytes_per_second",
                self.disk_ceiling_bytes_per_second,
            ),
        ];
        let cpu = self
            .cpu_seconds_per_million_flows
            .iter()
            .map(|(sink, value)| (sink.as_str(), *value));
        for (name, value) in scalars.into_iter().chain(cpu) {
            if !(value.is_finite() && value > 0.0) {
                return Err(format!(
                    "`{name}` is {value}: every figure must be a positive number"
                ));
            }
        }
        // A sink may write nothing (discard), never less.
        for (sink, value) in &self.sink_bytes_per_flow {
            if !(value.is_finite() && *value >= 0.0) {
                return Err(format!(
                    "`sink_bytes_per_flow.{sink}` is {value}: it must be a number of bytes, 0 or more"
                ));
            }
        }
        if let Some(sink) = self
            .sinks()
            .into_iter()
            .find(|sink| !self.sink_bytes_per_flow.contains_key(*sink))
        {
            return Err(format!(
                "sink `{sink}` has a CPU figure but no `sink_bytes_per_flow`"
            ));
        }
        if self.cpu_seconds_per_million_flows.is_empty() {
            return Err("no sink has a CPU figure".into());
        }
        Ok(())
    }

    pub fn sinks(&self) -> Vec<&str> {
        self.cpu_seconds_per_million_flows
            .keys()
            .map(String::as_str)
            .collect()
    }
}
