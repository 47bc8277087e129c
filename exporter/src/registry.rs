//! Workload names and their ids. The eBPF maps store small ids (fixed-size values); the names
//! live in a file of `id name` lines in the exporter's state directory, so both survive
//! restarts as the pinned maps do.
//!
//! Orchestrators start containers in parallel, so registrations race: several `register`
//! processes and the agent's local API at once. Every change to the names file or the pinned
//! maps happens under [`RegistryLock`], an exclusive `flock` on a lock file beside the names,
//! and the names file is only ever replaced whole (written to a temporary file, synced, renamed
//! over, directory synced): an id is never given to two names, and a reader (the agent) sees
//! the old file or the new one, never a torn line.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use flowattr_common::{NameProblem, WorkloadId, check_identity_key};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("workload registry {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "workload registry {path} line {line}: {reason}. Fix that line (`ID NAME`, ids from 1, each id and name once) or delete it; addresses registered under a deleted id report no workload until they are registered again"
    )]
    Corrupt {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("workload name `{}` {problem}", .name.escape_debug())]
    BadName { name: String, problem: NameProblem },
    #[error("workload registry {path} is full: no id left")]
    Full { path: PathBuf },
}

/// Id 0 means "unknown" in the eBPF maps; names get ids from 1.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WorkloadNames {
    by_id: BTreeMap<u32, String>,
}

const FILE: &str = "workloads";
const LOCK_FILE: &str = "registry.lock";

impl WorkloadNames {
    /// Reads `<dir>/workloads`; a missing file is an empty registry. Any line that is not a
    /// well-formed `id name`, an id given twice or a name given twice is an error naming the
    /// line: the ids in the pinned maps mean nothing without a trustworthy file.
    pub fn load(dir: &Path) -> Result<WorkloadNames, RegistryError> {
        let path = dir.join(FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => return Err(RegistryError::Io { path, source }),
        };
        let mut by_id = BTreeMap::new();
        let mut lines_of_names: BTreeMap<&str, usize> = BTreeMap::new();
        for (index, line) in text.lines().enumerate() {
            let corrupt = |reason: String| RegistryError::Corrupt {
                path: path.clone(),
                line: index + 1,
                reason,
            };
            let (id, name) = line
                .split_once(' ')
                .ok_or_else(|| corrupt("not `id name`".into()))?;
            let id: u32 = id
                .parse()
                .map_err(|_| corrupt("the id is not a number".into()))?;
            if id == 0 {
                return Err(corrupt("id 0 is reserved for unknown".into()));
            }
            check_identity_key(name).map_err(|problem| corrupt(format!("the name {problem}")))?;
            if let Some(first) = lines_of_names.insert(name, index + 1) {
                return Err(corrupt(format!("the name is already on line {first}")));
            }
            if by_id.insert(id, name.to_owned()).is_some() {
                return Err(corrupt(format!("id {id} is given to a second name")));
            }
        }
        Ok(WorkloadNames { by_id })
    }

    pub fn name(&self, id: WorkloadId) -> Option<&str> {
        self.by_id.get(&id.get()).map(String::as_str)
    }

    pub fn id_of(&self, name: &str) -> Option<WorkloadId> {
        self.by_id
            .iter()
            .find(|(_, known)| *known == name)
            .map(|(&id, _)| WorkloadId::new(id))
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// The exclusive right to change the registry (names file and pinned maps), held until
/// dropped. The names are read after the lock is taken, so they are current for its holder.
pub struct RegistryLock {
    _lock: File,
    dir: PathBuf,
    names: WorkloadNames,
}

impl RegistryLock {
    /// Waits for every other holder (another process, or another request of the local API).
    pub fn acquire(dir: &Path) -> Result<RegistryLock, RegistryError> {
        let path = dir.join(LOCK_FILE);
        let io = |source| RegistryError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io)?;
        // flock, not fcntl locks: it excludes other open file descriptions in this process
        // too (the local API and a CLI call can run in one test process), and the kernel
        // drops it when the holder dies, so a killed `register` never wedges the registry.
        loop {
            // SAFETY: a valid open descriptor for the duration of the call.
            if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } == 0 {
                break;
            }
            let error = std::io::Error::last_os_error();
            if error.kind() != std::io::ErrorKind::Interrupted {
                return Err(io(error));
            }
        }
        let names = WorkloadNames::load(dir)?;
        Ok(RegistryLock {
            _lock: lock,
            dir: dir.to_owned(),
            names,
        })
    }

