//! The peer protocol: how a downloader fetches chunks from a peer that has them.
//!
//! ```text
//! downloader                                   server (any peer holding chunks)
//!   TLS 1.3 handshake, both ends proving a key  <------>
//!   (the downloader goes on only if the server proved the key the tracker
//!   named for the sharer at that address)
//!   Hello { role: Peer }            ------->
//!   Want { group, name, sha1, grant } ----->   asks its tracker whether the grant
//!                                              is a member's, for that file, and
//!                                              was issued to the key the
//!                                              downloader proved
//!                                   <-------   Have { chunks, load }   (or Refused)
//!   Request { chunk, offset, len } x N ---->
//!                                   <-------   Block { chunk, offset, load, data } x N
//!                                   <-------   HaveOne { chunk } (server gained a chunk)
//!   Cancel { chunk, offset, len }   ------->
//!                                   <-------   Busy { chunk } (upload slots taken:
//!                                              that chunk's requests dropped)
//!                                   <-------   Ready (a slot is free: ask again)
//! ```
//!
//! A whole chunk is fetched from one peer, so a chunk failing its SHA1 names
//! the peer that sent it. Frames are the [`crate::wire`] frames with the
//! smaller [`MAX_PEER_FRAME`] limit.

use serde::{Deserialize, Serialize};

use crate::chunk::{chunk_count, chunk_len, Sha1Digest, MAX_FILE_CHUNKS};
use crate::ids::{FileName, GroupId};
use crate::proto::Role;

/// Size of the blocks a chunk is requested in.
pub const BLOCK_SIZE: u32 = 128 * 1024;
/// Largest frame on a peer connection: a block plus its header, or the chunk
/// map of the largest file (2^20 bits).
pub const MAX_PEER_FRAME: usize = (MAX_FILE_CHUNKS as usize / 8) + 1024;
/// Most block requests a server queues per connection; more is a protocol error.
pub const MAX_QUEUED_REQUESTS: usize = 64;

/// Proof, issued by a tracker to a member, that it may fetch a file.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Grant(pub [u8; 16]);

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Grant(<redacted>)")
    }
}

/// How busy a server is: downloaders prefer the least loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Load {
    /// Connections it is serving now.
    pub uploads: u16,
    /// Block requests waiting on all of them.
    pub queued: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMessage {
    Hello {
        protocol_version: u32,
        role: Role,
    },
    Want {
        group: GroupId,
        name: FileName,
        sha1: Sha1Digest,
        grant: Grant,
    },
    Have {
        chunks: Bitmap,
        load: Load,
    },
    HaveOne {
        chunk: u32,
    },
    Request {
        chunk: u32,
        offset: u32,
        len: u32,
    },
    Cancel {
        chunk: u32,
        offset: u32,
        len: u32,
    },
    Block {
        chunk: u32,
        offset: u32,
        load: Load,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    Refused {
        reason: String,
    },
    /// From a complete sharer that sent its whole map and now serves a
    /// crowd: that map no longer stands; only the chunks it offers from
    /// now on (`HaveOne`) may be asked of it (requests already sent are
    /// still served). Its upload then goes out as chunks no one else was
    /// given, not as second copies (super-seeding, BEP 16).
    OffersOnly,
    /// From a sharer that offered chunks one by one: it holds every chunk
    /// and any may be asked of it now (every chunk went out once).
    HaveAll,
    /// From a server whose upload slots are all taken: the requests for
    /// `chunk` are dropped (none of it was or will be sent), and no other
    /// chunk should be asked of it until it says `Ready`. The downloader
    /// asks a peer that can send it sooner (choking, and the fast
    /// extension's reject, BEP 6).
    Busy {
        chunk: u32,
    },
    /// From a server that answered `Busy`: a slot is free, ask again.
    Ready,
}

/// A set of chunk indexes, one bit each.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bitmap {
    len: u32,
    #[serde(with = "serde_bytes")]
    bits: Vec<u8>,
}

impl std::fmt::Debug for Bitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bitmap({}/{})", self.count(), self.len)
    }
}

impl Bitmap {
    pub fn new(len: u32) -> Bitmap {
        Bitmap { len, bits: vec![0; (len as usize).div_ceil(8)] }
    }

