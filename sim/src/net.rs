//! The simulated network: connections, their latency and order, cuts, and
//! the delivery of what was sent.

use std::cmp::Reverse;
use std::net::SocketAddr;

use shoal_core::chunk::Sha1Digest;
use shoal_core::client::download::PeerConnId;
use shoal_core::client::{ClientInput, PeerEvent, TrackerEvent};
use shoal_core::time::Millis;
use shoal_core::tracker::{ConnId, NodeId};

use crate::hosts::Link;
use crate::World;

/// An endpoint of the simulated network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ep {
    Tracker(usize),
    Client(usize),
}

#[derive(Debug)]
pub(crate) enum Event {
    /// A peer connection from `from` (its id `conn`) reaches client `to`, which
    /// knows it as `accepted`.
    PeerConnected {
        from: usize,
        conn: PeerConnId,
        to: usize,
        accepted: PeerConnId,
    },
    PeerBytes {
        to: usize,
        conn: PeerConnId,
        bytes: Vec<u8>,
    },
    /// Client `from`'s connection `conn` reached a host proving a key that is
    /// not the sharer's (someone else answering at the sharer's address).
    ForgedPeerConnected {
        from: usize,
        conn: PeerConnId,
    },
    PeerClosed {
        to: usize,
        conn: PeerConnId,
    },
    /// A client's connection attempt reaches (or fails to reach) a tracker.
    Connected {
        client: usize,
        conn: ConnId,
    },
    ToTracker {
        conn: ConnId,
        bytes: Vec<u8>,
    },
    ToClient {
        conn: ConnId,
        bytes: Vec<u8>,
    },
    /// Tracker `from`'s link to `to` connects (or fails to).
    LinkConnected {
        from: usize,
        to: usize,
        conn: ConnId,
    },
    /// Bytes on a tracker-to-tracker link, arriving at the receiver's `conn`.
    LinkBytes {
        conn: ConnId,
        bytes: Vec<u8>,
    },
    /// Bytes the receiver of a link sends back on it (its `Pong`s).
    LinkBack {
        conn: ConnId,
        bytes: Vec<u8>,
    },
    /// A tracker closed `conn`; the other side sees it after the bytes before it.
    CloseConn {
        conn: ConnId,
    },
    /// A job tracker `t` handed out (in its run `run`) is done.
    JobDone {
        t: usize,
        run: u64,
        ticket: u64,
        done: shoal_core::tracker::JobDone,
    },
}

/// One end of a peer connection: (client, its id for the connection).
pub(crate) type PeerEnd = (usize, PeerConnId);

#[derive(Clone, Copy, Debug)]
pub(crate) enum ConnKind {
    /// Client `client` to tracker `tracker`.
    Client { client: usize, tracker: usize },
    /// Tracker `from`'s link to `to` (data flows from -> to only).
    Link { from: usize, to: usize },
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct LiveConn {
    pub(crate) kind: ConnKind,
    /// When the last bytes towards the tracker (or link receiver) are due.
    pub(crate) up_due: Millis,
    /// When the last bytes towards the client are due.
    pub(crate) down_due: Millis,
    /// Whether the tracker side was told of it (`handle_connected`).
    pub(crate) accepted: bool,
}

/// Knobs of the simulated network.
#[derive(Clone, Copy, Debug)]
pub struct NetConfig {
    pub min_latency: Millis,
    pub max_latency: Millis,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig { min_latency: Millis(1), max_latency: Millis(40) }
    }
}

impl World {
    pub(crate) fn latency(&mut self) -> Millis {
        let span = self.net.max_latency.0.saturating_sub(self.net.min_latency.0) + 1;
        Millis(self.net.min_latency.0 + self.rng.below(span))
    }

    pub(crate) fn schedule(&mut self, at: Millis, ev: Event) {
        let id = self.next_event;
        self.next_event += 1;
        self.queue.push(Reverse((at, id)));
        self.events.insert(id, ev);
    }

    pub(crate) fn reachable(&self, from: Ep, to: Ep) -> bool {
        !self.cuts.contains(&(from, to))
    }

    pub(crate) fn new_conn(&mut self) -> ConnId {
        let c = ConnId(self.next_conn);
        self.next_conn += 1;
        c
    }

    pub(crate) fn tracker_timers(&mut self, t: usize) {
        if self.trackers[t].node.is_none() {
            return;
        }
        let now = self.tracker_now(t);
        let due = self.trackers[t].node.as_ref().and_then(|n| n.poll_timeout()).is_some_and(|d| d <= now);
        if due {
            if let Some(n) = self.trackers[t].node.as_mut() {
                n.handle_timeout(now);
            }
            self.drain_tracker(t);
        }
    }

