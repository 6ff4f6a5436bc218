//! shoal-net-mio: runs shoal's core state machines over real TCP with mio.
//!
//! The drivers here make no decisions: they move bytes between sockets and
//! the core, read the clock, hash files off-thread, and arm timers from
//! `poll_timeout`. Everything that decides lives in `shoal-core`.

pub mod client;
mod clock;
mod conn;
mod hashers;
pub mod http;
mod pageout;
mod part;
pub mod partial;
#[doc(hidden)]
pub mod pathbench;
pub mod ranges;
mod readcache;
pub mod records;
pub mod tls;
pub mod tracker;
pub mod wal;

pub use clock::Clock;

/// 32 bytes from the operating system's CSPRNG, to seed a core [`shoal_core::rng::Rng`].
pub fn os_seed() -> std::io::Result<[u8; 32]> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).map_err(std::io::Error::other)?;
    Ok(seed)
}
