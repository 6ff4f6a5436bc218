//! SHA-1 that can advance two independent hashes in one pass.
//!
//! A download hashes every byte twice: once for its chunk's SHA1 and once
//! for the whole file's. With the x86 SHA extensions a single SHA-1 stream
//! is bound by the latency of `sha1rnds4` (each group of four rounds waits
//! for the one before), not by how many of them the core can issue; two
//! independent streams interleaved fill those gaps, so
//! [`Sha1::update2`] costs little more than one [`Sha1::update`]. This is
//! the multi-buffer technique of Intel's ISA-L (`sha1_ni_x2`), done with the
//! standard SHA-NI round sequence. Without SHA-NI (detected at run time) both
//! streams fall back to the `sha1` crate's portable compression function.
//!
//! [`Sha1`] is a plain streaming hasher otherwise: any split of the input
//! gives the digest of the whole, and it equals the `sha1` crate's (tested).

#![deny(unsafe_op_in_unsafe_fn)]

const BLOCK: usize = 64;
const IV: [u32; 5] = [0x6745_2301, 0xEFCD_AB89, 0x98BA_DCFE, 0x1032_5476, 0xC3D2_E1F0];

/// A streaming SHA-1 state.
#[derive(Clone)]
pub struct Sha1 {
    state: [u32; 5],
    /// Bytes of an incomplete block, waiting for the rest.
    buf: [u8; BLOCK],
    buf_len: usize,
    /// Bytes hashed in all, for the final padding.
    len: u64,
}

impl Default for Sha1 {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Sha1 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sha1").field("len", &self.len).finish_non_exhaustive()
    }
}

impl Sha1 {
    pub fn new() -> Sha1 {
        Sha1 { state: IV, buf: [0; BLOCK], buf_len: 0, len: 0 }
    }

    /// The SHA-1 of `data`.
    pub fn digest(data: &[u8]) -> [u8; 20] {
        let mut h = Sha1::new();
        h.update(data);
        h.finalize()
    }

    /// The SHA-1 of two inputs, computed together.
    pub fn digest2(a: &[u8], b: &[u8]) -> ([u8; 20], [u8; 20]) {
        let (mut ha, mut hb) = (Sha1::new(), Sha1::new());
        Sha1::update2(&mut ha, a, &mut hb, b);
        (ha.finalize(), hb.finalize())
    }

    /// Feeds the next bytes of the stream.
    pub fn update(&mut self, data: &[u8]) {
        let rest = self.fill(data);
        let whole = rest.len() / BLOCK * BLOCK;
        compress1(&mut self.state, &rest[..whole]);
        self.keep(&rest[whole..]);
    }

    /// Feeds `da` to `a` and `db` to `b`, the blocks both have interleaved:
    /// the same result as `a.update(da); b.update(db)`, faster where the
    /// CPU has SHA-NI.
    pub fn update2(a: &mut Sha1, da: &[u8], b: &mut Sha1, db: &[u8]) {
        let (ra, rb) = (a.fill(da), b.fill(db));
        let (wa, wb) = (ra.len() / BLOCK * BLOCK, rb.len() / BLOCK * BLOCK);
        let both = wa.min(wb);
        compress2(&mut a.state, &ra[..both], &mut b.state, &rb[..both]);
        compress1(&mut a.state, &ra[both..wa]);
        compress1(&mut b.state, &rb[both..wb]);
        a.keep(&ra[wa..]);
        b.keep(&rb[wb..]);
    }

    /// The digest of everything fed.
    pub fn finalize(mut self) -> [u8; 20] {
        let bits = self.len.wrapping_mul(8);
        let mut tail = [0u8; 2 * BLOCK];
        tail[..self.buf_len].copy_from_slice(&self.buf[..self.buf_len]);
        tail[self.buf_len] = 0x80;
        let end = if self.buf_len < BLOCK - 8 { BLOCK } else { 2 * BLOCK };
        tail[end - 8..end].copy_from_slice(&bits.to_be_bytes());
        compress1(&mut self.state, &tail[..end]);
        let mut out = [0u8; 20];
        for (o, s) in out.chunks_exact_mut(4).zip(self.state) {
            o.copy_from_slice(&s.to_be_bytes());
        }
        out
    }

    /// Completes a buffered partial block from the front of `data`; returns
    /// the rest of `data`, which starts on a block boundary of the stream.
    fn fill<'d>(&mut self, data: &'d [u8]) -> &'d [u8] {
        self.len = self.len.wrapping_add(data.len() as u64);
        if self.buf_len == 0 {
            return data;
        }
        let take = (BLOCK - self.buf_len).min(data.len());
        self.buf[self.buf_len..self.buf_len + take].copy_from_slice(&data[..take]);
        self.buf_len += take;
        if self.buf_len == BLOCK {
            let block = self.buf;
            compress1(&mut self.state, &block);
            self.buf_len = 0;
        }
        &data[take..]
    }

    /// Buffers a tail shorter than a block (called with `buf` empty).
    fn keep(&mut self, tail: &[u8]) {
        debug_assert!(tail.is_empty() || self.buf_len == 0);
        if !tail.is_empty() {
            self.buf[..tail.len()].copy_from_slice(tail);
            self.buf_len = tail.len();
        }
    }
}

