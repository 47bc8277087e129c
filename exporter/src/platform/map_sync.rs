//! Keeps the eBPF maps (IP -> workload, and (host IPv4, port) -> workload for containers on the
//! host's network) in step with the runtime's containers, beside whatever `register` put there
//! by hand.
//!
//! Every change takes the [`RegistryLock`], as `register` does. The watcher remembers which
//! entries it wrote (`platform-registrations` in the state directory, so a restarted agent
//! still knows them): it replaces or deletes only those. An entry it did not write is a manual
//! registration; that wins, and is reported, never overwritten.

use std::collections::BTreeMap;
use std::path::PathBuf;

use flowattr_common::WorkloadId;

use crate::capture::WorkloadMaps;
use crate::registration::{ExporterDirs, LocalAddress, RegistrationError};
use crate::registry::{RegistryError, RegistryLock};

const RECORD_FILE: &str = "platform-registrations";

/// What registering an address for a container did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registered {
    Set,
    /// A registration made by hand holds the address: kept.
    ManualKept {
        holder: Option<String>,
    },
}

#[derive(Debug)]
pub struct MapSync {
    dirs: ExporterDirs,
    /// The entries this watcher wrote: address -> the id it wrote.
    written: BTreeMap<LocalAddress, WorkloadId>,
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
            let Some((address, id)) = line
                .split_once(' ')
                .and_then(|(address, id)| Some((parse_address(address)?, id.parse::<u32>().ok()?)))
            else {
                return Err(RegistryError::Corrupt {
                    path,
                    line: index + 1,
                    reason: "not `IP ID` or `IPv4:PORT ID`".into(),
                }
                .into());
            };
            written.insert(address, WorkloadId::new(id));
        }
        Ok(MapSync {
            dirs: dirs.clone(),
            written,
        })
    }

    /// Maps `address` to `workload`, unless a manual registration holds it.
    pub fn register(
        &mut self,
        address: LocalAddress,
        workload: &str,
    ) -> Result<Registered, RegistrationError> {
        let mut registry = RegistryLock::acquire(&self.dirs.state_dir)?;
        let mut maps = WorkloadMaps::open(&self.dirs.pin_dir)?;
        if let Some(held) = address.held(&maps)?
            && self.written.get(&address) != Some(&held)
        {
            return Ok(Registered::ManualKept {
                holder: registry.names().name(held).map(str::to_owned),
            });
        }
        let id = registry.id_for(workload)?;
        address.set(&mut maps, id)?;
        if self.written.insert(address, id) != Some(id) {
            self.save()?;
        }
        Ok(Registered::Set)
    }

    /// Removes the entry for `address` if it is still the one this watcher wrote (compare and
    /// delete); true if it removed one.
    pub fn unregister(&mut self, address: LocalAddress) -> Result<bool, RegistrationError> {
        let _registry = RegistryLock::acquire(&self.dirs.state_dir)?;
        let Some(written) = self.written.remove(&address) else {
            return Ok(false);
        };
        let mut maps = WorkloadMaps::open(&self.dirs.pin_dir)?;
        let removed = address.held(&maps)? == Some(written) && address.remove(&mut maps)?;
        self.save()?;
        Ok(removed)
    }

    /// The addresses this watcher wrote entries for.
    pub fn written(&self) -> impl Iterator<Item = LocalAddress> + '_ {
        self.written.keys().copied()
    }

    /// Called under the registry lock.
    fn save(&self) -> Result<(), RegistryError> {
        let path: PathBuf = self.dirs.state_dir.join(RECORD_FILE);
        let mut text = String::new();
        for (address, id) in &self.written {
            match address {
                LocalAddress::Ip(ip) => text.push_str(&format!("{ip} {}\n", id.get())),
                LocalAddress::Shared(ip, port) => {
                    text.push_str(&format!("{ip}:{port} {}\n", id.get()))
                }
            }
        }
        flowattr_common::durable::replace_file(&path, text.as_bytes())
            .map_err(|source| RegistryError::Io { path, source })
    }
}

/// `IP` (a whole address) or `IPv4:PORT` (a port of a shared host address), as [`MapSync::save`]
/// writes them.
fn parse_address(text: &str) -> Option<LocalAddress> {
    if let Ok(socket) = text.parse::<std::net::SocketAddrV4>() {
        return Some(LocalAddress::Shared(*socket.ip(), socket.port()));
    }
    text.parse::<std::net::IpAddr>()
        .ok()
        .map(|ip| LocalAddress::Ip(ip.to_canonical()))
}
