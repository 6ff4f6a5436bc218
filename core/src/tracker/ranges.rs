//! Chunk lists beside the log: the ranges of every shared file's chunk list,
//! stored by each tracker, replicated to a majority before the file's entry
//! is proposed, and fetched from the others by a tracker that lacks one.
//!
//! A file's log entry names each range of its chunk list by hash
//! ([`crate::chunk::FileIndex`]); the ranges themselves are content-addressed
//! pieces of at most [`RANGE_CHUNKS`] hashes that the driver keeps in its
//! range store ([`TrackerOutput::StoreRange`], [`TrackerOutput::LoadRange`]).
//! So the log, the in-memory state and its snapshots stay small whatever the
//! size of the files shared, and a chunk list travels in bounded pieces.
//!
//! - **Upload.** A client shares a file by its index; the tracker answers
//!   [`ApiError::MissingRanges`] until every stored range is durable on a
//!   majority. The client sends each missing range (`PutRange`); the tracker
//!   stores it, pushes it to every other tracker ([`TrackerFrame::Range`]) and
//!   answers once a majority (itself included) said `RangeStored`, each after
//!   its own sync. A range some file in the log names is on a majority
//!   already: the tracker that proposed that file checked.
//! - **Download.** A member asks for a range (`GetRange`); the tracker loads
//!   it from its store, or asks another tracker for it (`RangeWanted`) and
//!   answers when it comes.
//! - **Catch-up.** A tracker that applies a file (or installs a snapshot)
//!   naming ranges it lacks fetches them in the background, a few at a
//!   time, so a tracker restarted with an empty data dir serves every file's
//!   chunk list again once it has caught up.
//! - **Collection.** A range no file in the log names (an upload that never
//!   finished, a file no longer shared) is dropped from the store after
//!   [`UNNAMED_GRACE`]; a user may have at most [`MAX_UNNAMED_PER_USER`]
//!   such ranges put through one tracker at a time, so an account cannot
//!   fill the trackers' disks with ranges of files it never shares.

use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::chunk::{range_bytes, range_from_bytes, range_hash, Sha1Digest, RANGE_CHUNKS};

/// Ranges fetched from other trackers at once in the background.
pub const CATCH_UP_IN_FLIGHT: usize = 8;
/// A range asked of another tracker and not received by then is asked again
/// (of the next tracker).
pub const RANGE_ASK_AGAIN: Millis = Millis(1_000);
/// A range confirmed on a majority is remembered that long for the file's
/// upload that follows (after that, one the log names counts).
const CONFIRMED_KEPT: Millis = Millis(10 * 60 * 1000);
/// A stored range no file names is dropped after this long.
pub const UNNAMED_GRACE: Millis = Millis(10 * 60 * 1000);
/// Ranges put by one user through this tracker that no file names yet
/// (four files of the largest size).
pub const MAX_UNNAMED_PER_USER: usize = 4 * crate::chunk::MAX_RANGES as usize;
/// Most ranges a tracker waits for at once (pushes, loads and asks): a client
/// has at most [`MAX_WRITES_IN_FLIGHT`] in flight per connection.
pub const MAX_RANGE_WAITS: usize = 4096;

/// Who waits for a range load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LoadFor {
    Client { conn: ConnId, id: RequestId },
    Peer(NodeId),
}

/// A range pushed to the other trackers, until a majority holds it.
struct Push {
    stored: BTreeSet<NodeId>,
    waiters: Vec<(ConnId, RequestId)>,
    deadline: Millis,
}

/// A range this tracker lacks and asks the others for.
struct Want {
    asked: Option<Millis>,
    attempt: usize,
    waiters: Vec<(ConnId, RequestId, Millis)>,
}

#[derive(Default)]
pub(crate) struct Ranges {
    /// In this tracker's store (written; durable once the next sync is done).
    present: BTreeSet<Sha1Digest>,
    /// Durable on a majority, as counted in this run, and since when.
    confirmed: BTreeMap<Sha1Digest, Millis>,
    pushes: BTreeMap<Sha1Digest, Push>,
    loads: BTreeMap<Sha1Digest, Vec<LoadFor>>,
    wanted: BTreeMap<Sha1Digest, Want>,
    /// Held and named by no file in the log, since when.
    unnamed: BTreeMap<Sha1Digest, Millis>,
    /// Unnamed ranges a user put through this tracker, and how many each.
    put_by: BTreeMap<Sha1Digest, UserId>,
    per_user: BTreeMap<UserId, usize>,
}

