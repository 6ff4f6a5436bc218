//! The client's file work: hashing uploads, serving blocks, and the part file,
//! sidecar and final rename of a download.
//!
//! Paths follow one rule: a download writes only `<final>.part`,
//! `<final>.part.state` and, at the end, `<final>` itself,
//! where `<final>` is the destination the user named (or the file's name
//! inside it, for a directory). It never replaces an existing `<final>` and
//! never writes through a symlink.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha1::{Digest, Sha1};
use shoal_core::chunk::{chunk_len, FileDigest, FileHasher, Sha1Digest, CHUNK_SIZE};
use shoal_core::client::Prepared;
use shoal_core::download::chunk_offset;
use shoal_core::ids::FileName;
use shoal_core::peer::Bitmap;
use shoal_core::sidecar;

/// Streams a file through the chunk hasher in 1 MiB reads: constant memory.
pub fn hash_file(path: &str) -> Result<FileDigest, String> {
    let mut f = File::open(path).map_err(|e| e.to_string())?;
    if !f.metadata().map_err(|e| e.to_string())?.is_file() {
        return Err("not a regular file".into());
    }
    let mut h = FileHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]).map_err(|e| e.to_string())?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.to_string()),
        }
    }
    h.finish().map_err(|e| e.to_string())
}

/// Open files of shared content, for serving blocks.
#[derive(Default)]
pub struct ReadCache {
    files: HashMap<String, Arc<File>>,
}

/// Files kept open for serving at once.
const MAX_OPEN_SHARED: usize = 64;

impl ReadCache {
    /// The open file at `path`, checked to hold `len` bytes at `offset`.
    pub fn open_range(&mut self, path: &str, offset: u64, len: u64) -> Result<Arc<File>, String> {
        if !self.files.contains_key(path) {
            if self.files.len() >= MAX_OPEN_SHARED {
                self.files.clear();
            }
            let f = File::open(path).map_err(|e| format!("{path}: {e}"))?;
            self.files.insert(path.to_string(), Arc::new(f));
        }
        let f = &self.files[path];
        match f.metadata() {
            Ok(m) if m.len() >= offset + len => Ok(f.clone()),
            Ok(_) => {
                self.files.remove(path);
                Err(format!("{path}: shorter than when it was shared"))
            }
            Err(e) => {
                self.files.remove(path);
                Err(format!("{path}: {e}"))
            }
        }
    }
}

/// Where a download's files live.
#[derive(Clone, Debug)]
pub struct PartPaths {
    pub final_path: PathBuf,
    pub part: PathBuf,
    pub state: PathBuf,
}

/// A download's open part file.
pub struct PartFile {
    file: File,
    paths: PartPaths,
    size: u64,
    /// The state file, the sequence number of its next record and the
    /// length of its records.
    state: File,
    state_seq: u64,
    slot_len: Option<usize>,
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn refuse_symlink(p: &Path) -> Result<(), String> {
    match p.symlink_metadata() {
        Ok(m) if m.file_type().is_symlink() => {
            Err(format!("{} is a symbolic link; not writing through it", p.display()))
        }
        _ => Ok(()),
    }
}

/// Resolves the destination, opens (or resumes) the part file and re-checks
/// every chunk the sidecar claims.
pub fn prepare(dest: &str, name: &FileName, digest: &FileDigest) -> Result<(Prepared, PartFile), String> {
    let d = Path::new(dest);
    let final_path = if d.is_dir() {
        d.join(name.as_str())
    } else if dest.ends_with('/') || d.file_name().is_none() {
        return Err(format!("no such directory: {dest}"));
    } else {
        d.to_path_buf()
    };
    if let Some(parent) = final_path.parent() {
        if !parent.as_os_str().is_empty() && !parent.is_dir() {
            return Err(format!("no such directory: {}", parent.display()));
        }
    }
    if final_path.symlink_metadata().is_ok() {
        return Err(format!("{} already exists", final_path.display()));
    }
    let paths = PartPaths {
        part: with_suffix(&final_path, ".part"),
        state: with_suffix(&final_path, ".part.state"),
        final_path,
    };
    refuse_symlink(&paths.part)?;
    refuse_symlink(&paths.state)?;
    let open = |p: &Path| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(p)
            .map_err(|e| format!("{}: {e}", p.display()))
    };
    let (file, state) = (open(&paths.part)?, open(&paths.state)?);
    let n = digest.chunks.len() as u32;
    let (claimed, state_seq) = match read_state(&state, &paths.state, digest) {
        Some((have, seq, true)) => (Some(have), seq + 1),
        found => {
            // Nothing usable, or the first format (one bare record that
            // would shadow the slots): start the two slots afresh.
            state.set_len(0).map_err(|e| format!("{}: {e}", paths.state.display()))?;
            (found.map(|(have, _, _)| have), 0)
        }
    };
    let mut have = Bitmap::new(n);
    // Without a sidecar nothing in an old part file counts: every chunk is
    // written whole before it is read back, so stale bytes need no clearing.
    // (Truncating to zero first would also make ext4 flush the whole file
    // to disk when it is closed, its replace-by-truncate heuristic: measured
    // as 0.6 s of a 3 s download of 1 GiB.)
    if let Some(claimed) = claimed {
        let mut buf = vec![0u8; CHUNK_SIZE as usize];
        for c in claimed.iter_set() {
            let len = chunk_len(digest.size, c as u64) as usize;
            let ok = file.read_exact_at(&mut buf[..len], chunk_offset(c)).is_ok()
                && Sha1Digest::of(&buf[..len]) == digest.chunks[c as usize];
            if ok {
                have.set(c);
            }
        }
    }
    file.set_len(digest.size).map_err(|e| format!("{}: {e}", paths.part.display()))?;
    if !os::reserve(&file, digest.size) {
        return Err(format!("not enough disk space for {} ({} bytes)", paths.part.display(), digest.size));
    }
    let prepared = Prepared {
        final_path: paths.final_path.display().to_string(),
        part_path: paths.part.display().to_string(),
        have,
    };
    Ok((prepared, PartFile { file, paths, size: digest.size, state, state_seq, slot_len: None }))
}

