//! A token bucket: limits how fast this client uploads, when asked to.

use crate::time::Millis;

#[derive(Clone, Debug)]
pub struct TokenBucket {
    /// Bytes per second.
    rate: u64,
    capacity: u64,
    tokens: u64,
    last: Millis,
}

impl TokenBucket {
    /// A bucket allowing `rate` bytes per second with bursts of `burst` bytes.
    pub fn new(rate: u64, burst: u64, now: Millis) -> TokenBucket {
        let capacity = burst.max(1);
        TokenBucket { rate: rate.max(1), capacity, tokens: capacity, last: now }
    }

    fn refill(&mut self, now: Millis) {
        let ms = now.since(self.last).0;
        if ms > 0 {
            let add = self.rate.saturating_mul(ms) / 1000;
            if add > 0 {
                self.tokens = (self.tokens + add).min(self.capacity);
                self.last = now;
            }
        }
    }

    /// Takes `n` bytes' worth if there are enough.
    pub fn take(&mut self, n: u64, now: Millis) -> bool {
        self.refill(now);
        if self.tokens >= n.min(self.capacity) {
            self.tokens = self.tokens.saturating_sub(n);
            true
        } else {
            false
        }
    }

    /// Bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// When `n` bytes' worth will be there.
    pub fn ready_at(&self, n: u64) -> Millis {
        let missing = n.min(self.capacity).saturating_sub(self.tokens);
        self.last.plus(Millis((missing.saturating_mul(1000)).div_ceil(self.rate)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_the_long_run_rate() {
        let mut b = TokenBucket::new(1_000_000, 64 * 1024, Millis(0));
        let mut now = Millis(0);
        let mut sent = 0u64;
        while now < Millis(10_000) {
            if b.take(64 * 1024, now) {
                sent += 64 * 1024;
            } else {
                now = b.ready_at(64 * 1024).max(now.plus(Millis(1)));
            }
        }
        // 10 s at 1 MB/s, plus the first burst.
        assert!((9_900_000..=10_200_000).contains(&sent), "{sent}");
    }
}
