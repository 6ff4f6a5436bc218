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
    /// A tracker closed `conn`; the other side sees it after the bytes before it.
    CloseConn {
        conn: ConnId,
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

pub(crate) const REDIAL_MIN: Millis = Millis(100);
pub(crate) const REDIAL_MAX: Millis = Millis(1_000);

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
        // Redial links that are down.
        let redial: Vec<usize> = self.trackers[t]
            .links
            .iter()
            .filter(|(_, l)| matches!(l, Link::Down { retry_at, .. } if *retry_at <= self.now))
            .map(|(p, _)| *p)
            .collect();
        for p in redial {
            let conn = self.new_conn();
            let Some(Link::Down { backoff, .. }) = self.trackers[t].links.get(&p).copied() else { continue };
            self.trackers[t].links.insert(p, Link::Connecting(conn));
            self.conns.insert(
                conn,
                LiveConn {
                    kind: ConnKind::Link { from: t, to: p },
                    up_due: self.now,
                    down_due: self.now,
                    accepted: false,
                },
            );
            let at = self.now.plus(self.latency());
            self.schedule(at, Event::LinkConnected { from: t, to: p, conn });
            // Remember the backoff for the next failure.
            self.link_backoff.insert((t, p), backoff);
        }
    }

    pub(crate) fn link_down(&mut self, from: usize, to: usize) {
        if self.trackers[from].node.is_none() {
            return;
        }
        let Some(l) = self.trackers[from].links.get(&to).copied() else { return };
        let backoff = self.link_backoff.get(&(from, to)).copied().unwrap_or(REDIAL_MIN);
        let was_up = matches!(l, Link::Up(_));
        let next_backoff = if was_up { REDIAL_MIN } else { Millis((backoff.0 * 2).min(REDIAL_MAX.0)) };
        let retry_at = self.now.plus(if was_up { REDIAL_MIN } else { backoff });
        self.trackers[from].links.insert(to, Link::Down { retry_at, backoff: next_backoff });
        self.link_backoff.insert((from, to), next_backoff);
        if was_up {
            let now = self.tracker_now(from);
            if let Some(n) = self.trackers[from].node.as_mut() {
                n.handle_peer_down(to as NodeId + 1, now);
            }
            self.drain_tracker(from);
        }
    }

    pub(crate) fn deliver(&mut self, ev: Event) {
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
                let remote = SocketAddr::from(([10, 0, 1, client as u8], 40000));
                let now = self.tracker_now(tracker);
                self.trackers[tracker].node.as_mut().expect("up").handle_connected(conn, remote, now);
                self.drain_tracker(tracker);
                let now = self.client_now(client);
                self.clients[client].engine.handle_input(ClientInput::Tracker(TrackerEvent::Connected), now);
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
                let ok = self.trackers[to].node.is_some() && self.reachable(Ep::Tracker(from), Ep::Tracker(to));
                if !ok {
                    self.conns.remove(&conn);
                    self.link_down(from, to);
                    return;
                }
                self.record(format!("{} t{from}->t{to} linked {}", self.now.0, conn.0));
                self.conns.get_mut(&conn).expect("live").accepted = true;
                self.trackers[from].links.insert(to, Link::Up(conn));
                let remote = SocketAddr::new(self.trackers[from].addr.ip(), 50000);
                let now = self.tracker_now(to);
                self.trackers[to].node.as_mut().expect("up").handle_connected(conn, remote, now);
                self.drain_tracker(to);
                let now = self.tracker_now(from);
                self.trackers[from].node.as_mut().expect("up").handle_peer_up(to as NodeId + 1, now);
                self.drain_tracker(from);
            }
            Event::LinkBytes { conn, bytes } => {
                let Some(LiveConn { kind: ConnKind::Link { from, to }, .. }) = self.conns.get(&conn).copied() else {
                    return;
                };
                self.record(format!("{} t{from}->t{to} {}", self.now.0, Sha1Digest::of(&bytes).to_hex()));
                let now = self.tracker_now(to);
                if let Some(n) = self.trackers[to].node.as_mut() {
                    n.handle_bytes(conn, &bytes, now);
                }
                self.drain_tracker(to);
            }
            Event::PeerConnected { from, conn, to, accepted } => {
                if !self.peer_links.contains_key(&(from, conn)) {
                    return;
                }
                self.record(format!("{} c{from}->c{to} peer connected", self.now.0));
                let now = self.client_now(to);
                self.clients[to].engine.handle_input(ClientInput::Peer(accepted, PeerEvent::Accepted), now);
                self.drain_client(to);
                let now = self.client_now(from);
                self.clients[from].engine.handle_input(ClientInput::Peer(conn, PeerEvent::Connected), now);
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
                if !self.clients[to].up {
                    return;
                }
                self.record(format!("{} c{to} peer {} closed", self.now.0, conn.0));
                let now = self.client_now(to);
                self.clients[to].engine.handle_input(ClientInput::Peer(conn, PeerEvent::Closed), now);
                self.drain_client(to);
            }
            Event::CloseConn { conn } => self.reset(conn),
        }
    }

    /// Bytes on a peer connection, delivered in order after a latency.
    pub(crate) fn peer_send(&mut self, c: usize, conn: PeerConnId, bytes: Vec<u8>) {
        let lat = self.latency().plus(self.clients[c].slow);
        let Some(((to, other), due)) = self.peer_links.get_mut(&(c, conn)) else { return };
        let at = self.now.plus(lat).max(*due);
        *due = at;
        let (to, other) = (*to, *other);
        self.schedule(at, Event::PeerBytes { to, conn: other, bytes });
    }
}
