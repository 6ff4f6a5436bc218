//! Verification of a download: every chunk against its SHA1, the whole file
//! against its own, and the chunks a resumed part file claims.
//!
//! [`Verifier`] decides; the driver computes. It hands out work as
//! [`VerifyOp`]s (hash these buffers, read this chunk back, write this one)
//! and takes the results back through `handle_*`, libtorrent's
//! `async_hash` shape: the disk side returns digests, the policy compares.
//! A [`HashJob`] is run by the driver with [`HashJob::run`], on any thread;
//! it carries the buffers and, for the whole-file hash, the hash state, and
//! comes back with the digests. The driver never says whether a chunk is
//! good.
//!
//! What it decides:
//! - a received chunk is good if its digest matches; only then is it
//!   written, and only once written is it reported [`VerifyEvent::Good`]
//!   (servable, and counted in the sidecar);
//! - the whole-file hash runs along the prefix of good chunks (`cursor`).
//!   A chunk checked while it is next in file order is folded in by the same
//!   job over the same bytes, its fold kept only if its check passes; good
//!   chunks past the cursor are held in memory (at most [`MAX_HELD_CHUNKS`],
//!   the farthest giving way) or read back when the hash reaches them, and a
//!   chunk read back is checked again (a disk that changed it fails the
//!   download rather than the whole-file hash). A job folds in every good
//!   chunk it can reach from the cursor, paired with its checks (two SHA1
//!   streams at once) while there are any;
//! - resuming, the chunks the sidecar claims are read back and checked; only
//!   those that match count as on disk.
//!
//! At most [`MAX_JOBS`] hash jobs are out at a time (the whole-file state in
//! one of them), at most [`MAX_WRITES`] writes and [`MAX_READS`] reads: with
//! the engine's one sidecar save and one rename, a download never has more
//! than [`crate::client::disk::MAX_DISK_OPS`] disk operations queued.
//!
//! Calling contract: inputs in any order the driver's results come back in;
//! after each, drain [`Verifier::poll`] until `None`. Every input takes the
//! file's digest (the verifier does not copy the chunk list).

use std::collections::{BTreeMap, VecDeque};

use shoal_sha1x::Sha1;

use crate::chunk::{chunk_len, FileDigest, Sha1Digest};
use crate::client::peer::Bitmap;

/// Good chunks past the whole-file hash's cursor kept in memory for it (32
/// MiB). The hash trails the newest chunk by as many as arrived ahead of a
/// late one: up to about 40 in the bench (1 GiB, 4 sharers). Each chunk it
/// does not hold is read back and checked again; with 32 held, runs that
/// passed that mark read back 900-1,800 of 2,048 chunks, each read-back
/// making the hash later still.
pub const MAX_HELD_CHUNKS: usize = 64;
/// Chunk writes queued at once.
pub const MAX_WRITES: usize = 16;
/// Chunk reads queued at once (the resume re-check's read-ahead).
pub const MAX_READS: usize = 4;
/// Most checks one hash job carries: under load, checks that arrived while a
/// job ran go together in the next, so the hasher waits for the engine once
/// per batch, not per chunk. Small, because every chunk in a job is memory
/// that cannot be written or reused until the job is back: with 16, the
/// bench (1 GiB, 4 sharers) peaked at 59-68 MiB and ran 0.55-0.58x the hash
/// limit against the old pipeline's 0.60-0.64x; with 4, 53-59 MiB and
/// 0.58-0.61x, 2,000 of 2,048 folds paired, no chunk read back.
pub const MAX_CHECKS_PER_JOB: usize = 4;
/// Hash jobs out at once. The second continues the whole-file hash from
/// where the first leaves it ([`HashChain`]), so the driver's hasher has the
/// next job at hand when it finishes one instead of waiting a round trip to
/// the engine. (Two jobs hashing independently, one of them checks only,
/// let the checks outrun the sequential folds: held chunks overflowed and
/// were read back, bench 0.26x the hash limit instead of 0.55x.)
pub const MAX_JOBS: usize = 2;
/// Held chunks from which folds run without checks to pair with. Below it a
/// fold waits for a check (two SHA1 streams over one pass cost about one):
/// the bench paired 1,930 of 2,048 folds so, against 1,300 when folds ran
/// alone from 16 held. From it, folds run alone to catch up, or the held
/// chunks pass [`MAX_HELD_CHUNKS`] behind a late chunk and every one evicted
/// costs a read and a second check (folds that always waited for checks:
/// 1,700-1,900 of 2,048 chunks read back in the bench, 1 GiB).
/// (Three quarters of the places, as [`Verifier::with_max_held`] sets them.)
pub const CATCH_UP_HELD: usize = MAX_HELD_CHUNKS * 3 / 4;
/// Most folds one job does: it takes good chunks as far as they reach from
/// the cursor, up to this many when catching up (or when no more checks will
/// come to pair with), as many as it has checks otherwise.
pub const MAX_FOLDS_PER_JOB: usize = 32;

