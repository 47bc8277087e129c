//! Workload names and their ids. The eBPF maps store small ids (fixed-size values); the names
//! live in a file in the exporter's state directory, appended by `register` and reread by the
//! agent, so both survive restarts as the pinned maps do.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use flowattr_common::WorkloadId;
use flowattr_common::wire::WORKLOAD_NAME_BYTES_MAX;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("workload registry {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("workload registry {path} line {line}: {reason}")]
    Corrupt {
        path: PathBuf,
        line: usize,
        reason: &'static str,
    },
    #[error("workload name `{0}` is empty, longer than 255 bytes, or holds a newline")]
    BadName(String),
}

/// Id 0 means "unknown" in the eBPF maps; names get ids from 1.
#[derive(Debug, Default, Clone)]
pub struct WorkloadNames {
    by_id: BTreeMap<u32, String>,
}

const FILE: &str = "workloads";

impl WorkloadNames {
    /// Reads `<dir>/workloads`; a missing file is an empty registry.
    pub fn load(dir: &Path) -> Result<WorkloadNames, RegistryError> {
        let path = dir.join(FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => return Err(RegistryError::Io { path, source }),
        };
        let mut by_id = BTreeMap::new();
        for (index, line) in text.lines().enumerate() {
            let corrupt = |reason| RegistryError::Corrupt {
                path: path.clone(),
                line: index + 1,
                reason,
            };
            let (id, name) = line.split_once(' ').ok_or_else(|| corrupt("not `id name`"))?;
            let id: u32 = id.parse().map_err(|_| corrupt("id is not a number"))?;
            if id == 0 {
                return Err(corrupt("id 0 is reserved for unknown"));
            }
            by_id.insert(id, name.to_owned());
        }
        Ok(WorkloadNames { by_id })
    }

    pub fn name(&self, id: WorkloadId) -> Option<&str> {
        self.by_id.get(&id.get()).map(String::as_str)
    }

    /// The id of `name`, adding it to the file in `dir` if it is new.
    pub fn id_for(&mut self, dir: &Path, name: &str) -> Result<WorkloadId, RegistryError> {
        if name.is_empty() || name.len() > WORKLOAD_NAME_BYTES_MAX || name.contains('\n') {
            return Err(RegistryError::BadName(name.to_owned()));
        }
        if let Some((&id, _)) = self.by_id.iter().find(|(_, known)| *known == name) {
            return Ok(WorkloadId::new(id));
        }
        let id = self.by_id.keys().next_back().map_or(1, |last| last + 1);
        let path = dir.join(FILE);
        let io = |source| RegistryError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        writeln!(file, "{id} {name}").map_err(io)?;
        file.sync_data().map_err(io)?;
        self.by_id.insert(id, name.to_owned());
        Ok(WorkloadId::new(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_get_stable_ids_that_survive_a_reload() {
        let dir = std::env::temp_dir().join(format!("flowattr-registry-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut names = WorkloadNames::load(&dir).unwrap();
        let api = names.id_for(&dir, "api").unwrap();
        let db = names.id_for(&dir, "db with spaces").unwrap();
        assert_eq!(names.id_for(&dir, "api").unwrap(), api);
        assert_ne!(api, db);
        assert_ne!(api.get(), 0);
        let reloaded = WorkloadNames::load(&dir).unwrap();
        assert_eq!(reloaded.name(db), Some("db with spaces"));
        assert!(names.id_for(&dir, "").is_err());
        std::fs::write(dir.join(FILE), "x api\n").unwrap();
        assert!(matches!(WorkloadNames::load(&dir), Err(RegistryError::Corrupt { line: 1, .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