impl Ranges {
    fn waits(&self) -> usize {
        self.pushes.len() + self.loads.len() + self.wanted.len()
    }

    /// A file in the log names the range now.
    fn named(&mut self, hash: &Sha1Digest) {
        self.unnamed.remove(hash);
        if let Some(u) = self.put_by.remove(hash) {
            if let Some(n) = self.per_user.get_mut(&u) {
                *n -= 1;
                if *n == 0 {
                    self.per_user.remove(&u);
                }
            }
        }
    }
}

impl<R: Replicator> TrackerNode<R> {
    /// The ranges the driver's store holds, told at start-up (before any
    /// input): the ranges the recovered log names and the store lacks are
    /// then fetched from the other trackers.
    pub fn add_stored_ranges(&mut self, hashes: impl IntoIterator<Item = Sha1Digest>) {
        self.ranges.present.extend(hashes);
        self.want_missing_ranges();
    }

    /// Whether this tracker's store holds the range.
    pub fn holds_range(&self, hash: &Sha1Digest) -> bool {
        self.ranges.present.contains(hash)
    }

    /// How many ranges this tracker's store holds.
    pub fn ranges_held(&self) -> usize {
        self.ranges.present.len()
    }

    fn majority(&self) -> usize {
        // Of peers + 1 trackers, more than half.
        self.replicator.peers().len().div_ceil(2) + 1
    }

    /// Whether the range is durable on a majority.
    pub(crate) fn range_confirmed(&self, hash: &Sha1Digest) -> bool {
        self.ranges.confirmed.contains_key(hash) || self.meta.names_range(hash)
    }

    /// Writes a range to our store (durable with the next sync).
    fn store_range(&mut self, hash: Sha1Digest, bytes: Vec<u8>) {
        if self.ranges.present.insert(hash) {
            if !self.meta.names_range(&hash) {
                self.ranges.unnamed.insert(hash, self.now);
            }
            self.outbox.push(TrackerOutput::StoreRange { hash, bytes });
        }
    }

    /// The ranges of the files an entry may remove (before it is applied).
    pub(crate) fn ranges_at_stake(&self, cmd: &Command) -> Vec<Sha1Digest> {
        let files: Vec<&crate::meta::SharedFile> = match cmd {
            Command::StopShare { group, name, .. } => {
                self.meta.group(group).and_then(|g| g.files.get(name)).map(|f| &**f).into_iter().collect()
            }
            Command::LeaveGroup { group, .. } => {
                self.meta.group(group).map(|g| g.files.values().map(|f| &**f).collect()).unwrap_or_default()
            }
            _ => Vec::new(),
        };
        files.into_iter().flat_map(|f| f.meta.index.stored_ranges().map(|(_, h)| h)).collect()
    }

    /// After an entry applied: ranges it named, and those it may have left unnamed.
    pub(crate) fn ranges_applied(&mut self, cmd: &Command, at_stake: Vec<Sha1Digest>, now: Millis) {
        if let Command::AddFile { file, .. } = cmd {
            for (_, h) in file.index.stored_ranges() {
                if self.meta.names_range(&h) {
                    self.ranges.named(&h);
                }
            }
        }
        for h in at_stake {
            if self.ranges.present.contains(&h) && !self.meta.names_range(&h) {
                self.ranges.unnamed.entry(h).or_insert(now);
            }
        }
    }

    /// The held ranges the log does not name, counted from now (start-up, a snapshot installed).
    fn find_unnamed(&mut self) {
        let now = self.now;
        let meta = &self.meta;
        let unnamed: Vec<Sha1Digest> = self.ranges.present.iter().filter(|h| !meta.names_range(h)).copied().collect();
        let hashes: Vec<Sha1Digest> = self.ranges.unnamed.keys().copied().collect();
        for h in hashes {
            if self.meta.names_range(&h) {
                self.ranges.named(&h);
            }
        }
        for h in unnamed {
            self.ranges.unnamed.entry(h).or_insert(now);
        }
    }

