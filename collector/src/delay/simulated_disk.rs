//! A disk in memory for the delay buffer's model test, as unkind as a real one is allowed to
//! be (POSIX, and what Linux does after a failed fsync):
//!
//! - written bytes sit in a "page cache" until the file is synced; a crash keeps, sector by
//!   sector, either the synced or the cached version (a torn write), and either length;
//! - names are durable once made: `create` and `remove` sync their directory;
//! - a write can fail after some of its sectors landed, and a failed sync can drop the cached
//!   bytes it did not write (so only rewriting them makes them durable);
//! - a bit can flip at rest.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::files::SegmentFiles;

pub const SECTOR: usize = 512;

#[derive(Debug, Clone, Default)]
struct SimFile {
    cached: Vec<u8>,
    synced: Vec<u8>,
}

#[derive(Debug)]
struct Disk {
    files: BTreeMap<PathBuf, SimFile>,
    rng: fastrand::Rng,
    /// The next this many writes fail (after some of their sectors landed).
    failing_writes: u32,
    /// The next this many syncs fail (dropping some cached sectors).
    failing_syncs: u32,
}

#[derive(Debug, Clone)]
pub struct SimulatedDisk(Rc<RefCell<Disk>>);

fn injected(what: &str) -> io::Error {
    io::Error::other(format!("injected {what} failure"))
}

impl SimulatedDisk {
    pub fn new(seed: u64) -> Self {
        SimulatedDisk(Rc::new(RefCell::new(Disk {
            files: BTreeMap::new(),
            rng: fastrand::Rng::with_seed(seed),
            failing_writes: 0,
            failing_syncs: 0,
        })))
    }

    pub fn fail_writes(&self, count: u32) {
        self.0.borrow_mut().failing_writes = count;
    }

    pub fn fail_syncs(&self, count: u32) {
        self.0.borrow_mut().failing_syncs = count;
    }

    /// Power loss: what was not synced survives sector by sector, or not at all.
    pub fn crash(&self) {
        let mut disk = self.0.borrow_mut();
        let Disk { files, rng, .. } = &mut *disk;
        for file in files.values_mut() {
            let len = if rng.bool() {
                file.cached.len()
            } else {
                file.synced.len()
            };
            let mut survived = vec![0u8; len];
            for (index, sector) in survived.chunks_mut(SECTOR).enumerate() {
                let from = if rng.bool() {
                    &file.cached
                } else {
                    &file.synced
                };
                copy_sector(sector, from, index * SECTOR);
            }
            file.cached = survived.clone();
            file.synced = survived;
        }
        disk.failing_writes = 0;
        disk.failing_syncs = 0;
    }

    /// Flips one bit at `byte` of `path`, at rest (synced and cached alike).
    pub fn flip_bit(&self, path: &Path, byte: usize, bit: u8) {
        let mut disk = self.0.borrow_mut();
        let file = disk
            .files
            .get_mut(path)
            .expect("flipping a bit of a file that exists");
        for bytes in [&mut file.cached, &mut file.synced] {
            if let Some(value) = bytes.get_mut(byte) {
                *value ^= 1 << (bit % 8);
            }
        }
    }

    /// A file's bytes as a read would see them.
    pub fn contents(&self, path: &Path) -> Option<Vec<u8>> {
        self.0
            .borrow()
            .files
            .get(path)
            .map(|file| file.cached.clone())
    }

    pub fn paths(&self) -> Vec<PathBuf> {
        self.0.borrow().files.keys().cloned().collect()
    }
}

/// `sector` becomes `from`'s bytes at `start`, zeros past its end.
fn copy_sector(sector: &mut [u8], from: &[u8], start: usize) {
    let available = from.len().saturating_sub(start).min(sector.len());
    if available > 0 {
        sector[..available].copy_from_slice(&from[start..start + available]);
    }
    sector[available..].fill(0);
}

impl SegmentFiles for SimulatedDisk {
    type File = PathBuf;

    async fn create(&self, path: &Path) -> io::Result<PathBuf> {
        let mut disk = self.0.borrow_mut();
        if disk.files.contains_key(path) {
            return Err(io::Error::from(io::ErrorKind::AlreadyExists));
        }
        // The name is durable at once (create syncs the directory), the file empty.
        disk.files.insert(path.to_owned(), SimFile::default());
        Ok(path.to_owned())
    }

    async fn write_padded(
        &self,
        file: &PathBuf,
        position: u64,
        head: &[u8],
        body: &[u8],
    ) -> io::Result<()> {
        let mut disk = self.0.borrow_mut();
        assert_eq!(
            position as usize % SECTOR,
            0,
            "O_DIRECT writes start at an aligned offset"
        );
        let mut bytes = [head, body].concat();
        bytes.resize(bytes.len().div_ceil(SECTOR) * SECTOR, 0);
        let mut landing = bytes.len();
        let failing = disk.failing_writes > 0;
        if failing {
            disk.failing_writes -= 1;
            landing = disk.rng.usize(0..=bytes.len() / SECTOR) * SECTOR;
        }
        let target = disk
            .files
            .get_mut(file)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let position = position as usize;
        if target.cached.len() < position + landing {
            target.cached.resize(position + landing, 0);
        }
        target.cached[position..position + landing].copy_from_slice(&bytes[..landing]);
        if failing {
            return Err(injected("write"));
        }
        Ok(())
    }

    fn alignment(&self, _: &PathBuf) -> usize {
        SECTOR
    }

    async fn sync(&self, file: &PathBuf) -> io::Result<()> {
        let mut disk = self.0.borrow_mut();
        let failing = disk.failing_syncs > 0;
        if failing {
            disk.failing_syncs -= 1;
            // As Linux may after a failed writeback: the cached pages are marked clean, their
            // bytes lost; a later sync succeeds and says nothing.
            let Disk { files, rng, .. } = &mut *disk;
            let target = files
                .get_mut(file)
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
            let synced = target.synced.clone();
            for (index, sector) in target.cached.chunks_mut(SECTOR).enumerate() {
                if rng.bool() {
                    copy_sector(sector, &synced, index * SECTOR);
                }
            }
            return Err(injected("sync"));
        }
        let target = disk
            .files
            .get_mut(file)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        target.synced = target.cached.clone();
        Ok(())
    }

    async fn truncate(&self, file: &PathBuf, len: u64) -> io::Result<()> {
        let mut disk = self.0.borrow_mut();
        let target = disk
            .files
            .get_mut(file)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        target.cached.resize(len as usize, 0);
        Ok(())
    }

    async fn close(&self, _: PathBuf) -> io::Result<()> {
        Ok(())
    }

    async fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.contents(path)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }

    async fn remove(&self, path: &Path) -> io::Result<()> {
        let mut disk = self.0.borrow_mut();
        disk.files
            .remove(path)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        Ok(())
    }

    async fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut disk = self.0.borrow_mut();
        let file = disk
            .files
            .remove(from)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        disk.files.insert(to.to_owned(), file);
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<(String, u64)>> {
        let disk = self.0.borrow();
        Ok(disk
            .files
            .iter()
            .filter(|(path, _)| path.parent() == Some(dir))
            .filter_map(|(path, file)| {
                Some((
                    path.file_name()?.to_str()?.to_owned(),
                    file.cached.len() as u64,
                ))
            })
            .collect())
    }

    fn cut(&self, path: &Path, len: u64) -> io::Result<()> {
        let mut disk = self.0.borrow_mut();
        let file = disk
            .files
            .get_mut(path)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        file.cached.truncate(len as usize);
        file.synced = file.cached.clone();
        Ok(())
    }
}