/// The chunks the state file claims, its newest record's sequence number,
/// and whether it is in the two-slot format.
fn read_state(f: &File, path: &Path, digest: &FileDigest) -> Option<(Bitmap, u64, bool)> {
    let mut bytes = Vec::new();
    f.take(sidecar::MAX_STATE_FILE_LEN as u64 + 1).read_to_end(&mut bytes).ok()?;
    if bytes.is_empty() {
        return None;
    }
    match sidecar::latest(&bytes, digest) {
        Ok((have, seq)) => Some((have, seq, !sidecar::is_first_format(&bytes))),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring the download state file");
            None
        }
    }
}

/// What the writer thread of a download is told, in order.
pub enum WriterMsg {
    /// A chunk to check against its SHA1 and, if it matches, write at
    /// `chunk * CHUNK_SIZE`; the verdict is reported.
    Chunk(u32, Vec<u8>, Sha1Digest),
    /// New sidecar bytes.
    State(Vec<u8>),
    /// Every chunk was sent: check the whole file against this SHA1 and rename.
    Finish(Sha1Digest),
}

/// What the writer and hasher threads report back.
pub enum WriterEvent {
    /// A chunk matched its SHA1 and is written (true), or did not and was not.
    Checked(u32, bool),
    /// A chunk's buffer, done with: for the download to reuse.
    Spare(Vec<u8>),
    Failed(String),
    Finished(Result<(), String>),
}

/// Chunks queued to a writer (and from it to the hasher) at most; a full queue makes the engine wait,
/// which bounds the memory a fast network and a slow disk can take.
const WRITER_QUEUE: usize = 16;

impl PartFile {
    fn write_chunk(&self, chunk: u32, data: &[u8]) -> Result<(), String> {
        self.file.write_all_at(data, chunk_offset(chunk)).map_err(|e| format!("{}: {e}", self.paths.part.display()))
    }

    /// Writes the sidecar record into the older of the state file's two
    /// slots, in place ([`sidecar::slot`]).
    fn save_state(&mut self, record: &[u8]) -> Result<(), String> {
        let err = |e: io::Error| format!("{}: {e}", self.paths.state.display());
        // A download's records all have one length; should that ever change,
        // the slots start over (from slot 0) rather than overlap.
        if self.slot_len.is_some_and(|l| l != record.len()) {
            self.state.set_len(0).map_err(err)?;
            self.state_seq += self.state_seq % 2;
        }
        self.slot_len = Some(record.len());
        let slot = sidecar::slot(record, self.state_seq);
        let at = (self.state_seq % 2) * slot.len() as u64;
        self.state_seq += 1;
        self.state.write_all_at(&slot, at).map_err(err)
    }