    /// A client's `PutRange`.
    pub(crate) fn put_range(
        &mut self,
        conn: ConnId,
        id: RequestId,
        user: &UserId,
        hashes: Vec<Sha1Digest>,
        now: Millis,
    ) {
        if hashes.is_empty() || hashes.len() as u64 > RANGE_CHUNKS {
            let e = format!("a range holds 1 to {RANGE_CHUNKS} chunk hashes, not {}", hashes.len());
            return self.respond(conn, id, Err(ApiError::InvalidFile(e)));
        }
        let hash = range_hash(&hashes);
        if self.range_confirmed(&hash) && self.ranges.present.contains(&hash) {
            return self.respond_synced(conn, id, Ok(Reply::Done));
        }
        let mine = self.ranges.put_by.contains_key(&hash);
        if !mine && !self.meta.names_range(&hash) {
            let n = self.ranges.per_user.get(user).copied().unwrap_or(0);
            if n >= MAX_UNNAMED_PER_USER {
                let e = format!("{n} chunk-list ranges of yours wait for their files; share those first");
                return self.respond(conn, id, Err(ApiError::Limit(e)));
            }
        }
        if self.ranges.waits() >= MAX_RANGE_WAITS && !self.ranges.pushes.contains_key(&hash) {
            return self.respond(conn, id, Err(ApiError::Limit("too many chunk-list ranges in flight".into())));
        }
        // A range write takes a slot as a log write does.
        if !self.admit_write(conn, id, now) {
            return;
        }
        let bytes = range_bytes(&hashes);
        self.store_range(hash, bytes.clone());
        if !mine && self.ranges.unnamed.contains_key(&hash) {
            self.ranges.put_by.insert(hash, user.clone());
            *self.ranges.per_user.entry(user.clone()).or_default() += 1;
        }
        let fresh = !self.ranges.pushes.contains_key(&hash);
        let me = self.replicator.me();
        let push = self.ranges.pushes.entry(hash).or_insert_with(|| Push {
            stored: BTreeSet::from([me]),
            waiters: Vec::new(),
            deadline: now,
        });
        push.waiters.push((conn, id));
        push.deadline = now.plus(WRITE_DEADLINE);
        if fresh {
            self.broadcast(encode(&Message::Tracker(TrackerFrame::Range(bytes))));
        }
        self.push_progress(hash, now);
    }

    /// Answers a push's clients once a majority holds its range.
    fn push_progress(&mut self, hash: Sha1Digest, now: Millis) {
        let majority = self.majority();
        let Some(p) = self.ranges.pushes.get(&hash) else { return };
        if p.stored.len() < majority {
            return;
        }
        let Some(p) = self.ranges.pushes.remove(&hash) else { return };
        self.ranges.confirmed.insert(hash, now);
        for (conn, id) in p.waiters {
            self.write_answered(conn);
            // Our own copy counts once it is durable: after the sync.
            self.respond_synced(conn, id, Ok(Reply::Done));
        }
    }

    /// An answer that may leave only once what was written before it is durable.
    pub(crate) fn respond_synced(&mut self, conn: ConnId, id: RequestId, result: Result<Reply, ApiError>) {
        self.send_response(conn, id, result, true);
    }

    /// A client's `GetRange`.
    pub(crate) fn get_range(&mut self, conn: ConnId, id: RequestId, me: &UserId, req: (GroupId, FileName, u32)) {
        let (group, name, range) = req;
        let index = match self.meta.group_of_member(me, &group) {
            Ok(g) => match g.files.get(&name) {
                Some(f) => f.meta.index.clone(),
                None => return self.respond(conn, id, Err(ApiError::NoSuchFile)),
            },
            Err(e) => return self.respond(conn, id, Err(e)),
        };
        let Some(hash) = index.ranges.get(range as usize).copied() else {
            let e = format!("the file's chunk list has {} ranges, not {}", index.ranges.len(), range + 1);
            return self.respond(conn, id, Err(ApiError::InvalidFile(e)));
        };
        if let Some(hashes) = index.implied_range(range as u64) {
            return self.respond(conn, id, Ok(Reply::Range { hashes }));
        }
        if self.ranges.waits() >= MAX_RANGE_WAITS {
            return self.respond(conn, id, Err(ApiError::Limit("too many chunk-list ranges in flight".into())));
        }
        if self.ranges.present.contains(&hash) {
            self.load_range(hash, LoadFor::Client { conn, id });
        } else {
            let deadline = self.now.plus(WRITE_DEADLINE);
            let w = self.ranges.wanted.entry(hash).or_insert(Want { asked: None, attempt: 0, waiters: Vec::new() });
            w.waiters.push((conn, id, deadline));
            self.ask_for_ranges(self.now);
        }
    }

