//! Files of the simulated disks, stored in chunk-sized pieces that every
//! file holding the same bytes shares: a flash crowd of a thousand leechers
//! of one file holds one copy of its chunks, not a thousand.
//!
//! A piece that is written whole is looked up in a [`Pool`] of the pieces
//! alive (by a fingerprint of a few of its bytes, then compared in full) and
//! shared if found; any other write copies the piece first (copy on write).
//! Sharing changes nothing a host can see: only how much memory the
//! simulation takes.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Weak};

use shoal_core::chunk::CHUNK_SIZE;

const PIECE: usize = CHUNK_SIZE as usize;

/// Bytes sampled for a piece's fingerprint.
const SAMPLES: usize = 16;

type Fingerprint = (usize, [u8; SAMPLES]);

/// The pieces alive, by fingerprint.
#[derive(Debug, Default)]
pub struct Pool {
    pieces: BTreeMap<Fingerprint, Vec<Weak<Vec<u8>>>>,
}

impl Pool {
    fn fingerprint(bytes: &[u8]) -> Fingerprint {
        let mut s = [0u8; SAMPLES];
        if !bytes.is_empty() {
            for (i, b) in s.iter_mut().enumerate() {
                *b = bytes[i * (bytes.len() - 1) / (SAMPLES - 1).max(1)];
            }
        }
        (bytes.len(), s)
    }

    /// The piece alive with these bytes, or a new one.
    pub fn intern(&mut self, bytes: &[u8]) -> Arc<Vec<u8>> {
        let list = self.pieces.entry(Pool::fingerprint(bytes)).or_default();
        list.retain(|w| w.strong_count() > 0);
        if let Some(p) = list.iter().filter_map(Weak::upgrade).find(|p| p[..] == *bytes) {
            return p;
        }
        let p = Arc::new(bytes.to_vec());
        list.push(Arc::downgrade(&p));
        p
    }
}

/// The parts of bytes `from..to` of a file, piece by piece: (piece, range
/// within it, range within `from..to`).
fn spans(from: usize, to: usize) -> impl Iterator<Item = (usize, Range<usize>, Range<usize>)> {
    let mut at = from;
    std::iter::from_fn(move || {
        if at >= to {
            return None;
        }
        let (i, start) = (at / PIECE, at % PIECE);
        let n = (PIECE - start).min(to - at);
        let span = (i, start..start + n, at - from..at - from + n);
        at += n;
        Some(span)
    })
}

/// One file's bytes.
#[derive(Clone, Debug, Default)]
pub struct Stored {
    len: usize,
    /// Piece `i` holds bytes `i * PIECE ..` (all `PIECE` long but the last).
    pieces: Vec<Arc<Vec<u8>>>,
}

impl Stored {
    pub fn new(bytes: &[u8], pool: &mut Pool) -> Stored {
        let mut s = Stored::default();
        s.write_at(0, bytes, pool);
        s
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Grows (with zeros) or shrinks to `len` bytes.
    pub fn resize(&mut self, len: usize, pool: &mut Pool) {
        if len < self.len {
            self.pieces.truncate(len.div_ceil(PIECE));
            let count = self.pieces.len();
            if let Some(last) = self.pieces.last_mut() {
                let keep = len - (count - 1) * PIECE;
                if last.len() != keep {
                    Arc::make_mut(last).truncate(keep);
                }
            }
        } else if len > self.len {
            let count = self.pieces.len();
            if let Some(last) = self.pieces.last_mut() {
                let full = (len - (count - 1) * PIECE).min(PIECE);
                if last.len() < full {
                    Arc::make_mut(last).resize(full, 0);
                }
            }
            while self.pieces.len() * PIECE < len {
                let n = (len - self.pieces.len() * PIECE).min(PIECE);
                self.pieces.push(pool.intern(&vec![0; n]));
            }
        }
        self.len = len;
    }

    /// Writes `bytes` at `offset`, growing the file if they reach past its end.
    pub fn write_at(&mut self, offset: usize, bytes: &[u8], pool: &mut Pool) {
        let end = offset + bytes.len();
        if end > self.len {
            self.resize(end, pool);
        }
        for (i, within, from) in spans(offset, end) {
            let piece = &mut self.pieces[i];
            let src = &bytes[from];
            if within.start == 0 && within.len() == piece.len() {
                *piece = pool.intern(src);
            } else {
                Arc::make_mut(piece)[within].copy_from_slice(src);
            }
        }
    }

    /// Bytes `range`, if the file holds them all (borrowed when within one piece).
    pub fn get(&self, range: Range<usize>) -> Option<Cow<'_, [u8]>> {
        if range.start > range.end || range.end > self.len {
            return None;
        }
        let i = range.start / PIECE;
        if range.is_empty() {
            return Some(Cow::Borrowed(&[]));
        }
        if (range.end - 1) / PIECE == i {
            let base = i * PIECE;
            return Some(Cow::Borrowed(&self.pieces[i][range.start - base..range.end - base]));
        }
        let mut out = Vec::with_capacity(range.len());
        for (i, within, _) in spans(range.start, range.end) {
            out.extend_from_slice(&self.pieces[i][within]);
        }
        Some(Cow::Owned(out))
    }