    /// Moves the part file to two threads of its own: a writer that checks
    /// each received chunk's SHA1, writes the ones that match and keeps the
    /// sidecar, and a hasher that computes the whole
    /// file's SHA1 along the growing prefix of written chunks (mostly from the
    /// chunks the writer hands on, reading back only what it could not hold),
    /// so the final check costs only what is left when the last chunk lands.
    /// Measured: this beats writing on the engine thread (bench, 1 GiB).
    /// The hasher also feeds the page-out thread ([`PageOut`]). Returns the
    /// writer's queue and the hasher thread, which outlives the report of a
    /// finished download by the state file's removal.
    pub fn spawn_writer(
        mut self,
        have: Bitmap,
        report: impl Fn(WriterEvent) + Send + Sync + 'static,
    ) -> io::Result<(std::sync::mpsc::SyncSender<WriterMsg>, std::thread::JoinHandle<()>)> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<WriterMsg>(WRITER_QUEUE);
        let (htx, hrx) = std::sync::mpsc::sync_channel::<WriterMsg>(WRITER_QUEUE);
        let report = std::sync::Arc::new(report);
        let file = self.file.try_clone()?;
        let (size, paths, r) = (self.size, self.paths.clone(), report.clone());
        let progress = page_out(&self.file)?;
        let hasher = std::thread::Builder::new().name("shoal-hasher".into()).spawn(move || {
            let mut w = PrefixHasher {
                written: have,
                cursor: 0,
                hasher: Sha1::new(),
                held: std::collections::BTreeMap::new(),
                spent: Vec::new(),
                buf: Vec::new(),
                size,
                file,
                progress,
            };
            if let Err(e) = w.advance() {
                return r(WriterEvent::Failed(e));
            }
            for msg in hrx {
                match msg {
                    WriterMsg::Chunk(c, data, _) => {
                        if let Err(e) = w.take(c, data) {
                            return r(WriterEvent::Failed(e));
                        }
                        for buf in w.spent.drain(..) {
                            r(WriterEvent::Spare(buf));
                        }
                    }
                    WriterMsg::State(_) => {}
                    WriterMsg::Finish(sha1) => {
                        let result = w.finish(&paths, sha1);
                        let complete = result.is_ok();
                        r(WriterEvent::Finished(result));
                        if complete {
                            // Only after reporting: freeing the state file's
                            // block waits for the disk with ext4's `discard`
                            // option (measured once 0.8 s, queued behind the
                            // download's writeback), and the download is
                            // complete without it. The driver joins this
                            // thread before the client exits.
                            let _ = std::fs::remove_file(&paths.state);
                        }
                        return;
                    }
                }
            }
        })?;
        std::thread::Builder::new().name("shoal-writer".into()).spawn(move || {
            for msg in rx {
                match msg {
                    WriterMsg::Chunk(c, data, sha1) => {
                        if !sha1.matches(&data) {
                            report(WriterEvent::Checked(c, false));
                            report(WriterEvent::Spare(data));
                            continue;
                        }
                        if let Err(e) = self.write_chunk(c, &data) {
                            return report(WriterEvent::Failed(e));
                        }
                        report(WriterEvent::Checked(c, true));
                        if htx.send(WriterMsg::Chunk(c, data, sha1)).is_err() {
                            return;
                        }
                    }
                    WriterMsg::State(bytes) => {
                        if let Err(e) = self.save_state(&bytes) {
                            return report(WriterEvent::Failed(e));
                        }
                    }
                    finish @ WriterMsg::Finish(_) => {
                        let _ = htx.send(finish);
                        return;
                    }
                }
            }
        })?;
        Ok((tx, hasher))
    }
}

/// Chunks the hasher holds while waiting for the prefix to reach them.
const MAX_HELD_CHUNKS: usize = 16;

/// The whole-file SHA1 over the longest prefix of written chunks.
struct PrefixHasher {
    written: Bitmap,
    cursor: u32,
    hasher: Sha1,
    /// Written chunks past the cursor, kept to hash without reading back.
    held: std::collections::BTreeMap<u32, Vec<u8>>,
    /// Chunk buffers hashed (or not kept): to hand back for reuse.
    spent: Vec<Vec<u8>>,
    buf: Vec<u8>,
    size: u64,
    file: File,
    /// Tells the page-out thread how far the hash has come.
    progress: std::sync::mpsc::SyncSender<u32>,
}

/// Chunks whose writeback starts together, in file order, behind the hasher.
const PAGE_OUT_BATCH: u32 = 16;
/// Chunks of a download kept in the page cache behind the hasher (64 MiB);
/// older ones are dropped once on disk.
const PAGE_CACHE_WINDOW: u32 = 128;

