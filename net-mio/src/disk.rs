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
use std::sync::{Arc, Condvar, Mutex};

use shoal_core::chunk::{chunk_len, FileDigest, FileHasher, Sha1Digest, CHUNK_SIZE};
use shoal_core::client::download::chunk_offset;
use shoal_core::client::peer::Bitmap;
use shoal_core::client::sidecar;
use shoal_core::client::Prepared;
use shoal_core::ids::FileName;
use shoal_sha1x::Sha1;

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
        // Two chunks at a time, hashed together (two SHA1 streams at once).
        let mut bufs = [vec![0u8; CHUNK_SIZE as usize], vec![0u8; CHUNK_SIZE as usize]];
        let claimed: Vec<u32> = claimed.iter_set().collect();
        for pair in claimed.chunks(2) {
            let mut read = [false; 2];
            for ((&c, buf), read) in pair.iter().zip(&mut bufs).zip(&mut read) {
                buf.resize(chunk_len(digest.size, c as u64) as usize, 0);
                *read = file.read_exact_at(buf, chunk_offset(c)).is_ok();
            }
            let got = match pair {
                [_, _] => {
                    let (a, b) = Sha1Digest::of_two(&bufs[0], &bufs[1]);
                    [a, b]
                }
                _ => [Sha1Digest::of(&bufs[0]); 2],
            };
            for ((&c, read), got) in pair.iter().zip(read).zip(got) {
                if read && got == digest.chunks[c as usize] {
                    have.set(c);
                }
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

/// What the checker and writer threads report back.
pub enum WriterEvent {
    /// A chunk matched its SHA1 and is written (true), or did not and was not.
    Checked(u32, bool),
    /// A chunk's buffer, done with: for the download to reuse.
    Spare(Vec<u8>),
    Failed(String),
    Finished(Result<(), String>),
}

/// Chunks queued to a checker, and from it to the writer, at most: a full
/// queue makes the engine wait, which bounds the memory a fast network and
/// a slow disk can take.
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

    /// Moves the part file to two threads of its own. The checker checks
    /// each received chunk's SHA1 and computes the whole file's SHA1 along
    /// the growing prefix of good chunks, so the final check costs only what
    /// is left when the last chunk lands. It runs the two hashes as two
    /// streams at once ([`shoal_sha1x::Sha1::update2`]): a chunk's check is
    /// paired with the whole-file hash of the same bytes when it is the next
    /// in file order, else of the chunk at the whole-file hash's cursor (held
    /// from earlier, or read back); whole-file work with nothing to pair waits
    /// until the queue is empty. The writer writes each good chunk, and only
    /// then reports it, keeps the sidecar and renames the finished file.
    ///
    /// Measured (bench, 1 GiB, SHA-NI): the two hashes cost ~0.8 s of CPU
    /// instead of ~1.4 s as two single streams, and the download rate rose
    /// from 0.43x to ~0.5x of the hash limit. Writing on the checker's
    /// thread too made it the bottleneck (the engine waited on its full
    /// queue 0.28 s of a 1.34 s download); the writer thread takes that
    /// 0.2-0.25 s per GiB to the other core. The checker also feeds the
    /// page-out thread ([`PageOut`]). Returns the checker's queue and the
    /// writer thread, which outlives the report of a finished download by
    /// the state file's removal.
    pub fn spawn_writer(
        self,
        have: Bitmap,
        report: impl Fn(WriterEvent) + Send + Sync + 'static,
    ) -> io::Result<(std::sync::mpsc::SyncSender<WriterMsg>, std::thread::JoinHandle<()>)> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<WriterMsg>(WRITER_QUEUE);
        let (store_tx, store_rx) = std::sync::mpsc::sync_channel::<Store>(WRITER_QUEUE);
        let report = Arc::new(report);
        let stored = Arc::new(Stored { state: Mutex::new((have.clone(), true)), changed: Condvar::new() });
        let prefix = PrefixHasher {
            available: have,
            cursor: 0,
            whole: Sha1::new(),
            held: std::collections::BTreeMap::new(),
            buf: Vec::new(),
            size: self.size,
            file: self.file.try_clone()?,
            part_path: self.paths.part.clone(),
            stored: stored.clone(),
            progress: page_out(&self.file)?,
            stats: HashStats::default(),
        };
        let r = report.clone();
        let writer = std::thread::Builder::new().name("shoal-writer".into()).spawn(move || {
            let mut w = Writer { part: self, stored, report: r };
            if let Err(e) = w.run(store_rx) {
                (w.report)(WriterEvent::Failed(e));
            }
        })?;
        std::thread::Builder::new().name("shoal-checker".into()).spawn(move || {
            let mut c = Checker { prefix, store: store_tx, report };
            if let Err(e) = c.run(rx) {
                (c.report)(WriterEvent::Failed(e));
            }
        })?;
        Ok((tx, writer))
    }

    /// Gives the finished part file its final name.
    fn rename_final(&self) -> Result<(), String> {
        let p = &self.paths;
        if p.final_path.symlink_metadata().is_ok() {
            return Err(format!("{} appeared meanwhile; not replacing it", p.final_path.display()));
        }
        std::fs::rename(&p.part, &p.final_path).map_err(|e| format!("{}: {e}", p.final_path.display()))
    }
}

