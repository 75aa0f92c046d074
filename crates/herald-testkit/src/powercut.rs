//! A disk that loses power, for crash tests of [`herald_log::EmbeddedLog`].
//!
//! `kill -9` leaves the operating system's page cache alone: everything the log wrote reaches
//! the file whether it was synced or not, so a SIGKILL test never sees a missing fsync. A power
//! cut throws away every write not yet synced. [`PowerCutDisk`] is an in-memory disk that
//! keeps the two apart, like redb's own `tests/crash_consistency.rs`:
//!
//! - the **durable image**, what a completed `sync_data` put on the platter;
//! - the **pending writes** (and length changes) since the last sync, in order, which the
//!   running machine already reads back.
//!
//! [`PowerCutDisk::cut`] (or a fuse armed with [`PowerCutDisk::cut_after`], which fires at
//! an exact write, resize or sync, inside a commit) decides what of the pending writes
//! survives ([`CutMode`]), and turns the machine off: the backends handed out before the cut
//! fail every call from then on, so a log still running on them cannot touch the surviving
//! image. [`PowerCutDisk::backend`] then gives a backend for the next boot, to reopen the log
//! on what survived.
//!
//! ```
//! use herald_core::{Event, Hub, Notification, ObjectChange, Watermark};
//! use herald_log::{AppendOptions, Durability, EmbeddedLog, LogOptions};
//! use herald_testkit::powercut::{CutMode, PowerCutDisk};
//!
//! let disk = PowerCutDisk::new(CutMode::LoseUnsynced, 7);
//! let open = || {
//!     EmbeddedLog::open_with_backend(disk.backend(), "disk", LogOptions::default(), Hub::default())
//!         .unwrap()
//! };
//! let event = || Notification::new("a/1", Event::ObjectCreated(ObjectChange::default()));
//! let log = open();
//! log.append_blocking(vec![event()], AppendOptions::default()).unwrap();
//! let buffered = AppendOptions { durability: Durability::Buffered, ..Default::default() };
//! log.append_blocking(vec![event()], buffered).unwrap();
//! disk.cut();
//! drop(log);
//! let log = open();
//! // The durable append survived; the buffered one, never synced, did not.
//! assert_eq!(log.read_blocking(Watermark(0), 10).unwrap().len(), 1);
//! ```

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use herald_log::StorageBackend;

/// Sectors a torn write is cut into: a disk writes a sector whole or not at all.
pub const SECTOR: u64 = 512;

/// What becomes of the writes not yet synced when the power fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutMode {
    /// All of them are lost: the disk is exactly as the last completed `sync_data` left it.
    /// The plainest power loss, and the one that shows a missing fsync every time.
    LoseUnsynced,
    /// Each of them independently reached the disk or not, in any combination (a later write
    /// may survive where an earlier one is lost), and a write that did may be torn: some of its 512-byte sectors written, the
    /// others not. That is the most a disk may do under the assumptions redb states for its
    /// media (single bytes written whole, no byte outside a write's range changed, writes
    /// durable after `fsync`), with whole sectors rather than single bytes because real disks
    /// write sectors atomically. It exercises redb's recovery of a half-written commit.
    Scramble,
}

/// One change the disk was asked for and has not synced.
#[derive(Clone, Debug)]
enum Pending {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

/// Which I/O call a fuse fired at (the call itself did not happen).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoCall {
    /// A write.
    Write,
    /// A change of length.
    SetLen,
    /// A `sync_data`: every pending write of the commit it would have made durable is exposed.
    Sync,
}

/// What a power cut did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Writes and length changes not yet synced when the power failed (more than zero: the
    /// cut fell inside a commit, between its first write and its sync).
    pub pending: usize,
    /// The bytes those writes carried.
    pub pending_bytes: u64,
    /// How many of them reached the surviving image, whole or torn (always 0 with
    /// [`CutMode::LoseUnsynced`]).
    pub kept: usize,
    /// How many of the kept writes were torn.
    pub torn: usize,
    /// The I/O call a fuse fired at, or `None` for [`PowerCutDisk::cut`].
    pub fuse: Option<IoCall>,
}

/// What the disk has done since it was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskStats {
    /// Calls to `write`.
    pub writes: u64,
    /// Calls to `set_len`.
    pub set_lens: u64,
    /// Calls to `sync_data`.
    pub syncs: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Power cuts.
    pub cuts: u64,
}

impl DiskStats {
    /// The calls a fuse counts: writes, length changes and syncs.
    pub fn io_calls(&self) -> u64 {
        self.writes + self.set_lens + self.syncs
    }
}

