//! Which chunk to fetch next, from whom: the [`PieceSelector`].
//!
//! Rarest first: among the chunks a peer has that are neither verified nor in
//! flight, take one of the least available. How ties are broken depends on
//! the swarm:
//!
//! - Some free chunk is held by fewer than all connected peers (a swarm:
//!   leechers that start together, chunks only a seeder has): at random
//!   over the rarest. The scan starts at a random place and takes the first
//!   `window` of the lowest availability from there, so downloaders that
//!   start together ask the seeder for different chunks instead of all for
//!   the first few.
//! - Every peer holds every free chunk (sources that are all complete):
//!   one of the `window` lowest indexes, at random, so chunks arrive nearly
//!   in order and the whole-file hash streams instead of reading back.
//!
//! When every missing chunk is
//! in flight, the endgame begins: a peer may take a chunk already in flight
//! elsewhere (at most [`MAX_ENDGAME_COPIES`] at once), and the first copy to
//! arrive whole cancels the others.
//!
//! A chunk moves from free to in flight ([`PieceSelector::pick`]), then to
//! checking once it arrived whole ([`PieceSelector::received`]) while its
//! SHA1 is checked off the engine thread, and to done
//! ([`PieceSelector::verified`]) or back to free ([`PieceSelector::rejected`],
//! [`PieceSelector::abandon`]). A chunk being checked is never handed out.
//!
//! Which peer asks first is the caller's choice: [`crate::client::download`] offers
//! free chunks to the least-loaded peers first.

use crate::client::peer::Bitmap;
use crate::rng::Rng;

/// How many peers may fetch the same chunk at once in the endgame.
pub const MAX_ENDGAME_COPIES: u8 = 2;

#[derive(Debug)]
pub struct PieceSelector {
    done: Bitmap,
    /// How many connected peers have each chunk.
    availability: Vec<u32>,
    /// How many peers are fetching each chunk now.
    in_flight: Vec<u8>,
    /// Chunks that arrived whole and wait for their SHA1 verdict.
    checking: Bitmap,
    /// How many free chunks (not done, checking or in flight) have each
    /// availability: the lowest one bounds what a scan can still find, so
    /// `pick` stops once its window holds that many of the rarest.
    free_at: Vec<u32>,
    window: usize,
    /// Peers whose maps are counted in `availability`.
    peers: u32,
}

impl PieceSelector {
    /// A selector for a file of `done.len()` chunks, of which `done` are held already.
    pub fn new(done: Bitmap, window: usize) -> PieceSelector {
        let n = done.len() as usize;
        let checking = Bitmap::new(done.len());
        let free_at = vec![done.len() - done.count()];
        PieceSelector {
            done,
            availability: vec![0; n],
            in_flight: vec![0; n],
            checking,
            free_at,
            window: window.max(1),
            peers: 0,
        }
    }

    fn is_free(&self, c: u32) -> bool {
        !self.done.get(c) && !self.checking.get(c) && self.in_flight[c as usize] == 0
    }

    /// Moves a chunk's availability one up or down, keeping `free_at` right.
    fn shift_availability(&mut self, c: u32, up: bool) {
        let i = c as usize;
        let free = self.uncount_if_free(c);
        let a = &mut self.availability[i];
        *a = if up { a.saturating_add(1) } else { a.saturating_sub(1) };
        if free {
            self.count_if_free(c);
        }
    }

    /// A chunk is about to stop being free (if it is): uncount it. Whether it was.
    fn uncount_if_free(&mut self, c: u32) -> bool {
        let free = self.is_free(c);
        if free {
            self.free_at[self.availability[c as usize] as usize] -= 1;
        }
        free
    }

    /// A chunk became free (if it is): count it.
    fn count_if_free(&mut self, c: u32) {
        if self.is_free(c) {
            let a = self.availability[c as usize] as usize;
            if self.free_at.len() <= a {
                self.free_at.resize(a + 1, 0);
            }
            self.free_at[a] += 1;
        }
    }