/// What the checker hands the writer, in order.
enum Store {
    /// A chunk that matched its SHA1: to write, then report.
    Chunk(u32, Arc<Vec<u8>>),
    State(Vec<u8>),
    /// The whole-file check's result: rename if it passed, and report.
    Finish(Result<(), String>),
}

/// The chunks the writer has written, for the checker to read back; and
/// whether the writer still runs.
struct Stored {
    state: Mutex<(Bitmap, bool)>,
    changed: Condvar,
}

impl Stored {
    fn lock(&self) -> std::sync::MutexGuard<'_, (Bitmap, bool)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mark(&self, c: u32) {
        self.lock().0.set(c);
        self.changed.notify_all();
    }

    /// Waits until chunk `c` is written; false if the writer stopped first.
    fn wait_for(&self, c: u32) -> bool {
        let mut s = self.lock();
        while !s.0.get(c) {
            if !s.1 {
                return false;
            }
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        true
    }
}

/// A download's writer thread: see [`PartFile::spawn_writer`].
struct Writer<R> {
    part: PartFile,
    stored: Arc<Stored>,
    report: Arc<R>,
}

impl<R> Drop for Writer<R> {
    /// However the writer ends, a checker waiting for a chunk stops waiting.
    fn drop(&mut self) {
        self.stored.lock().1 = false;
        self.stored.changed.notify_all();
    }
}