/// Why a buffer is being checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CheckKind {
    /// Just received from a peer: written only if it matches.
    Received,
    /// Read back because the sidecar claims it (resume).
    Claimed,
    /// Read back for the whole-file hash: it was good when written.
    ReadBack,
}

#[derive(Debug)]
struct Check {
    chunk: u32,
    data: Vec<u8>,
    kind: CheckKind,
    digest: Option<Sha1Digest>,
}

#[derive(Debug)]
enum FoldSrc {
    /// The bytes of this job's check at that index (folded speculatively).
    Check(usize),
    /// A good chunk held in memory.
    Held(Vec<u8>),
}

#[derive(Debug)]
struct Fold {
    chunk: u32,
    src: FoldSrc,
}

/// Where a job's whole-file hash starts.
#[derive(Debug)]
enum Start {
    /// No folds.
    None,
    /// From this state.
    Given(Box<Sha1>),
    /// From the state the download's previous job with folds ended with
    /// (kept by the driver in the download's [`HashChain`]).
    Chained,
}

/// The whole-file state a download's hash jobs hand on to the next, kept by
/// the driver (one per download, default to start). The driver runs a
/// download's jobs one after another in the order it got them, so a job can
/// start from the state the previous one ended with without waiting for the
/// engine.
#[derive(Debug, Default)]
pub struct HashChain {
    state: Option<Sha1>,
}

/// Hashing work for the driver: chunk checks and whole-file folds, run with
/// [`HashJob::run`] and handed back unchanged otherwise.
#[derive(Debug)]
pub struct HashJob {
    seq: u64,
    checks: Vec<Check>,
    folds: Vec<Fold>,
    start: Start,
    /// The state after each fold, filled in by `run`.
    after: Vec<Sha1>,
    ran: bool,
}

impl HashJob {
    /// Computes the digests: each fold paired with a check (two SHA1 streams
    /// at once), the remaining checks two by two. Pure computation, for any
    /// thread; but a download's jobs run in the order they were handed out,
    /// each with the download's `chain`.
    pub fn run(&mut self, chain: &mut HashChain) {
        let mut whole = match &self.start {
            Start::None => Sha1::new(),
            Start::Given(s) => (**s).clone(),
            Start::Chained => match chain.state.clone() {
                Some(s) => s,
                // The chain was lost (a driver's mistake): report nothing.
                None => return,
            },
        };
        let mut states: Vec<Option<Sha1>> = self.checks.iter().map(|_| Some(Sha1::new())).collect();
        let mut next = 0;
        self.after.clear();
        for f in &self.folds {
            let fold_data: &[u8] = match &f.src {
                FoldSrc::Check(i) => &self.checks[*i].data,
                FoldSrc::Held(b) => b,
            };
            match states.get_mut(next) {
                Some(Some(s)) => {
                    Sha1::update2(s, &self.checks[next].data, &mut whole, fold_data);
                    next += 1;
                }
                _ => whole.update(fold_data),
            }
            self.after.push(whole.clone());
        }
        while next < self.checks.len() {
            let (a, rest) = states[next..].split_first_mut().expect("in range");
            match (a, rest.first_mut()) {
                (Some(a), Some(Some(b))) => {
                    Sha1::update2(a, &self.checks[next].data, b, &self.checks[next + 1].data);
                    next += 2;
                }
                (Some(a), _) => {
                    a.update(&self.checks[next].data);
                    next += 1;
                }
                (None, _) => next += 1,
            }
        }
        for (c, s) in self.checks.iter_mut().zip(states) {
            c.digest = s.map(|s| Sha1Digest(s.finalize()));
        }
        if !self.folds.is_empty() {
            chain.state = Some(whole);
        }
        self.ran = true;
    }

