//! Faults the world injects: cuts and resets, crashes and restarts, slow
//! peers, damaged files and disks.

use std::net::SocketAddr;

use shoal_core::chunk::CHUNK_SIZE;
use shoal_core::client::download::PeerConnId;
use shoal_core::client::{ClientConfig, ClientEngine, ClientInput, PeerEvent, TrackerEvent};
use shoal_core::rng::Rng;
use shoal_core::time::Millis;
use shoal_core::tracker::ConnId;

use crate::net::{ConnKind, Ep, Event, PeerEnd};
use crate::World;

impl World {
    // ---- faults ----

    /// Loses everything sent from `from` to `to` from now on (connections
    /// that need that direction are reset) until [`World::heal`].
    pub fn cut(&mut self, from: Ep, to: Ep) {
        self.record(format!("{} cut {from:?}->{to:?}", self.now.0));
        *self.faults.entry("cut").or_default() += 1;
        self.cuts.insert((from, to));
        let doomed: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| match c.kind {
                ConnKind::Client { client, tracker } => {
                    let pair = (Ep::Client(client), Ep::Tracker(tracker));
                    (from, to) == pair || (to, from) == pair
                }
                ConnKind::Link { from: a, to: b } => (from, to) == (Ep::Tracker(a), Ep::Tracker(b)),
            })
            .map(|(id, _)| *id)
            .collect();
        for c in doomed {
            self.reset(c);
        }
    }

    /// Cuts both directions between `a` and `b`.
    pub fn cut_both(&mut self, a: Ep, b: Ep) {
        self.cut(a, b);
        self.cut(b, a);
    }

    /// Drops everything sent from `from` to `to` from now on, silently: no
    /// reset, no error, the packets just stop (what was sent arrives after
    /// [`World::heal`], as TCP would retransmit it). Connection attempts
    /// across it hang. The nodes must notice by themselves.
    pub fn cut_silently(&mut self, from: Ep, to: Ep) {
        self.record(format!("{} silent cut {from:?}->{to:?}", self.now.0));
        *self.faults.entry("silent cut").or_default() += 1;
        self.silent.insert((from, to));
    }

    /// Cuts both directions between `a` and `b` silently.
    pub fn cut_both_silently(&mut self, a: Ep, b: Ep) {
        self.cut_silently(a, b);
        self.cut_silently(b, a);
    }

    /// Removes every cut; what silent cuts held up arrives now, in order.
    pub fn heal(&mut self) {
        self.record(format!("{} heal", self.now.0));
        self.cuts.clear();
        self.silent.clear();
        let at = self.now.plus(self.net.min_latency);
        for ev in std::mem::take(&mut self.stalled) {
            self.schedule(at, ev);
        }
    }

    /// Whether any cut is in place.
    pub fn is_cut(&self) -> bool {
        !self.cuts.is_empty() || !self.silent.is_empty()
    }

    /// Resets one open connection (both ends see it close).
    pub fn reset(&mut self, conn: ConnId) {
        let Some(c) = self.conns.remove(&conn) else { return };
        self.record(format!("{} reset {}", self.now.0, conn.0));
        *self.faults.entry("reset").or_default() += 1;
        match c.kind {
            ConnKind::Client { client, tracker } => {
                if c.accepted {
                    self.tracker_conn_closed(tracker, conn);
                }
                if self.clients[client].conn == Some(conn) {
                    self.clients[client].conn = None;
                    let now = self.client_now(client);
                    self.clients[client].engine.handle_input(ClientInput::Tracker(TrackerEvent::Closed), now);
                    self.drain_client(client);
                }
            }
            ConnKind::Link { from, to } => {
                if c.accepted {
                    self.tracker_conn_closed(to, conn);
                }
                if self.trackers[from].node.is_some() {
                    self.link_down(from, to, conn);
                }
            }
        }
    }

    /// Tracker `t` learns that its side of `conn` closed.
    pub(crate) fn tracker_conn_closed(&mut self, t: usize, conn: ConnId) {
        let now = self.tracker_now(t);
        if let Some(n) = self.trackers[t].node.as_mut() {
            n.handle_closed(conn, now);
        }
        self.drain_tracker(t);
    }

    /// Resets a random open connection, if any.
    pub fn reset_random(&mut self) {
        if self.conns.is_empty() {
            return;
        }
        let i = self.rng.below(self.conns.len() as u64) as usize;
        let id = *self.conns.keys().nth(i).expect("in range");
        self.reset(id);
    }

    /// Stops tracker `t` abruptly: memory lost, its durable log kept.
    pub fn crash_tracker(&mut self, t: usize) {
        if self.trackers[t].node.is_none() {
            return;
        }
        self.record(format!("{} crash t{t}", self.now.0));
        *self.faults.entry("tracker crash").or_default() += 1;
        let mine: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| match c.kind {
                ConnKind::Client { tracker, .. } => tracker == t,
                ConnKind::Link { from, to } => from == t || to == t,
            })
            .map(|(id, _)| *id)
            .collect();
        self.trackers[t].node = None;
        self.trackers[t].log.crash();
        for c in mine {
            // What the process wrote to a socket before it died still
            // arrives (the kernel sends it), then the connection closes.
            let lc = self.conns[&c];
            let out_due = match lc.kind {
                ConnKind::Client { .. } => Some(lc.down_due),
                ConnKind::Link { from, .. } if from == t => Some(lc.up_due),
                ConnKind::Link { .. } => None,
            };
            match out_due {
                Some(due) if due > self.now => {
                    self.conns.get_mut(&c).expect("listed").accepted = false;
                    self.schedule(due, Event::CloseConn { conn: c });
                }
                _ => self.reset(c),
            }
        }
        self.trackers[t].links.clear();
    }

    /// Starts tracker `t` again from its durable log (or from nothing, if `wipe`).
    pub fn restart_tracker(&mut self, t: usize, wipe: bool) {
        if self.trackers[t].node.is_some() {
            return;
        }
        if self.mid_step_crash == Some(t) {
            self.mid_step_crash = None;
        }
        self.record(format!("{} restart t{t} wipe={wipe}", self.now.0));
        if wipe {
            *self.faults.entry("wipe").or_default() += 1;
            self.trackers[t].log.wipe();
        }
        self.start_tracker(t);
    }

    /// Whether tracker `t` may lose its data dir without the cluster losing
    /// decided entries: every other tracker is up, reachable and holds every
    /// decided entry and every chunk-list range the log names. (A wiped
    /// tracker forgets its votes; if the others do not hold everything a
    /// majority agreed on, no consensus protocol can recover it. Wiping is
    /// losing a replica.)
    pub fn safe_to_wipe(&self, t: usize) -> bool {
        let n = self.log_len();
        let ranges: Vec<_> = self.canon_state().stored_ranges().collect();
        self.cuts.is_empty()
            && (0..self.trackers.len())
                .filter(|o| *o != t)
                .all(|o| self.tracker_up(o) && self.applied(o) == n && ranges.iter().all(|h| self.holds_range(o, h)))
    }

    pub fn tracker_up(&self, t: usize) -> bool {
        self.trackers[t].node.is_some()
    }

    /// Stops client `c` abruptly: its engine (memory) is lost, its files kept
    /// (the disk operations it had in flight are lost, done, or torn).
    pub fn crash_client(&mut self, c: usize) {
        if !self.clients[c].up {
            return;
        }
        self.record(format!("{} crash c{c}", self.now.0));
        *self.faults.entry("client crash").or_default() += 1;
        if let Some(conn) = self.clients[c].conn {
            self.reset(conn);
        }
        let ends: Vec<PeerEnd> = self.peer_links.keys().filter(|(x, _)| *x == c).copied().collect();
        for end in ends {
            if let Some(((to, other), due)) = self.peer_links.remove(&end) {
                self.peer_links.remove(&(to, other));
                let at = self.now.plus(self.net.min_latency).max(due);
                self.schedule(at, Event::PeerClosed { to, conn: other });
            }
        }
        self.disk.crash(c);
        self.clients[c].up = false;
        self.refresh_timer(c);
        self.forged_dials.retain(|(x, _)| *x != c);
        self.impostor_serves.retain(|(x, _)| *x != c);
        self.link_user.retain(|(x, _), _| *x != c);
    }

    /// Client `c`'s machine loses power: a crash, and its disk loses writes
    /// that had not reached the platter (see [`crate::disk::MemDisk::power_loss`]).
    pub fn power_loss_client(&mut self, c: usize) {
        if !self.clients[c].up {
            return;
        }
        self.record(format!("{} power loss c{c}", self.now.0));
        self.disk.power_loss(c);
        self.crash_client(c);
    }

    /// Starts client `c` again with a fresh engine (it must log in again).
    pub fn restart_client(&mut self, c: usize) {
        let all: Vec<usize> = (0..self.trackers.len()).collect();
        self.restart_client_with(c, &all);
    }

    /// Starts client `c` again, knowing only the trackers `only`.
    pub fn restart_client_with(&mut self, c: usize, only: &[usize]) {
        if self.clients[c].up {
            return;
        }
        self.record(format!("{} restart c{c}", self.now.0));
        let trackers: Vec<SocketAddr> = only.iter().map(|t| self.trackers[*t].addr).collect();
        let mut cfg = ClientConfig::new(self.clients[c].listen, trackers);
        cfg.max_upload_rate = crate::world::upload_cap(self.max_upload_rate, self.cap_at_uplink, self.clients[c].link);
        if let Some(d) = &self.download {
            cfg.download = *d;
        }
        self.clients[c].engine = ClientEngine::new(cfg, Rng::from_u64(self.rng.next_u64()));
        self.clients[c].results.clear();
        self.clients[c].up = true;
        self.refresh_timer(c);
    }

    pub fn client_up(&self, c: usize) -> bool {
        self.clients[c].up
    }

    /// Adds `extra` latency to everything client `c` sends to peers.
    pub fn set_slow(&mut self, c: usize, extra: Millis) {
        if extra > Millis::ZERO {
            *self.faults.entry("slow peer").or_default() += 1;
        }
        self.clients[c].slow = extra;
    }

    /// Cancels a mid-step crash that has not struck yet.
    pub fn disarm(&mut self) {
        self.mid_step_crash = None;
    }

    /// Crashes tracker `t` in the middle of its next step that writes
    /// records: after it sent what need not wait for them, before they are
    /// durable (the moment the driver's fsync would have protected).
    pub fn crash_tracker_mid_step(&mut self, t: usize) {
        if self.trackers[t].node.is_some() {
            self.mid_step_crash = Some(t);
        }
    }

    /// Damages a file on the simulated disk (a sharer whose copy rotted).
    pub fn corrupt_file(&mut self, path: &str) {
        *self.faults.entry("corrupt file").or_default() += 1;
        let len = self.disk.stored(path).map_or(0, |f| f.len());
        for i in (0..len).step_by(CHUNK_SIZE as usize) {
            self.disk.damage(path, i, 0xff);
        }
    }
    /// Client `c`'s disk fills up (or has room again).
    pub fn set_disk_full(&mut self, c: usize, full: bool) {
        self.record(format!("{} c{c} disk full={full}", self.now.0));
        self.disk.set_full(c, full);
    }

    /// A chunk of some part file no download has open rots on its disk.
    pub fn rot_a_stored_chunk(&mut self) {
        if self.disk.rot_a_chunk() {
            self.record(format!("{} a stored chunk rots", self.now.0));
        }
    }

    /// A host that is not a tracker calls tracker `t` as tracker `claim`,
    /// proving a key of its own (or, with `stolen_addr`, calling from tracker
    /// `claim`'s own address), and sends what a tracker would: its Join,
    /// soft state naming a grant for `claim`'s clients, and a consensus
    /// message. The link must be refused before any of it is taken.
    pub fn forge_tracker_link(&mut self, t: usize, claim: usize, stolen_addr: bool) {
        use shoal_core::proto::{Message, Role, SoftGrant, SoftState, TrackerFrame, PROTOCOL_VERSION};
        use shoal_core::wire::encode;
        let Some(node) = self.trackers[t].node.as_ref() else { return };
        let before = node.connections();
        let impostor: std::net::IpAddr = IMPOSTOR.into();
        let from = if stolen_addr { self.trackers[claim].addr.ip() } else { impostor };
        let conn = self.new_conn();
        let now = self.tracker_now(t);
        let mut bytes = encode(&Message::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Tracker });
        bytes.extend(encode(&Message::Tracker(TrackerFrame::Join { node: claim as u64 + 1 })));
        let grant = SoftGrant {
            grant: shoal_core::client::peer::Grant([0x66; 16]),
            user: shoal_core::ids::UserId::new("u0").expect("valid id"),
            key: Some(crate::key_of(impostor)),
            group: shoal_core::ids::GroupId::new("seed").expect("valid id"),
            name: shoal_core::ids::FileName::new("f0.bin").expect("valid name"),
            ttl_ms: 60_000,
        };
        let soft = SoftState { grants: vec![grant], ..SoftState::default() };
        bytes.extend(encode(&Message::Tracker(TrackerFrame::Soft(soft))));
        let node = self.trackers[t].node.as_mut().expect("checked above");
        node.handle_connected(conn, SocketAddr::new(from, 50000), now);
        node.handle_secured(conn, crate::key_of(impostor), now);
        node.handle_bytes(conn, &bytes, now);
        let after = node.connections();
        assert_eq!(after, before, "t{t} kept a link from a host proving another key than tracker {}'s", claim + 1);
        assert!(!node.knows_grant(&shoal_core::client::peer::Grant([0x66; 16])), "t{t} took a forged grant");
        *self.faults.entry("forged tracker refused").or_default() += 1;
        self.record(format!("{} forged link to t{t} as t{claim} refused", self.now.0));
        self.drain_tracker(t);
    }
}