    /// Tracker `from` dials its link to `to`.
    pub(crate) fn dial(&mut self, from: usize, to: usize) {
        if let Some(Link::Connecting(old) | Link::Up(old)) = self.trackers[from].links.remove(&to) {
            self.close_link_conn(old);
        }
        let conn = self.new_conn();
        self.trackers[from].links.insert(to, Link::Connecting(conn));
        let kind = ConnKind::Link { from, to };
        self.conns.insert(conn, LiveConn { kind, up_due: self.now, down_due: self.now, accepted: false });
        let at = self.now.plus(self.latency());
        self.schedule(at, Event::LinkConnected { from, to, conn });
    }

    /// Tracker `from` hangs up its link to `to` (no report to it).
    pub(crate) fn hang_up(&mut self, from: usize, to: usize) {
        if let Some(Link::Connecting(c) | Link::Up(c)) = self.trackers[from].links.remove(&to) {
            self.close_link_conn(c);
        }
    }

    /// A link connection ends: its receiver sees the close after the bytes
    /// sent before it.
    fn close_link_conn(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get(&conn).copied() else { return };
        if c.accepted {
            let at = self.now.plus(self.latency()).max(c.up_due);
            self.schedule(at, Event::CloseConn { conn });
        } else {
            self.conns.remove(&conn);
        }
    }

    /// Link `conn` of tracker `from` to `to` failed: if it is still `from`'s
    /// link, `from` is told.
    pub(crate) fn link_down(&mut self, from: usize, to: usize, conn: ConnId) {
        if !matches!(self.trackers[from].links.get(&to), Some(Link::Connecting(c) | Link::Up(c)) if *c == conn) {
            return;
        }
        self.trackers[from].links.remove(&to);
        let now = self.tracker_now(from);
        if let Some(n) = self.trackers[from].node.as_mut() {
            n.handle_link_down(to as NodeId + 1, now);
        }
        self.drain_tracker(from);
    }

    /// The endpoints an event travels between (both ways for a connection
    /// attempt), for silent cuts; `None` for what a cut cannot hold up.
    fn path(&self, ev: &Event) -> Option<(Ep, Ep, bool)> {
        let conn_ends = |conn: &ConnId| {
            self.conns.get(conn).map(|c| match c.kind {
                ConnKind::Client { client, tracker } => (Ep::Client(client), Ep::Tracker(tracker)),
                ConnKind::Link { from, to } => (Ep::Tracker(from), Ep::Tracker(to)),
            })
        };
        match ev {
            Event::Connected { conn, .. } | Event::LinkConnected { conn, .. } | Event::CloseConn { conn } => {
                conn_ends(conn).map(|(a, b)| (a, b, true))
            }
            Event::ToTracker { conn, .. } | Event::LinkBytes { conn, .. } => {
                conn_ends(conn).map(|(a, b)| (a, b, false))
            }
            Event::ToClient { conn, .. } | Event::LinkBack { conn, .. } => conn_ends(conn).map(|(a, b)| (b, a, false)),
            Event::PeerConnected { .. }
            | Event::PeerBytes { .. }
            | Event::PeerClosed { .. }
            | Event::ForgedPeerConnected { .. }
            | Event::JobDone { .. } => None,
        }
    }

    /// Whether a silent cut holds `ev` up (until the heal).
    fn held_by_silence(&self, ev: &Event) -> bool {
        let Some((a, b, both)) = self.path(ev) else { return false };
        self.silent.contains(&(a, b)) || (both && self.silent.contains(&(b, a)))
    }

