//! Chunk lists with the trackers: a file is shared by its index, with the
//! ranges of its chunk list the trackers lack sent after it; a download
//! fetches its file's chunk list range by range before it starts.
//!
//! Both keep a few requests in flight ([`RANGES_IN_FLIGHT`]) so a 512 GiB
//! file's 20 MiB of hashes move in 320 KiB pieces, never in one frame.

use super::*;
use crate::chunk::{FileIndex, Sha1Digest};
use crate::client::peer::Grant;
use crate::proto::SharerAddr;

/// Range requests one share or download keeps in flight.
pub const RANGES_IN_FLIGHT: usize = 4;
/// Times a share sends the ranges the trackers lack and asks again before it
/// gives up (a tracker that lost them, a failover in between).
const SHARE_ROUNDS: u32 = 3;

/// What a finished share does next.
#[derive(Clone, Debug)]
pub(super) enum ShareThen {
    /// The shell's `upload_file`: it prints its line and the file is served.
    Shell { ticket: Ticket, cmd: ShellCommand },
    /// A finished download registered as shared.
    Reshare(DownloadId),
}

/// A file being shared: its index sent, then the ranges the trackers lack.
pub(super) struct Sharing {
    group: GroupId,
    meta: FileMeta,
    then: ShareThen,
    to_put: Vec<u32>,
    putting: usize,
    rounds: u32,
    failed: bool,
}

/// A download whose chunk list is being fetched.
pub(super) struct Listing {
    ticket: Ticket,
    group: GroupId,
    name: FileName,
    destination: String,
    index: FileIndex,
    ranges: Vec<Option<Vec<Sha1Digest>>>,
    next: u32,
    sharers: Vec<SharerAddr>,
    grant: Grant,
}

impl ClientEngine {
    /// Shares `meta` in `group`: its index first.
    pub(super) fn start_share(&mut self, group: GroupId, meta: FileMeta, then: ShareThen, now: Millis) {
        let sid = self.next_job;
        self.next_job += 1;
        let s = Sharing { group, meta, then, to_put: Vec::new(), putting: 0, rounds: 0, failed: false };
        self.sharing.insert(sid, s);
        self.send_share(sid, now);
    }

    fn send_share(&mut self, sid: u64, now: Millis) {
        let Some(s) = self.sharing.get(&sid) else { return };
        let req = Request::UploadFile { group: s.group.clone(), file: s.meta.record() };
        self.send(Purpose::Share(sid), req, now);
    }

    /// The tracker answered a share.
    pub(super) fn share_answered(&mut self, sid: u64, result: Result<Reply, ShellError>, now: Millis) {
        let Some(s) = self.sharing.get_mut(&sid) else { return };
        if let Err(ShellError::Api(ApiError::MissingRanges { ranges })) = &result {
            let count = s.meta.digest.index().ranges.len() as u32;
            if s.rounds < SHARE_ROUNDS && !ranges.is_empty() && ranges.iter().all(|&i| i < count) {
                s.rounds += 1;
                s.to_put = ranges.iter().rev().copied().collect();
                s.to_put.dedup();
                return self.put_ranges(sid, now);
            }
        }
        let Some(s) = self.sharing.remove(&sid) else { return };
        self.share_done(s, result);
    }

    fn put_ranges(&mut self, sid: u64, now: Millis) {
        loop {
            let Some(s) = self.sharing.get_mut(&sid) else { return };
            if s.putting >= RANGES_IN_FLIGHT {
                return;
            }
            let Some(i) = s.to_put.pop() else {
                if s.putting == 0 {
                    self.send_share(sid, now);
                }
                return;
            };
            s.putting += 1;
            let hashes = s.meta.digest.range(i as u64).to_vec();
            self.send(Purpose::PutRange(sid), Request::PutRange { hashes }, now);
        }
    }

    /// The tracker answered one of a share's ranges.
    pub(super) fn range_put(&mut self, sid: u64, result: Result<Reply, ShellError>, now: Millis) {
        let Some(s) = self.sharing.get_mut(&sid) else { return };
        s.putting = s.putting.saturating_sub(1);
        match result {
            Ok(_) if !s.failed => self.put_ranges(sid, now),
            Ok(_) => {}
            Err(e) => {
                // The first failure answers; the other ranges' answers are dropped.
                if !s.failed {
                    s.failed = true;
                    s.to_put.clear();
                    if let Some(s) = self.sharing.remove(&sid) {
                        self.share_done(s, Err(e));
                    }
                }
            }
        }
    }