    /// Bytes this job hashes (for the driver's statistics).
    pub fn bytes(&self) -> usize {
        let folds: usize = self.folds.iter().map(|f| if let FoldSrc::Held(b) = &f.src { b.len() } else { 0 }).sum();
        self.checks.iter().map(|c| c.data.len()).sum::<usize>() + folds
    }
}

/// What the verifier asks of the driver.
#[derive(Debug)]
pub enum VerifyOp {
    /// Run it ([`HashJob::run`]) and hand it back.
    Hash(HashJob),
    /// Read chunk `chunk` of the part file into `buf` (its length is the chunk's).
    Read { chunk: u32, buf: Vec<u8> },
    /// Write this good chunk into the part file.
    Write { chunk: u32, data: Vec<u8> },
}

#[derive(Debug)]
pub enum VerifyEvent {
    Op(VerifyOp),
    /// A received chunk matched its SHA1 and is written: serve it, count it.
    Good(u32),
    /// A received chunk did not match; it was not written.
    Bad(u32),
    /// A chunk buffer nothing needs any more, for the next fetch.
    Buffer(Vec<u8>),
    /// The resume re-check is done: [`Verifier::stored`] is what the part file holds.
    Rechecked,
    /// Every chunk is written and the whole file's SHA1 matches.
    Complete,
    /// The download cannot go on (a disk error, a part file that changed).
    Failed(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Recheck,
    Running,
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadWhy {
    Claimed,
    ReadBack,
}

/// Counts of a download's hashing, for the debug log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerifyStats {
    pub jobs: u32,
    pub checks: u32,
    /// Folds run beside a check (two streams at once).
    pub paired_folds: u32,
    pub solo_folds: u32,
    pub read_backs: u32,
    /// Good chunks past the cursor not held (all places taken).
    pub evicted: u32,
    /// Most chunks held at once.
    pub max_held: u32,
}

/// A download's verification; see the module docs.
#[derive(Debug)]
pub struct Verifier {
    stats: VerifyStats,
    n: u32,
    size: u64,
    /// Chunks verified and written: what the part file holds.
    stored: Bitmap,
    /// The whole-file hash covers chunks `0..cursor`, in this state.
    cursor: u32,
    whole: Sha1,
    /// Hash jobs out, in the order handed out (at most [`MAX_JOBS`]): each
    /// one's number, and how many folds and checks it carries.
    inflight: VecDeque<(u64, usize, usize)>,
    /// Jobs back before an earlier one, waiting their turn.
    parked: BTreeMap<u64, HashJob>,
    next_job: u64,
    /// The next chunk a new job folds: past the folds in flight.
    frontier: u32,
    /// A job's folds were not all kept while a later one, built on them, is
    /// out: its folds are thrown away, and none are handed out until every
    /// job is back.
    broken: bool,
    unchecked: VecDeque<Check>,
    held: BTreeMap<u32, Vec<u8>>,
    /// Most chunks held ([`MAX_HELD_CHUNKS`] unless set).
    max_held: usize,
    reading: BTreeMap<u32, ReadWhy>,
    /// Claimed chunks not yet read (resume).
    to_recheck: VecDeque<u32>,
    to_write: VecDeque<(u32, Vec<u8>)>,
    writing: usize,
    /// Buffers kept for reads.
    spare: Vec<Vec<u8>>,
    phase: Phase,
    out: VecDeque<VerifyEvent>,
}

impl Verifier {
    /// A download of `digest`'s file whose part file claims `claimed` (from
    /// its sidecar; empty for a new one, and as long as the chunk list):
    /// those are read back and checked before anything else.
    pub fn new(digest: &FileDigest, claimed: &Bitmap) -> Verifier {
        let n = digest.chunks.len() as u32;
        let size = digest.size;
        let to_recheck: VecDeque<u32> = claimed.iter_set().filter(|&c| c < n).collect();
        let mut v = Verifier {
            stats: VerifyStats::default(),
            n,
            size,
            stored: Bitmap::new(n),
            cursor: 0,
            whole: Sha1::new(),
            inflight: VecDeque::new(),
            parked: BTreeMap::new(),
            next_job: 0,
            frontier: 0,
            broken: false,
            unchecked: VecDeque::new(),
            held: BTreeMap::new(),
            max_held: MAX_HELD_CHUNKS,
            reading: BTreeMap::new(),
            phase: if to_recheck.is_empty() { Phase::Running } else { Phase::Recheck },
            to_recheck,
            to_write: VecDeque::new(),
            writing: 0,
            spare: Vec::new(),
            out: VecDeque::new(),
        };
        if v.phase == Phase::Running {
            v.out.push_back(VerifyEvent::Rechecked);
        }
        v.pump_and_finish(digest);
        v
    }

