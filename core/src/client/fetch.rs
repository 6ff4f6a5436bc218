//! The engine's downloads, from `download_file` to the renamed file.
//!
//! A download goes through: opening its part file ([`DiskOp::OpenPart`]);
//! re-checking the chunks the sidecar claims ([`Verifier`], when resuming);
//! running, where [`Download`] fetches chunks from peers and every chunk that
//! arrives whole goes to the [`Verifier`] (checked, written, then served and
//! announced), while the sidecar is saved every tick; once every chunk is
//! written and the whole file's SHA1 matches, the rename ([`DiskOp::Finish`]);
//! and the re-share of the finished file with the tracker.
//!
//! The sidecar ([`sidecar`]) lives in two slots of the state file written in
//! turn, in place; one save is out at a time, so slots are written in order.

use std::net::SocketAddr;

use super::{ClientEngine, ClientOutput, Purpose, Ticket};
use crate::chunk::{FileDigest, FileMeta};
use crate::client::disk::{DiskDone, DiskOp, OpenedPart};
use crate::client::download::{Download, DownloadOutput};
use crate::client::peer::{Bitmap, Grant};
use crate::client::serve::Shared;
use crate::client::sidecar;
use crate::client::verify::{Verifier, VerifyEvent, VerifyOp};
use crate::ids::{FileName, GroupId};
use crate::proto::{Reply, Request, SharerAddr};
use crate::rng::Rng;
use crate::shell::ShellError;
use crate::time::Millis;

/// A download of this client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DownloadId(pub u64);

/// Chunks the whole-file hash passes between two [`DiskOp::Release`] hints.
const RELEASE_EVERY: u32 = 16;

pub(crate) enum DlState {
    Opening {
        sharers: Vec<SharerAddr>,
        grant: Grant,
    },
    /// Resuming: the chunks the sidecar claims are being checked.
    Checking {
        sharers: Vec<SharerAddr>,
        grant: Grant,
        verify: Box<Verifier>,
    },
    /// Fetching (or, once every chunk is here, finishing the whole-file hash).
    Running {
        fetch: Box<Download>,
        verify: Box<Verifier>,
    },
    /// Renaming.
    Finishing,
    Complete,
    Failed(String),
}

pub(crate) struct DownloadEntry {
    group: GroupId,
    name: FileName,
    digest: FileDigest,
    ticket: Option<Ticket>,
    pub(crate) state: DlState,
    final_path: String,
    /// (time, verified bytes) at the last rate sample, and the rate then.
    mark: (Millis, u64),
    rate: u64,
    /// Chunks were verified since the last sidecar save.
    dirty: bool,
    /// A sidecar save is out; the sequence number of the next.
    saving: bool,
    state_seq: u64,
    /// The whole-file hash had passed this chunk at the last release hint.
    released: u32,
    /// Whether the tracker was told this client holds part of the file:
    /// it records partial holders, not chunks, so once is enough (a new
    /// tracker after a failover is told again).
    announced: bool,
    sources_pending: bool,
    /// Per source, verified bytes; and the sources banned (kept once the fetch is gone).
    supplied: Vec<(SocketAddr, u64)>,
    banned: Vec<SocketAddr>,
    started: Millis,
    finished: Option<Millis>,
}

impl DownloadEntry {
    pub(crate) fn fetch_mut(&mut self) -> Option<&mut Download> {
        match &mut self.state {
            DlState::Running { fetch, .. } => Some(fetch),
            _ => None,
        }
    }

    fn is_active(&self) -> bool {
        !matches!(self.state, DlState::Complete | DlState::Failed(_))
    }
}

/// A snapshot of a download, for programs that embed the client (demo, bench).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DownloadStat {
    pub group: GroupId,
    pub name: FileName,
    pub size: u64,
    pub verified: u64,
    pub complete: bool,
    pub failed: Option<String>,
    /// Verified bytes per source peer.
    pub supplied: Vec<(SocketAddr, u64)>,
    /// Peers banned for sending a chunk that failed its SHA1.
    pub banned: Vec<SocketAddr>,
    pub elapsed: Millis,
    /// Peers connected that sent their chunk map (0 once it ended).
    pub peers: usize,
    /// Bytes verified a second, over the last second or so.
    pub rate: u64,
}

