//! The client's link to its tracker: one connection at a time, requests
//! with their ids, failover to the next tracker of `tracker_info.txt` when
//! one is silent, refuses or drops, and the same ids sent again there (so a
//! write is applied once); heartbeats while the session is idle.

use super::*;

impl ClientEngine {
    /// Requests nobody answered in time fail; a silent tracker is left, an
    /// idle session heartbeats, a backoff ends.
    pub(super) fn link_timeout(&mut self, now: Millis) {
        // Give up on requests nobody answered in time.
        let expired: Vec<u64> = self.pending.iter().filter(|(_, p)| p.give_up_at <= now).map(|(s, _)| *s).collect();
        for seq in expired {
            let p = self.pending.remove(&seq).expect("listed above");
            let err = ShellError::NoTracker { tried: self.cfg.trackers.len() };
            self.finish_request(p, Err(err), now);
        }
        match self.link {
            Link::Backoff(at) if at <= now => {
                self.link = Link::Down;
                if !self.pending.is_empty() || self.session.is_some() {
                    self.connect();
                }
            }
            Link::Up => {
                let waiting = !self.pending.is_empty();
                if waiting && now.since(self.last_heard) >= self.cfg.request_timeout {
                    tracing::debug!(tracker = %self.cfg.trackers[self.tracker], "tracker silent, failing over");
                    self.out.push_back(ClientOutput::Disconnect);
                    self.fail_over(now);
                } else if !waiting && self.session.is_some() && now.since(self.last_sent) >= self.cfg.heartbeat_every {
                    self.send(Purpose::Heartbeat, Request::Heartbeat, now);
                    self.announce_partial(now);
                }
            }
            Link::Connecting if now.since(self.last_heard) >= self.cfg.request_timeout => {
                self.out.push_back(ClientOutput::Disconnect);
                self.fail_over(now);
            }
            _ => {}
        }
    }