    fn load_range(&mut self, hash: Sha1Digest, who: LoadFor) {
        let waiting = self.ranges.loads.entry(hash).or_default();
        waiting.push(who);
        if waiting.len() == 1 {
            self.outbox.push(TrackerOutput::LoadRange { hash });
        }
    }

    /// The driver read a range ([`TrackerOutput::LoadRange`]): `None` if its
    /// store did not have it after all.
    pub fn handle_range_loaded(&mut self, hash: Sha1Digest, bytes: Option<Vec<u8>>, now: Millis) {
        self.now = self.now.max(now);
        let who = self.ranges.loads.remove(&hash).unwrap_or_default();
        let bytes = bytes.filter(|b| Sha1Digest::of(b) == hash);
        let Some(bytes) = bytes else {
            tracing::warn!(%hash, "a chunk-list range is missing from the store; asking the other trackers");
            self.ranges.present.remove(&hash);
            let w = self.ranges.wanted.entry(hash).or_insert(Want { asked: None, attempt: 0, waiters: Vec::new() });
            for x in who {
                if let LoadFor::Client { conn, id } = x {
                    w.waiters.push((conn, id, now.plus(WRITE_DEADLINE)));
                }
            }
            return self.ask_for_ranges(now);
        };
        for x in who {
            match x {
                LoadFor::Client { conn, id } => self.answer_range(conn, id, &bytes),
                LoadFor::Peer(node) => {
                    self.link_send(node, encode(&Message::Tracker(TrackerFrame::Range(bytes.clone()))), false)
                }
            }
        }
    }

    fn answer_range(&mut self, conn: ConnId, id: RequestId, bytes: &[u8]) {
        let r = range_from_bytes(bytes).map(|hashes| Reply::Range { hashes }).ok_or(ApiError::RangeUnavailable);
        self.respond(conn, id, r);
    }

    /// Range frames from another tracker, on its link to us.
    pub(crate) fn handle_range_frame(&mut self, node: NodeId, frame: TrackerFrame, now: Millis) {
        match frame {
            TrackerFrame::Range(bytes) => {
                if bytes.is_empty() || !bytes.len().is_multiple_of(20) || bytes.len() as u64 > RANGE_CHUNKS * 20 {
                    tracing::warn!(node, len = bytes.len(), "a tracker sent a malformed chunk-list range");
                    return;
                }
                let hash = Sha1Digest::of(&bytes);
                if let Some(w) = self.ranges.wanted.remove(&hash) {
                    for (conn, id, _) in w.waiters {
                        self.answer_range(conn, id, &bytes);
                    }
                }
                self.store_range(hash, bytes);
                let stored = encode(&Message::Tracker(TrackerFrame::RangeStored(hash)));
                self.link_send(node, stored, true);
                self.ask_for_ranges(now);
            }
            TrackerFrame::RangeStored(hash) => {
                if let Some(p) = self.ranges.pushes.get_mut(&hash) {
                    p.stored.insert(node);
                    self.push_progress(hash, now);
                }
            }
            TrackerFrame::RangeWanted(hash) => {
                let asked = self.ranges.loads.get(&hash).is_some_and(|w| w.contains(&LoadFor::Peer(node)));
                if self.ranges.present.contains(&hash) && !asked && self.ranges.loads.len() < MAX_RANGE_WAITS {
                    self.load_range(hash, LoadFor::Peer(node));
                }
            }
            _ => {}
        }
    }

    /// Every range the log names that the store lacks is wanted (and one
    /// the store holds, not).
    pub(crate) fn want_missing_ranges(&mut self) {
        self.find_unnamed();
        let present = &self.ranges.present;
        self.ranges.wanted.retain(|h, w| !present.contains(h) || !w.waiters.is_empty());
        let missing: Vec<Sha1Digest> =
            self.meta.stored_ranges().filter(|h| !self.ranges.present.contains(*h)).copied().collect();
        for h in missing {
            self.ranges.wanted.entry(h).or_insert(Want { asked: None, attempt: 0, waiters: Vec::new() });
        }
    }

