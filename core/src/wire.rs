//! Framing and encoding: a 4-byte big-endian length, then a postcard-encoded
//! message ([`crate::proto::Message`] to trackers, [`crate::client::peer::PeerMessage`]
//! between peers).
//!
//! [`FrameDecoder`] is fed whatever bytes arrive, split anywhere, and hands back
//! whole messages. It checks a frame's announced length against its limit
//! before buffering the body, so a peer cannot make it allocate more than
//! `limit + 4` bytes, and it reports malformed input as a typed error.

use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

/// Largest frame on a control connection (client <-> tracker). The largest
/// message is one range of a chunk list (`PutRange`, `Reply::Range`): 320 KiB
/// of hashes ([`crate::chunk::RANGE_CHUNKS`]); a whole chunk list never
/// travels in one frame.
pub const MAX_CONTROL_FRAME: usize = 1024 * 1024;

/// Largest answer a tracker sends a client: a list of a group's files (at
/// most [`crate::meta::MAX_FILES_PER_GROUP`] names of up to 255 bytes) fits.
/// A tracker answers `limit reached` rather than send a bigger one.
pub const MAX_REPLY_FRAME: usize = 4 * 1024 * 1024;

const LEN_BYTES: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {limit}")]
    TooLarge { len: usize, limit: usize },
    #[error("undecodable message: {0}")]
    Malformed(String),
}

/// Encodes `msg` as one frame.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serialising our own types into a Vec cannot fail.
    let mut out = postcard::to_extend(msg, vec![0u8; LEN_BYTES]).expect("postcard encoding into a Vec");
    let len = (out.len() - LEN_BYTES) as u32;
    out[..LEN_BYTES].copy_from_slice(&len.to_be_bytes());
    out
}

/// Decodes one frame body (without its length prefix). Trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    match postcard::take_from_bytes::<T>(body) {
        Ok((msg, [])) => Ok(msg),
        Ok((_, rest)) => Err(FrameError::Malformed(format!("{} trailing bytes", rest.len()))),
        Err(e) => Err(FrameError::Malformed(e.to_string())),
    }
}

/// Reassembles frames from a byte stream.
///
/// Bytes come in either by [`FrameDecoder::push`] (a copy) or straight from
/// the socket: [`FrameDecoder::recv_buf`] lends the free space after the
/// buffered bytes and [`FrameDecoder::commit`] counts what was read into it,
/// so bulk data is copied once, by the kernel, on its way in.
#[derive(Debug)]
pub struct FrameDecoder {
    /// Initialised storage; `buf[start..end]` are the bytes held.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    limit: usize,
}

impl FrameDecoder {
    pub fn new(limit: usize) -> FrameDecoder {
        FrameDecoder { buf: Vec::new(), start: 0, end: 0, limit }
    }

