//! A tracker's links to the other trackers: dialling with backoff,
//! heartbeats, and the deadlines that notice silence.
//!
//! Each tracker dials every other one ([`TrackerOutput::Dial`]) and sends its
//! consensus and soft-state traffic on that link; the other side answers
//! every [`TrackerFrame::Ping`] on the same connection with a `Pong`. A link
//! that has carried nothing back for [`LINK_DEADLINE`] is hung up and
//! redialled (a cut that drops packets without a reset would otherwise wait
//! on TCP's retransmission backoff for many seconds), and so is a dial that
//! has not connected within [`DIAL_TIMEOUT`]; the pause before redialling
//! doubles from [`REDIAL_MIN`] to [`REDIAL_MAX`]. A connection another tracker
//! opened to us that stays silent as long is closed.
//!
//! A peer is *reachable* while both directions carry traffic within the
//! deadline. A node that does not reach a majority (itself included) names
//! no leader and answers writes `NoQuorum` at once, so its clients move to
//! the majority instead of waiting for writes that cannot be decided.

use std::collections::BTreeMap;

use super::replicator::{NodeId, Replicator};
use super::{TrackerNode, TrackerOutput};
use crate::identity::KeyId;
use crate::proto::{Message, Role, TrackerFrame, PROTOCOL_VERSION};
use crate::time::Millis;
use crate::wire::{encode, FrameDecoder};

/// How often a link carries a `Ping`.
pub const LINK_HEARTBEAT: Millis = Millis(100);
/// A link (or a peer's link to us) silent this long is dead.
pub const LINK_DEADLINE: Millis = Millis(800);
/// A dial not connected by then is abandoned and tried again.
pub const DIAL_TIMEOUT: Millis = Millis(500);
/// First pause before redialling; it doubles up to [`REDIAL_MAX`].
pub const REDIAL_MIN: Millis = Millis(50);
pub const REDIAL_MAX: Millis = Millis(400);

#[derive(Debug)]
enum State {
    Down { retry_at: Millis },
    Dialing { since: Millis },
    Up,
}

#[derive(Debug)]
pub(crate) struct Link {
    state: State,
    backoff: Millis,
    /// When something last came back on our link, and when we last pinged
    /// on it (whatever else it carries: only a ping is answered).
    heard: Millis,
    pinged: Millis,
    decoder: FrameDecoder,
    /// The wrong key last seen at this peer's address: warned once, not on
    /// every redial.
    impostor: Option<KeyId>,
}

/// The links of a node, by peer.
#[derive(Debug, Default)]
pub(crate) struct Links {
    map: BTreeMap<NodeId, Link>,
    /// When each peer was last heard on its own link to us.
    heard_in: BTreeMap<NodeId, Millis>,
}

impl Links {
    pub(crate) fn new(peers: &[NodeId]) -> Links {
        let map = peers
            .iter()
            .map(|p| {
                let link = Link {
                    state: State::Down { retry_at: Millis::ZERO },
                    backoff: REDIAL_MIN,
                    heard: Millis::ZERO,
                    pinged: Millis::ZERO,
                    decoder: FrameDecoder::new(1024),
                    impostor: None,
                };
                (*p, link)
            })
            .collect();
        Links { map, heard_in: BTreeMap::new() }
    }

    pub(crate) fn is_up(&self, node: NodeId) -> bool {
        self.map.get(&node).is_some_and(|l| matches!(l.state, State::Up))
    }

    /// Peers whose links are up.
    pub(crate) fn up(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.map.iter().filter(|(_, l)| matches!(l.state, State::Up)).map(|(n, _)| *n)
    }

    pub(crate) fn any_up(&self) -> bool {
        self.up().next().is_some()
    }

    /// Something arrived from `node` on its link to us.
    pub(crate) fn heard_in(&mut self, node: NodeId, now: Millis) {
        self.heard_in.insert(node, now);
    }

    fn reachable(&self, node: NodeId, l: &Link, now: Millis) -> bool {
        matches!(l.state, State::Up)
            && now.since(l.heard) < LINK_DEADLINE
            && self.heard_in.get(&node).is_some_and(|t| now.since(*t) < LINK_DEADLINE)
    }

