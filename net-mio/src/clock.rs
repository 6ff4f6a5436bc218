use std::time::{Duration, Instant};

use shoal_core::Millis;

/// Wall time as the core sees it: milliseconds since the driver started.
#[derive(Clone, Copy, Debug)]
pub struct Clock(Instant);

impl Default for Clock {
    fn default() -> Self {
        Clock(Instant::now())
    }
}

impl Clock {
    pub fn now(&self) -> Millis {
        Millis(self.0.elapsed().as_millis() as u64)
    }

    /// How long mio may sleep before `deadline` (rounded up so a timer never fires early).
    pub fn until(&self, deadline: Option<Millis>) -> Option<Duration> {
        deadline.map(|d| Duration::from_millis(d.since(self.now()).0.saturating_add(1)))
    }
}
