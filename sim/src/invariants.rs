//! What the world checks as it goes, and what tests ask of it afterwards.

use std::collections::BTreeSet;

use sha1::{Digest, Sha1};
use shoal_core::chunk::{chunk_len, CHUNK_SIZE};
use shoal_core::client::disk::{DiskDone, DiskOp};
use shoal_core::client::download::PeerConnId;
use shoal_core::client::peer::PeerMessage;
use shoal_core::client::{sidecar, DownloadId};
use shoal_core::meta::{Entry, MetaState};
use shoal_core::wire::decode;

use crate::World;

/// postcard's tag of [`PeerMessage::Want`] (its variant index).
const WANT_TAG: u8 = 1;

pub(crate) fn entry_hash(e: &Entry) -> [u8; 20] {
    Sha1::digest(postcard::to_allocvec(e).expect("encode")).into()
}

impl World {
    /// The bytes chunk `chunk` of client `c`'s download `id` must hold: the
    /// source's (`None` if the file was never put on the disk here).
    fn expected(&self, c: usize, id: DownloadId, chunk: u32) -> Option<&[u8]> {
        let d = self.clients[c].engine.download_digest(id)?;
        let src = self.sources.get(&d.sha1)?;
        let at = chunk as usize * CHUNK_SIZE as usize;
        // Within one piece: borrowed, never copied.
        match src.get(at..at + chunk_len(d.size, chunk as u64) as usize)? {
            std::borrow::Cow::Borrowed(b) => Some(b),
            std::borrow::Cow::Owned(_) => None,
        }
    }

    /// Before a disk operation runs: nothing unverified is written, and a
    /// resumed download fetches nothing its part file held verified.
    pub(crate) fn check_disk_op(&mut self, c: usize, op: &DiskOp) {
        let DiskOp::Write { id, chunk, data } = op else { return };
        if let Some(want) = self.expected(c, *id, *chunk) {
            assert!(data[..] == *want, "c{c} wrote chunk {chunk} of download {} with bytes not the file's", id.0);
        }
        self.chunks_written += 1;
        let kept = self.resume_keep.get(&(c, *id)).is_some_and(|k| k.contains(chunk));
        let excused = self
            .disk
            .part_of(c, *id)
            .and_then(|p| self.disk.record(&p.part))
            .is_some_and(|r| r.read_failed.contains(chunk));
        assert!(
            !kept || excused,
            "c{c} fetched chunk {chunk} of download {} again, though its part file held it verified before the crash",
            id.0
        );
    }

    /// After a disk operation: what a resumed download must keep.
    pub(crate) fn check_disk_done(&mut self, c: usize, done: &DiskDone) {
        let DiskDone::PartOpened { id, result: Ok(opened) } = done else { return };
        if opened.state.is_empty() {
            return;
        }
        let Some(d) = self.clients[c].engine.download_digest(*id) else { return };
        let Ok((claimed, _)) = sidecar::latest(&opened.state, d) else { return };
        let Some(part) = self.disk.stored(&opened.paths.part) else { return };
        let keep: BTreeSet<u32> = claimed
            .iter_set()
            .filter(|&ch| {
                let at = ch as usize * CHUNK_SIZE as usize;
                let want = self.expected(c, *id, ch);
                want.is_some_and(|w| part.holds(at, w))
            })
            .collect();
        self.resume_keep.insert((c, *id), keep);
    }

    /// A block served from a part file holds the file's bytes: only verified
    /// chunks are served.
    pub(crate) fn check_serve(&mut self, c: usize, path: &str, offset: u64, len: u32) {
        let Some(id) = self.disk.download_at(c, path) else { return };
        let chunk = (offset / CHUNK_SIZE) as u32;
        let Some(want) = self.expected(c, id, chunk) else { return };
        let at = chunk as usize * CHUNK_SIZE as usize;
        let holds = self.disk.stored(path).is_some_and(|f| f.holds(at, want));
        let rotted = self.disk.record(path).is_some_and(|r| r.rotted.contains(&chunk));
        assert!(
            holds || rotted,
            "c{c} served chunk {chunk} of {path} ({len} bytes at {offset}) before it held the file's bytes"
        );
        self.part_serves += 1;
    }