/// A small, seeded random generator (SplitMix64): the same seed gives the same cuts, and a
/// test prints its seed so that a red run can be replayed.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        // The modulo bias is far below anything a test could notice.
        self.next_u64() % n
    }

    /// A number in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `percent` / 100.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[derive(Debug)]
struct Disk {
    mode: CutMode,
    rng: SplitMix64,
    /// What survives a cut.
    durable: Vec<u8>,
    /// What the running machine reads: `durable` with `pending` applied.
    live: Vec<u8>,
    pending: Vec<Pending>,
    /// Bumped by every cut; a backend of an earlier boot is dead.
    boot: u64,
    /// I/O calls left before the power fails on its own.
    fuse: Option<u64>,
    stats: DiskStats,
    last_cut: Option<CutReport>,
}

impl Disk {
    fn cut(&mut self, fuse: Option<IoCall>) -> CutReport {
        let mut report = CutReport {
            pending: self.pending.len(),
            pending_bytes: self
                .pending
                .iter()
                .map(|p| match p {
                    Pending::Write { data, .. } => data.len() as u64,
                    Pending::SetLen(_) => 0,
                })
                .sum(),
            fuse,
            ..CutReport::default()
        };
        let pending = std::mem::take(&mut self.pending);
        if self.mode == CutMode::Scramble {
            for p in pending {
                if !self.rng.percent(50) {
                    continue;
                }
                report.kept += 1;
                match p {
                    Pending::SetLen(len) => apply_len(&mut self.durable, len),
                    Pending::Write { offset, data } => {
                        let first = offset / SECTOR;
                        let last = (offset + data.len() as u64).saturating_sub(1) / SECTOR;
                        if first == last || !self.rng.percent(25) {
                            apply_write(&mut self.durable, offset, &data);
                            continue;
                        }
                        report.torn += 1;
                        for sector in first..=last {
                            if self.rng.percent(50) {
                                let start = (sector * SECTOR).max(offset);
                                let end = ((sector + 1) * SECTOR).min(offset + data.len() as u64);
                                let slice =
                                    &data[(start - offset) as usize..(end - offset) as usize];
                                apply_write(&mut self.durable, start, slice);
                            }
                        }
                    }
                }
            }
        }
        self.live = self.durable.clone();
        self.boot += 1;
        self.fuse = None;
        self.stats.cuts += 1;
        self.last_cut = Some(report);
        report
    }

    /// Counts an I/O call against the fuse: `Err` if the power fails at this call.
    fn spend(&mut self, call: IoCall) -> io::Result<()> {
        match &mut self.fuse {
            Some(0) | None => Ok(()),
            Some(left) => {
                *left -= 1;
                if *left == 0 {
                    self.cut(Some(call));
                    Err(power_off())
                } else {
                    Ok(())
                }
            }
        }
    }
}

fn apply_len(image: &mut Vec<u8>, len: u64) {
    image.resize(len as usize, 0);
}

/// Writes like a file: past the end, the file grows.
fn apply_write(image: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let end = offset as usize + data.len();
    if end > image.len() {
        image.resize(end, 0);
    }
    image[offset as usize..end].copy_from_slice(data);
}

fn power_off() -> io::Error {
    io::Error::other("the power is off (simulated power cut)")
}

/// An in-memory disk that can lose power; see the [module docs](self). Cheap to clone: every
/// clone is the same disk, so a test keeps one while the log runs on its backend.
#[derive(Clone, Debug)]
pub struct PowerCutDisk {
    disk: Arc<Mutex<Disk>>,
}