    pub(crate) fn deliver(&mut self, ev: Event) {
        if self.held_by_silence(&ev) {
            // Nothing is lost or reset: the packets stop, TCP retries, and
            // all of it arrives, in order, once the cut heals.
            self.stalled.push(ev);
            return;
        }
        match ev {
            Event::Connected { client, conn } => {
                let Some(c) = self.conns.get(&conn).copied() else { return };
                let ConnKind::Client { tracker, .. } = c.kind else { return };
                if self.clients[client].conn != Some(conn) {
                    return;
                }
                let ok = self.trackers[tracker].node.is_some()
                    && self.reachable(Ep::Client(client), Ep::Tracker(tracker))
                    && self.reachable(Ep::Tracker(tracker), Ep::Client(client));
                if !ok {
                    self.record(format!("{} c{client} connect to t{tracker} failed", self.now.0));
                    self.conns.remove(&conn);
                    self.clients[client].conn = None;
                    let now = self.client_now(client);
                    self.clients[client].engine.handle_input(ClientInput::Tracker(TrackerEvent::Closed), now);
                    self.drain_client(client);
                    return;
                }
                self.record(format!("{} c{client} connected t{tracker} {}", self.now.0, conn.0));
                self.conns.get_mut(&conn).expect("live").accepted = true;
                let remote = SocketAddr::new(crate::world::client_ip(client), 40000);
                let now = self.tracker_now(tracker);
                let node = self.trackers[tracker].node.as_mut().expect("up");
                node.handle_connected(conn, remote, now);
                node.handle_secured(conn, crate::key_of(remote.ip()), now);
                self.drain_tracker(tracker);
                let now = self.client_now(client);
                let key = crate::key_of(self.trackers[tracker].addr.ip());
                self.clients[client].engine.handle_input(ClientInput::Tracker(TrackerEvent::Connected { key }), now);
                self.drain_client(client);
            }
            Event::ToTracker { conn, bytes } => {
                let Some(LiveConn { kind: ConnKind::Client { tracker, .. }, .. }) = self.conns.get(&conn).copied()
                else {
                    return;
                };
                self.record(format!("{} ->t{tracker} {} {}", self.now.0, conn.0, Sha1Digest::of(&bytes).to_hex()));
                let now = self.tracker_now(tracker);
                if let Some(n) = self.trackers[tracker].node.as_mut() {
                    n.handle_bytes(conn, &bytes, now);
                }
                self.drain_tracker(tracker);
            }
            Event::ToClient { conn, bytes } => {
                let Some(LiveConn { kind: ConnKind::Client { client, .. }, .. }) = self.conns.get(&conn).copied()
                else {
                    return;
                };
                if self.clients[client].conn != Some(conn) {
                    return;
                }
                self.record(format!("{} ->c{client} {}", self.now.0, Sha1Digest::of(&bytes).to_hex()));
                let now = self.client_now(client);
                self.clients[client].engine.handle_input(ClientInput::Tracker(TrackerEvent::Bytes(&bytes)), now);
                self.drain_client(client);
            }
            Event::LinkConnected { from, to, conn } => {
                if !self.conns.contains_key(&conn) {
                    return;
                }
                if !matches!(self.trackers[from].links.get(&to), Some(Link::Connecting(c)) if *c == conn) {
                    self.conns.remove(&conn);
                    return;
                }
                let ok = self.trackers[to].node.is_some()
                    && self.reachable(Ep::Tracker(from), Ep::Tracker(to))
                    && self.reachable(Ep::Tracker(to), Ep::Tracker(from));
                if !ok {
                    self.conns.remove(&conn);
                    return self.link_down(from, to, conn);
                }
                self.record(format!("{} t{from}->t{to} linked {}", self.now.0, conn.0));
                self.conns.get_mut(&conn).expect("live").accepted = true;
                self.trackers[from].links.insert(to, Link::Up(conn));
                let remote = SocketAddr::new(self.trackers[from].addr.ip(), 50000);
                let now = self.tracker_now(to);
                let node = self.trackers[to].node.as_mut().expect("up");
                node.handle_connected(conn, remote, now);
                node.handle_secured(conn, crate::key_of(remote.ip()), now);
                self.drain_tracker(to);
                let now = self.tracker_now(from);
                let key = crate::key_of(self.trackers[to].addr.ip());
                if let Some(n) = self.trackers[from].node.as_mut() {
                    n.handle_link_up(to as NodeId + 1, key, now);
                }
                self.drain_tracker(from);
            }
            Event::LinkBytes { conn, bytes } => {
                let Some(LiveConn { kind: ConnKind::Link { from, to }, accepted: true, .. }) =
                    self.conns.get(&conn).copied()
                else {
                    return;
                };
                self.record(format!("{} t{from}->t{to} {}", self.now.0, Sha1Digest::of(&bytes).to_hex()));
                let now = self.tracker_now(to);
                if let Some(n) = self.trackers[to].node.as_mut() {
                    n.handle_bytes(conn, &bytes, now);
                }
                self.drain_tracker(to);
            }
            Event::LinkBack { conn, bytes } => {
                let Some(LiveConn { kind: ConnKind::Link { from, to }, .. }) = self.conns.get(&conn).copied() else {
                    return;
                };
                if !matches!(self.trackers[from].links.get(&to), Some(Link::Up(c)) if *c == conn) {
                    return;
                }
                self.record(format!("{} t{to}=>t{from} {}", self.now.0, Sha1Digest::of(&bytes).to_hex()));
                let now = self.tracker_now(from);
                if let Some(n) = self.trackers[from].node.as_mut() {
                    n.handle_link_bytes(to as NodeId + 1, &bytes, now);
                }
                self.drain_tracker(from);
            }
            Event::PeerConnected { from, conn, to, accepted } => {
                if !self.peer_links.contains_key(&(from, conn)) {
                    return;
                }
                self.record(format!("{} c{from}->c{to} peer connected", self.now.0));
                // Each end proves its own key (TLS, which the sim does not
                // run: the key is what the handshake would have proved).
                let now = self.client_now(to);
                self.clients[to].engine.handle_input(ClientInput::Peer(accepted, PeerEvent::Accepted), now);
                let key = crate::key_of(self.clients[from].listen.ip());
                self.clients[to].engine.handle_input(ClientInput::Peer(accepted, PeerEvent::Secured { key }), now);
                self.drain_client(to);
                let now = self.client_now(from);
                let key = Some(crate::key_of(self.clients[to].listen.ip()));
                self.clients[from].engine.handle_input(ClientInput::Peer(conn, PeerEvent::Connected { key }), now);
                self.drain_client(from);
            }
            Event::ForgedPeerConnected { from, conn } => {
                if !self.forged_dials.contains(&(from, conn)) {
                    return;
                }
                self.record(format!("{} c{from} peer {} reached an impostor", self.now.0, conn.0));
                let now = self.client_now(from);
                let key = Some(crate::key_of(crate::faults::IMPOSTOR.into()));
                self.clients[from].engine.handle_input(ClientInput::Peer(conn, PeerEvent::Connected { key }), now);
                self.drain_client(from);
            }
            Event::PeerBytes { to, conn, bytes } => {
                if !self.peer_links.contains_key(&(to, conn)) {
                    return;
                }
                self.record(format!("{} ->c{to} peer {} {}", self.now.0, conn.0, Sha1Digest::of(&bytes).to_hex()));
                let now = self.client_now(to);
                self.clients[to].engine.handle_input(ClientInput::Peer(conn, PeerEvent::Bytes(&bytes)), now);
                self.drain_client(to);
            }
            Event::PeerClosed { to, conn } => {
                // Closed from the other end (or never opened): whoever
                // dialled this serving end is known no more.
                self.link_user.remove(&(to, conn));
                if !self.clients[to].up {
                    return;
                }
                self.record(format!("{} c{to} peer {} closed", self.now.0, conn.0));
                let now = self.client_now(to);
                self.clients[to].engine.handle_input(ClientInput::Peer(conn, PeerEvent::Closed), now);
                self.drain_client(to);
            }
            Event::CloseConn { conn } => self.reset(conn),
            Event::JobDone { t, run, ticket, done } => {
                if self.trackers[t].run != run {
                    return;
                }
                self.record(format!("{} t{t} job {ticket} done", self.now.0));
                let now = self.tracker_now(t);
                if let Some(n) = self.trackers[t].node.as_mut() {
                    n.handle_job_done(ticket, done, now);
                }
                self.drain_tracker(t);
            }
        }
    }