    pub fn done(&self) -> &Bitmap {
        &self.done
    }

    pub fn remaining(&self) -> u32 {
        self.done.len() - self.done.count()
    }

    pub fn is_complete(&self) -> bool {
        self.remaining() == 0
    }

    pub fn availability(&self, chunk: u32) -> u32 {
        self.availability[chunk as usize]
    }

    pub fn in_flight(&self, chunk: u32) -> u8 {
        self.in_flight[chunk as usize]
    }

    /// Whether `chunk` arrived whole and waits for its verdict.
    pub fn is_checking(&self, chunk: u32) -> bool {
        self.checking.get(chunk)
    }

    /// A peer joined with this chunk map (already checked to fit).
    pub fn add_peer(&mut self, have: &Bitmap) {
        self.peers += 1;
        for c in have.iter_set() {
            self.shift_availability(c, true);
        }
    }

    /// A peer left; `have` is its chunk map as it was last known.
    pub fn remove_peer(&mut self, have: &Bitmap) {
        self.peers = self.peers.saturating_sub(1);
        for c in have.iter_set() {
            self.shift_availability(c, false);
        }
    }

    /// A connected peer gained a chunk.
    pub fn add_have(&mut self, chunk: u32) {
        if chunk < self.done.len() {
            self.shift_availability(chunk, true);
        }
    }

    /// The lowest availability of any free chunk (`u32::MAX`: none free).
    fn floor(&self) -> u32 {
        self.free_at.iter().position(|&n| n > 0).map_or(u32::MAX, |a| a as u32)
    }