    /// A file just applied: the ranges it names that we lack are wanted.
    pub(crate) fn want_ranges_of(&mut self, group: &GroupId, name: &FileName) {
        let Some(f) = self.meta.group(group).and_then(|g| g.files.get(name)) else { return };
        let missing: Vec<Sha1Digest> =
            f.meta.index.stored_ranges().map(|(_, h)| h).filter(|h| !self.ranges.present.contains(h)).collect();
        for h in missing {
            self.ranges.wanted.entry(h).or_insert(Want { asked: None, attempt: 0, waiters: Vec::new() });
        }
    }

    /// Asks for wanted ranges: those a client waits for first, then the
    /// background catch-up, [`CATCH_UP_IN_FLIGHT`] at a time; each of one
    /// tracker, the next one on each retry.
    pub(crate) fn ask_for_ranges(&mut self, now: Millis) {
        let up: Vec<NodeId> = self.links.up().collect();
        if up.is_empty() || self.ranges.wanted.is_empty() {
            return;
        }
        let in_flight =
            self.ranges.wanted.values().filter(|w| w.asked.is_some_and(|t| now.since(t) < RANGE_ASK_AGAIN)).count();
        let mut room = CATCH_UP_IN_FLIGHT.saturating_sub(in_flight);
        let mut asks = Vec::new();
        for urgent in [true, false] {
            for (h, w) in self.ranges.wanted.iter_mut() {
                if w.waiters.is_empty() == urgent || w.asked.is_some_and(|t| now.since(t) < RANGE_ASK_AGAIN) {
                    continue;
                }
                if !urgent && room == 0 {
                    break;
                }
                room = room.saturating_sub(1);
                let node = up[(w.attempt + h.0[0] as usize) % up.len()];
                w.attempt += 1;
                w.asked = Some(now);
                asks.push((node, *h));
            }
        }
        for (node, h) in asks {
            self.link_send(node, encode(&Message::Tracker(TrackerFrame::RangeWanted(h))), false);
        }
    }

    /// Once a second: pushes and asks past their deadline answered, old
    /// confirmations forgotten, asks repeated.
    pub(crate) fn sweep_ranges(&mut self, now: Millis) {
        let late: Vec<Sha1Digest> =
            self.ranges.pushes.iter().filter(|(_, p)| p.deadline <= now).map(|(h, _)| *h).collect();
        for h in late {
            let Some(p) = self.ranges.pushes.remove(&h) else { continue };
            for (conn, id) in p.waiters {
                self.write_answered(conn);
                self.respond(conn, id, Err(ApiError::NoQuorum));
            }
        }
        let mut late = Vec::new();
        for w in self.ranges.wanted.values_mut() {
            w.waiters.retain(|&(conn, id, deadline)| {
                let keep = deadline > now;
                if !keep {
                    late.push((conn, id));
                }
                keep
            });
        }
        for (conn, id) in late {
            self.respond(conn, id, Err(ApiError::RangeUnavailable));
        }
        // What the log no longer names (the file is gone) is no longer wanted.
        let meta = &self.meta;
        self.ranges.wanted.retain(|h, w| !w.waiters.is_empty() || meta.names_range(h));
        self.ranges.confirmed.retain(|_, t| now.since(*t) < CONFIRMED_KEPT);
        self.drop_unnamed(now);
        self.ask_for_ranges(now);
    }

    /// Ranges unnamed past their grace (and not in use) leave the store.
    fn drop_unnamed(&mut self, now: Millis) {
        let r = &self.ranges;
        let due: Vec<Sha1Digest> = r
            .unnamed
            .iter()
            .filter(|(h, since)| {
                now.since(**since) >= UNNAMED_GRACE && !r.pushes.contains_key(*h) && !r.loads.contains_key(*h)
            })
            .map(|(h, _)| *h)
            .collect();
        for hash in due {
            tracing::debug!(%hash, "dropping a chunk-list range no file names");
            self.ranges.named(&hash);
            self.ranges.present.remove(&hash);
            self.ranges.confirmed.remove(&hash);
            self.outbox.push(TrackerOutput::DropRange { hash });
        }
    }

    /// Whether range work waits for the sweep.
    pub(crate) fn ranges_busy(&self) -> bool {
        !self.ranges.pushes.is_empty() || !self.ranges.wanted.is_empty() || !self.ranges.unnamed.is_empty()
    }
}