    /// Whether `node` is reachable now (both directions heard lately).
    pub(crate) fn reachable_now(&self, node: NodeId, now: Millis) -> bool {
        self.map.get(&node).is_some_and(|l| self.reachable(node, l, now))
    }

    /// When `node` was last heard, on either link (none: never).
    pub(crate) fn last_heard(&self, node: NodeId) -> Option<Millis> {
        let ours = self.map.get(&node).map(|l| l.heard).filter(|t| *t > Millis::ZERO);
        ours.into_iter().chain(self.heard_in.get(&node).copied()).max()
    }

    /// Whether this node and the peers it reaches are a majority.
    pub(crate) fn quorum(&self, now: Millis) -> bool {
        let reached = self.map.iter().filter(|(n, l)| self.reachable(**n, l, now)).count();
        2 * (reached + 1) > self.map.len() + 1
    }

    /// The next time a link needs attention (a dial, a ping, a deadline).
    pub(crate) fn deadline(&self) -> Option<Millis> {
        let links = self.map.values().map(|l| match l.state {
            State::Down { retry_at } => retry_at,
            State::Dialing { since } => since.plus(DIAL_TIMEOUT),
            State::Up => l.pinged.plus(LINK_HEARTBEAT).min(l.heard.plus(LINK_DEADLINE)),
        });
        // When reachability changes, the leader this node names may too.
        let inbound = self.heard_in.values().map(|t| t.plus(LINK_DEADLINE));
        links.chain(inbound).min()
    }
}