/// Starts a download's page-out thread; it ends when the sender is dropped.
fn page_out(file: &File) -> io::Result<std::sync::mpsc::SyncSender<u32>> {
    let file = file.try_clone()?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<u32>(64);
    std::thread::Builder::new().name("shoal-pageout".into()).spawn(move || {
        let mut paged = PageOut::default();
        while let Ok(mut hashed) = rx.recv() {
            while let Ok(later) = rx.try_recv() {
                hashed = hashed.max(later);
            }
            paged.advance(&file, hashed);
        }
    })?;
    Ok(tx)
}

/// Drop-behind: keeps a download's part file from piling up in the page cache.
///
/// The whole-file hasher is the last to need a chunk's bytes, so once it has
/// passed a batch of chunks their writeback is started (in file order, so the
/// disk sees sequential writes), and a window later they are dropped from
/// the cache once written. This runs on a thread of its own: waiting for the
/// disk never holds up the download (measured: a 0.4 s stall of the whole
/// pipeline when the hasher waited itself); if it falls behind, the page
/// cache just grows as it would without it. A download then holds at most about 72 MiB of page
/// cache however large the file, does not push other programs' data out of
/// memory, and writes into pages it freed itself a moment ago: on a VM,
/// fresh pages the host has not backed cost several times more to fill
/// (bench: a plain writer's rate varies 0.6-1.9 GB/s with that). Files under
/// the window are never dropped. A chunk served to a peer after it was
/// dropped is read back from disk. Best effort: where the calls do nothing
/// (tmpfs, other systems) the page cache behaves as before.
#[derive(Default)]
struct PageOut {
    /// Chunks below this have had their writeback started.
    started: u32,
    /// Chunks below this have been dropped from the page cache.
    dropped: u32,
}

impl PageOut {
    fn advance(&mut self, file: &File, hashed: u32) {
        while hashed >= self.started + PAGE_OUT_BATCH {
            os::start_writeback(file, chunk_offset(self.started), chunk_offset(PAGE_OUT_BATCH));
            self.started += PAGE_OUT_BATCH;
        }
        while self.started >= self.dropped + PAGE_CACHE_WINDOW + PAGE_OUT_BATCH {
            os::drop_cached(file, chunk_offset(self.dropped), chunk_offset(PAGE_OUT_BATCH));
            self.dropped += PAGE_OUT_BATCH;
        }
    }
}

#[cfg(target_os = "linux")]
mod os {
    use std::fs::File;
    use std::os::fd::AsRawFd;