    pub fn full(len: u32) -> Bitmap {
        let mut b = Bitmap::new(len);
        for i in 0..len {
            b.set(i);
        }
        b
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether a received bitmap is well formed for a file of `chunks` chunks.
    pub fn fits(&self, chunks: u32) -> bool {
        self.len == chunks && self.bits.len() == (chunks as usize).div_ceil(8)
    }

    pub fn get(&self, i: u32) -> bool {
        i < self.len && self.bits[(i / 8) as usize] & (1 << (i % 8)) != 0
    }

    pub fn set(&mut self, i: u32) {
        if i < self.len {
            self.bits[(i / 8) as usize] |= 1 << (i % 8);
        }
    }

    pub fn clear(&mut self, i: u32) {
        if i < self.len {
            self.bits[(i / 8) as usize] &= !(1 << (i % 8));
        }
    }

    pub fn count(&self) -> u32 {
        self.bits.iter().map(|b| b.count_ones()).sum()
    }

    pub fn is_full(&self) -> bool {
        self.count() == self.len
    }

    pub fn iter_set(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len).filter(|i| self.get(*i))
    }

    pub fn to_bytes(&self) -> &[u8] {
        &self.bits
    }

    pub fn from_bytes(len: u32, bits: Vec<u8>) -> Option<Bitmap> {
        let b = Bitmap { len, bits };
        // Bits past `len` must be zero so equal sets compare equal.
        let clean = (len..(b.bits.len() as u32 * 8)).all(|i| b.bits[(i / 8) as usize] & (1 << (i % 8)) == 0);
        (b.fits(len) && clean).then_some(b)
    }
}

/// A `Block` message's fields, its data borrowed from the frame.
#[derive(Debug, PartialEq, Eq, Deserialize)]
pub struct BlockRef<'a> {
    pub chunk: u32,
    pub offset: u32,
    pub load: Load,
    pub data: &'a [u8],
}

/// postcard's tag of [`PeerMessage::Block`] (its variant index, one varint byte).
pub(crate) const BLOCK_TAG: u8 = 6;

/// Decodes a frame body if it is a `Block`, without copying its data; any
/// other message (or garbage) gives `None` and goes through
/// [`crate::wire::decode`] as usual.
pub fn decode_block(body: &[u8]) -> Option<BlockRef<'_>> {
    match body.split_first() {
        Some((&BLOCK_TAG, rest)) => match postcard::take_from_bytes::<BlockRef>(rest) {
            Ok((b, [])) => Some(b),
            _ => None,
        },
        _ => None,
    }
}

/// The fields of a `Block` frame up to its data, read from the start of the
/// frame's body: enough to know where the data goes before it arrives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockHead {
    pub chunk: u32,
    pub offset: u32,
    pub load: Load,
    /// Data bytes that follow the header.
    pub len: u32,
    /// Bytes of the body before the data.
    pub header_len: usize,
}

/// Reads a `Block` header from `prefix`, the first bytes of a frame body of
/// `body_len` bytes. `None` if the body is not a block, its header is not
/// all in `prefix` yet, or the header's data length disagrees with the frame's.
pub fn decode_block_head(body_len: usize, prefix: &[u8]) -> Option<BlockHead> {
    let (&BLOCK_TAG, rest) = prefix.split_first()? else { return None };
    let ((chunk, offset, load, len), after) = postcard::take_from_bytes::<(u32, u32, Load, usize)>(rest).ok()?;
    let header_len = prefix.len() - after.len();
    let len = u32::try_from(len).ok()?;
    (header_len.checked_add(len as usize)? == body_len).then_some(BlockHead { chunk, offset, load, len, header_len })
}

/// Encodes a `Block` frame with one allocation of the right size.
pub fn encode_block(chunk: u32, offset: u32, load: Load, data: &[u8]) -> Vec<u8> {
    #[derive(Serialize)]
    enum Tagged<'a> {
        // Placeholders keep `Block` at its index in `PeerMessage`.
        _0,
        _1,
        _2,
        _3,
        _4,
        _5,
        Block {
            chunk: u32,
            offset: u32,
            load: Load,
            #[serde(with = "serde_bytes")]
            data: &'a [u8],
        },
    }
    let msg = Tagged::Block { chunk, offset, load, data };
    let mut out = Vec::with_capacity(data.len() + 32);
    out.extend_from_slice(&[0; 4]);
    let mut out = postcard::to_extend(&msg, out).expect("postcard encoding into a Vec");
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

/// The start of a `Block` frame carrying `len` data bytes: the length
/// prefix (which counts the data) and the message up to the data. A sharer
/// sends it and then the `len` bytes straight from the file (`sendfile`),
/// so block data is never copied through user space.
pub fn block_header(chunk: u32, offset: u32, load: Load, len: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    out.extend_from_slice(&[0; 4]);
    let mut out = postcard::to_extend(&(BLOCK_TAG, chunk, offset, load, len as usize), out)
        .expect("postcard encoding into a Vec");
    let frame_len = (out.len() - 4 + len as usize) as u32;
    out[..4].copy_from_slice(&frame_len.to_be_bytes());
    out
}