    /// Holds at most `n` good chunks past the cursor (at least one): less
    /// memory, more chunks read back and checked again when they arrive far
    /// out of order.
    pub fn with_max_held(mut self, n: usize) -> Verifier {
        self.max_held = n.max(1);
        self
    }

    // ---- getters ----

    /// Chunks verified and written.
    pub fn stored(&self) -> &Bitmap {
        &self.stored
    }

    /// The whole-file hash has taken in chunks `0..folded()`.
    pub fn folded(&self) -> u32 {
        self.cursor
    }

    pub fn stats(&self) -> VerifyStats {
        self.stats
    }

    /// Disk operations handed out and not yet back.
    pub fn ops_out(&self) -> usize {
        self.writing + self.reading.len() + self.inflight.len()
    }

    // ---- inputs ----

    /// A chunk arrived whole from a peer: check it, then write it if good.
    pub fn submit(&mut self, chunk: u32, data: Vec<u8>, digest: &FileDigest) {
        if self.phase != Phase::Running || chunk >= self.n || self.stored.get(chunk) {
            // Not asked for (or already here): nothing to verify.
            self.give_back(data);
            return;
        }
        self.unchecked.push_back(Check { chunk, data, kind: CheckKind::Received, digest: None });
        self.pump_and_finish(digest);
    }

    /// A [`VerifyOp::Hash`] job, run (or not) by the driver. Jobs may come
    /// back in any order; they are taken in the order they were handed out.
    pub fn handle_hashed(&mut self, job: HashJob, digest: &FileDigest) {
        if self.phase == Phase::Done || !self.inflight.iter().any(|(q, _, _)| *q == job.seq) {
            return;
        }
        self.parked.insert(job.seq, job);
        while let Some(job) = self.inflight.front().and_then(|(q, _, _)| self.parked.remove(q)) {
            self.inflight.pop_front();
            self.take_job(job, digest);
            if self.phase == Phase::Done {
                return;
            }
        }
        if self.inflight.is_empty() {
            self.broken = false;
            self.frontier = self.cursor;
        }
        self.pump_and_finish(digest);
    }