    pub(super) fn tracker_connected(&mut self, key: KeyId, now: Millis) {
        let at = self.cfg.trackers[self.tracker];
        let pinned = self.cfg.tracker_keys.get(self.tracker).copied().flatten();
        match pinned.or_else(|| self.tracker_seen_keys.get(&self.tracker).copied()) {
            Some(expected) if expected != key => {
                // Someone else answers at that address: it gets nothing, not
                // even the password of a login waiting to be sent.
                let why = if pinned.is_some() { "the key tracker_info pins" } else { "the key it proved before" };
                // The user reads it as the error of what waited (below), or
                // not at all if another tracker serves it.
                tracing::info!(tracker = %at, %key, %expected, "the tracker reached does not hold {why}; sent it nothing");
                self.key_refused.insert(self.tracker, ShellError::TrackerKey { tracker: at, got: key, expected, why });
                self.out.push_back(ClientOutput::Disconnect);
                if self.key_refused.len() == self.cfg.trackers.len() {
                    // Every tracker listed is someone else: say so now
                    // rather than when the requests time out.
                    let err = self.key_refused.remove(&self.tracker).expect("inserted above");
                    self.key_refused.clear();
                    let waiting: Vec<u64> = self.pending.keys().copied().collect();
                    for seq in waiting {
                        if let Some(p) = self.pending.remove(&seq) {
                            self.finish_request(p, Err(err.clone()), now);
                        }
                    }
                }
                return self.fail_over(now);
            }
            Some(_) => {
                self.key_refused.clear();
            }
            None => {
                self.key_refused.clear();
                tracing::info!(tracker = %at, %key, "tracker_info.txt pins no key for this tracker; requiring this one from now on");
                self.tracker_seen_keys.insert(self.tracker, key);
            }
        }
        self.link = Link::Up;
        self.last_heard = now;
        self.decoder = FrameDecoder::new(crate::wire::MAX_REPLY_FRAME);
        self.transmit(&Message::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Client }, now);
        let resend: Vec<Message> = self
            .pending
            .iter()
            .map(|(seq, p)| Message::Request {
                id: self.id(*seq),
                settled_below: self.settled_below(),
                session: self.token(),
                body: p.request.clone(),
            })
            .collect();
        for m in resend {
            self.transmit(&m, now);
        }
        if self.session.is_some() {
            // A new tracker (after a failover) learns at once that this
            // client is alive and which files it holds parts of; the others'
            // soft state may have died with the old one.
            if self.pending.is_empty() {
                self.send(Purpose::Heartbeat, Request::Heartbeat, now);
            }
            self.announce_partial(now);
        }
    }

    /// Tells the tracker again which files this client holds parts of (a
    /// download announces its first chunk only): with every heartbeat, so
    /// a record the tracker dropped when a lease lapsed comes back.
    pub(super) fn announce_partial(&mut self, now: Millis) {
        let partial: Vec<(GroupId, FileName, u32)> = self
            .shares
            .iter()
            .filter(|(_, s)| s.have.count() < s.have.len())
            .filter_map(|((g, n), s)| s.have.iter_set().next().map(|c| (g.clone(), n.clone(), c)))
            .collect();
        for (g, n, c) in partial {
            self.announce(&g, &n, c, now);
        }
    }

    pub(super) fn tracker_closed(&mut self, now: Millis) {
        if self.link == Link::Down || matches!(self.link, Link::Backoff(_)) {
            return;
        }
        if self.pending.is_empty() && self.session.is_none() {
            // Nothing to say (the tracker closed an idle link): reconnect when needed.
            self.link = Link::Down;
            return;
        }
        tracing::debug!(tracker = %self.cfg.trackers[self.tracker], "tracker connection lost");
        self.fail_over(now);
    }

    pub(super) fn tracker_bytes(&mut self, bytes: &[u8], now: Millis) {
        if self.link != Link::Up {
            return;
        }
        self.last_heard = now;
        self.decoder.push(bytes);
        loop {
            match self.decoder.next_message::<Message>() {
                Ok(None) => return,
                Ok(Some(Message::Response { id, result })) => self.handle_response(id, result, now),
                Ok(Some(Message::Refused { reason })) => {
                    tracing::warn!(%reason, "tracker refused us");
                    return self.fail_over(now);
                }
                Ok(Some(_)) | Err(_) => return self.fail_over(now),
            }
        }
    }

    pub(super) fn id(&self, seq: u64) -> RequestId {
        RequestId { client: self.client_id, seq }
    }

    /// Every request below this has its answer (or was given up on): the
    /// oldest still pending, or the next to be sent.
    pub(super) fn settled_below(&self) -> u64 {
        self.pending.keys().next().copied().unwrap_or(self.next_seq)
    }

    pub(super) fn token(&self) -> Option<SessionToken> {
        self.session.as_ref().map(|(t, _)| *t)
    }

    pub(super) fn transmit(&mut self, msg: &Message, now: Millis) {
        self.last_sent = now;
        self.out.push_back(ClientOutput::Transmit(encode(msg)));
    }

    pub(super) fn connect(&mut self) {
        self.link = Link::Connecting;
        self.out.push_back(ClientOutput::Connect { addr: self.cfg.trackers[self.tracker] });
    }

    pub(super) fn send(&mut self, purpose: Purpose, request: Request, now: Millis) {
        let seq = self.next_seq;
        let settled_below = self.settled_below();
        self.next_seq += 1;
        let msg = Message::Request { id: self.id(seq), settled_below, session: self.token(), body: request.clone() };
        let give_up_at = now.plus(match purpose {
            // Exit logs out, but must not keep the user waiting long.
            Purpose::Shell { cmd: ShellCommand::Exit, .. } => self.cfg.request_timeout,
            _ => self.cfg.give_up_after,
        });
        let idle = self.pending.is_empty();
        self.pending.insert(seq, Pending { purpose, request, give_up_at, refused: 0, sent_at: now });
        match self.link {
            Link::Up => {
                if idle {
                    self.last_heard = now;
                }
                self.transmit(&msg, now)
            }
            Link::Down => {
                self.last_heard = now;
                self.connect()
            }
            Link::Connecting | Link::Backoff(_) => {}
        }
    }

    pub(super) fn fail_over(&mut self, now: Millis) {
        self.tracker = (self.tracker + 1) % self.cfg.trackers.len();
        self.tried += 1;
        self.last_heard = now;
        if self.tried >= self.cfg.trackers.len() {
            // A whole round failed: pause before the next one. Trackers that
            // answered (no quorum yet, catching up) are alive and are tried
            // again sooner than ones that did not.
            self.tried = 0;
            let pause = if std::mem::take(&mut self.refused_round) {
                Millis(self.cfg.retry_backoff.0 / 5)
            } else {
                self.cfg.retry_backoff
            };
            self.link = Link::Backoff(now.plus(pause));
        } else {
            self.connect();
        }
    }

    pub(super) fn handle_response(&mut self, id: RequestId, result: Result<Reply, ApiError>, now: Millis) {
        if id.client != self.client_id {
            return;
        }
        let Some(mut p) = self.pending.remove(&id.seq) else { return };
        if let Err(ApiError::NoQuorum | ApiError::CatchingUp) = result {
            // This tracker cannot decide (or has not caught up): another may.
            // The same request id goes to the next one, so a write that was
            // decided after all is still applied once.
            p.refused += 1;
            if p.refused < self.cfg.trackers.len() || now.since(p.sent_at) < self.cfg.quorum_wait {
                tracing::debug!(tracker = %self.cfg.trackers[self.tracker], "tracker cannot serve, failing over");
                self.pending.insert(id.seq, p);
                self.refused_round = true;
                self.out.push_back(ClientOutput::Disconnect);
                return self.fail_over(now);
            }
            self.tried = 0;
            return self.finish_request(p, Err(ShellError::from(ApiError::NoQuorum)), now);
        }
        self.tried = 0;
        self.finish_request(p, result.map_err(ShellError::from), now);
    }
}
