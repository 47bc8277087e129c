//! Keeps the eBPF IP -> workload map in step with the runtime's containers, beside whatever
//! `register` put there by hand.
//!
//! Every change takes the [`RegistryLock`], as `register` does. The watcher remembers which
//! entries it wrote (`platform-registrations` in the state directory, so a restarted agent
//! still knows them): it replaces or deletes only those. An entry it did not write is a manual
//! registration; that wins, and is reported, never overwritten.

use std::collections::BTreeMap;
use std::path::PathBuf;

use flowattr_common::{CanonicalIp, WorkloadId};

use crate::capture::WorkloadMaps;
use crate::registration::{ExporterDirs, RegistrationError};
use crate::registry::{RegistryError, RegistryLock};

const RECORD_FILE: &str = "platform-registrations";

/// What registering an address for a container did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registered {
    Set,
    /// A registration made by hand holds the address: kept.
    ManualKept { holder: Option<String> },
}

#[derive(Debug)]
pub struct MapSync {
    dirs: ExporterDirs,
    /// The entries this watcher wrote: address -> the id it wrote.
    written: BTreeMap<CanonicalIp, WorkloadId>,
}

impl MapSync {
    pub fn open(dirs: &ExporterDirs) -> Result<MapSync, RegistrationError> {
        let _lock = RegistryLock::acquire(&dirs.state_dir)?;
        let path = dirs.state_dir.join(RECORD_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => return Err(RegistryError::Io { path, source }.into()),
        };
        let mut written = BTreeMap::new();
        for (index, line) in text.lines().enumerate() {
            let parsed = line
                .split_once(' ')
                .and_then(|(ip, id)| Some((ip.parse::<std::net::IpAddr>().ok()?, id.parse::<u32>().ok()?)));
            let Some((ip, id)) = parsed else {
                return Err(RegistryError::Corrupt {
                    path,
                    line: index + 1,
                    reason: "not `IP ID`".into(),
                }
                .into());
            };
            written.insert(CanonicalIp::from(ip), WorkloadId::new(id));
        }
        Ok(MapSync {
            dirs: dirs.clone(),
            written,
        })
    }

    /// Maps `ip` to `workload`, unless a manual registration holds it.
    pub fn register(&mut self, ip: CanonicalIp, workload: &str) -> Result<Registered, RegistrationError> {
        let mut registry = RegistryLock::acquire(&self.dirs.state_dir)?;
        let mut maps = WorkloadMaps::open(&self.dirs.pin_dir)?;
        let held = maps.ip(ip)?;
        if let Some(held) = held
            && self.written.get(&ip) != Some(&held)
        {
            return Ok(Registered::ManualKept {
                holder: registry.names().name(held).map(str::to_owned),
            });
        }
        let id = registry.id_for(workload)?;
        maps.set_ip(ip, id)?;
        if self.written.insert(ip, id) != Some(id) {
            self.save()?;
        }
        Ok(Registered::Set)
    }

    /// Removes the entry for `ip` if it is still the one this watcher wrote (compare and
    /// delete); true if it removed one.
    pub fn unregister(&mut self, ip: CanonicalIp) -> Result<bool, RegistrationError> {
        let _registry = RegistryLock::acquire(&self.dirs.state_dir)?;
        let Some(written) = self.written.remove(&ip) else { return Ok(false) };
        let mut maps = WorkloadMaps::open(&self.dirs.pin_dir)?;
        let removed = maps.ip(ip)? == Some(written) && maps.remove_ip(ip)?;
        self.save()?;
        Ok(removed)
    }

    /// The addresses this watcher wrote entries for.
    pub fn written(&self) -> impl Iterator<Item = CanonicalIp> + '_ {
        self.written.keys().copied()
    }

    /// Called under the registry lock.
    fn save(&self) -> Result<(), RegistryError> {
        let path: PathBuf = self.dirs.state_dir.join(RECORD_FILE);
        let mut text = String::new();
        for (ip, id) in &self.written {
            text.push_str(&format!("{} {}\n", ip.to_ip_addr(), id.get()));
        }
        flowattr_common::durable::replace_file(&path, text.as_bytes()).map_err(|source| RegistryError::Io { path, source })
    }
}