    /// Allocates the file's blocks up front (what is already there stays):
    /// a full disk shows at the start, not halfway, and writing back a
    /// chunk behind the writer need not allocate while the writer does (on
    /// ext4 both take the inode's block-map lock; measured: pwrite stalls of
    /// 0.1-0.3 s). A file system that cannot preallocate keeps a sparse file.
    /// False if the disk has no room for the file.
    pub fn reserve(file: &File, size: u64) -> bool {
        size == 0
            || rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, size)
                != Err(rustix::io::Errno::NOSPC)
    }

    /// Starts writing back `len` bytes from `offset`, without waiting.
    pub fn start_writeback(file: &File, offset: u64, len: u64) {
        // SAFETY: a plain system call on a descriptor `file` keeps open; no
        // memory is passed. Failure only means the kernel writes back later.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE);
        }
    }

    /// Waits until `len` bytes from `offset` are on disk, then drops them
    /// from the page cache (clean pages only; nothing is lost either way).
    pub fn drop_cached(file: &File, offset: u64, len: u64) {
        let all = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        // SAFETY: as in `start_writeback`.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, all);
        }
        if let Some(len) = std::num::NonZeroU64::new(len) {
            let _ = rustix::fs::fadvise(file, offset, Some(len), rustix::fs::Advice::DontNeed);
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod os {
    pub fn reserve(_: &std::fs::File, _: u64) -> bool {
        true
    }
    pub fn start_writeback(_: &std::fs::File, _: u64, _: u64) {}
    pub fn drop_cached(_: &std::fs::File, _: u64, _: u64) {}
}

impl PrefixHasher {
    fn take(&mut self, c: u32, data: Vec<u8>) -> Result<(), String> {
        self.written.set(c);
        if c != self.cursor && self.held.len() < MAX_HELD_CHUNKS {
            self.held.insert(c, data);
        } else {
            if c == self.cursor {
                self.hasher.update(&data);
                self.cursor += 1;
            }
            self.spent.push(data);
        }
        self.advance()
    }

    /// Hashes chunks from the cursor while they are written.
    fn advance(&mut self) -> Result<(), String> {
        while self.cursor < self.written.len() && self.written.get(self.cursor) {
            let c = self.cursor;
            match self.held.remove(&c) {
                Some(data) => {
                    self.hasher.update(&data);
                    self.spent.push(data);
                }
                None => {
                    let len = chunk_len(self.size, c as u64) as usize;
                    self.buf.resize(len, 0);
                    self.file.read_exact_at(&mut self.buf, chunk_offset(c)).map_err(|e| e.to_string())?;
                    self.hasher.update(&self.buf);
                }
            }
            self.cursor += 1;
        }
        // A full queue only means the page-out thread is behind; it will
        // see a later position.
        let _ = self.progress.try_send(self.cursor);
        Ok(())
    }

    fn finish(mut self, p: &PartPaths, sha1: Sha1Digest) -> Result<(), String> {
        self.advance()?;
        if self.cursor < self.written.len() {
            return Err(format!("chunk {} was never written", self.cursor));
        }
        let got = Sha1Digest(self.hasher.finalize().into());
        if got != sha1 {
            return Err(format!("whole-file SHA1 mismatch: expected {sha1}, got {got}"));
        }
        if p.final_path.symlink_metadata().is_ok() {
            return Err(format!("{} appeared meanwhile; not replacing it", p.final_path.display()));
        }
        std::fs::rename(&p.part, &p.final_path).map_err(|e| format!("{}: {e}", p.final_path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_core::chunk::FileHasher;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("shoal-disk-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn digest_of(data: &[u8]) -> FileDigest {
        let mut h = FileHasher::new();
        h.update(data).unwrap();
        h.finish().unwrap()
    }

    fn bits(n: u32, set: &[u32]) -> Bitmap {
        let mut b = Bitmap::new(n);
        set.iter().for_each(|&c| b.set(c));
        b
    }

    #[test]
    fn progress_survives_in_the_newest_intact_slot() {
        let dir = scratch("slots");
        let data: Vec<u8> = (0..3 * CHUNK_SIZE as usize + 1000).map(|i| (i % 253) as u8).collect();
        let d = digest_of(&data);
        let name = FileName::new("f.bin").unwrap();
        let dest = dir.display().to_string();
        let chunk = |c: u32| &data[chunk_offset(c) as usize..(chunk_offset(c) + chunk_len(d.size, c as u64)) as usize];

        let (p, mut part) = prepare(&dest, &name, &d).unwrap();
        assert_eq!(p.have.count(), 0);
        for c in [0, 2] {
            part.write_chunk(c, chunk(c)).unwrap();
        }
        part.save_state(&sidecar::encode(&d, &bits(4, &[0]))).unwrap();
        part.save_state(&sidecar::encode(&d, &bits(4, &[0, 2]))).unwrap();
        drop(part);
        let state = dir.join("f.bin.part.state");
        let slot_len = std::fs::metadata(&state).unwrap().len() / 2;

        // Resuming takes the newest slot (seq 1), and goes on after it.
        let (p, mut part) = prepare(&dest, &name, &d).unwrap();
        assert_eq!(p.have, bits(4, &[0, 2]));
        part.write_chunk(3, chunk(3)).unwrap();
        part.save_state(&sidecar::encode(&d, &bits(4, &[0, 2, 3]))).unwrap();
        drop(part);
        assert_eq!(std::fs::metadata(&state).unwrap().len(), 2 * slot_len, "two slots, written in place");
        let (p, _) = prepare(&dest, &name, &d).unwrap();
        assert_eq!(p.have, bits(4, &[0, 2, 3]));

        // A damaged newest slot (seq 2, slot 0) falls back to seq 1.
        let mut bytes = std::fs::read(&state).unwrap();
        bytes[20] ^= 1;
        std::fs::write(&state, &bytes).unwrap();
        let (p, _) = prepare(&dest, &name, &d).unwrap();
        assert_eq!(p.have, bits(4, &[0, 2]));

        // A claimed chunk whose bytes are wrong is not trusted.
        let file = OpenOptions::new().write(true).open(dir.join("f.bin.part")).unwrap();
        file.write_all_at(&[0xee; 10], chunk_offset(2)).unwrap();
        let (p, _) = prepare(&dest, &name, &d).unwrap();
        assert_eq!(p.have, bits(4, &[0]));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