/// Whether a block request lies inside chunk `chunk` of a file of `size` bytes.
pub fn valid_block(size: u64, chunk: u32, offset: u32, len: u32) -> bool {
    (chunk as u64) < chunk_count(size)
        && len > 0
        && len <= BLOCK_SIZE
        && (offset as u64 + len as u64) <= chunk_len(size, chunk as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::CHUNK_SIZE;
    use crate::wire::{decode, encode};

    #[test]
    fn bitmap_basics() {
        let mut b = Bitmap::new(10);
        b.set(0);
        b.set(9);
        b.set(10);
        assert_eq!(b.iter_set().collect::<Vec<_>>(), vec![0, 9]);
        assert!(b.fits(10) && !b.fits(9));
        assert!(Bitmap::from_bytes(10, vec![0, 0b0000_0100]).is_none(), "bit 10 is past the end");
        assert!(Bitmap::from_bytes(10, vec![0]).is_none());
        assert!(Bitmap::full(10).is_full());
    }

    #[test]
    fn block_bounds() {
        let size = CHUNK_SIZE + 100;
        assert!(valid_block(size, 0, 0, BLOCK_SIZE));
        assert!(valid_block(size, 1, 0, 100));
        assert!(!valid_block(size, 1, 0, 101));
        assert!(!valid_block(size, 2, 0, 1));
        assert!(!valid_block(size, 0, u32::MAX, 1));
        assert!(!valid_block(size, 0, 0, BLOCK_SIZE + 1));
        assert!(!valid_block(size, 0, 0, 0));
    }

    #[test]
    fn the_block_fast_paths_agree_with_the_codec() {
        let load = Load { uploads: 3, queued: 9 };
        let m = PeerMessage::Block { chunk: 300, offset: 65536, load, data: vec![1, 2, 3] };
        let f = encode(&m);
        assert_eq!(encode_block(300, 65536, load, &[1, 2, 3]), f);
        assert_eq!(decode_block(&f[4..]), Some(BlockRef { chunk: 300, offset: 65536, load, data: &[1, 2, 3] }));
        assert_eq!(decode_block(&encode(&PeerMessage::HaveOne { chunk: 6 })[4..]), None);
        assert_eq!(decode_block(&[BLOCK_TAG, 0xff]), None);
        let mut frame = block_header(300, 65536, load, 3);
        frame.extend_from_slice(&[1, 2, 3]);
        assert_eq!(frame, f);
        let big = vec![9u8; BLOCK_SIZE as usize];
        let mut frame = block_header(1 << 20, 0, load, BLOCK_SIZE);
        frame.extend_from_slice(&big);
        assert_eq!(frame, encode_block(1 << 20, 0, load, &big));
    }

    #[test]
    fn a_block_header_reads_from_any_prefix_that_holds_it() {
        let load = Load { uploads: 2, queued: 300 };
        let f = encode_block(70_000, 65536, load, &[5; 1000]);
        let body = &f[4..];
        let head = decode_block_head(body.len(), body).expect("a block");
        assert_eq!((head.chunk, head.offset, head.load, head.len), (70_000, 65536, load, 1000));
        assert_eq!(&body[head.header_len..], &[5; 1000][..]);
        for cut in 0..head.header_len {
            assert_eq!(decode_block_head(body.len(), &body[..cut]), None, "header cut at {cut}");
        }
        for cut in head.header_len..body.len() {
            assert_eq!(decode_block_head(body.len(), &body[..cut]), Some(head));
        }
        assert_eq!(decode_block_head(body.len() + 1, body), None, "frame length disagrees");
        let have = encode(&PeerMessage::HaveOne { chunk: 6 });
        assert_eq!(decode_block_head(have.len() - 4, &have[4..]), None);
    }

    #[test]
    fn a_block_frame_fits_the_limit_and_round_trips() {
        let m = PeerMessage::Block { chunk: 1, offset: 0, load: Load::default(), data: vec![7; BLOCK_SIZE as usize] };
        let f = encode(&m);
        assert!(f.len() - 4 <= MAX_PEER_FRAME);
        assert_eq!(decode::<PeerMessage>(&f[4..]).unwrap(), m);
        let have = PeerMessage::Have { chunks: Bitmap::full(MAX_FILE_CHUNKS as u32), load: Load::default() };
        assert!(encode(&have).len() - 4 <= MAX_PEER_FRAME);
    }
}