    /// Bytes on a peer connection, delivered in order after the sender's
    /// uplink, the latency and the receiver's downlink (see [`crate::Bandwidth`]).
    pub(crate) fn peer_send(&mut self, c: usize, conn: PeerConnId, bytes: Vec<u8>) {
        let lat = self.latency().plus(self.clients[c].slow);
        let Some(&((to, other), due)) = self.peer_links.get(&(c, conn)) else { return };
        let len = bytes.len() as u64;
        let mut at_us = self.now.0 * 1000;
        let up = self.clients[c].link.up;
        if up > 0 {
            let start = at_us.max(self.clients[c].up_free_us);
            at_us = start + (len * 1_000_000).div_ceil(up);
            self.clients[c].up_free_us = at_us;
        }
        at_us += lat.0 * 1000;
        let down = self.clients[to].link.down;
        if down > 0 {
            let start = at_us.max(self.clients[to].down_free_us);
            at_us = start + (len * 1_000_000).div_ceil(down);
            self.clients[to].down_free_us = at_us;
        }
        let at = Millis(at_us.div_ceil(1000)).max(due);
        if let Some((_, d)) = self.peer_links.get_mut(&(c, conn)) {
            *d = at;
        }
        self.schedule(at, Event::PeerBytes { to, conn: other, bytes });
    }
}
