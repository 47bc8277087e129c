//! Registering and unregistering the local addresses a workload owns: what container runtimes
//! and orchestrators call, through the CLI or the local API, as containers start and stop.
//!
//! Both run under the [`RegistryLock`], so the names file and the pinned maps change as one
//! step for every caller, and `unregister` can be a compare-and-delete: an orchestrator that
//! unregisters a container late must not remove the registration of the container that got
//! the address next. The eBPF maps have no compare-and-delete of their own; the lock makes the
//! read and the delete one step, since every writer of the maps takes it.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use flowattr_common::kernel::SharedKey;
use flowattr_common::{CanonicalIp, WorkloadId};

use crate::capture::{CaptureError, WorkloadMaps};
use crate::registry::{RegistryError, RegistryLock};

#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Maps(#[from] CaptureError),
    #[error("{0} with a port: ports are for shared IPv4 host addresses (or IPv4-mapped IPv6)")]
    PortOnIpv6(IpAddr),
}

/// Where the exporter keeps its pinned maps and its state.
#[derive(Debug, Clone)]
pub struct ExporterDirs {
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
}

/// A local address a workload owns: a whole IP, or a port of a shared (NAT64-style) IPv4 host
/// address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LocalAddress {
    Ip(IpAddr),
    Shared(Ipv4Addr, u16),
}

impl LocalAddress {
    pub fn new(ip: IpAddr, port: Option<u16>) -> Result<LocalAddress, RegistrationError> {
        let Some(port) = port else {
            return Ok(LocalAddress::Ip(ip));
        };
        let v4 = match ip {
            IpAddr::V4(ip) => ip,
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .ok_or(RegistrationError::PortOnIpv6(ip))?,
        };
        Ok(LocalAddress::Shared(v4, port))
    }

    fn shared_key(ip: Ipv4Addr, port: u16) -> SharedKey {
        SharedKey {
            ip: ip.octets(),
            port,
            _pad: 0,
        }
    }

    /// The workload `maps` give this address.
    pub(crate) fn held(&self, maps: &WorkloadMaps) -> Result<Option<WorkloadId>, CaptureError> {
        match *self {
            LocalAddress::Ip(ip) => maps.ip(CanonicalIp::from(ip)),
            LocalAddress::Shared(ip, port) => maps.shared(LocalAddress::shared_key(ip, port)),
        }
    }

    pub(crate) fn set(&self, maps: &mut WorkloadMaps, id: WorkloadId) -> Result<(), CaptureError> {
        match *self {
            LocalAddress::Ip(ip) => maps.set_ip(CanonicalIp::from(ip), id),
            LocalAddress::Shared(ip, port) => {
                maps.set_shared(LocalAddress::shared_key(ip, port), id)
            }
        }
    }

    /// True if there was an entry to remove.
    pub(crate) fn remove(&self, maps: &mut WorkloadMaps) -> Result<bool, CaptureError> {
        match *self {
            LocalAddress::Ip(ip) => maps.remove_ip(CanonicalIp::from(ip)),
            LocalAddress::Shared(ip, port) => {
                maps.remove_shared(LocalAddress::shared_key(ip, port))
            }
        }
    }
}

impl From<CanonicalIp> for LocalAddress {
    fn from(ip: CanonicalIp) -> LocalAddress {
        LocalAddress::Ip(ip.to_ip_addr())
    }
}

impl fmt::Display for LocalAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LocalAddress::Ip(ip) => write!(f, "{ip}"),
            LocalAddress::Shared(ip, port) => write!(f, "{ip} port {port}"),
        }
    }
}

/// What `unregister` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unregistered {
    Removed {
        workload: Option<String>,
    },
    /// Nothing held the address: a retried unregister, which is fine.
    NotRegistered,
    /// The address belongs to another workload now (it was re-registered after the one
    /// named); left as it is.
    HeldByAnother {
        holder: Option<String>,
    },
}

impl Unregistered {
    /// One line for the caller.
    pub fn describe(&self, address: &LocalAddress, expected: Option<&str>) -> String {
        // A runtime watcher's entry holds an identity key: its name is what a person reads.
        let name = |key: &Option<String>| {
            key.as_deref()
                .map_or("an unnamed workload", |key| {
                    flowattr_common::WorkloadIdentity::of_checked_key(key).name
                })
                .to_owned()
        };
        match self {
            Unregistered::Removed { workload } => {
                format!("unregistered {address} (was {})", name(workload))
            }
            Unregistered::NotRegistered => format!("{address} was not registered; nothing to do"),
            Unregistered::HeldByAnother { holder } => format!(
                "{address} is registered to {}, not {}; left as it is",
                name(holder),
                expected.unwrap_or("?")
            ),
        }
    }
}

/// Maps `address` to `workload` (replacing any earlier owner): a name given by hand, held to
/// the name rule.
pub fn register(
    dirs: &ExporterDirs,
    address: LocalAddress,
    workload: &str,
) -> Result<WorkloadId, RegistrationError> {
    flowattr_common::check_workload_name(workload).map_err(|problem| RegistryError::BadName {
        name: workload.to_owned(),
        problem,
    })?;
    let mut registry = RegistryLock::acquire(&dirs.state_dir)?;
    let id = registry.id_for(workload)?;
    let mut maps = WorkloadMaps::open(&dirs.pin_dir)?;
    address.set(&mut maps, id)?;
    Ok(id)
}

/// Removes the registration of `address`; with `only_if`, only while it is still that
/// workload's.
pub fn unregister(
    dirs: &ExporterDirs,
    address: LocalAddress,
    only_if: Option<&str>,
) -> Result<Unregistered, RegistrationError> {
    let registry = RegistryLock::acquire(&dirs.state_dir)?;
    let mut maps = WorkloadMaps::open(&dirs.pin_dir)?;
    let Some(held) = address.held(&maps)? else {
        return Ok(Unregistered::NotRegistered);
    };
    let holder = registry.names().name(held).map(str::to_owned);
    if let Some(expected) = only_if
        && holder.as_deref() != Some(expected)
    {
        return Ok(Unregistered::HeldByAnother { holder });
    }
    let removed = address.remove(&mut maps)?;
    Ok(if removed {
        Unregistered::Removed { workload: holder }
    } else {
        Unregistered::NotRegistered
    })
}
