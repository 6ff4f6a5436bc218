//! The one source of randomness in the core: a ChaCha stream seeded by the driver.
//!
//! Production drivers seed it from the OS; `sim` seeds it from the run's seed, so
//! tokens, salts and jitter replay exactly.

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

/// A seeded, portable PRNG (ChaCha20: its output is the same on every platform).
#[derive(Clone)]
pub struct Rng(ChaCha20Rng);

impl Rng {
    /// A stream fully determined by `seed`.
    pub fn from_seed(seed: [u8; 32]) -> Rng {
        Rng(ChaCha20Rng::from_seed(seed))
    }

    /// Convenience for tests and the simulator.
    pub fn from_u64(seed: u64) -> Rng {
        Rng(ChaCha20Rng::seed_from_u64(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        self.0.fill_bytes(out)
    }

    /// Uniform in `0..n` (`n > 0`), without modulo bias worth speaking of for our `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

impl std::fmt::Debug for Rng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Rng(..)")
    }
}
