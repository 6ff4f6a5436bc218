//! The simulated disks: one model for both worlds (the discrete-event
//! [`crate::World`] and the turmoil adapter), after TigerBeetle's
//! `testing/storage.zig`.
//!
//! [`MemDisk`] holds the clients' files in memory and carries out the
//! engine's [`DiskOp`]s the way a driver would, but each takes a random time
//! (so results come back in any order, and now and then after a stall), and
//! it injects faults: a crash tears the writes in flight (each dropped,
//! done, or done in part), a full disk refuses to allocate or write, a read
//! fails, and a chunk stored at rest rots. What it keeps survives a client
//! crash: part files and sidecars stay for the resume. It decides nothing
//! about chunks: hash jobs are run as they are ([`shoal_core::client::verify::HashJob::run`]), and core
//! compares.
//!
//! [`TrackerLog`] is a tracker's durable log: records appended since the
//! last sync are lost in a crash, and lazy ones are never synced on their own.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use shoal_core::chunk::{FileHasher, Sha1Digest, CHUNK_SIZE};
use shoal_core::client::disk::{resolve, DiskDone, DiskOp, OpenedPart, PartPaths, PathKind};
use shoal_core::client::verify::HashChain;
use shoal_core::client::DownloadId;
use shoal_core::rng::Rng;
use shoal_core::time::Millis;
use shoal_core::tracker::Persist;

use crate::pieces::{Pool, Stored};

/// How a [`MemDisk`] behaves.
#[derive(Clone, Copy, Debug)]
pub struct DiskConfig {
    pub min_latency: Millis,
    pub max_latency: Millis,
    /// One operation in this many stalls for several times the latency.
    pub stall_one_in: u64,
    /// One read in this many fails (0: never).
    pub read_fault_one_in: u64,
}

impl Default for DiskConfig {
    fn default() -> Self {
        DiskConfig { min_latency: Millis(1), max_latency: Millis(10), stall_one_in: 8, read_fault_one_in: 0 }
    }
}

/// What happened to one download's files, for the invariants.
#[derive(Clone, Debug, Default)]
pub struct PartRecord {
    /// Chunks whose write completed, by index.
    pub written: BTreeSet<u32>,
    /// Chunks whose read failed since the part was last opened (a resume
    /// may then fetch them again).
    pub read_failed: BTreeSet<u32>,
    /// Chunks whose bytes were damaged at rest since they were written.
    pub rotted: BTreeSet<u32>,
}

struct Pending {
    host: usize,
    op: DiskOp,
}

/// Clients' files in memory, with latency and faults; see the module docs.
pub struct MemDisk {
    cfg: DiskConfig,
    rng: Rng,
    files: BTreeMap<String, Stored>,
    /// The pieces the files share.
    pool: Pool,
    dirs: BTreeSet<String>,
    /// Open part files, by host and download.
    open: BTreeMap<(usize, DownloadId), PartPaths>,
    pending: BTreeMap<(Millis, u64), Pending>,
    next: u64,
    full: BTreeSet<usize>,
    records: BTreeMap<String, PartRecord>,
    chains: BTreeMap<(usize, DownloadId), HashChain>,
    /// How many faults of each kind struck.
    pub counts: BTreeMap<&'static str, u64>,
}

impl MemDisk {
    pub fn new(cfg: DiskConfig, seed: u64) -> MemDisk {
        MemDisk {
            cfg,
            rng: Rng::from_u64(seed),
            files: BTreeMap::new(),
            pool: Pool::default(),
            dirs: BTreeSet::new(),
            open: BTreeMap::new(),
            pending: BTreeMap::new(),
            next: 0,
            full: BTreeSet::new(),
            records: BTreeMap::new(),
            chains: BTreeMap::new(),
            counts: BTreeMap::new(),
        }
    }

    fn count(&mut self, what: &'static str) {
        *self.counts.entry(what).or_default() += 1;
    }

    // ---- files ----

    /// Puts a file on the disk (and its directories).
    pub fn write_file(&mut self, path: &str, content: &[u8]) {
        if let Some((dir, _)) = path.rsplit_once('/') {
            self.mkdir(dir);
        }
        let stored = Stored::new(content, &mut self.pool);
        self.files.insert(path.to_string(), stored);
    }

