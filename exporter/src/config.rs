//! The exporter's settings file. `run`, `register` and `unregister` read the same file (and
//! the same environment variables), so a container runtime's hook that calls `register` finds
//! the pin and state directories of the running agent without repeating flags on every call.
//! Precedence: flag, then environment variable, then this file, then the built-in default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flowattr_common::collector_address::CollectorAddresses;
use serde::Deserialize;

/// Where the file is looked for when neither `--config` nor `FLOWATTR_EXPORTER_CONFIG` names
/// one; a missing file at this path is not an error.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/flowattr/exporter.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/flowattr-exporter";
pub const DEFAULT_API_SOCKET: &str = "/run/flowattr-exporter.sock";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the exporter config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("exporter config {path}: {message}")]
    Parse { path: PathBuf, message: String },
}

/// Every key is optional; a key absent here falls back to the built-in default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub pin_dir: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    /// The local API's Unix socket.
    pub api_socket: Option<PathBuf>,
    /// A group whose members may use the local API besides root.
    pub api_group: Option<String>,
    /// `"host:7400"`, `"a:7400,b:7400"` or `["a:7400", "b:7400"]`: collectors to fail over between.
    pub collector: Option<CollectorAddresses>,
    #[serde(default, with = "optional_duration")]
    pub interval: Option<Duration>,
    pub exporter_id: Option<u64>,
    pub region: Option<String>,
    /// This host's name in every output record (`--host-name`).
    pub host_name: Option<String>,
    pub host_identity: Option<PathBuf>,
    pub memory_batches: Option<usize>,
    pub spool_batches: Option<usize>,
    /// How batches travel to the collector (`--wire-compression`).
    pub wire_compression: Option<WireCompression>,
    /// Metrics over TCP (read-only unless `tcp_api`).
    pub http_listen: Option<SocketAddr>,
    pub tcp_api: Option<bool>,
    /// Mutual TLS with the collector (the `--tls-*` flags).
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_server_name: Option<String>,
    /// Workload names from the host's container runtime (`[identity]`).
    pub identity: Option<IdentityFile>,
}

/// How the exporter frames its batches for the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WireCompression {
    /// zstd: about a quarter of the bytes of a plain frame (collectors from this release on).
    #[default]
    Zstd,
    /// Plain archives, for collectors older than this release.
    None,
}

/// `[identity]`: the container runtime whose containers name local addresses.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFile {
    /// `"docker"` or `"cri"`.
    pub runtime: Option<crate::platform::Runtime>,
    /// The runtime's API socket [default: the runtime's own].
    pub socket: Option<PathBuf>,
    /// How a container's workload name is made (see `platform::name_template`).
    pub name_template: Option<String>,
    /// With `cri`: the node's pod address ranges [default: the CNI configuration's].
    pub pod_cidrs: Option<Vec<ipnet::IpNet>>,
}

impl ConfigFile {
    /// Reads `explicit`, or the default path if a file is there, or nothing.
    pub fn load(explicit: Option<&Path>) -> Result<ConfigFile, ConfigError> {
        let path = match explicit {
            Some(path) => path,
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => Path::new(DEFAULT_CONFIG_PATH),
            None => return Ok(ConfigFile::default()),
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|error| ConfigError::Parse {
            path: path.to_owned(),
            message: error.to_string(),
        })
    }
}

mod optional_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text).map(Some).map_err(|error| {
            serde::de::Error::custom(format!(
                "`{text}` is not a duration ({error}); write e.g. \"60s\""
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_parses_and_unknown_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exporter.toml");
        std::fs::write(
            &path,
            "pin_dir = \"/sys/fs/bpf/x\"\ninterval = \"30s\"\napi_group = \"docker\"\n",
        )
        .unwrap();
        let file = ConfigFile::load(Some(&path)).unwrap();
        assert_eq!(file.pin_dir.as_deref(), Some(Path::new("/sys/fs/bpf/x")));
        assert_eq!(file.interval, Some(Duration::from_secs(30)));
        assert_eq!(file.api_group.as_deref(), Some("docker"));
        std::fs::write(&path, "pin_dri = \"/x\"\n").unwrap();
        let error = ConfigFile::load(Some(&path)).unwrap_err().to_string();
        assert!(error.contains("pin_dri"), "{error}");
        std::fs::write(&path, "interval = \"often\"\n").unwrap();
        let error = ConfigFile::load(Some(&path)).unwrap_err().to_string();
        assert!(error.contains("often"), "{error}");
        assert!(ConfigFile::load(Some(&dir.path().join("missing.toml"))).is_err());
        std::fs::write(
            &path,
            "[identity]\nruntime = \"docker\"\nname_template = \"{name}\"\n",
        )
        .unwrap();
        let identity = ConfigFile::load(Some(&path)).unwrap().identity.unwrap();
        assert_eq!(identity.runtime, Some(crate::platform::Runtime::Docker));
        std::fs::write(&path, "[identity]\nruntime = \"podman\"\n").unwrap();
        let error = ConfigFile::load(Some(&path)).unwrap_err().to_string();
        assert!(
            error.contains("podman") && error.contains("docker"),
            "{error}"
        );
    }
}