    fn take_job(&mut self, job: HashJob, digest: &FileDigest) {
        let HashJob { checks, folds, after, ran, .. } = job;
        if !ran {
            return self.fail("a hash job came back without being run".into());
        }
        let ok: Vec<bool> = checks
            .iter()
            .map(|c| c.digest.is_some() && c.digest == digest.chunks.get(c.chunk as usize).copied())
            .collect();
        // The longest prefix of folds over good bytes is kept, unless an
        // earlier job's were not (then these were built on a wrong state).
        let accepted = if self.broken {
            0
        } else {
            folds
                .iter()
                .take_while(|f| match f.src {
                    FoldSrc::Held(_) => true,
                    FoldSrc::Check(i) => ok[i],
                })
                .count()
        };
        if accepted > 0 {
            self.whole = after[accepted - 1].clone();
            self.cursor += accepted as u32;
        }
        if accepted < folds.len() {
            if self.inflight.iter().any(|(_, f, _)| *f > 0) {
                // A later job folds on from the state just thrown away.
                self.broken = true;
            } else {
                // The next folds start again where the hash is.
                self.frontier = self.cursor;
            }
        }
        for (k, f) in folds.into_iter().enumerate() {
            if let FoldSrc::Held(buf) = f.src {
                if k < accepted {
                    self.give_back(buf);
                } else {
                    self.held.insert(f.chunk, buf);
                }
            }
        }
        // Held chunks the hash has passed (folded from another copy).
        while let Some((&c, _)) = self.held.first_key_value() {
            if c >= self.cursor {
                break;
            }
            if let Some(buf) = self.held.remove(&c) {
                self.give_back(buf);
            }
        }
        for (c, good) in checks.into_iter().zip(ok) {
            match (c.kind, good) {
                (CheckKind::Received, true) => self.to_write.push_back((c.chunk, c.data)),
                (CheckKind::Received, false) => {
                    self.out.push_back(VerifyEvent::Bad(c.chunk));
                    self.give_back(c.data);
                }
                (CheckKind::Claimed, true) => {
                    self.stored.set(c.chunk);
                    self.hold(c.chunk, c.data);
                }
                (CheckKind::Claimed, false) => self.give_back(c.data),
                (CheckKind::ReadBack, true) => self.hold(c.chunk, c.data),
                (CheckKind::ReadBack, false) => {
                    self.give_back(c.data);
                    return self.fail(format!(
                        "chunk {} of the part file no longer matches its SHA1: the disk changed it",
                        c.chunk
                    ));
                }
            }
        }
    }

    /// A [`VerifyOp::Write`] finished (`buf` is its data, handed back).
    pub fn handle_written(&mut self, chunk: u32, buf: Vec<u8>, result: Result<(), String>, digest: &FileDigest) {
        if self.phase == Phase::Done {
            return;
        }
        self.writing = self.writing.saturating_sub(1);
        if let Err(e) = result {
            return self.fail(format!("cannot write the part file: {e}"));
        }
        if chunk < self.n && !self.stored.get(chunk) {
            self.stored.set(chunk);
            self.out.push_back(VerifyEvent::Good(chunk));
        }
        self.hold(chunk, buf);
        self.pump_and_finish(digest);
    }

    /// A [`VerifyOp::Read`] finished.
    pub fn handle_read(&mut self, chunk: u32, buf: Vec<u8>, result: Result<(), String>, digest: &FileDigest) {
        if self.phase == Phase::Done {
            return;
        }
        let Some(why) = self.reading.remove(&chunk) else {
            return self.give_back(buf);
        };
        match (why, result) {
            (ReadWhy::Claimed, Ok(())) => {
                self.unchecked.push_back(Check { chunk, data: buf, kind: CheckKind::Claimed, digest: None })
            }
            (ReadWhy::Claimed, Err(e)) => {
                // Not readable: not on disk, as far as the download goes.
                tracing::debug!(chunk, error = %e, "a claimed chunk cannot be read back; fetching it again");
                self.give_back(buf);
            }
            (ReadWhy::ReadBack, Ok(())) => {
                // It holds the whole-file hash up: checked first.
                self.unchecked.push_front(Check { chunk, data: buf, kind: CheckKind::ReadBack, digest: None })
            }
            (ReadWhy::ReadBack, Err(e)) => {
                self.give_back(buf);
                return self.fail(format!("cannot read the part file back: {e}"));
            }
        }
        self.pump_and_finish(digest);
    }