    /// `content` as the disk would store it (its pieces shared with the
    /// files that hold the same bytes).
    pub fn store(&mut self, content: &[u8]) -> Stored {
        Stored::new(content, &mut self.pool)
    }

    /// Makes a directory (and its parents).
    pub fn mkdir(&mut self, path: &str) {
        let mut p = path.trim_end_matches('/');
        while !p.is_empty() {
            self.dirs.insert(p.to_string());
            p = p.rsplit_once('/').map_or("", |(d, _)| d);
        }
    }

    /// A file's bytes (a copy).
    pub fn file(&self, path: &str) -> Option<Vec<u8>> {
        self.files.get(path).map(Stored::to_vec)
    }

    /// A file's bytes, as stored.
    pub fn stored(&self, path: &str) -> Option<&Stored> {
        self.files.get(path)
    }

    /// Bytes `range` of a file, if it holds them all.
    pub fn read(&self, path: &str, range: std::ops::Range<usize>) -> Option<Cow<'_, [u8]>> {
        self.files.get(path)?.get(range)
    }

    /// Flips the bits of `mask` in byte `at` of a file (a fault).
    pub fn damage(&mut self, path: &str, at: usize, mask: u8) {
        if let Some(f) = self.files.get_mut(path) {
            f.xor(at, mask);
        }
    }

    pub fn probe(&self, p: &str) -> PathKind {
        let p = p.trim_end_matches('/');
        if p.is_empty() || self.dirs.contains(p) {
            PathKind::Dir
        } else if self.files.contains_key(p) {
            PathKind::Other
        } else {
            PathKind::Missing
        }
    }

    /// The part file a host's download has open.
    pub fn part_of(&self, host: usize, id: DownloadId) -> Option<&PartPaths> {
        self.open.get(&(host, id))
    }

    /// The download of `host` whose part file is at `path`, if one has it open.
    pub fn download_at(&self, host: usize, path: &str) -> Option<DownloadId> {
        self.open.iter().find(|((h, _), p)| *h == host && p.part == path).map(|((_, id), _)| *id)
    }

    /// What happened to the part file at `path`.
    pub fn record(&self, path: &str) -> Option<&PartRecord> {
        self.records.get(path)
    }

    // ---- faults ----

    /// Host `host`'s disk is full (or no longer).
    pub fn set_full(&mut self, host: usize, full: bool) {
        if full {
            self.count("disk full");
            self.full.insert(host);
        } else {
            self.full.remove(&host);
        }
    }

    /// Host `host` crashed: its operations in flight are lost, or done, or
    /// (writes) done in part; its files stay.
    pub fn crash(&mut self, host: usize) {
        let mine: Vec<(Millis, u64)> = self.pending.iter().filter(|(_, p)| p.host == host).map(|(k, _)| *k).collect();
        for k in mine {
            let p = self.pending.remove(&k).expect("listed");
            match self.rng.below(3) {
                0 => {}
                1 => drop(self.perform(p.host, p.op)),
                _ => self.tear(p.host, p.op),
            }
        }
        self.open.retain(|(h, _), _| *h != host);
        self.chains.retain(|(h, _), _| *h != host);
    }

    /// Host `host` lost power: as [`MemDisk::crash`], and besides, writes
    /// that had completed but were not yet on the platter are gone: some of
    /// the chunks its part files hold revert to zeros while the sidecar that
    /// counts them may have made it (the part files are never fsynced; the
    /// resume's re-check is what catches this).
    pub fn power_loss(&mut self, host: usize) {
        let open: Vec<String> =
            self.open.iter().filter(|((h, _), _)| *h == host).map(|(_, p)| p.part.clone()).collect();
        self.crash(host);
        self.count("power loss");
        for path in open {
            let Some(r) = self.records.get(&path) else { continue };
            let lost: Vec<u32> = r.written.iter().copied().filter(|_| self.rng.below(3) == 0).collect();
            let Some(f) = self.files.get_mut(&path) else { continue };
            for &c in &lost {
                let at = c as usize * CHUNK_SIZE as usize;
                let end = (at + CHUNK_SIZE as usize).min(f.len());
                if at < end {
                    f.write_at(at, &vec![0; end - at], &mut self.pool);
                }
            }
            if let Some(r) = self.records.get_mut(&path) {
                for c in lost {
                    r.written.remove(&c);
                    *self.counts.entry("chunk lost to power loss").or_default() += 1;
                }
            }
        }
    }

    /// A write in flight at a crash, done in part.
    fn tear(&mut self, host: usize, op: DiskOp) {
        let (path, at, bytes) = match op {
            DiskOp::Write { id, chunk, data } => {
                let Some(p) = self.open.get(&(host, id)) else { return };
                (p.part.clone(), chunk as usize * CHUNK_SIZE as usize, data)
            }
            DiskOp::SaveState { id, offset, bytes } => {
                let Some(p) = self.open.get(&(host, id)).map(|p| p.state.clone()) else { return };
                self.count("torn sidecar");
                (p, offset as usize, bytes)
            }
            _ => return,
        };
        let cut = self.rng.below(bytes.len() as u64 + 1) as usize;
        if let Some(f) = self.files.get_mut(&path) {
            f.write_at(at, &bytes[..cut], &mut self.pool);
        }
        self.count("torn write");
    }

    /// Damages one stored chunk of a part file no download has open (bit rot
    /// at rest, found by the resume's re-check); false if there is none.
    pub fn rot_a_chunk(&mut self) -> bool {
        let open: BTreeSet<&String> = self.open.values().map(|p| &p.part).collect();
        let candidates: Vec<(String, u32)> = self
            .records
            .iter()
            .filter(|(path, _)| !open.contains(path) && self.files.contains_key(*path))
            .flat_map(|(path, r)| r.written.iter().map(move |c| (path.clone(), *c)))
            .collect();
        if candidates.is_empty() {
            return false;
        }
        let (path, c) = candidates[self.rng.below(candidates.len() as u64) as usize].clone();
        let at = c as usize * CHUNK_SIZE as usize;
        let Some(f) = self.files.get_mut(&path) else { return false };
        if at >= f.len() {
            return false;
        }
        f.xor(at, 0x5a);
        self.records.entry(path).or_default().rotted.insert(c);
        self.count("rotted chunk");
        true
    }

    // ---- operations ----

    fn latency(&mut self) -> Millis {
        let c = self.cfg;
        let span = c.max_latency.0.saturating_sub(c.min_latency.0) + 1;
        let lag = Millis(c.min_latency.0 + self.rng.below(span));
        if c.stall_one_in > 0 && self.rng.below(c.stall_one_in) == 0 {
            lag.plus(Millis(c.max_latency.0.saturating_mul(6)))
        } else {
            lag
        }
    }

    /// Queues `op` of host `host`; it completes a random while later. Hash
    /// jobs are run now, in the order handed out (they continue each other's
    /// whole-file hash), and come back a random while later.
    pub fn submit(&mut self, host: usize, mut op: DiskOp, now: Millis) {
        if let DiskOp::Hash { id, job } = &mut op {
            job.run(self.chains.entry((host, *id)).or_default());
        }
        let at = now.plus(self.latency());
        self.next += 1;
        self.pending.insert((at, self.next), Pending { host, op });
    }

    /// When the next queued operation completes.
    pub fn next_due(&self) -> Option<Millis> {
        self.pending.keys().next().map(|(at, _)| *at)
    }

    /// Completes the next operation due by `now`: its host and its result
    /// (none for a hint or a close).
    pub fn complete(&mut self, now: Millis) -> Option<(usize, Option<DiskDone>)> {
        let (&key, _) = self.pending.iter().next().filter(|((at, _), _)| *at <= now)?;
        let p = self.pending.remove(&key).expect("peeked");
        let host = p.host;
        Some((host, self.perform(host, p.op)))
    }

    fn perform(&mut self, host: usize, op: DiskOp) -> Option<DiskDone> {
        let at = |chunk: u32| chunk as usize * CHUNK_SIZE as usize;
        let full = self.full.contains(&host);
        Some(match op {
            DiskOp::HashFile { job, path } => {
                let result = match self.files.get(&path) {
                    Some(d) => {
                        let mut h = FileHasher::new();
                        d.pieces().try_for_each(|p| h.update(p)).and_then(|()| h.finish()).map_err(|e| e.to_string())
                    }
                    None => Err("No such file or directory".into()),
                };
                DiskDone::FileHashed { job, result }
            }
            DiskOp::OpenPart { id, dest, name, size } => {
                let result = resolve(&dest, &name, |p| self.probe(p)).and_then(|paths| {
                    let fresh = !self.files.contains_key(&paths.part);
                    if full && (fresh || self.files[&paths.part].len() < size as usize) {
                        self.count("refused for space");
                        return Err(format!("not enough disk space for {} ({size} bytes)", paths.part));
                    }
                    self.files.entry(paths.part.clone()).or_default().resize(size as usize, &mut self.pool);
                    let state = self.files.entry(paths.state.clone()).or_default().to_vec();
                    if !fresh {
                        self.count("resume");
                    }
                    let r = self.records.entry(paths.part.clone()).or_default();
                    if fresh {
                        *r = PartRecord::default();
                    }
                    r.read_failed.clear();
                    self.open.insert((host, id), paths.clone());
                    Ok(OpenedPart { paths, state })
                });
                DiskDone::PartOpened { id, result }
            }
            DiskOp::Read { id, chunk, mut buf } => {
                let fault = self.cfg.read_fault_one_in > 0 && self.rng.below(self.cfg.read_fault_one_in) == 0;
                let part = self.open.get(&(host, id)).map(|p| p.part.clone());
                let result = match part.as_ref().and_then(|p| self.files.get(p)) {
                    _ if fault => Err("Input/output error".to_string()),
                    Some(f) => f
                        .get(at(chunk)..at(chunk) + buf.len())
                        .map(|b| buf.copy_from_slice(&b))
                        .ok_or_else(|| "short read".to_string()),
                    None => Err("short read".to_string()),
                };
                if fault {
                    self.count("read fault");
                    if let Some(p) = part {
                        self.records.entry(p).or_default().read_failed.insert(chunk);
                    }
                }
                DiskDone::Read { id, chunk, buf, result }
            }
            // Run when submitted.
            DiskOp::Hash { id, job } => DiskDone::Hashed { id, job },
            DiskOp::Write { id, chunk, data } => {
                let part = self.open.get(&(host, id)).map(|p| p.part.clone());
                let result = match part.as_ref().and_then(|p| self.files.get_mut(p)) {
                    // The part file's blocks were reserved when it opened.
                    Some(f) if f.len() >= at(chunk) + data.len() => {
                        f.write_at(at(chunk), &data, &mut self.pool);
                        Ok(())
                    }
                    Some(_) => Err("write past the end of the part file".to_string()),
                    None => Err("the part file is not open".to_string()),
                };
                if let (Ok(()), Some(p)) = (&result, part) {
                    let r = self.records.entry(p).or_default();
                    r.written.insert(chunk);
                    r.rotted.remove(&chunk);
                }
                DiskDone::Written { id, chunk, data, result }
            }
            DiskOp::SaveState { id, offset, bytes } => {
                let state = self.open.get(&(host, id)).map(|p| p.state.clone());
                let result = match state.as_ref().and_then(|p| self.files.get_mut(p)) {
                    Some(_) if full => Err("No space left on device".to_string()),
                    Some(f) => {
                        f.write_at(offset as usize, &bytes, &mut self.pool);
                        Ok(())
                    }
                    None => Err("the state file is not open".to_string()),
                };
                if full {
                    self.count("refused for space");
                }
                DiskDone::StateSaved { id, result }
            }
            DiskOp::Finish { id } => {
                let result = match self.open.remove(&(host, id)) {
                    Some(p) if self.files.contains_key(&p.final_path) => {
                        Err(format!("{} appeared meanwhile; not replacing it", p.final_path))
                    }
                    Some(p) => {
                        let data = self.files.remove(&p.part).unwrap_or_default();
                        self.files.remove(&p.state);
                        self.records.remove(&p.part);
                        self.files.insert(p.final_path, data);
                        Ok(())
                    }
                    None => Err("the part file is not open".into()),
                };
                DiskDone::Finished { id, result }
            }
            DiskOp::Close { id } => {
                self.open.remove(&(host, id));
                return None;
            }
            DiskOp::Release { .. } => return None,
        })
    }
}