    /// Whether bytes `at..` are `want`: at once when both are the same
    /// shared piece.
    pub fn holds(&self, at: usize, want: &[u8]) -> bool {
        let i = at / PIECE;
        if at.is_multiple_of(PIECE) && self.pieces.get(i).is_some_and(|p| std::ptr::eq(p.as_ptr(), want.as_ptr())) {
            return self.pieces[i].len() == want.len();
        }
        self.get(at..at + want.len()).is_some_and(|b| *b == *want)
    }

    /// Changes byte `at` in place (a fault), if the file has it.
    pub fn xor(&mut self, at: usize, mask: u8) {
        if at < self.len {
            Arc::make_mut(&mut self.pieces[at / PIECE])[at % PIECE] ^= mask;
        }
    }

    /// Each piece in turn.
    pub fn pieces(&self) -> impl Iterator<Item = &[u8]> {
        self.pieces.iter().map(|p| p.as_slice())
    }

    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        self.pieces().for_each(|p| out.extend_from_slice(p));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever is written where, the file reads back as a plain
        /// vector given the same writes would.
        #[test]
        fn a_stored_file_reads_as_a_vector(
            writes in proptest::collection::vec((0usize..3 * PIECE, 0usize..PIECE + 100, any::<u8>()), 1..8),
            shrink in proptest::option::of(0usize..3 * PIECE),
        ) {
            let mut pool = Pool::default();
            let mut plain: Vec<u8> = Vec::new();
            let mut s = Stored::default();
            for (at, len, byte) in writes {
                let bytes = vec![byte; len];
                shoal_core::client::disk::write_in_memory(&mut plain, at, &bytes);
                s.write_at(at, &bytes, &mut pool);
            }
            if let Some(n) = shrink {
                plain.resize(n, 0);
                s.resize(n, &mut pool);
            }
            prop_assert_eq!(s.len(), plain.len());
            prop_assert_eq!(s.to_vec(), plain.clone());
            for at in (0..plain.len()).step_by(PIECE / 3) {
                let end = (at + PIECE).min(plain.len());
                prop_assert_eq!(&s.get(at..end).unwrap()[..], &plain[at..end]);
                prop_assert!(s.holds(at, &plain[at..end]));
            }
            prop_assert!(s.get(0..plain.len() + 1).is_none());
            let copy = s.clone();
            s.xor(0, 1);
            prop_assert_eq!(copy.to_vec(), plain.clone());
            if !plain.is_empty() {
                prop_assert!(s.get(0..1).unwrap()[0] != plain[0]);
            }
        }
    }

    #[test]
    fn files_of_the_same_bytes_share_their_pieces() {
        let mut pool = Pool::default();
        let content: Vec<u8> = (0..3 * PIECE + 7).map(|i| (i * 7 % 251) as u8).collect();
        let a = Stored::new(&content, &mut pool);
        let mut b = Stored::default();
        b.resize(content.len(), &mut pool);
        for i in (0..4).rev() {
            let end = ((i + 1) * PIECE).min(content.len());
            b.write_at(i * PIECE, &content[i * PIECE..end], &mut pool);
        }
        for (x, y) in a.pieces().zip(b.pieces()) {
            assert!(std::ptr::eq(x.as_ptr(), y.as_ptr()), "a piece was copied, not shared");
        }
        let mut c = b.clone();
        c.xor(PIECE, 0xff);
        assert_eq!(b.to_vec(), content, "a change to one file showed in another");
        assert!(!c.holds(PIECE, &content[PIECE..2 * PIECE]));
        assert!(b.holds(PIECE, a.get(PIECE..2 * PIECE).unwrap().as_ref()));
    }
}