    pub fn poll(&mut self) -> Option<VerifyEvent> {
        self.out.pop_front()
    }

    // ---- internals ----

    fn fail(&mut self, reason: String) {
        if self.phase != Phase::Done {
            self.phase = Phase::Done;
            self.out.push_back(VerifyEvent::Failed(reason));
        }
    }

    /// A buffer nothing here needs: kept for reads, or given to the download.
    fn give_back(&mut self, buf: Vec<u8>) {
        if self.spare.len() < MAX_READS && (self.phase == Phase::Recheck || self.spare.is_empty()) {
            self.spare.push(buf);
        } else {
            self.out.push_back(VerifyEvent::Buffer(buf));
        }
    }

    fn buffer(&mut self, chunk: u32) -> Vec<u8> {
        let len = chunk_len(self.size, chunk as u64) as usize;
        let mut b = self.spare.pop().unwrap_or_default();
        // Old bytes are overwritten by the read before anything reads them.
        b.resize(len, 0);
        b
    }

    /// Keeps a good chunk past the cursor for the whole-file hash, or gives
    /// its buffer back: when all places are taken, the held chunk farthest
    /// from the cursor makes way for a nearer one.
    fn hold(&mut self, chunk: u32, data: Vec<u8>) {
        // Passed by the hash, or being folded by a job out (if that fold is
        // not kept, the chunk is read back when the hash gets there).
        let passed = chunk < self.cursor || (!self.broken && chunk < self.frontier);
        if passed || self.held.contains_key(&chunk) {
            return self.give_back(data);
        }
        if self.held.len() < self.max_held {
            self.held.insert(chunk, data);
            self.stats.max_held = self.stats.max_held.max(self.held.len() as u32);
            return;
        }
        match self.held.last_key_value() {
            Some((&far, _)) if far > chunk => {
                let evicted = self.held.remove(&far).expect("present");
                self.held.insert(chunk, data);
                self.stats.evicted += 1;
                self.give_back(evicted);
            }
            _ => {
                self.stats.evicted += 1;
                self.give_back(data)
            }
        }
    }

    fn pump_and_finish(&mut self, digest: &FileDigest) {
        self.pump();
        if self.phase == Phase::Recheck
            && self.to_recheck.is_empty()
            && self.reading.is_empty()
            && self.inflight.is_empty()
            && !self.unchecked.iter().any(|c| c.kind == CheckKind::Claimed)
        {
            self.phase = Phase::Running;
            self.out.push_back(VerifyEvent::Rechecked);
            self.pump();
        }
        if self.phase == Phase::Running
            && self.cursor == self.n
            && self.stored.is_full()
            && self.writing == 0
            && self.inflight.is_empty()
        {
            let got = Sha1Digest(self.whole.clone().finalize());
            if got == digest.sha1 {
                self.phase = Phase::Done;
                self.out.push_back(VerifyEvent::Complete);
            } else {
                self.fail(format!("whole-file SHA1 mismatch: expected {}, got {got}", digest.sha1));
            }
        }
    }