/// A tracker's log on a simulated disk.
#[derive(Clone, Debug, Default)]
pub struct TrackerLog {
    durable: Vec<Vec<u8>>,
    /// Written since the last sync: lost in a crash.
    volatile: Vec<Vec<u8>>,
    /// The range store beside the log, and what was written to it since the
    /// last sync (lost in a crash with the log's records).
    ranges: BTreeMap<Sha1Digest, Vec<u8>>,
    volatile_ranges: Vec<(Sha1Digest, Vec<u8>)>,
    /// The partial snapshot base beside the log: written without a sync, it
    /// survives a crash of the process (the page cache holds it), not a wipe.
    partial: Option<(Sha1Digest, Vec<u8>)>,
}

impl TrackerLog {
    /// Writes a record (not yet durable).
    pub fn persist(&mut self, p: Persist) {
        match p {
            Persist::Append(r) | Persist::Lazy(r) => self.volatile.push(r),
            Persist::Rewrite(image) => {
                // Written beside the old log, synced, renamed over it.
                self.volatile.clear();
                self.durable = image.records();
            }
        }
    }

    /// Makes everything written so far durable.
    pub fn sync(&mut self) {
        self.durable.append(&mut self.volatile);
        self.ranges.extend(self.volatile_ranges.drain(..));
    }