impl DownloadStat {
    /// Seconds left at the current rate, while it runs.
    pub fn eta_secs(&self) -> Option<u64> {
        let left = self.size.saturating_sub(self.verified);
        (self.rate > 0 && left > 0 && !self.complete && self.failed.is_none()).then(|| left.div_ceil(self.rate))
    }
}

/// `75s` as `1m15s`, `4000s` as `1h06m`.
pub fn format_secs(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

impl ClientEngine {
    // ---- getters ----

    /// Whether a download is still running (the piped shell waits for them).
    pub fn downloads_running(&self) -> bool {
        self.downloads.values().any(|d| d.is_active())
    }

    pub fn download_stats(&self, now: Millis) -> Vec<DownloadStat> {
        self.downloads
            .values()
            .map(|d| {
                let (verified, supplied, banned) = match &d.state {
                    DlState::Running { fetch, .. } => {
                        (fetch.verified_bytes(), fetch.supplied().collect(), fetch.banned().collect())
                    }
                    DlState::Finishing | DlState::Complete => (d.digest.size, d.supplied.clone(), d.banned.clone()),
                    _ => (0, d.supplied.clone(), d.banned.clone()),
                };
                DownloadStat {
                    group: d.group.clone(),
                    name: d.name.clone(),
                    size: d.digest.size,
                    verified,
                    complete: matches!(d.state, DlState::Complete),
                    failed: if let DlState::Failed(e) = &d.state { Some(e.clone()) } else { None },
                    supplied,
                    banned,
                    elapsed: d.finished.unwrap_or(now).since(d.started),
                    peers: match &d.state {
                        DlState::Running { fetch, .. } => fetch.active_peers(),
                        _ => 0,
                    },
                    rate: d.rate,
                }
            })
            .collect()
    }

    /// The digest of download `id`'s file (for a driver checking what it serves).
    pub fn download_digest(&self, id: DownloadId) -> Option<&FileDigest> {
        self.downloads.get(&id).map(|d| &d.digest)
    }

    /// The lines of `show_downloads`: one a download; with `verbose`, a
    /// running one's line ends with its ETA (` ETA 1m15s`) and each is
    /// followed by its sources (`  from <addr>: <bytes> bytes`) and the
    /// peers it banned (`  banned <addr>: sent a chunk that failed its SHA1`)
    /// and the addresses where someone else than the sharer answered
    /// (`  refused <addr>: not the sharer the tracker named ...`).
    pub(super) fn show_downloads(&self, verbose: bool) -> Vec<String> {
        if self.downloads.is_empty() {
            return vec!["no downloads".into()];
        }
        let mut lines = Vec::new();
        for d in self.downloads.values() {
            let (g, n) = (&d.group, &d.name);
            lines.push(match &d.state {
                DlState::Opening { .. } | DlState::Checking { .. } => format!("[D] {g} {n} 0% 0 MB/s 0 peers"),
                DlState::Running { fetch, .. } if fetch.is_complete() => format!("[D] {g} {n} 100% verifying"),
                DlState::Running { fetch, .. } => {
                    let pct = (fetch.verified_bytes() * 100).checked_div(d.digest.size).unwrap_or(100);
                    let line =
                        format!("[D] {g} {n} {pct}% {:.0} MB/s {} peers", d.rate as f64 / 1e6, fetch.active_peers());
                    // The ETA only with `-v`: the short line is what scripts parse.
                    let left = d.digest.size.saturating_sub(fetch.verified_bytes());
                    match left.checked_div(d.rate) {
                        Some(_) if verbose && left > 0 => format!("{line} ETA {}", format_secs(left.div_ceil(d.rate))),
                        _ => line,
                    }
                }
                DlState::Finishing => format!("[D] {g} {n} 100% verifying"),
                DlState::Complete => format!("[C] {g} {n}"),
                DlState::Failed(e) => format!("[F] {g} {n} {e}"),
            });
            if verbose {
                let (supplied, banned): (Vec<(SocketAddr, u64)>, Vec<SocketAddr>) = match &d.state {
                    DlState::Running { fetch, .. } => (fetch.supplied().collect(), fetch.banned().collect()),
                    _ => (d.supplied.clone(), d.banned.clone()),
                };
                for (a, b) in supplied.into_iter().filter(|(_, b)| *b > 0) {
                    lines.push(format!("  from {a}: {b} bytes"));
                }
                for a in banned {
                    lines.push(format!("  banned {a}: sent a chunk that failed its SHA1"));
                }
                if let DlState::Running { fetch, .. } = &d.state {
                    use crate::identity::KeyId;
                    for (a, want, found) in fetch.not_the_sharer() {
                        lines.push(format!(
                            "  refused {a}: not the sharer the tracker named (it proved key {}, not {})",
                            KeyId::short_or_none(found),
                            KeyId::short_or_none(want)
                        ));
                    }
                }
            }
        }
        lines
    }

    /// Why `download_file` for this file cannot start, if it cannot.
    pub(super) fn download_conflict(&self, group: &GroupId, name: &FileName) -> Option<String> {
        let running = self.downloads.values().any(|d| &d.group == group && &d.name == name && d.is_active())
            || self.listing_of(group, name);
        if running {
            return Some(format!("{name} from {group} is already being downloaded"));
        }
        if self.shares.contains_key(&(group.clone(), name.clone())) {
            return Some(format!("this client already has {name} of {group}"));
        }
        None
    }

    // ---- starting ----

    #[allow(clippy::too_many_arguments)]
    pub(super) fn start_download(
        &mut self,
        ticket: Ticket,
        group: GroupId,
        name: FileName,
        dest: String,
        digest: FileDigest,
        sharers: Vec<SharerAddr>,
        grant: Grant,
        now: Millis,
    ) {
        let id = DownloadId(self.next_download);
        self.next_download += 1;
        let size = digest.size;
        self.out.push_back(ClientOutput::Disk(DiskOp::OpenPart { id, dest, name: name.clone(), size }));
        self.downloads.insert(
            id,
            DownloadEntry {
                group,
                name,
                digest,
                ticket: Some(ticket),
                state: DlState::Opening { sharers, grant },
                final_path: String::new(),
                mark: (now, 0),
                rate: 0,
                dirty: false,
                saving: false,
                state_seq: 0,
                released: 0,
                announced: false,
                sources_pending: false,
                supplied: Vec::new(),
                banned: Vec::new(),
                started: now,
                finished: None,
            },
        );
    }

    // ---- disk results ----

    pub(super) fn disk_done(&mut self, done: DiskDone, now: Millis) {
        let (id, done) = match done {
            DiskDone::FileHashed { .. } => return,
            DiskDone::PartOpened { id, result } => return self.part_opened(id, result, now),
            DiskDone::Finished { id, result } => return self.finished(id, result, now),
            DiskDone::StateSaved { id, result } => {
                let Some(e) = self.downloads.get_mut(&id) else { return };
                e.saving = false;
                if let (Err(err), true) = (result, e.is_active()) {
                    self.fail_download(id, format!("cannot save the download's progress: {err}"), now);
                }
                return;
            }
            d @ (DiskDone::Read { id, .. } | DiskDone::Hashed { id, .. } | DiskDone::Written { id, .. }) => (id, d),
        };
        let Some(e) = self.downloads.get_mut(&id) else { return };
        let digest = &e.digest;
        let (DlState::Checking { verify, .. } | DlState::Running { verify, .. }) = &mut e.state else {
            // A download that ended meanwhile: nothing to do with it.
            return;
        };
        match done {
            DiskDone::Read { chunk, buf, result, .. } => verify.handle_read(chunk, buf, result, digest),
            DiskDone::Hashed { job, .. } => verify.handle_hashed(job, digest),
            DiskDone::Written { chunk, data, result, .. } => verify.handle_written(chunk, data, result, digest),
            _ => unreachable!("sorted above"),
        }
        self.drain_verifier(id, now);
    }

    fn part_opened(&mut self, id: DownloadId, result: Result<OpenedPart, String>, now: Millis) {
        let Some(e) = self.downloads.get_mut(&id) else { return };
        let DlState::Opening { sharers, grant } = std::mem::replace(&mut e.state, DlState::Finishing) else {
            // It was stopped while opening: the files are not wanted.
            if result.is_ok() {
                self.out.push_back(ClientOutput::Disk(DiskOp::Close { id }));
            }
            return;
        };
        let opened = match result {
            Ok(o) => o,
            Err(err) => {
                e.state = DlState::Failed(err.clone());
                e.finished = Some(now);
                if let Some(ticket) = e.ticket.take() {
                    self.out.push_back(ClientOutput::Done { ticket, result: Err(ShellError::Local(err)) });
                }
                return;
            }
        };
        let n = e.digest.chunks.len() as u32;
        let (claimed, next_seq) = match sidecar::latest(&opened.state, &e.digest) {
            // The first format's one record is left to be overwritten.
            Ok((have, _)) if sidecar::is_first_format(&opened.state) => (have, 0),
            Ok((have, seq)) => (have, seq + 1),
            Err(err) => {
                if !opened.state.is_empty() {
                    tracing::warn!(path = %opened.paths.state, error = %err, "ignoring the download state file");
                }
                (Bitmap::new(n), 0)
            }
        };
        e.state_seq = next_seq;
        e.final_path = opened.paths.final_path.clone();
        let key = (e.group.clone(), e.name.clone());
        let shared = Shared::new(opened.paths.part, e.digest.size, e.digest.sha1, Bitmap::new(n));
        self.shares.insert(key, shared);
        let verify = Box::new(Verifier::new(&e.digest, &claimed).with_max_held(self.cfg.download.hold_chunks));
        e.state = DlState::Checking { sharers, grant, verify };
        self.drain_verifier(id, now);
    }

    /// The resume re-check is done (or there was none): the download starts.
    fn start_fetching(&mut self, id: DownloadId, now: Millis) {
        let Some(e) = self.downloads.get_mut(&id) else { return };
        let DlState::Checking { sharers, grant, verify } = std::mem::replace(&mut e.state, DlState::Finishing) else {
            return;
        };
        let have = verify.stored().clone();
        let n = e.digest.chunks.len();
        let already = have.count();
        let line = if already > 0 {
            format!(
                "resuming {} into {}: {already} of {n} chunks already here, {} sources",
                e.name,
                e.final_path,
                sharers.len()
            )
        } else {
            format!(
                "downloading {} into {} ({} bytes, {n} chunks, {} sources)",
                e.name,
                e.final_path,
                e.digest.size,
                sharers.len()
            )
        };
        let key = (e.group.clone(), e.name.clone());
        if let Some(s) = self.shares.get_mut(&key) {
            s.have = have.clone();
        }
        let fetch = Download::new(
            self.cfg.download,
            e.group.clone(),
            e.name.clone(),
            e.digest.clone(),
            grant,
            have,
            super::OUTGOING | (id.0 << 24),
            Rng::from_u64(self.rng.next_u64()),
            now,
        );
        e.mark = (now, fetch.verified_bytes());
        e.announced = already > 0;
        e.state = DlState::Running { fetch: Box::new(fetch), verify };
        if let Some(ticket) = e.ticket.take() {
            self.out.push_back(ClientOutput::Done { ticket, result: Ok(vec![line]) });
        }
        if already > 0 {
            // Partial holders are listed as sources for others.
            self.announce(&key.0, &key.1, 0, now);
        }
        if let Some(fetch) = self.downloads.get_mut(&id).and_then(|e| e.fetch_mut()) {
            fetch.handle_sources(&sharers, now);
        }
        self.drain_download(id, now);
    }

    /// Moves the verifier's events on: its disk work out, its verdicts to
    /// the fetch.
    fn drain_verifier(&mut self, id: DownloadId, now: Millis) {
        loop {
            let Some(e) = self.downloads.get_mut(&id) else { return };
            let verify = match &mut e.state {
                DlState::Checking { verify, .. } | DlState::Running { verify, .. } => verify,
                _ => return,
            };
            let events: Vec<VerifyEvent> = std::iter::from_fn(|| verify.poll()).collect();
            let folded = verify.folded();
            if folded >= e.released + RELEASE_EVERY {
                e.released = folded;
                self.out.push_back(ClientOutput::Disk(DiskOp::Release { id, below: folded }));
            }
            if events.is_empty() {
                return;
            }
            for ev in events {
                let Some(e) = self.downloads.get_mut(&id) else { return };
                match ev {
                    VerifyEvent::Op(VerifyOp::Hash(job)) => {
                        self.out.push_back(ClientOutput::Disk(DiskOp::Hash { id, job }))
                    }
                    VerifyEvent::Op(VerifyOp::Read { chunk, buf }) => {
                        self.out.push_back(ClientOutput::Disk(DiskOp::Read { id, chunk, buf }))
                    }
                    VerifyEvent::Op(VerifyOp::Write { chunk, data }) => {
                        self.out.push_back(ClientOutput::Disk(DiskOp::Write { id, chunk, data }))
                    }
                    VerifyEvent::Good(chunk) | VerifyEvent::Bad(chunk) => {
                        let good = matches!(ev, VerifyEvent::Good(_));
                        if let Some(fetch) = e.fetch_mut() {
                            fetch.handle_checked(chunk, good, now);
                            // Served and announced now, before anything
                            // later in this batch (the rename) happens.
                            self.drain_download(id, now);
                        }
                    }
                    VerifyEvent::Buffer(buf) => {
                        if let Some(fetch) = e.fetch_mut() {
                            fetch.reuse_buffer(buf);
                        }
                    }
                    VerifyEvent::Rechecked => self.start_fetching(id, now),
                    VerifyEvent::Complete => self.finish(id, now),
                    VerifyEvent::Failed(reason) => return self.fail_download(id, format!("disk error: {reason}"), now),
                }
            }
        }
    }

    /// Moves a download's outputs into the engine's.
    pub(super) fn drain_download(&mut self, id: DownloadId, now: Millis) {
        let Some(e) = self.downloads.get_mut(&id) else { return };
        let Some(dl) = e.fetch_mut() else { return };
        let outs: Vec<DownloadOutput> = std::iter::from_fn(|| dl.poll_output()).collect();
        if outs.is_empty() {
            // Most reads of block data end here.
            return;
        }
        let key = (e.group.clone(), e.name.clone());
        let mut want_sources = false;
        let mut failed = None;
        let mut checks = Vec::new();
        for o in outs {
            match o {
                DownloadOutput::Connect { peer, addr } => {
                    self.link_outgoing(peer, id);
                    self.out.push_back(ClientOutput::PeerConnect { conn: peer, addr });
                }
                DownloadOutput::Send { peer, msg } => self.peer_send(peer, &msg),
                DownloadOutput::Close { peer } => {
                    self.peers.remove(&peer);
                    self.out.push_back(ClientOutput::PeerClose { conn: peer });
                }
                DownloadOutput::Check { chunk, data } => checks.push((chunk, data)),
                // Only now is the chunk on disk: serving it before would
                // send what the part file held before it was written.
                DownloadOutput::Verified { chunk } => {
                    if let Some(s) = self.shares.get_mut(&key) {
                        s.have.set(chunk);
                    }
                    self.tell_servers(&key, chunk);
                    if let Some(e) = self.downloads.get_mut(&id) {
                        e.dirty = true;
                        if !std::mem::replace(&mut e.announced, true) {
                            self.announce(&key.0, &key.1, chunk, now);
                        }
                    }
                }
                DownloadOutput::Banned { addr, chunk } => {
                    tracing::warn!(%addr, chunk, file = %key.1, "peer sent a corrupt chunk and is banned for this file");
                }
                DownloadOutput::NotTheSharer { addr, expected, found } => {
                    use crate::identity::KeyId;
                    tracing::warn!(
                        %addr,
                        expected = %KeyId::short_or_none(expected),
                        found = %KeyId::short_or_none(found),
                        file = %key.1,
                        "the peer at this address is not the sharer the tracker named (wrong key); nothing sent to it"
                    );
                }
                DownloadOutput::WantSources => want_sources = true,
                DownloadOutput::Failed { reason } => failed = Some(reason),
            }
        }
        if let Some(reason) = failed {
            return self.fail_download(id, reason, now);
        }
        let Some(e) = self.downloads.get_mut(&id) else { return };
        if want_sources && !e.sources_pending && self.session.is_some() {
            e.sources_pending = true;
            let req = Request::DownloadFile { group: key.0.clone(), name: key.1.clone() };
            self.send(Purpose::Sources(id), req, now);
        }
        if checks.is_empty() {
            return;
        }
        let Some(e) = self.downloads.get_mut(&id) else { return };
        if let DlState::Running { verify, .. } = &mut e.state {
            for (chunk, data) in checks {
                verify.submit(chunk, data, &e.digest);
            }
        }
        self.drain_verifier(id, now);
    }

    /// Every chunk is written and the whole file matched: rename it.
    fn finish(&mut self, id: DownloadId, now: Millis) {
        self.drain_download(id, now);
        let Some(e) = self.downloads.get_mut(&id) else { return };
        if let DlState::Running { fetch, verify } = &mut e.state {
            fetch.close_all();
            e.supplied = fetch.supplied().collect();
            e.banned = fetch.banned().collect();
            tracing::debug!(stats = ?verify.stats(), "whole-file hash done");
        }
        // The fetch's last outputs (its connections closing) go out first.
        let old = std::mem::replace(&mut e.state, DlState::Finishing);
        if let DlState::Running { mut fetch, .. } = old {
            while let Some(o) = fetch.poll_output() {
                if let DownloadOutput::Close { peer } = o {
                    self.peers.remove(&peer);
                    self.out.push_back(ClientOutput::PeerClose { conn: peer });
                }
            }
        }
        let Some(e) = self.downloads.get_mut(&id) else { return };
        let secs = now.since(e.started).0 as f64 / 1000.0;
        tracing::info!("{} verified whole after {secs:.2} s; renaming it", e.name);
        self.out.push_back(ClientOutput::Disk(DiskOp::Finish { id }));
    }

    fn finished(&mut self, id: DownloadId, result: Result<(), String>, now: Millis) {
        let Some(e) = self.downloads.get_mut(&id) else { return };
        if !matches!(e.state, DlState::Finishing) {
            return;
        }
        if let Err(err) = result {
            return self.fail_download(id, err, now);
        }
        e.state = DlState::Complete;
        e.finished = Some(now);
        let secs = now.since(e.started).0 as f64 / 1000.0;
        let sources: Vec<String> = e.supplied.iter().map(|(a, b)| format!("{a}={b}")).collect();
        tracing::info!(
            "download complete: {} ({} bytes) in {secs:.2} s; bytes fetched per source: {}",
            e.name,
            e.digest.size,
            sources.join(" ")
        );
        let key = (e.group.clone(), e.name.clone());
        let meta = FileMeta { name: e.name.clone(), digest: e.digest.clone() };
        let final_path = e.final_path.clone();
        if let Some(s) = self.shares.get_mut(&key) {
            s.path = final_path;
        }
        if self.session.is_some() {
            self.start_share(key.0, meta, super::lists::ShareThen::Reshare(id), now);
        }
    }

    pub(super) fn reshared(&mut self, id: DownloadId, result: Result<Reply, ShellError>) {
        if let Err(e) = result {
            tracing::warn!(download = id.0, error = %e, "could not register the finished download as shared");
        }
    }

    pub(super) fn fail_download(&mut self, id: DownloadId, reason: String, now: Millis) {
        let Some(e) = self.downloads.get_mut(&id) else { return };
        if let DlState::Running { fetch, .. } = &mut e.state {
            fetch.close_all();
            e.supplied = fetch.supplied().collect();
            e.banned = fetch.banned().collect();
        }
        let old = std::mem::replace(&mut e.state, DlState::Failed(reason.clone()));
        e.finished = Some(now);
        let ticket = e.ticket.take();
        let key = (e.group.clone(), e.name.clone());
        let opened = !matches!(old, DlState::Opening { .. } | DlState::Complete | DlState::Failed(_));
        if let DlState::Running { mut fetch, .. } = old {
            while let Some(o) = fetch.poll_output() {
                if let DownloadOutput::Close { peer } = o {
                    self.peers.remove(&peer);
                    self.out.push_back(ClientOutput::PeerClose { conn: peer });
                }
            }
        }
        if opened {
            self.out.push_back(ClientOutput::Disk(DiskOp::Close { id }));
        }
        if let Some(ticket) = ticket {
            self.out.push_back(ClientOutput::Done { ticket, result: Err(ShellError::Local(reason.clone())) });
        }
        tracing::warn!(download = id.0, %reason, "download failed");
        self.stop_serving(Some((&key.0, &key.1)), "the download failed");
        self.shares.remove(&key);
    }

    // ---- tracker answers ----

    pub(super) fn sources_answered(&mut self, id: DownloadId, result: Result<Reply, ShellError>, now: Millis) {
        let Some(e) = self.downloads.get_mut(&id) else { return };
        e.sources_pending = false;
        if let (Some(dl), Ok(Reply::Download { sharers, grant, .. })) = (e.fetch_mut(), result) {
            dl.set_grant(grant);
            dl.handle_sources(&sharers, now);
            self.drain_download(id, now);
        }
    }

    pub(super) fn announce(&mut self, group: &GroupId, name: &FileName, chunk: u32, now: Millis) {
        if self.session.is_some() {
            let req = Request::HaveChunk { group: group.clone(), name: name.clone(), chunk };
            self.send(Purpose::Announce, req, now);
        }
    }

    // ---- time ----

    pub(super) fn downloads_deadline(&self) -> Option<Millis> {
        self.downloads
            .values()
            .filter_map(|d| match &d.state {
                DlState::Running { fetch, .. } => fetch.poll_timeout(),
                _ => None,
            })
            .min()
    }

    pub(super) fn downloads_timeout(&mut self, now: Millis) {
        let due: Vec<DownloadId> = self
            .downloads
            .iter()
            .filter(|(_, d)| matches!(&d.state, DlState::Running { fetch, .. } if fetch.poll_timeout().is_some_and(|t| t <= now)))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            if let Some(dl) = self.downloads.get_mut(&id).and_then(|e| e.fetch_mut()) {
                dl.handle_timeout(now);
            }
            self.drain_download(id, now);
        }
    }

    /// Samples rates, saves progress, and reports it to the tracker once a
    /// second (for the operators' view of transfers).
    pub(super) fn downloads_tick(&mut self, now: Millis) {
        let mut reports = Vec::new();
        for (id, e) in self.downloads.iter_mut() {
            let DlState::Running { fetch, verify } = &e.state else { continue };
            let verified = fetch.verified_bytes();
            let dt = now.since(e.mark.0).0;
            if dt >= 1000 {
                e.rate = verified.saturating_sub(e.mark.1) * 1000 / dt;
                e.mark = (now, verified);
                let mut sources: Vec<(SocketAddr, u64)> = fetch.supplied().filter(|(_, b)| *b > 0).collect();
                sources.sort_by_key(|(a, b)| (std::cmp::Reverse(*b), *a));
                sources.truncate(crate::tracker::health::MAX_PROGRESS_SOURCES);
                reports.push(Request::Progress {
                    group: e.group.clone(),
                    name: e.name.clone(),
                    size: e.digest.size,
                    done: verified.min(e.digest.size),
                    rate: e.rate,
                    sources,
                });
            }
            if e.dirty && !e.saving {
                e.dirty = false;
                e.saving = true;
                let slot = sidecar::slot(&sidecar::encode(&e.digest, verify.stored()), e.state_seq);
                let offset = (e.state_seq % 2) * slot.len() as u64;
                e.state_seq += 1;
                self.out.push_back(ClientOutput::Disk(DiskOp::SaveState { id: *id, offset, bytes: slot }));
            }
        }
        // One report waiting at a time: a tracker that is down or slow gets
        // the newest when it answers, not a queue of old ones.
        let waiting = self.pending.values().any(|p| matches!(p.purpose, Purpose::Progress));
        if self.session.is_some() && !waiting {
            for r in reports {
                self.send(Purpose::Progress, r, now);
            }
        }
    }
}