impl PowerCutDisk {
    /// An empty disk; `seed` drives what [`CutMode::Scramble`] keeps.
    pub fn new(mode: CutMode, seed: u64) -> PowerCutDisk {
        PowerCutDisk {
            disk: Arc::new(Mutex::new(Disk {
                mode,
                rng: SplitMix64::new(seed),
                durable: Vec::new(),
                live: Vec::new(),
                pending: Vec::new(),
                boot: 0,
                fuse: None,
                stats: DiskStats::default(),
                last_cut: None,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Disk> {
        self.disk.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A storage backend for the machine as it is now powered. After the next cut it fails
    /// every call; take a new one to reopen the log.
    pub fn backend(&self) -> PowerCutBackend {
        PowerCutBackend {
            disk: self.disk.clone(),
            boot: self.lock().boot,
        }
    }

    /// The power fails now: pending writes are dropped (or scrambled, per the [`CutMode`]) and
    /// every backend handed out so far goes dead.
    pub fn cut(&self) -> CutReport {
        self.lock().cut(None)
    }

    /// Arms a fuse: the power fails at the `calls`-th write, length change or sync from now
    /// (that call fails and does not happen). `0` disarms it.
    pub fn cut_after(&self, calls: u64) {
        self.lock().fuse = (calls > 0).then_some(calls);
    }

    /// The number of cuts so far, by fuse or by [`PowerCutDisk::cut`].
    pub fn cuts(&self) -> u64 {
        self.lock().stats.cuts
    }

    /// What the last cut did.
    pub fn last_cut(&self) -> Option<CutReport> {
        self.lock().last_cut
    }

    /// Counters since the disk was made.
    pub fn stats(&self) -> DiskStats {
        self.lock().stats
    }
}

/// A [`PowerCutDisk`] as redb storage, for one boot of the machine.
#[derive(Debug)]
pub struct PowerCutBackend {
    disk: Arc<Mutex<Disk>>,
    boot: u64,
}

impl PowerCutBackend {
    /// The disk, if the power has not failed since this backend was made.
    fn powered(&self) -> io::Result<MutexGuard<'_, Disk>> {
        let disk = self.disk.lock().unwrap_or_else(|e| e.into_inner());
        if disk.boot == self.boot {
            Ok(disk)
        } else {
            Err(power_off())
        }
    }
}

impl StorageBackend for PowerCutBackend {
    fn len(&self) -> io::Result<u64> {
        Ok(self.powered()?.live.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let disk = self.powered()?;
        let start = offset as usize;
        let bytes = disk
            .live
            .get(start..start + out.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        out.copy_from_slice(bytes);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut disk = self.powered()?;
        disk.spend(IoCall::SetLen)?;
        disk.stats.set_lens += 1;
        apply_len(&mut disk.live, len);
        disk.pending.push(Pending::SetLen(len));
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut disk = self.powered()?;
        disk.spend(IoCall::Sync)?;
        disk.stats.syncs += 1;
        let disk = &mut *disk;
        for p in disk.pending.drain(..) {
            match p {
                Pending::Write { offset, data } => apply_write(&mut disk.durable, offset, &data),
                Pending::SetLen(len) => apply_len(&mut disk.durable, len),
            }
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut disk = self.powered()?;
        disk.spend(IoCall::Write)?;
        disk.stats.writes += 1;
        disk.stats.bytes_written += data.len() as u64;
        apply_write(&mut disk.live, offset, data);
        disk.pending.push(Pending::Write {
            offset,
            data: data.to_vec(),
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_loses_exactly_the_unsynced_writes() {
        let disk = PowerCutDisk::new(CutMode::LoseUnsynced, 1);
        let b = disk.backend();
        b.write(0, b"durable").unwrap();
        b.sync_data().unwrap();
        b.write(0, b"DUR").unwrap();
        b.set_len(100).unwrap();
        let report = disk.cut();
        assert_eq!((report.pending, report.kept), (2, 0));
        assert!(b.len().is_err(), "the old boot must be dead");
        let b = disk.backend();
        assert_eq!(b.len().unwrap(), 7);
        let mut out = [0; 7];
        b.read(0, &mut out).unwrap();
        assert_eq!(&out, b"durable");
    }

    #[test]
    fn a_fuse_fires_at_the_chosen_call_and_that_call_does_not_happen() {
        let disk = PowerCutDisk::new(CutMode::LoseUnsynced, 1);
        let b = disk.backend();
        disk.cut_after(3);
        b.write(0, b"a").unwrap();
        b.sync_data().unwrap();
        assert!(b.write(1, b"b").is_err());
        assert_eq!(disk.last_cut().unwrap().fuse, Some(IoCall::Write));
        assert_eq!(disk.backend().len().unwrap(), 1);
    }

    #[test]
    fn scramble_keeps_only_bytes_that_were_written() {
        for seed in 0..200 {
            let disk = PowerCutDisk::new(CutMode::Scramble, seed);
            let b = disk.backend();
            b.set_len(4 * SECTOR).unwrap();
            b.sync_data().unwrap();
            b.write(0, &[1; 4 * SECTOR as usize]).unwrap();
            b.write(SECTOR, &[2; SECTOR as usize]).unwrap();
            disk.cut();
            let b = disk.backend();
            let mut image = vec![0; 4 * SECTOR as usize];
            b.read(0, &mut image).unwrap();
            for sector in image.chunks(SECTOR as usize) {
                // Whole sectors, each old or written by one of the writes.
                assert!(sector.iter().all(|&x| x == sector[0]));
                assert!(sector[0] <= 2);
            }
        }
    }
}