impl<R: Fn(WriterEvent)> Writer<R> {
    fn run(&mut self, rx: std::sync::mpsc::Receiver<Store>) -> Result<(), String> {
        for msg in rx {
            match msg {
                Store::Chunk(c, data) => {
                    self.part.write_chunk(c, &data)?;
                    self.stored.mark(c);
                    // Only now: a chunk reported good is served to peers.
                    (self.report)(WriterEvent::Checked(c, true));
                    if let Some(buf) = Arc::into_inner(data) {
                        (self.report)(WriterEvent::Spare(buf));
                    }
                }
                Store::State(bytes) => self.part.save_state(&bytes)?,
                Store::Finish(result) => {
                    let result = result.and_then(|()| self.part.rename_final());
                    let complete = result.is_ok();
                    (self.report)(WriterEvent::Finished(result));
                    if complete {
                        // Only after reporting: freeing the state file's
                        // block waits for the disk with ext4's `discard`
                        // option (measured once 0.8 s, queued behind the
                        // download's writeback), and the download is
                        // complete without it. The driver joins this
                        // thread before the client exits.
                        let _ = std::fs::remove_file(&self.part.paths.state);
                    }
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// A download's checker thread: see [`PartFile::spawn_writer`].
struct Checker<R> {
    prefix: PrefixHasher,
    store: std::sync::mpsc::SyncSender<Store>,
    report: Arc<R>,
}

impl<R: Fn(WriterEvent)> Checker<R> {
    fn run(&mut self, rx: std::sync::mpsc::Receiver<WriterMsg>) -> Result<(), String> {
        use std::sync::mpsc::TryRecvError;
        loop {
            let msg = match rx.try_recv() {
                Ok(msg) => msg,
                Err(TryRecvError::Empty) if self.prefix.pending() => {
                    // Nothing to pair it with: whole-file work alone.
                    if let Some(held) = self.prefix.step()? {
                        self.release(held);
                    }
                    continue;
                }
                Err(TryRecvError::Empty) => match rx.recv() {
                    Ok(msg) => msg,
                    Err(_) => return Ok(()),
                },
                Err(TryRecvError::Disconnected) => return Ok(()),
            };
            // A send fails only when the writer stopped; it reported why.
            let sent = match msg {
                WriterMsg::Chunk(c, data, sha1) => self.chunk(c, data, sha1)?,
                WriterMsg::State(bytes) => self.store.send(Store::State(bytes)).is_ok(),
                WriterMsg::Finish(sha1) => {
                    let result = self.prefix.finish(sha1);
                    let _ = self.store.send(Store::Finish(result));
                    return Ok(());
                }
            };
            if !sent {
                return Ok(());
            }
        }
    }

    /// Hands a buffer back once the writer is done with it too.
    fn release(&self, data: Arc<Vec<u8>>) {
        if let Some(buf) = Arc::into_inner(data) {
            (self.report)(WriterEvent::Spare(buf));
        }
    }

    /// Checks a received chunk, alongside whole-file work where there is
    /// some to pair with it, and passes it to the writer if it matches.
    /// False if the writer has stopped.
    fn chunk(&mut self, c: u32, data: Vec<u8>, sha1: Sha1Digest) -> Result<bool, String> {
        let p = &mut self.prefix;
        let mut check = Sha1::new();
        let mut speculative = None;
        if c == p.cursor && !p.available.get(c) {
            // The next chunk in file order: both hashes over the same bytes,
            // the whole file's on a copy of its state, kept if they match.
            let mut whole = p.whole.clone();
            Sha1::update2(&mut check, &data, &mut whole, &data);
            speculative = Some(whole);
            p.stats.same += 1;
        } else if p.pending() {
            // Whole-file work at the cursor, from memory or read back.
            let held = p.next_chunk()?;
            Sha1::update2(&mut check, &data, &mut p.whole, held.as_deref().unwrap_or(&p.buf));
            p.advanced();
            p.stats.paired += 1;
            if let Some(held) = held {
                self.release(held);
            }
        } else {
            p.stats.alone += 1;
            check.update(&data);
        }
        if sha1.0 != check.finalize() {
            (self.report)(WriterEvent::Checked(c, false));
            (self.report)(WriterEvent::Spare(data));
            return Ok(true);
        }
        let data = Arc::new(data);
        if self.store.send(Store::Chunk(c, data.clone())).is_err() {
            return Ok(false);
        }
        let p = &mut self.prefix;
        p.available.set(c);
        if let Some(whole) = speculative {
            p.whole = whole;
            p.advanced();
        }
        if let Some(spent) = p.hold(c, data) {
            self.release(spent);
        }
        Ok(true)
    }
}

/// Chunks the checker holds while waiting for the whole-file hash to reach
/// them (16 MiB). The hash trails the newest written chunk by as many
/// chunks as arrived ahead of a late one: 10-30 in the bench (1 GiB, 4
/// sharers). With 16 held, 250-550 of 2,048 chunks were read back from the
/// file (0.17 s of copying per GiB); with 32, none, for ~3 MiB more peak RSS.
const MAX_HELD_CHUNKS: usize = 32;

/// The whole-file SHA1 over the longest prefix of good chunks.
struct PrefixHasher {
    /// Chunks that matched their SHA1 (this run, or resumed from the last).
    available: Bitmap,
    /// The first chunk the whole-file hash has not taken in.
    cursor: u32,
    whole: Sha1,
    /// Good chunks at or past the cursor, kept to hash without reading back.
    held: std::collections::BTreeMap<u32, Arc<Vec<u8>>>,
    /// For chunks read back.
    buf: Vec<u8>,
    size: u64,
    /// The part file, to read chunks back once the writer has written them.
    file: File,
    part_path: PathBuf,
    stored: Arc<Stored>,
    /// Tells the page-out thread how far the hash has come.
    progress: std::sync::mpsc::SyncSender<u32>,
    /// How the whole-file hash went, for the debug log.
    stats: HashStats,
}

/// Counts of the checker's hashing, logged when a download finishes.
#[derive(Debug, Default)]
struct HashStats {
    /// Chunks checked together with the whole-file hash over the same bytes.
    same: u32,
    /// Chunks checked together with the whole-file hash of an earlier chunk.
    paired: u32,
    /// Chunks checked with no whole-file work to pair with.
    alone: u32,
    /// Whole-file steps done alone, the queue being empty.
    idle: u32,
    /// Chunks the whole-file hash read back from the part file.
    read_back: u32,
}

/// Chunks whose writeback starts together, in file order, behind the whole-file hash.
const PAGE_OUT_BATCH: u32 = 16;
/// Chunks of a download kept in the page cache behind the whole-file hash (64 MiB);
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
/// The whole-file hash is the last to need a chunk's bytes, so once it has
/// passed a batch of chunks their writeback is started (in file order, so the
/// disk sees sequential writes), and a window later they are dropped from
/// the cache once written. This runs on a thread of its own: waiting for the
/// disk never holds up the download (measured: a 0.4 s stall of the whole
/// pipeline when the whole-file hasher waited itself); if it falls behind, the page
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
    /// Whether the chunk at the cursor is good: whole-file work to do.
    fn pending(&self) -> bool {
        self.cursor < self.available.len() && self.available.get(self.cursor)
    }

    /// The chunk at the cursor: held, or else read back into `buf` (None).
    fn next_chunk(&mut self) -> Result<Option<Arc<Vec<u8>>>, String> {
        match self.held.remove(&self.cursor) {
            Some(data) => Ok(Some(data)),
            None => self.read_back().map(|()| None),
        }
    }

    /// Reads the chunk at the cursor back from the part file into `buf`,
    /// once the writer has written it.
    fn read_back(&mut self) -> Result<(), String> {
        if !self.stored.wait_for(self.cursor) {
            return Err("the part file's writer stopped".into());
        }
        let len = chunk_len(self.size, self.cursor as u64) as usize;
        self.buf.resize(len, 0);
        self.stats.read_back += 1;
        self.file
            .read_exact_at(&mut self.buf, chunk_offset(self.cursor))
            .map_err(|e| format!("{}: {e}", self.part_path.display()))
    }

    /// The whole-file hash has taken in the chunk at the cursor.
    fn advanced(&mut self) {
        self.cursor += 1;
        // The page-out thread acts on whole batches only: waking it for
        // every chunk cost a context switch each (2,048 per GiB). A full
        // queue only means it is behind; it will see a later position.
        // (It trails the hash by 64 MiB, far behind what the writer may
        // still have queued.)
        if self.cursor.is_multiple_of(PAGE_OUT_BATCH) {
            let _ = self.progress.try_send(self.cursor);
        }
    }

    /// Keeps a good chunk past the cursor for the whole-file hash, or gives
    /// a buffer up: when all places are taken, the held chunk farthest from
    /// the cursor makes way for a nearer one (a chunk not held is read back
    /// from the file when the hash reaches it).
    fn hold(&mut self, c: u32, data: Arc<Vec<u8>>) -> Option<Arc<Vec<u8>>> {
        if c < self.cursor {
            return Some(data);
        }
        if self.held.len() < MAX_HELD_CHUNKS {
            self.held.insert(c, data);
            return None;
        }
        match self.held.last_key_value() {
            Some((&far, _)) if far > c => {
                self.held.insert(c, data);
                self.held.remove(&far)
            }
            _ => Some(data),
        }
    }

    /// Hashes the good chunk at the cursor alone (held, or read back);
    /// returns it when it was held.
    fn step(&mut self) -> Result<Option<Arc<Vec<u8>>>, String> {
        debug_assert!(self.pending());
        self.stats.idle += 1;
        let held = self.next_chunk()?;
        self.whole.update(held.as_deref().unwrap_or(&self.buf));
        self.advanced();
        Ok(held)
    }

    /// Completes the whole-file hash and compares it with `sha1`.
    fn finish(&mut self, sha1: Sha1Digest) -> Result<(), String> {
        while self.pending() {
            self.step()?;
        }
        if self.cursor < self.available.len() {
            return Err(format!("chunk {} was never written", self.cursor));
        }
        tracing::debug!(stats = ?self.stats, "whole-file hash done");
        let got = Sha1Digest(std::mem::take(&mut self.whole).finalize());
        if got != sha1 {
            return Err(format!("whole-file SHA1 mismatch: expected {sha1}, got {got}"));
        }
        Ok(())
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

    /// Feeds a writer the chunks of a file in `order`, each one listed in
    /// `corrupt` first as a damaged copy, then finishes; returns the events
    /// and leaves the downloaded file in `dir`.
    fn run_writer(dir: &Path, data: &[u8], resumed: &[u32], order: &[u32], corrupt: &[u32]) -> Vec<WriterEvent> {
        let d = digest_of(data);
        let name = FileName::new("f.bin").unwrap();
        let (p, part) = prepare(&dir.display().to_string(), &name, &d).unwrap();
        assert_eq!(p.have.count(), 0);
        let n = d.chunks.len() as u32;
        let chunk = |c: u32| data[chunk_offset(c) as usize..][..chunk_len(d.size, c as u64) as usize].to_vec();
        for &c in resumed {
            part.write_chunk(c, &chunk(c)).unwrap();
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let (w, thread) = part.spawn_writer(bits(n, resumed), move |ev| drop(tx.send(ev))).unwrap();
        for &c in order {
            if corrupt.contains(&c) {
                let mut bad = chunk(c);
                let mid = bad.len() / 2;
                bad[mid] ^= 0x40;
                w.send(WriterMsg::Chunk(c, bad, d.chunks[c as usize])).unwrap();
            }
            w.send(WriterMsg::Chunk(c, chunk(c), d.chunks[c as usize])).unwrap();
        }
        w.send(WriterMsg::Finish(d.sha1)).unwrap();
        thread.join().unwrap();
        rx.try_iter().collect()
    }

    fn file_of(chunks: u32, tail: usize) -> Vec<u8> {
        let len = (chunks.saturating_sub(1) as usize) * CHUNK_SIZE as usize + tail;
        (0..len).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()
    }

    /// Each chunk's verdict, in order.
    type Verdicts = Vec<(u32, bool)>;

    /// The verdicts are the expected ones, each chunk's in the expected
    /// order (a bad copy's before the good one's); across chunks the order
    /// may differ, the checker reporting bad copies and the writer good ones.
    fn same_verdicts(got: &Verdicts, expected: &Verdicts) -> bool {
        let of = |v: &Verdicts, c: u32| v.iter().filter(|(x, _)| *x == c).map(|(_, ok)| *ok).collect::<Vec<_>>();
        got.len() == expected.len() && expected.iter().all(|&(c, _)| of(got, c) == of(expected, c))
    }

    /// The verdicts, and whether the download ended complete.
    fn outcome(events: &[WriterEvent]) -> (Verdicts, Option<Result<(), String>>) {
        let mut checked = Vec::new();
        let mut finished = None;
        for ev in events {
            match ev {
                WriterEvent::Checked(c, ok) => checked.push((*c, *ok)),
                WriterEvent::Finished(r) => finished = Some(r.clone()),
                WriterEvent::Failed(e) => panic!("writer failed: {e}"),
                WriterEvent::Spare(_) => {}
            }
        }
        (checked, finished)
    }

    #[test]
    fn a_bad_chunk_at_the_cursor_leaves_the_whole_file_hash_intact() {
        // Chunk 0 first arrives damaged: its check ran together with the
        // whole-file hash over the same bytes, which must be thrown away.
        let dir = scratch("cursor");
        let data = file_of(3, 1000);
        let events = run_writer(&dir, &data, &[], &[0, 1, 2], &[0, 1]);
        let (checked, finished) = outcome(&events);
        let expected = vec![(0, false), (0, true), (1, false), (1, true), (2, true)];
        assert!(same_verdicts(&checked, &expected), "{checked:?}");
        assert_eq!(finished, Some(Ok(())));
        assert_eq!(std::fs::read(dir.join("f.bin")).unwrap(), data);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn chunks_far_out_of_order_are_read_back_for_the_whole_file_hash() {
        // Reversed: the whole-file hash can start only at the end, with more
        // chunks written past it than the writer holds.
        let dir = scratch("reversed");
        let n = MAX_HELD_CHUNKS as u32 + 6;
        let data = file_of(n, 77);
        let order: Vec<u32> = (0..n).rev().collect();
        let (checked, finished) = outcome(&run_writer(&dir, &data, &[], &order, &[]));
        assert_eq!(checked.len(), n as usize);
        assert_eq!(finished, Some(Ok(())));
        assert_eq!(std::fs::read(dir.join("f.bin")).unwrap(), data);
        let _ = std::fs::remove_dir_all(&dir);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// Whatever the order, the chunks resumed from an earlier run and the
        /// damaged copies, every good chunk is written, every bad one refused,
        /// and the file completes with the right content.
        #[test]
        fn the_writer_completes_any_arrival_order(
            n in 1u32..22,
            tail in 1usize..=CHUNK_SIZE as usize,
            keys in proptest::collection::vec(proptest::prelude::any::<u16>(), 22),
            flags in proptest::collection::vec(0u8..8, 22),
        ) {
            let dir = scratch(&format!("order-{n}-{tail}"));
            let data = file_of(n, tail);
            let resumed: Vec<u32> = (0..n).filter(|&c| flags[c as usize] == 0).collect();
            let corrupt: Vec<u32> = (0..n).filter(|&c| flags[c as usize] == 1).collect();
            let mut order: Vec<u32> = (0..n).filter(|c| !resumed.contains(c)).collect();
            order.sort_by_key(|&c| keys[c as usize]);
            let (checked, finished) = outcome(&run_writer(&dir, &data, &resumed, &order, &corrupt));
            let expected: Vec<(u32, bool)> = order
                .iter()
                .flat_map(|&c| corrupt.contains(&c).then_some((c, false)).into_iter().chain([(c, true)]))
                .collect();
            proptest::prop_assert!(same_verdicts(&checked, &expected), "{:?} vs {:?}", checked, expected);
            proptest::prop_assert_eq!(finished, Some(Ok(())));
            proptest::prop_assert!(std::fs::read(dir.join("f.bin")).unwrap() == data);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