/// Compresses whole blocks (`blocks.len()` a multiple of 64) into `state`.
fn compress1(state: &mut [u32; 5], blocks: &[u8]) {
    debug_assert_eq!(blocks.len() % BLOCK, 0);
    if blocks.is_empty() {
        return;
    }
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if ni::available() {
        // SHA-NI is present (checked at run time) and the slice holds
        // `len / 64` whole blocks.
        return ni::compress([state], [blocks]);
    }
    portable(state, blocks);
}

/// Compresses two equally long runs of whole blocks into two states.
fn compress2(a: &mut [u32; 5], da: &[u8], b: &mut [u32; 5], db: &[u8]) {
    debug_assert_eq!(da.len(), db.len());
    if da.is_empty() {
        return;
    }
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if ni::available() {
        return ni::compress([a, b], [da, db]);
    }
    portable(a, da);
    portable(b, db);
}

fn portable(state: &mut [u32; 5], blocks: &[u8]) {
    use sha1::digest::generic_array::GenericArray;
    for block in blocks.chunks_exact(BLOCK) {
        sha1::compress(state, &[GenericArray::clone_from_slice(block)]);
    }
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
mod ni {
    #[cfg(target_arch = "x86")]
    use std::arch::x86::*;
    #[cfg(target_arch = "x86_64")]
    use std::arch::x86_64::*;

    cpufeatures::new!(sha_ni, "sha", "sse2", "ssse3", "sse4.1");

    pub fn available() -> bool {
        sha_ni::get()
    }

    /// Compresses `data[l]` into `states[l]` for each of the `N` lanes,
    /// the lanes' instructions interleaved. Every `data[l]` holds the same
    /// whole number of blocks.
    pub fn compress<const N: usize>(states: [&mut [u32; 5]; N], data: [&[u8]; N]) {
        let len = data[0].len();
        assert!(len.is_multiple_of(super::BLOCK) && data.iter().all(|d| d.len() == len), "lanes of unequal length");
        assert!(available(), "SHA-NI is not available");
        // SAFETY: the CPU has the features `blocks` is compiled for (checked
        // just above), and every lane holds `len / 64` whole blocks.
        unsafe { blocks(states, data, len / super::BLOCK) }
    }

    /// The SHA-NI round sequence (Intel's, as in the `sha1` crate's x86
    /// backend) for `N` lanes, step by step across the lanes so that their
    /// dependency chains overlap.
    ///
    /// # Safety
    /// The CPU must have SHA, SSE2, SSSE3 and SSE4.1, and each `data[l]`
    /// must hold at least `n * 64` bytes.
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    unsafe fn blocks<const N: usize>(states: [&mut [u32; 5]; N], data: [&[u8]; N], n: usize) {
        let mask = _mm_set_epi64x(0x0001_0203_0405_0607, 0x0809_0A0B_0C0D_0E0F);
        let zero = _mm_setzero_si128();
        let mut abcd = [zero; N];
        let mut e = [zero; N];
        for l in 0..N {
            let s = &states[l];
            abcd[l] = _mm_set_epi32(s[0] as i32, s[1] as i32, s[2] as i32, s[3] as i32);
            e[l] = _mm_set_epi32(s[4] as i32, 0, 0, 0);
        }
        let mut h0 = [zero; N];
        let mut h1 = [zero; N];
        let mut w = [[zero; 5]; N];

        // Message schedule: w[j] = sha1msg2(sha1msg1(w[j+1], w[j+2]) ^ w[j+3], w[j+4]), indices mod 5.
        macro_rules! schedule {
            ($l:ident, $j:literal) => {
                w[$l][$j] = _mm_sha1msg2_epu32(
                    _mm_xor_si128(_mm_sha1msg1_epu32(w[$l][($j + 1) % 5], w[$l][($j + 2) % 5]), w[$l][($j + 3) % 5]),
                    w[$l][($j + 4) % 5],
                )
            };
        }
        // Four rounds; they alternate between updating h0 and h1.
        macro_rules! rounds {
            (h0, $l:ident, $j:literal, $f:literal) => {
                h0[$l] = _mm_sha1rnds4_epu32(h1[$l], _mm_sha1nexte_epu32(h0[$l], w[$l][$j]), $f)
            };
            (h1, $l:ident, $j:literal, $f:literal) => {
                h1[$l] = _mm_sha1rnds4_epu32(h0[$l], _mm_sha1nexte_epu32(h1[$l], w[$l][$j]), $f)
            };
        }
        macro_rules! step {
            ($h:ident, $j:literal, $f:literal) => {
                for l in 0..N {
                    rounds!($h, l, $j, $f);
                }
            };
            (schedule $h:ident, $j:literal, $f:literal) => {
                for l in 0..N {
                    schedule!(l, $j);
                    rounds!($h, l, $j, $f);
                }
            };
        }

        for b in 0..n {
            for l in 0..N {
                // SAFETY: block `b < n` lies within `data[l]` (caller's
                // contract); the loads are unaligned ones.
                let p = unsafe { data[l].as_ptr().add(b * super::BLOCK) } as *const __m128i;
                for (j, wj) in w[l].iter_mut().take(4).enumerate() {
                    // SAFETY: as above, `p.add(j)` for j < 4 stays in the block.
                    *wj = _mm_shuffle_epi8(unsafe { _mm_loadu_si128(p.add(j)) }, mask);
                }
                h0[l] = abcd[l];
                h1[l] = _mm_add_epi32(e[l], w[l][0]);
                h1[l] = _mm_sha1rnds4_epu32(h0[l], h1[l], 0);
            }
            // Rounds 4..20.
            step!(h0, 1, 0);
            step!(h1, 2, 0);
            step!(h0, 3, 0);
            step!(schedule h1, 4, 0);
            // Rounds 20..40.
            step!(schedule h0, 0, 1);
            step!(schedule h1, 1, 1);
            step!(schedule h0, 2, 1);
            step!(schedule h1, 3, 1);
            step!(schedule h0, 4, 1);
            // Rounds 40..60.
            step!(schedule h1, 0, 2);
            step!(schedule h0, 1, 2);
            step!(schedule h1, 2, 2);
            step!(schedule h0, 3, 2);
            step!(schedule h1, 4, 2);
            // Rounds 60..80.
            step!(schedule h0, 0, 3);
            step!(schedule h1, 1, 3);
            step!(schedule h0, 2, 3);
            step!(schedule h1, 3, 3);
            step!(schedule h0, 4, 3);
            for l in 0..N {
                abcd[l] = _mm_add_epi32(abcd[l], h0[l]);
                e[l] = _mm_sha1nexte_epu32(h1[l], e[l]);
            }
        }
        for l in 0..N {
            let s = &mut *states[l];
            s[0] = _mm_extract_epi32(abcd[l], 3) as u32;
            s[1] = _mm_extract_epi32(abcd[l], 2) as u32;
            s[2] = _mm_extract_epi32(abcd[l], 1) as u32;
            s[3] = _mm_extract_epi32(abcd[l], 0) as u32;
            s[4] = _mm_extract_epi32(e[l], 3) as u32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sha1::Digest;

    fn reference(data: &[u8]) -> [u8; 20] {
        sha1::Sha1::digest(data).into()
    }

    fn bytes(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i.wrapping_mul(131) as u8) ^ seed.wrapping_mul(7)).collect()
    }

    #[test]
    fn known_answers() {
        let hex = |d: [u8; 20]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
        assert_eq!(hex(Sha1::digest(b"")), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        assert_eq!(hex(Sha1::digest(b"abc")), "a9993e364706816aba3e25717850c26c9cd0d89d");
        let (a, b) = Sha1::digest2(b"abc", b"");
        assert_eq!(hex(a), "a9993e364706816aba3e25717850c26c9cd0d89d");
        assert_eq!(hex(b), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        let million = vec![b'a'; 1_000_000];
        assert_eq!(hex(Sha1::digest2(&million, &million).1), "34aa973cd4c4daa4f61eeb2bdbad27316534016f");
    }

    #[test]
    fn every_padding_boundary() {
        for len in 0..=3 * BLOCK {
            let a = bytes(len, 1);
            let b = bytes(3 * BLOCK - len, 2);
            assert_eq!(Sha1::digest(&a), reference(&a), "len {len}");
            assert_eq!(Sha1::digest2(&a, &b), (reference(&a), reference(&b)), "len {len}");
        }
    }

    #[test]
    fn the_portable_path_agrees() {
        let data = bytes(10 * BLOCK, 3);
        let mut state = IV;
        portable(&mut state, &data);
        let mut h = Sha1::new();
        h.update(&data);
        assert_eq!(h.state, state);
    }

    proptest! {
        /// Any cuts of two streams, fed pairwise through `update2` or alone
        /// through `update`, give each stream's SHA-1.
        #[test]
        fn streams_in_any_pieces_match_the_sha1_crate(
            la in 0usize..5000, lb in 0usize..5000,
            cuts in proptest::collection::vec((0usize..700, 0usize..700, any::<bool>()), 0..12),
        ) {
            let (a, b) = (bytes(la, 5), bytes(lb, 9));
            let (mut ha, mut hb) = (Sha1::new(), Sha1::new());
            let (mut ra, mut rb) = (&a[..], &b[..]);
            for (ca, cb, together) in cuts {
                let (ca, cb) = (ca.min(ra.len()), cb.min(rb.len()));
                if together {
                    Sha1::update2(&mut ha, &ra[..ca], &mut hb, &rb[..cb]);
                } else {
                    ha.update(&ra[..ca]);
                    hb.update(&rb[..cb]);
                }
                ra = &ra[ca..];
                rb = &rb[cb..];
            }
            Sha1::update2(&mut ha, ra, &mut hb, rb);
            prop_assert_eq!(ha.finalize(), reference(&a));
            prop_assert_eq!(hb.finalize(), reference(&b));
        }
    }
}