    /// Hands out the work that can go now: writes, reads, the next hash job.
    fn pump(&mut self) {
        if self.phase == Phase::Done {
            return;
        }
        while self.writing < MAX_WRITES {
            let Some((chunk, data)) = self.to_write.pop_front() else { break };
            self.writing += 1;
            self.out.push_back(VerifyEvent::Op(VerifyOp::Write { chunk, data }));
        }
        if self.phase == Phase::Recheck {
            while self.reading.len() < MAX_READS {
                let Some(chunk) = self.to_recheck.pop_front() else { break };
                self.reading.insert(chunk, ReadWhy::Claimed);
                let buf = self.buffer(chunk);
                self.out.push_back(VerifyEvent::Op(VerifyOp::Read { chunk, buf }));
            }
        }
        // The chunks the whole-file hash reaches next that are on disk only
        // are read back, a few ahead while there is room to hold them.
        // (The chunks before the frontier are in the jobs out.)
        if !self.broken {
            let end = self.n.min(self.frontier + MAX_FOLDS_PER_JOB as u32);
            for c in self.frontier..end {
                let room = self.held.len() + self.reading.len() < self.max_held;
                if self.reading.len() >= MAX_READS || (c > self.frontier && !room) {
                    break;
                }
                if !self.stored.get(c) {
                    break;
                }
                if self.held.contains_key(&c)
                    || self.reading.contains_key(&c)
                    || self.unchecked.iter().any(|k| k.chunk == c)
                {
                    continue;
                }
                self.reading.insert(c, ReadWhy::ReadBack);
                self.stats.read_backs += 1;
                let buf = self.buffer(c);
                self.out.push_back(VerifyEvent::Op(VerifyOp::Read { chunk: c, buf }));
            }
        }
        self.dispatch();
    }

    /// Whether every chunk is on disk or on its way there (checked, or being
    /// checked): no more checks will come for folds to pair with.
    fn no_more_checks(&self, taken: usize) -> bool {
        let in_flight: usize = self.inflight.iter().map(|(_, _, c)| c).sum();
        let accounted = self.stored.count() as usize
            + self.to_write.len()
            + self.writing
            + self.unchecked.len()
            + taken
            + in_flight;
        self.phase == Phase::Recheck || accounted >= self.n as usize
    }

    /// The next hash jobs, while they can go and have work: the checks
    /// waiting, and the folds the whole-file hash can reach. A second job
    /// goes only with checks to do; its folds continue the first job's.
    fn dispatch(&mut self) {
        while self.inflight.len() < MAX_JOBS {
            if !self.inflight.is_empty() && self.unchecked.is_empty() {
                return;
            }
            let take = self.unchecked.len().min(MAX_CHECKS_PER_JOB);
            let checks: Vec<Check> = self.unchecked.drain(..take).collect();
            let mut folds = Vec::new();
            if !self.broken {
                // Folds pair with checks (two streams for the price of about
                // one); alone only to catch up once chunks pile up in memory,
                // or when no more checks will come to pair with.
                let catch_up = self.held.len() >= self.max_held * 3 / 4 || self.no_more_checks(checks.len());
                let limit = if catch_up { MAX_FOLDS_PER_JOB } else { checks.len() };
                let mut k = self.frontier;
                while folds.len() < limit && k < self.n {
                    if let Some(buf) = self.held.remove(&k) {
                        folds.push(Fold { chunk: k, src: FoldSrc::Held(buf) });
                    } else if let Some(i) = checks.iter().position(|c| c.chunk == k) {
                        folds.push(Fold { chunk: k, src: FoldSrc::Check(i) });
                    } else {
                        break;
                    }
                    k += 1;
                }
            }
            if checks.is_empty() && folds.is_empty() {
                return;
            }
            let start = if folds.is_empty() {
                Start::None
            } else if self.inflight.iter().any(|(_, f, _)| *f > 0) {
                Start::Chained
            } else {
                Start::Given(Box::new(self.whole.clone()))
            };
            self.frontier += folds.len() as u32;
            self.next_job += 1;
            self.inflight.push_back((self.next_job, folds.len(), checks.len()));
            self.stats.jobs += 1;
            self.stats.checks += checks.len() as u32;
            let paired = folds.len().min(checks.len());
            self.stats.paired_folds += paired as u32;
            self.stats.solo_folds += (folds.len() - paired) as u32;
            let job = HashJob { seq: self.next_job, checks, folds, start, after: Vec::new(), ran: false };
            self.out.push_back(VerifyEvent::Op(VerifyOp::Hash(job)));
        }
    }
}

#[cfg(test)]
mod tests;