    /// The process died: what was not synced is gone.
    pub fn crash(&mut self) {
        self.volatile.clear();
        self.volatile_ranges.clear();
    }

    /// The disk was wiped.
    pub fn wipe(&mut self) {
        self.partial = None;
        self.durable.clear();
        self.volatile.clear();
        self.ranges.clear();
        self.volatile_ranges.clear();
    }

    /// Writes at `offset` of base `base`'s partial, as the driver's store
    /// does: offset 0 starts it again; another base's or a write past the
    /// end is dropped.
    pub fn save_partial(&mut self, base: Sha1Digest, offset: u64, bytes: &[u8]) {
        if offset == 0 {
            self.partial = Some((base, Vec::new()));
        }
        if let Some((d, held)) = self.partial.as_mut() {
            if *d == base && offset as usize <= held.len() {
                held.truncate(offset as usize);
                held.extend_from_slice(bytes);
            }
        }
    }

    /// Removes the partial snapshot base.
    pub fn drop_partial(&mut self) {
        self.partial = None;
    }

    /// The partial snapshot base a restart finds.
    pub fn partial(&self) -> Option<(Sha1Digest, Vec<u8>)> {
        self.partial.clone()
    }

    /// Writes a chunk-list range (not yet durable).
    pub fn store_range(&mut self, hash: Sha1Digest, bytes: Vec<u8>) {
        self.volatile_ranges.push((hash, bytes));
    }

    /// Removes a range.
    pub fn drop_range(&mut self, hash: &Sha1Digest) {
        self.ranges.remove(hash);
        self.volatile_ranges.retain(|(h, _)| h != hash);
    }

    /// A range as the store reads it back (written, durable or not).
    pub fn load_range(&self, hash: &Sha1Digest) -> Option<Vec<u8>> {
        let unsynced = self.volatile_ranges.iter().rev().find(|(h, _)| h == hash).map(|(_, b)| b.clone());
        unsynced.or_else(|| self.ranges.get(hash).cloned())
    }

    /// Whether a range is in the store durably.
    pub fn holds_durably(&self, hash: &Sha1Digest) -> bool {
        self.ranges.contains_key(hash)
    }

    /// The ranges a restart finds.
    pub fn held_ranges(&self) -> Vec<Sha1Digest> {
        self.ranges.keys().copied().collect()
    }

    /// What a restart replays.
    pub fn records(&self) -> &[Vec<u8>] {
        &self.durable
    }
}