    fn share_done(&mut self, s: Sharing, result: Result<Reply, ShellError>) {
        match s.then {
            ShareThen::Reshare(id) => self.reshared(id, result),
            ShareThen::Shell { ticket, cmd } => {
                let result = result.map(|_| {
                    let ShellCommand::UploadFile { path, group } = &cmd else { return Vec::new() };
                    let d = &s.meta.digest;
                    let line = format!(
                        "shared {} in {group}: {} bytes, {} chunks, sha1 {}",
                        s.meta.name,
                        d.size,
                        chunk_count(d.size),
                        d.sha1
                    );
                    let have = Bitmap::full(d.chunks.len() as u32);
                    let share = Shared::new(path.clone(), d.size, d.sha1, have);
                    self.shares.insert((group.clone(), s.meta.name.clone()), share);
                    vec![line]
                });
                self.out.push_back(ClientOutput::Done { ticket, result });
            }
        }
    }

    /// A download's index came: its chunk list is fetched, then it starts.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start_listing(
        &mut self,
        ticket: Ticket,
        (group, name, destination): (GroupId, FileName, String),
        index: FileIndex,
        sharers: Vec<SharerAddr>,
        grant: Grant,
        now: Millis,
    ) {
        if let Err(e) = index.validate() {
            let err = ShellError::Api(ApiError::InvalidFile(e.to_string()));
            return self.out.push_back(ClientOutput::Done { ticket, result: Err(err) });
        }
        let lid = self.next_job;
        self.next_job += 1;
        let ranges = vec![None; index.ranges.len()];
        let l = Listing { ticket, group, name, destination, index, ranges, next: 0, sharers, grant };
        self.listing.insert(lid, l);
        self.get_ranges(lid, now);
    }

    fn get_ranges(&mut self, lid: u64, now: Millis) {
        let Some(l) = self.listing.get_mut(&lid) else { return };
        let mut asks = Vec::new();
        let in_flight = |l: &Listing| l.ranges[..l.next as usize].iter().filter(|r| r.is_none()).count();
        while (l.next as usize) < l.ranges.len() && in_flight(l) < RANGES_IN_FLIGHT {
            let i = l.next;
            l.next += 1;
            match l.index.implied_range(i as u64) {
                Some(hashes) => l.ranges[i as usize] = Some(hashes),
                None => asks.push((i, Request::GetRange { group: l.group.clone(), name: l.name.clone(), range: i })),
            }
        }
        let done = l.ranges.iter().all(|r| r.is_some());
        for (i, req) in asks {
            self.send(Purpose::GetRange(lid, i), req, now);
        }
        if done {
            self.listing_done(lid, now);
        }
    }

    /// The tracker answered one range of a download's chunk list.
    pub(super) fn range_got(&mut self, lid: u64, i: u32, result: Result<Reply, ShellError>, now: Millis) {
        let Some(l) = self.listing.get_mut(&lid) else { return };
        let hashes = match result {
            Ok(Reply::Range { hashes }) => hashes,
            Ok(_) => {
                return self.listing_failed(lid, ShellError::Local("unexpected answer to a chunk-list request".into()))
            }
            Err(e) => return self.listing_failed(lid, e),
        };
        if l.index.check_range(i as u64, &hashes).is_err() {
            let e = format!("the tracker sent range {i} of {}'s chunk list, which does not match its index", l.name);
            return self.listing_failed(lid, ShellError::Local(e));
        }
        if let Some(slot) = l.ranges.get_mut(i as usize) {
            *slot = Some(hashes);
        }
        self.get_ranges(lid, now);
    }

    fn listing_failed(&mut self, lid: u64, e: ShellError) {
        if let Some(l) = self.listing.remove(&lid) {
            self.out.push_back(ClientOutput::Done { ticket: l.ticket, result: Err(e) });
        }
    }

    fn listing_done(&mut self, lid: u64, now: Millis) {
        let Some(l) = self.listing.remove(&lid) else { return };
        let ranges: Vec<Vec<Sha1Digest>> = l.ranges.into_iter().flatten().collect();
        match l.index.digest(ranges) {
            Ok(digest) => {
                let (g, n, d) = (l.group, l.name, l.destination);
                self.start_download(l.ticket, g, n, d, digest, l.sharers, l.grant, now)
            }
            Err(e) => {
                let err = ShellError::Api(ApiError::InvalidFile(e.to_string()));
                self.out.push_back(ClientOutput::Done { ticket: l.ticket, result: Err(err) });
            }
        }
    }

    /// Whether a download of this file is fetching its chunk list.
    pub(super) fn listing_of(&self, group: &GroupId, name: &FileName) -> bool {
        self.listing.values().any(|l| &l.group == group && &l.name == name)
    }
}