    /// The chunk a peer with map `have` should fetch next, or `None`.
    /// `fetching` are the chunks that peer is already fetching.
    pub fn pick(&mut self, have: &Bitmap, fetching: &[u32], rng: &mut Rng) -> Option<u32> {
        // No free chunk is rarer than this.
        let floor = self.floor();
        let (h, d, k) = (have.to_bytes(), self.done.to_bytes(), self.checking.to_bytes());
        // Where the scan starts (a byte of the maps), and so which chunks
        // win ties: the first ones met.
        // Ties go at random over the whole file when some free chunk is
        // held by fewer than all connected peers.
        let spread = floor < self.peers;
        let start = if spread && !h.is_empty() { rng.below(h.len() as u64) as usize } else { 0 };
        // (availability, order met, chunk)
        let mut best: Vec<(u32, u32, u32)> = Vec::with_capacity(self.window + 1);
        let mut endgame: Option<(u8, u32, u32)> = None;
        let mut met = 0u32;
        // Chunks the peer has that are neither done nor being checked, eight at a time.
        'scan: for step in 0..h.len() {
            let byte = (start + step) % h.len();
            let mut bits = h[byte] & !(d[byte] | k[byte]);
            while bits != 0 {
                let c = byte as u32 * 8 + bits.trailing_zeros();
                bits &= bits - 1;
                let i = c as usize;
                if c >= self.done.len() || fetching.contains(&c) {
                    continue;
                }
                if self.in_flight[i] == 0 {
                    let key = (self.availability[i], met, c);
                    met += 1;
                    if best.len() < self.window {
                        best.push(key);
                    } else if let Some(worst) = best.iter_mut().max() {
                        if key < *worst {
                            *worst = key;
                        }
                    }
                    // Later chunks cannot be rarer than the floor, and at
                    // equal rarity the one met first already won.
                    if best.len() == self.window && best.iter().all(|&(a, _, _)| a <= floor) {
                        break 'scan;
                    }
                } else if self.in_flight[i] < MAX_ENDGAME_COPIES {
                    let key = (self.in_flight[i], self.availability[i], c);
                    if endgame.is_none_or(|e| key < e) {
                        endgame = Some(key);
                    }
                }
            }
        }
        let chunk = if let Some(rarest) = best.iter().map(|&(a, _, _)| a).min() {
            // Only the rarest: a window's more plentiful chunks wait.
            best.retain(|&(a, _, _)| a == rarest);
            best.sort_unstable();
            best[rng.below(best.len() as u64) as usize].2
        } else if self.all_missing_in_flight() {
            endgame?.2
        } else {
            return None;
        };
        self.uncount_if_free(chunk);
        self.in_flight[chunk as usize] += 1;
        Some(chunk)
    }

    /// `free_at` agrees with the chunks' states (tests).
    #[cfg(test)]
    fn assert_counts(&self) {
        let mut want = vec![0u32; self.free_at.len().max(1)];
        for c in (0..self.done.len()).filter(|&c| self.is_free(c)) {
            want[self.availability[c as usize] as usize] += 1;
        }
        want.resize(self.free_at.len(), 0);
        assert_eq!(self.free_at, want);
    }

    fn all_missing_in_flight(&self) -> bool {
        (0..self.done.len()).all(|c| self.done.get(c) || self.checking.get(c) || self.in_flight[c as usize] > 0)
    }

    /// A fetch of `chunk` ended before the chunk arrived (stall, hang-up, cancelled copy).
    pub fn abandon(&mut self, chunk: u32) {
        let f = &mut self.in_flight[chunk as usize];
        if *f > 0 {
            *f -= 1;
            self.count_if_free(chunk);
        }
    }

    /// A fetch of `chunk` brought it whole; its SHA1 is being checked. Other
    /// fetches of it should be cancelled by the caller and reported with
    /// [`PieceSelector::abandon`].
    pub fn received(&mut self, chunk: u32) {
        self.checking.set(chunk);
        self.abandon(chunk);
    }

    /// `chunk` passed its SHA1 (and is stored).
    pub fn verified(&mut self, chunk: u32) {
        // Not through `received` (a caller's shortcut): it stops being free.
        self.uncount_if_free(chunk);
        self.checking.clear(chunk);
        self.done.set(chunk);
    }

    /// `chunk` failed its SHA1: it is free to fetch again.
    pub fn rejected(&mut self, chunk: u32) {
        if self.checking.get(chunk) {
            self.checking.clear(chunk);
            self.count_if_free(chunk);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use proptest::prelude::{any, prop_assert, prop_assert_eq, proptest};

    fn map(n: u32, set: &[u32]) -> Bitmap {
        let mut b = Bitmap::new(n);
        for &c in set {
            b.set(c);
        }
        b
    }

    /// The plain scan `pick` must agree with: every chunk, no shortcuts.
    fn reference_pick(s: &PieceSelector, have: &Bitmap, fetching: &[u32], rng: &mut Rng) -> Option<u32> {
        let free_anywhere = (0..s.done.len()).filter(|&c| s.is_free(c)).map(|c| s.availability[c as usize]);
        let spread = free_anywhere.min().is_some_and(|floor| floor < s.peers);
        let bytes = have.to_bytes().len();
        let start = if spread && bytes > 0 { rng.below(bytes as u64) as usize * 8 } else { 0 };
        // Each chunk's place in the order the scan meets them: from `start`
        // to the end, then from the beginning.
        let n = s.done.len();
        let mut rank: Vec<u32> = vec![0; n as usize];
        let from_start = (0..n).filter(|&c| c as usize >= start);
        for (r, c) in from_start.chain(0..(start as u32).min(n)).enumerate() {
            rank[c as usize] = r as u32;
        }
        let mut free: Vec<(u32, u32, u32)> = Vec::new();
        let mut endgame: Option<(u8, u32, u32)> = None;
        for c in have.iter_set() {
            let i = c as usize;
            if s.done.get(c) || s.checking.get(c) || fetching.contains(&c) {
                continue;
            }
            if s.in_flight[i] == 0 {
                free.push((s.availability[i], rank[i], c));
            } else if s.in_flight[i] < MAX_ENDGAME_COPIES {
                let key = (s.in_flight[i], s.availability[i], c);
                endgame = endgame.min(Some(key)).or(Some(key));
            }
        }
        free.sort_unstable();
        free.truncate(s.window);
        if let Some(&(rarest, _, _)) = free.first() {
            free.retain(|&(a, _, _)| a == rarest);
            Some(free[rng.below(free.len() as u64) as usize].2)
        } else if s.all_missing_in_flight() {
            endgame.map(|e| e.2)
        } else {
            None
        }
    }

    #[test]
    fn rarest_first() {
        let mut s = PieceSelector::new(Bitmap::new(4), 1);
        s.add_peer(&map(4, &[0, 1, 2, 3]));
        s.add_peer(&map(4, &[0, 1, 3]));
        s.add_peer(&map(4, &[0, 3]));
        let mut rng = Rng::from_u64(1);
        let all = map(4, &[0, 1, 2, 3]);
        assert_eq!(s.pick(&all, &[], &mut rng), Some(2), "held by one peer");
        assert_eq!(s.pick(&all, &[2], &mut rng), Some(1), "held by two");
    }

    #[test]
    fn verified_and_in_flight_chunks_are_skipped_until_the_endgame() {
        let mut s = PieceSelector::new(map(3, &[0]), 4);
        let all = map(3, &[0, 1, 2]);
        s.add_peer(&all);
        s.add_peer(&all);
        let mut rng = Rng::from_u64(2);
        let a = s.pick(&all, &[], &mut rng).unwrap();
        let b = s.pick(&all, &[a], &mut rng).unwrap();
        assert_ne!(a, b);
        assert!(a != 0 && b != 0);
        // Endgame: a second peer may take a chunk already in flight, once.
        let e = s.pick(&all, &[], &mut rng).unwrap();
        assert!(e == a || e == b);
        assert_eq!(s.in_flight(e), 2);
        s.received(e);
        assert!(s.is_checking(e) && !s.done().get(e));
        s.verified(e);
        assert!(s.done().get(e) && !s.is_checking(e));
    }

    #[test]
    fn a_chunk_being_checked_is_not_handed_out_until_rejected() {
        let mut s = PieceSelector::new(Bitmap::new(1), 4);
        let all = map(1, &[0]);
        s.add_peer(&all);
        s.add_peer(&all);
        let mut rng = Rng::from_u64(4);
        assert_eq!(s.pick(&all, &[], &mut rng), Some(0));
        s.received(0);
        assert_eq!(s.in_flight(0), 0);
        assert_eq!(s.pick(&all, &[], &mut rng), None, "checking, not free, not endgame");
        s.rejected(0);
        assert_eq!(s.pick(&all, &[], &mut rng), Some(0), "free again after a bad hash");
    }

    /// Leechers that start together, each seeing the seeder (every chunk)
    /// and an empty peer: their first picks from the seeder spread over the
    /// file. Sources that are all complete: picks stay at the front, in
    /// order for the whole-file hash.
    #[test]
    fn a_flash_crowd_spreads_and_complete_sources_keep_order() {
        let n = 256;
        let seeder = map(n, &(0..n).collect::<Vec<_>>());
        let first_picks = |with_empty_peer: bool| {
            let mut firsts: Vec<u32> = (0..64u64)
                .map(|i| {
                    let mut s = PieceSelector::new(Bitmap::new(n), 4);
                    s.add_peer(&seeder);
                    if with_empty_peer {
                        s.add_peer(&Bitmap::new(n));
                    } else {
                        s.add_peer(&seeder);
                    }
                    s.pick(&seeder, &[], &mut Rng::from_u64(i)).unwrap()
                })
                .collect();
            firsts.sort_unstable();
            firsts
        };
        let mut crowd = first_picks(true);
        let max = *crowd.last().unwrap();
        crowd.dedup();
        assert!(crowd.len() >= 40, "64 leechers' first picks hit only {} chunks", crowd.len());
        assert!(max >= n / 2, "first picks stay below chunk {max}");
        let ordered = first_picks(false);
        assert!(ordered.iter().all(|&c| c < 4), "complete sources: {ordered:?}");
    }

    #[test]
    fn nothing_for_a_peer_without_useful_chunks() {
        let mut s = PieceSelector::new(map(3, &[1]), 4);
        let mut rng = Rng::from_u64(3);
        assert_eq!(s.pick(&map(3, &[1]), &[], &mut rng), None);
        assert_eq!(s.pick(&map(3, &[]), &[], &mut rng), None);
    }

    proptest! {
        /// Random peers taking, abandoning, receiving, verifying and
        /// rejecting chunks always end with every chunk verified, never
        /// picking a done or checking chunk or one the peer lacks, and never
        /// more copies than allowed.
        #[test]
        fn picks_are_always_legal_and_finish(n in 1u32..40, peers in proptest::collection::vec(proptest::collection::vec(any::<bool>(), 40), 1..5), seed in any::<u64>(), fail_every in 2u64..7) {
            let mut maps: Vec<Bitmap> = peers.iter().map(|bits| {
                let mut b = Bitmap::new(n);
                for (i, &x) in bits.iter().take(n as usize).enumerate() { if x { b.set(i as u32); } }
                b
            }).collect();
            // Chunks nobody has cannot finish: start with those done.
            let mut done = Bitmap::new(n);
            for c in 0..n { if !maps.iter().any(|m| m.get(c)) { done.set(c); } }
            let mut s = PieceSelector::new(done, 3);
            for m in &maps { s.add_peer(m); }
            let mut rng = Rng::from_u64(seed);
            let mut fetching: Vec<Vec<u32>> = vec![vec![]; maps.len()];
            let mut checking: Vec<u32> = Vec::new();
            let mut step = 0u64;
            while !s.is_complete() {
                step += 1;
                prop_assert!(step < 10_000, "no progress");
                if !checking.is_empty() && rng.below(3) == 0 {
                    let c = checking.swap_remove(rng.below(checking.len() as u64) as usize);
                    if rng.below(fail_every) == 0 { s.rejected(c) } else { s.verified(c) }
                    continue;
                }
                s.assert_counts();
                let p = rng.below(maps.len() as u64) as usize;
                // Now and then a peer leaves (its fetches end) and comes
                // back, or gains a chunk.
                if rng.below(25) == 0 {
                    s.remove_peer(&maps[p]);
                    for c in fetching[p].drain(..) {
                        s.abandon(c);
                    }
                    s.add_peer(&maps[p]);
                    continue;
                }
                if rng.below(25) == 0 {
                    let c = rng.below(n as u64) as u32;
                    if !maps[p].get(c) {
                        maps[p].set(c);
                        s.add_have(c);
                    }
                    continue;
                }
                if fetching[p].len() < 2 {
                    let expected = reference_pick(&s, &maps[p], &fetching[p], &mut rng.clone());
                    // The rarest free chunk this peer could give.
                    let rarest = maps[p]
                        .iter_set()
                        .filter(|&c| s.is_free(c) && !fetching[p].contains(&c))
                        .map(|c| s.availability(c))
                        .min();
                    let picked = s.pick(&maps[p], &fetching[p], &mut rng);
                    prop_assert_eq!(picked, expected);
                    if let (Some(c), Some(a)) = (picked, rarest) {
                        prop_assert_eq!(s.in_flight(c), 1, "a free chunk existed: no endgame copy");
                        prop_assert_eq!(s.availability(c), a, "not the rarest");
                    }
                    if let Some(c) = picked {
                        prop_assert!(maps[p].get(c) && !s.done().get(c) && !s.is_checking(c));
                        prop_assert!(s.in_flight(c) <= MAX_ENDGAME_COPIES);
                        fetching[p].push(c);
                        continue;
                    }
                }
                if let Some(c) = fetching[p].pop() {
                    if rng.below(fail_every) == 0 || s.done().get(c) || s.is_checking(c) {
                        s.abandon(c);
                    } else {
                        s.received(c);
                        checking.push(c);
                        // The caller cancels the other copies.
                        for (q, f) in fetching.iter_mut().enumerate() {
                            if q != p {
                                if let Some(i) = f.iter().position(|&x| x == c) {
                                    f.remove(i);
                                    s.abandon(c);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
