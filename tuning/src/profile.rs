//! What one collector node's machine offers. Built-in profiles carry the provider's published
//! figures (AWS, as of 2026); users add their own in TOML; "this-machine" is read off the
//! host the planner runs on.

use std::path::Path;

use serde::{Deserialize, Serialize};

const GIB: f64 = (1u64 << 30) as f64;
/// Bytes per second in a gigabit per second.
const GBPS: f64 = 1e9 / 8.0;
const MB: f64 = 1e6;
const GB: f64 = 1e9;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub name: String,
    pub vcpus: u32,
    pub memory_bytes: f64,
    /// Sustained network bandwidth in each direction (in and out at once, as AWS publishes
    /// it), bytes/s (infinite: not a limit).
    pub network_bytes_per_second: f64,
    pub network_burst_bytes_per_second: f64,
    /// Sustained bandwidth of the delay buffer's disk (reads and writes together), bytes/s.
    pub disk_bytes_per_second: f64,
    pub disk_burst_bytes_per_second: f64,
    /// Space for the delay buffer.
    pub disk_bytes: f64,
    /// Where the figures come from.
    pub source: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    profile: Vec<ProfileText>,
}

/// A profile as users write it: in GiB, Gbit/s and MB/s.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileText {
    name: String,
    vcpus: u32,
    memory_gib: f64,
    network_gbps: f64,
    network_burst_gbps: Option<f64>,
    disk_mb_per_second: f64,
    disk_burst_mb_per_second: Option<f64>,
    disk_gb: f64,
    #[serde(default)]
    source: Option<String>,
}

/// The EBS volume size assumed where the profile's disk is EBS (gp3; `--disk-gb` changes it).
pub const DEFAULT_EBS_GB: f64 = 500.0;

pub fn builtin() -> Vec<Profile> {
    let aws = |name: &str,
               vcpus,
               memory_gib: f64,
               network: f64,
               network_burst: f64,
               disk_mb: f64,
               disk_burst_mb: f64,
               disk_gb: f64,
               source: &str| Profile {
        name: name.to_owned(),
        vcpus,
        memory_bytes: memory_gib * GIB,
        network_bytes_per_second: network * GBPS,
        network_burst_bytes_per_second: network_burst * GBPS,
        disk_bytes_per_second: disk_mb * MB,
        disk_burst_bytes_per_second: disk_burst_mb * MB,
        disk_bytes: disk_gb * GB,
        source: source.to_owned(),
    };
    vec![
        aws(
            "c7i.2xlarge",
            8,
            16.0,
            3.125,
            12.5,
            312.5,
            1250.0,
            DEFAULT_EBS_GB,
            "AWS: 8 vCPU, 16 GiB, network 3.125 Gbit/s baseline (12.5 burst), EBS 312.5 MB/s baseline (1,250 burst); 500 GB gp3 assumed",
        ),
        aws(
            "c7i.4xlarge",
            16,
            32.0,
            6.25,
            12.5,
            625.0,
            1250.0,
            DEFAULT_EBS_GB,
            "AWS: 16 vCPU, 32 GiB, network 6.25 Gbit/s baseline (12.5 burst), EBS 625 MB/s baseline (1,250 burst); 500 GB gp3 assumed",
        ),
        // Instance store: AWS publishes 4 KiB IOPS (67,083 random writes/s), not sequential
        // bandwidth; 67,083 x 4 KiB is the floor used here.
        aws(
            "c6id.2xlarge",
            8,
            16.0,
            3.125,
            12.5,
            274.8,
            274.8,
            474.0,
            "AWS: 8 vCPU, 16 GiB, network 3.125 Gbit/s baseline (12.5 burst), local NVMe 474 GB; disk bandwidth from the published 67,083 random-write IOPS x 4 KiB (a floor)",
        ),
    ]
}

/// The host this runs on: its CPUs and memory, the disk ceiling the calibration measured (the
/// default calibration was measured here), the free space where the planner runs; loopback is
/// no network limit.
pub fn this_machine(disk_ceiling: f64, dir: &Path) -> Profile {
    let vcpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let memory_bytes = memory_bytes().unwrap_or(0.0);
    let disk_bytes = free_bytes(dir).unwrap_or(0.0);
    Profile {
        name: "this-machine".into(),
        vcpus,
        memory_bytes,
        network_bytes_per_second: f64::INFINITY,
        network_burst_bytes_per_second: f64::INFINITY,
        disk_bytes_per_second: disk_ceiling,
        disk_burst_bytes_per_second: disk_ceiling,
        disk_bytes,
        source: format!(
            "probed: {vcpus} CPUs, /proc/meminfo, free space of {}, the calibration's disk ceiling; one machine has no network limit",
            dir.display()
        ),
    }
}

/// This machine's memory (MemTotal of /proc/meminfo).
pub fn memory_bytes() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|line| line.starts_with("MemTotal:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? * 1024.0)
}

fn free_bytes(dir: &Path) -> Option<f64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string and `stats` a buffer statvfs fills on success.
    let stats = unsafe {
        if libc::statvfs(path.as_ptr(), stats.as_mut_ptr()) != 0 {
            return None;
        }
        stats.assume_init()
    };
    Some(stats.f_bavail as f64 * stats.f_frsize as f64)
}

/// Profiles from a user's TOML file (`[[profile]]` tables in GiB, Gbit/s, MB/s and GB).
pub fn from_file(path: &Path) -> Result<Vec<Profile>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| format!("cannot read profiles {}: {error}", path.display()))?;
    parse(&text).map_err(|error| format!("profiles {}: {error}", path.display()))
}

pub fn parse(text: &str) -> Result<Vec<Profile>, String> {
    let file: ProfileFile = toml::from_str(text).map_err(|error| error.to_string())?;
    file.profile
        .into_iter()
        .map(|p| {
            let positive = [p.memory_gib, p.network_gbps, p.disk_mb_per_second, p.disk_gb];
            if p.vcpus == 0 || positive.iter().any(|value| !(value.is_finite() && *value > 0.0)) {
                return Err(format!("profile {}: vcpus, memory_gib, network_gbps, disk_mb_per_second and disk_gb must be positive", p.name));
            }
            Ok(Profile {
                source: p.source.unwrap_or_else(|| "user profile".into()),
                name: p.name,
                vcpus: p.vcpus,
                memory_bytes: p.memory_gib * GIB,
                network_bytes_per_second: p.network_gbps * GBPS,
                network_burst_bytes_per_second: p.network_burst_gbps.unwrap_or(p.network_gbps) * GBPS,
                disk_bytes_per_second: p.disk_mb_per_second * MB,
                disk_burst_bytes_per_second: p.disk_burst_mb_per_second.unwrap_or(p.disk_mb_per_second) * MB,
                disk_bytes: p.disk_gb * GB,
            })
        })
        .collect()
}