    /// What client `c` sends on peer connection `conn`, before it travels:
    /// nothing to a host that proved another key than the sharer's, and
    /// nothing of a file (its chunk map, its blocks) to an impostor showing
    /// a copied grant. Whether it travels on (false: its connection is an
    /// impostor's, which receives it nowhere).
    pub(crate) fn check_peer_transmit(&mut self, c: usize, conn: PeerConnId, bytes: &[u8]) -> bool {
        assert!(
            !self.forged_dials.contains(&(c, conn)),
            "c{c} sent {} bytes to a peer that proved a key other than the sharer's",
            bytes.len()
        );
        let body = bytes.get(4..).unwrap_or_default();
        if self.impostor_serves.contains(&(c, conn)) {
            if let Ok(m @ (PeerMessage::Have { .. } | PeerMessage::Block { .. })) = decode::<PeerMessage>(body) {
                panic!("c{c} sent {m:?} to an impostor showing a copied grant (not a member's key)");
            }
            return false;
        }
        if body.first() == Some(&WANT_TAG) {
            if let Ok(m @ PeerMessage::Want { .. }) = decode::<PeerMessage>(body) {
                self.last_want = Some(m);
            }
        }
        true
    }

    /// Client `c` sends block data on `conn`: only members ever receive chunk
    /// data (the downloader at the other end was logged in, when it
    /// dialled, as a user who was a member of the group at some point).
    pub(crate) fn check_receiver(&mut self, c: usize, conn: PeerConnId) {
        assert!(
            !self.impostor_serves.contains(&(c, conn)),
            "c{c} served file data to an impostor showing a copied grant"
        );
        // Closed already (by the other end, the bytes go nowhere; or by
        // this one in the step that sent this): nobody receives them.
        let Some(((to, _), _)) = self.peer_links.get(&(c, conn)) else { return };
        let to = *to;
        let Some((group, _)) = self.clients[c].engine.serving(conn) else { return };
        let group = group.to_string();
        let user = self.link_user.get(&(c, conn)).cloned().flatten();
        let member = user.as_deref().is_some_and(|u| self.ever_member(&group, u));
        assert!(member, "c{c} served chunk data of group {group} to c{to} as {user:?}, never a member of it");
        self.member_serves += 1;
    }

    /// Client `c` closed peer connection `conn`: forget what was known of it.
    pub(crate) fn peer_closed_by(&mut self, c: usize, conn: PeerConnId) {
        if self.forged_dials.remove(&(c, conn)) {
            *self.faults.entry("forged sharer refused").or_default() += 1;
        }
        if self.impostor_serves.remove(&(c, conn)) {
            *self.faults.entry("copied grant refused").or_default() += 1;
        }
        self.link_user.remove(&(c, conn));
        if let Some(((to, other), _)) = self.peer_links.get(&(c, conn)) {
            let other_end = (*to, *other);
            self.link_user.remove(&other_end);
        }
    }

    /// Agreement: every tracker applies the same entry at each log index.
    pub(crate) fn check_applied(&mut self, t: usize, index: u64, entry: Option<Entry>) {
        let tr = &mut self.trackers[t];
        match entry {
            None => {
                assert!(index as usize <= self.canon.len(), "t{t} installed a snapshot at {index} beyond the log");
                tr.applied = index;
            }
            Some(e) => {
                assert_eq!(index, tr.applied + 1, "t{t} applied entry {index} after {}", tr.applied);
                tr.applied = index;
                let h = entry_hash(&e);
                let i = index as usize - 1;
                if i < self.canon.len() {
                    assert!(self.canon[i] == h, "t{t} applied a different entry at log index {index}: {e:?}");
                } else {
                    assert_eq!(i, self.canon.len(), "t{t} applied index {index} past the end");
                    self.canon.push(h);
                    if let Some(id) = e.id {
                        self.canon_ids.insert(id);
                    }
                    let _ = self.canon_state.apply(&e);
                    if let Err(why) = self.canon_state.check_invariants() {
                        panic!("metadata rule broken after log index {index}: {why}");
                    }
                    for (g, grp) in self.canon_state.groups() {
                        self.ever_owner.insert((g.to_string(), grp.owner.to_string()));
                        for m in &grp.members {
                            self.ever_member.insert((g.to_string(), m.to_string()));
                        }
                    }
                }
            }
        }
    }

    /// The metadata after every entry decided so far (by whichever tracker applied it first).
    pub fn canon_state(&self) -> &MetaState {
        &self.canon_state
    }

    /// Whether `user` was ever a member (or owner) of `group` in the decided history.
    pub fn ever_member(&self, group: &str, user: &str) -> bool {
        self.ever_member.contains(&(group.to_string(), user.to_string()))
    }

    pub fn ever_owner(&self, group: &str, user: &str) -> bool {
        self.ever_owner.contains(&(group.to_string(), user.to_string()))
    }

    /// How many writes trackers acknowledged with success.
    pub fn acked_writes(&self) -> usize {
        self.acked.len()
    }

    /// Every running tracker's metadata, for convergence checks.
    pub fn metas(&self) -> Vec<(usize, &MetaState)> {
        self.trackers.iter().enumerate().filter_map(|(i, t)| t.node.as_ref().map(|n| (i, n.meta()))).collect()
    }
}