impl<R: Replicator> TrackerNode<R> {
    /// Our link to tracker `node` connected and the other end proved `key`
    /// (its TLS handshake is done): if that is `node`'s key, introduce
    /// ourselves and tell it the soft state we know; if not, hang up (whoever
    /// answers at that address is not that tracker) and dial again later.
    pub fn handle_link_up(&mut self, node: NodeId, key: KeyId, now: Millis) {
        self.now = self.now.max(now);
        let Some(l) = self.links.map.get(&node) else { return };
        if !matches!(l.state, State::Dialing { .. }) {
            return;
        }
        if self.cfg.peer_keys.get(&node) != Some(&key) {
            let expected = self.cfg.peer_keys.get(&node).map_or("none known".to_string(), |k| k.to_string());
            if l.impostor != Some(key) {
                tracing::warn!(node, %key, %expected, "the tracker we reached does not hold that tracker's key; hanging up (again at each redial, quietly)");
            } else {
                tracing::debug!(node, %key, "the same wrong key again; hanging up");
            }
            if let Some(l) = self.links.map.get_mut(&node) {
                l.impostor = Some(key);
            }
            self.link_lost(node, now, true);
            self.pump(now);
            return;
        }
        let Some(l) = self.links.map.get_mut(&node) else { return };
        l.impostor = None;
        tracing::info!(node, "linked to tracker");
        l.state = State::Up;
        l.backoff = REDIAL_MIN;
        l.heard = now;
        l.pinged = Millis::ZERO;
        l.decoder = FrameDecoder::new(1024);
        let hello = Message::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Tracker };
        self.link_send(node, encode(&hello), false);
        let join = Message::Tracker(TrackerFrame::Join { node: self.replicator.me() });
        self.link_send(node, encode(&join), false);
        for frame in super::soft::soft_frames(self.full_soft_state(now)) {
            self.link_send(node, frame, false);
        }
        self.replicator.handle_peer_up(node);
        self.pump(now);
        if self.replicator.leader() == Some(node) {
            // What was forwarded to it while the link was down was lost.
            self.repropose();
        }
    }

    /// Our link to tracker `node` failed to connect, or closed.
    pub fn handle_link_down(&mut self, node: NodeId, now: Millis) {
        self.now = self.now.max(now);
        self.link_lost(node, now, false);
        self.pump(now);
    }

    /// Bytes came back on our link to tracker `node` (its `Pong`s).
    pub fn handle_link_bytes(&mut self, node: NodeId, bytes: &[u8], now: Millis) {
        self.now = self.now.max(now);
        let Some(l) = self.links.map.get_mut(&node) else { return };
        if !matches!(l.state, State::Up) {
            return;
        }
        l.decoder.push(bytes);
        loop {
            match l.decoder.next_message::<Message>() {
                Ok(Some(Message::Tracker(TrackerFrame::Pong))) => l.heard = now,
                Ok(None) => break,
                Ok(Some(Message::Refused { reason })) => {
                    tracing::warn!(node, %reason, "tracker refused our link");
                    self.link_lost(node, now, true);
                    break;
                }
                Ok(Some(_)) | Err(_) => {
                    tracing::warn!(node, "unexpected bytes on our link; hanging up");
                    self.link_lost(node, now, true);
                    break;
                }
            }
        }
        self.pump(now);
    }

    /// Sends on our link to `node`, if it is up.
    pub(crate) fn link_send(&mut self, node: NodeId, bytes: Vec<u8>, after_sync: bool) {
        if !self.links.is_up(node) {
            return;
        }
        self.outbox.send(TrackerOutput::PeerSend { node, bytes }, after_sync);
    }

    /// Sends `bytes` on our link to `node` at once, past what waits there
    /// for a sync: only for what promises nothing and needs no order with
    /// the rest (see `Outbox::send_now`).
    pub(crate) fn link_send_now(&mut self, node: NodeId, bytes: Vec<u8>) {
        if self.links.is_up(node) {
            self.outbox.send_now(TrackerOutput::PeerSend { node, bytes });
        }
    }

    /// The link is gone (or given up on): down, redialled after its backoff.
    pub(crate) fn link_lost(&mut self, node: NodeId, now: Millis, hang_up: bool) {
        let Some(l) = self.links.map.get_mut(&node) else { return };
        let was_up = matches!(l.state, State::Up);
        if matches!(l.state, State::Down { .. }) {
            return;
        }
        let pause = if was_up { REDIAL_MIN } else { l.backoff };
        l.backoff = if was_up { REDIAL_MIN } else { Millis((l.backoff.0 * 2).min(REDIAL_MAX.0)) };
        l.state = State::Down { retry_at: now.plus(pause) };
        if hang_up {
            self.outbox.push(TrackerOutput::Hangup { node });
        }
        self.outbox.forget_link(node);
        self.streams_link_lost(node);
        if was_up {
            tracing::info!(node, "link to tracker lost");
        }
    }

    /// Dials, pings, and hangs up silent links whose deadline passed; returns
    /// the peers whose own links to us fell silent (their connections are
    /// closed by the caller).
    pub(crate) fn links_timeout(&mut self, now: Millis) -> Vec<NodeId> {
        let silent: Vec<NodeId> =
            self.links.heard_in.iter().filter(|(_, t)| now.since(**t) >= LINK_DEADLINE).map(|(n, _)| *n).collect();
        for n in &silent {
            self.links.heard_in.remove(n);
        }
        let nodes: Vec<NodeId> = self.links.map.keys().copied().collect();
        for node in nodes {
            let Some(l) = self.links.map.get_mut(&node) else { continue };
            match l.state {
                State::Down { retry_at } if retry_at <= now => {
                    l.state = State::Dialing { since: now };
                    self.outbox.push(TrackerOutput::Dial { node });
                }
                State::Dialing { since } if now.since(since) >= DIAL_TIMEOUT => {
                    tracing::debug!(node, "dial timed out");
                    self.link_lost(node, now, true);
                }
                State::Up if now.since(l.heard) >= LINK_DEADLINE => {
                    tracing::info!(node, "link to tracker silent past its deadline; redialling");
                    self.link_lost(node, now, true);
                }
                State::Up if now.since(l.pinged) >= LINK_HEARTBEAT => {
                    l.pinged = now;
                    // Not behind votes waiting for this node's disk.
                    self.link_send_now(node, encode(&Message::Tracker(TrackerFrame::Ping)));
                }
                _ => {}
            }
        }
        silent
    }
}