    pub fn names(&self) -> &WorkloadNames {
        &self.names
    }

    /// The id of `name` (a workload name, or the identity key a runtime watcher makes), adding
    /// it to the names file if it is new.
    pub fn id_for(&mut self, name: &str) -> Result<WorkloadId, RegistryError> {
        check_identity_key(name).map_err(|problem| RegistryError::BadName {
            name: name.to_owned(),
            problem,
        })?;
        if let Some(id) = self.names.id_of(name) {
            return Ok(id);
        }
        let path = self.dir.join(FILE);
        let next = match self.names.by_id.keys().next_back() {
            None => 1,
            Some(&last) => last
                .checked_add(1)
                .ok_or(RegistryError::Full { path: path.clone() })?,
        };
        let mut names = self.names.clone();
        names.by_id.insert(next, name.to_owned());
        let mut text = String::new();
        for (id, name) in &names.by_id {
            text.push_str(&format!("{id} {name}\n"));
        }
        flowattr_common::durable::replace_file(&path, text.as_bytes())
            .map_err(|source| RegistryError::Io { path, source })?;
        self.names = names;
        Ok(WorkloadId::new(next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_get_stable_ids_that_survive_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let mut registry = RegistryLock::acquire(dir).unwrap();
        let api = registry.id_for("api").unwrap();
        let db = registry.id_for("db with spaces").unwrap();
        assert_eq!(registry.id_for("api").unwrap(), api);
        assert_ne!(api, db);
        assert_ne!(api.get(), 0);
        drop(registry);
        let reloaded = WorkloadNames::load(dir).unwrap();
        assert_eq!(reloaded.name(db), Some("db with spaces"));
        assert_eq!(reloaded.len(), 2);
    }

    #[test]
    fn bad_names_are_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut registry = RegistryLock::acquire(dir.path()).unwrap();
        for name in ["", "bad\tname", "two\nlines", &"x".repeat(256)] {
            let error = registry.id_for(name).unwrap_err();
            assert!(matches!(error, RegistryError::BadName { .. }), "{error}");
        }
        assert!(!dir.path().join(FILE).exists());
    }

    #[test]
    fn a_damaged_file_names_its_line_and_the_way_out() {
        let dir = tempfile::tempdir().unwrap();
        for (text, line, reason) in [
            ("x api\n", 1, "not a number"),
            ("1 api\n0 db\n", 2, "reserved"),
            ("1 api\n2 db\n2 cache\n", 3, "second name"),
            ("1 api\n2 api\n", 2, "already on line 1"),
            ("1 api\n2 db\n3", 3, "not `id name`"),
            ("1 a\tb\n", 1, "control character"),
        ] {
            std::fs::write(dir.path().join(FILE), text).unwrap();
            let error = WorkloadNames::load(dir.path()).unwrap_err();
            let message = error.to_string();
            assert!(
                matches!(error, RegistryError::Corrupt { line: l, .. } if l == line),
                "{text:?}: {message}"
            );
            assert!(
                message.contains(reason) && message.contains("Fix that line"),
                "{message}"
            );
            assert!(RegistryLock::acquire(dir.path()).is_err());
        }
    }

    #[test]
    fn threads_registering_at_once_never_share_an_id() {
        let dir = tempfile::tempdir().unwrap();
        let threads: Vec<_> = (0..16)
            .map(|thread| {
                let dir = dir.path().to_owned();
                std::thread::spawn(move || {
                    (0..20)
                        .map(|i| {
                            let name = format!("w{}", (thread * 20 + i) % 200);
                            (
                                name.clone(),
                                RegistryLock::acquire(&dir).unwrap().id_for(&name).unwrap(),
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut given = BTreeMap::new();
        for thread in threads {
            for (name, id) in thread.join().unwrap() {
                assert_eq!(
                    *given.entry(name.clone()).or_insert(id),
                    id,
                    "{name} got two ids"
                );
            }
        }
        let names_after = WorkloadNames::load(dir.path()).unwrap();
        assert_eq!(names_after.len(), given.len());
        for (name, id) in given {
            assert_eq!(names_after.name(id), Some(name.as_str()));
        }
    }
}