    /// Changes the largest frame accepted from now on (e.g. once a peer said Hello).
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    /// Bytes held but not yet returned as a frame.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Storage in use, held or free; what a peer can make this decoder take.
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// At least `want` bytes of free space after the bytes held, to receive
    /// into. Consumed bytes are reclaimed first (moving the held ones, at most
    /// one partial frame, to the front), so the storage stays within the
    /// largest partial frame plus `want`.
    pub fn recv_buf(&mut self, want: usize) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.buf.len() - self.end < want && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < want {
            self.buf.resize(self.end + want, 0);
        }
        &mut self.buf[self.end..]
    }

    /// Counts `n` bytes received into [`FrameDecoder::recv_buf`]'s space.
    pub fn commit(&mut self, n: usize) {
        assert!(n <= self.buf.len() - self.end, "committed more than the receive space");
        self.end += n;
    }

    /// Appends received bytes. Call [`FrameDecoder::next_message`] until it
    /// returns `Ok(None)` afterwards.
    pub fn push(&mut self, bytes: &[u8]) {
        self.recv_buf(bytes.len())[..bytes.len()].copy_from_slice(bytes);
        self.commit(bytes.len());
    }

    /// The next whole frame's body, `Ok(None)` if more bytes are needed.
    /// After an error the stream is unusable: close the connection.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, FrameError> {
        let avail = &self.buf[self.start..self.end];
        if avail.len() < LEN_BYTES {
            return Ok(None);
        }
        let len = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        if len > self.limit {
            return Err(FrameError::TooLarge { len, limit: self.limit });
        }
        if avail.len() < LEN_BYTES + len {
            return Ok(None);
        }
        let body_start = self.start + LEN_BYTES;
        self.start = body_start + len;
        Ok(Some(&self.buf[body_start..body_start + len]))
    }

    /// The frame being received when its length prefix is held but not all
    /// of its body: the body's length and the part of it held. `None` when a
    /// whole frame is held, nothing is, or the length is not complete yet.
    /// (A length over the limit shows as an error from `next_frame`.)
    pub fn partial_frame(&self) -> Option<(usize, &[u8])> {
        let avail = &self.buf[self.start..self.end];
        let len = u32::from_be_bytes(avail.get(..LEN_BYTES)?.try_into().expect("4 bytes")) as usize;
        (avail.len() < LEN_BYTES + len && len <= self.limit).then(|| (len, &avail[LEN_BYTES..]))
    }

    /// Drops the first `n` bytes held (at most all of them): bytes the
    /// caller has no use for.
    pub fn skip(&mut self, n: usize) {
        self.start += n.min(self.end - self.start);
    }

    /// Drops the partial frame's length prefix and the first `body_bytes`
    /// of its body ([`FrameDecoder::partial_frame`]): the caller took them
    /// and receives the rest of the frame elsewhere.
    pub fn take_partial(&mut self, body_bytes: usize) {
        self.skip(LEN_BYTES + body_bytes);
    }

    /// The next whole message, `Ok(None)` if more bytes are needed.
    pub fn next_message<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        match self.next_frame()? {
            None => Ok(None),
            Some(body) => decode(body).map(Some),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{FileDigest, FileMeta, Sha1Digest};
    use crate::ids::{FileName, GroupId, SessionToken, UserId};
    use crate::proto::Message;
    use crate::proto::*;
    use proptest::prelude::*;

    fn id_strategy() -> impl Strategy<Value = String> + Clone {
        "[A-Za-z0-9_.-]{1,64}"
    }

    fn request_strategy() -> impl Strategy<Value = Request> {
        let user = id_strategy().prop_map(|s| UserId::new(s).unwrap());
        let group = id_strategy().prop_map(|s| GroupId::new(s).unwrap());
        let name = "[a-z .]{0,20}[a-z]".prop_map(|s| FileName::new(s).unwrap());
        let digest = (any::<u64>(), any::<[u8; 20]>(), proptest::collection::vec(any::<[u8; 20]>(), 0..4)).prop_map(
            |(size, sha1, chunks)| FileDigest {
                size,
                sha1: Sha1Digest(sha1),
                chunks: chunks.into_iter().map(Sha1Digest).collect(),
            },
        );
        let addr = (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| std::net::SocketAddr::from((ip, port)));
        prop_oneof![
            (user.clone(), ".{0,30}").prop_map(|(user, password)| Request::CreateUser { user, password }),
            (user.clone(), ".{0,30}", addr.clone(), any::<bool>()).prop_map(
                |(user, password, listen, plaintext_peers)| {
                    Request::Login { user, password, listen, plaintext_peers }
                }
            ),
            Just(Request::Logout),
            Just(Request::Heartbeat),
            group.clone().prop_map(|group| Request::CreateGroup { group }),
            group.clone().prop_map(|group| Request::JoinGroup { group }),
            group.clone().prop_map(|group| Request::LeaveGroup { group }),
            group.clone().prop_map(|group| Request::ListRequests { group }),
            (group.clone(), user.clone()).prop_map(|(group, user)| Request::AcceptRequest { group, user }),
            (group.clone(), user).prop_map(|(group, user)| Request::RejectRequest { group, user }),
            Just(Request::ListGroups),
            Just(Request::ListMyGroups),
            group.clone().prop_map(|group| Request::ListFiles { group }),
            (group.clone(), name.clone(), digest.clone()).prop_map(|(group, name, digest)| Request::UploadFile {
                group,
                file: FileMeta { name, digest }.record()
            }),
            digest.prop_map(|d| Request::PutRange { hashes: d.chunks }),
            (group.clone(), name.clone(), any::<u32>()).prop_map(|(group, name, range)| Request::GetRange {
                group,
                name,
                range
            }),
            (group.clone(), name.clone()).prop_map(|(group, name)| Request::DownloadFile { group, name }),
            (group.clone(), name.clone()).prop_map(|(group, name)| Request::StopShare { group, name }),
            (group, name, any::<(u64, u64, u64)>(), proptest::collection::vec((addr, any::<u64>()), 0..4)).prop_map(
                |(group, name, (size, done, rate), sources)| Request::Progress {
                    group,
                    name,
                    size,
                    done,
                    rate,
                    sources
                }
            ),
        ]
    }

    fn message_strategy() -> impl Strategy<Value = Message> {
        let api_error = prop_oneof![
            Just(ApiError::NotLoggedIn),
            Just(ApiError::NoQuorum),
            ".{0,20}".prop_map(ApiError::InvalidFile),
        ];
        let reply = prop_oneof![
            Just(Reply::Done),
            any::<[u8; 16]>().prop_map(|t| Reply::Session { token: SessionToken(t) }),
            Just(Reply::Left { group_deleted: true, new_owner: None }),
            Just(Reply::Requests(vec![UserId::new("u").unwrap()])),
        ];
        prop_oneof![
            (any::<u32>(), prop_oneof![Just(Role::Client), Just(Role::Tracker), Just(Role::Peer)])
                .prop_map(|(protocol_version, role)| Message::Hello { protocol_version, role }),
            ".{0,40}".prop_map(|reason| Message::Refused { reason }),
            (any::<u64>(), any::<u64>(), proptest::option::of(any::<[u8; 16]>()), request_strategy()).prop_map(
                |(client, seq, session, body)| Message::Request {
                    id: RequestId { client, seq },
                    settled_below: seq / 2,
                    session: session.map(SessionToken),
                    body
                }
            ),
            (any::<u64>(), any::<u64>(), prop_oneof![reply.prop_map(Ok), api_error.prop_map(Err)])
                .prop_map(|(client, seq, result)| Message::Response { id: RequestId { client, seq }, result }),
        ]
    }

    proptest! {
        #[test]
        fn every_message_round_trips_through_frames(msgs in proptest::collection::vec(message_strategy(), 1..8), split in 1usize..64) {
            let stream: Vec<u8> = msgs.iter().flat_map(encode).collect();
            let mut dec = FrameDecoder::new(MAX_CONTROL_FRAME);
            let mut out: Vec<Message> = Vec::new();
            for piece in stream.chunks(split) {
                dec.push(piece);
                while let Some(m) = dec.next_message().unwrap() {
                    out.push(m);
                }
            }
            prop_assert_eq!(out, msgs);
            prop_assert_eq!(dec.buffered(), 0);
        }

        #[test]
        fn receiving_in_place_matches_pushing(
            msgs in proptest::collection::vec(message_strategy(), 1..8),
            pieces in proptest::collection::vec((1usize..300, 0usize..300, any::<bool>()), 1..40),
        ) {
            let stream: Vec<u8> = msgs.iter().flat_map(encode).collect();
            let largest = msgs.iter().map(|m| encode(m).len()).max().unwrap_or(0);
            let mut dec = FrameDecoder::new(MAX_CONTROL_FRAME);
            let mut out: Vec<Message> = Vec::new();
            let (mut at, mut i, mut max_want) = (0, 0, 0);
            while at < stream.len() {
                let (len, extra, in_place) = pieces[i % pieces.len()];
                i += 1;
                let piece = &stream[at..stream.len().min(at + len)];
                if in_place {
                    // Like a socket read: the space offered may exceed what arrives.
                    let want = piece.len() + extra;
                    max_want = max_want.max(want);
                    dec.recv_buf(want)[..piece.len()].copy_from_slice(piece);
                    dec.commit(piece.len());
                } else {
                    max_want = max_want.max(piece.len());
                    dec.push(piece);
                }
                at += piece.len();
                while let Some(m) = dec.next_message().unwrap() {
                    out.push(m);
                }
                prop_assert!(dec.capacity() <= largest + max_want, "{} > {} + {}", dec.capacity(), largest, max_want);
            }
            prop_assert_eq!(out, msgs);
            prop_assert_eq!(dec.buffered(), 0);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut dec = FrameDecoder::new(1024);
            dec.push(&bytes);
            while let Ok(Some(_)) = dec.next_message::<Message>() {}
        }
    }

    #[test]
    fn a_huge_length_prefix_is_refused_before_buffering() {
        let mut dec = FrameDecoder::new(MAX_CONTROL_FRAME);
        dec.push(&u32::MAX.to_be_bytes());
        assert_eq!(dec.next_frame(), Err(FrameError::TooLarge { len: u32::MAX as usize, limit: MAX_CONTROL_FRAME }));
    }

    #[test]
    fn trailing_bytes_in_a_frame_are_malformed() {
        let mut f = encode(&Message::Request {
            id: RequestId { client: 1, seq: 2 },
            settled_below: 0,
            session: None,
            body: Request::ListGroups,
        });
        f.push(0);
        let len = (f.len() - 4) as u32;
        f[..4].copy_from_slice(&len.to_be_bytes());
        let mut dec = FrameDecoder::new(1024);
        dec.push(&f);
        assert!(matches!(dec.next_message::<Message>(), Err(FrameError::Malformed(_))));
    }
}