/// Where impostors call from (no tracker or client of the world has it).
pub const IMPOSTOR: [u8; 4] = [10, 9, 9, 9];

impl World {
    /// The next peer connection any client opens reaches someone else at the
    /// sharer's address, who proves its own key: the downloader must send it
    /// nothing (the world asserts) and close it.
    pub fn forge_sharer_identity(&mut self) {
        self.forge_dial = true;
        self.record(format!("{} the next peer dial reaches an impostor", self.now.0));
    }

    /// An eavesdropper with a key of its own calls client `c` and shows the
    /// last `Want` (and grant) a downloader sent: the grant was issued to
    /// another key, so `c` must refuse it and send nothing of the file.
    pub fn copy_grant_to(&mut self, c: usize) {
        use shoal_core::client::peer::PeerMessage;
        use shoal_core::proto::{Role, PROTOCOL_VERSION};
        let Some(want) = self.last_want.clone() else { return };
        if !self.clients[c].up {
            return;
        }
        let conn = PeerConnId(self.next_accepted);
        self.next_accepted += 1;
        self.impostor_serves.insert((c, conn));
        *self.faults.entry("copied grant shown").or_default() += 1;
        self.record(format!("{} an impostor shows c{c} a copied grant", self.now.0));
        let now = self.client_now(c);
        let key = crate::key_of(IMPOSTOR.into());
        let mut bytes =
            shoal_core::wire::encode(&PeerMessage::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Peer });
        bytes.extend(shoal_core::wire::encode(&want));
        let e = &mut self.clients[c].engine;
        e.handle_input(ClientInput::Peer(conn, PeerEvent::Accepted), now);
        e.handle_input(ClientInput::Peer(conn, PeerEvent::Secured { key }), now);
        e.handle_input(ClientInput::Peer(conn, PeerEvent::Bytes(&bytes)), now);
        self.drain_client(c);
    }
}
