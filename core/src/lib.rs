//! shoal-core: the deterministic, sans-IO heart of shoal.
//!
//! Nothing in this crate reads a clock, opens a socket or a file, spawns a thread
//! or draws from a global random source. Time comes in as [`time::Millis`]
//! arguments, randomness from a seed the driver passes in, and every effect
//! goes out as an output value the driver drains. Same inputs and seed give the
//! same outputs, bit for bit, which is what lets `sim` replay whole clusters.
//! Every decision is made here: drivers (net-mio, the simulation) move bytes,
//! files and time, and report what they observed (bytes read, a digest
//! computed, a sync done).
//!
//! The state machines follow one calling contract (after quinn-proto and str0m):
//!
//! 1. feed an input (`handle_input` for the client engine, `handle_*` for
//!    the tracker node), passing `now`, which never goes backwards;
//! 2. drain `poll_output` until it returns `None`, carrying the outputs out in
//!    order; no input is fed while draining;
//! 3. ask `poll_timeout` for the next deadline and feed the timeout once it
//!    passes (early is harmless).
//!
//! Each module's docs state its own contract. Modules, by layer:
//! - [`wire`]: length-prefixed frames and the postcard codec;
//! - [`proto`]: the messages clients and trackers exchange;
//! - [`ids`], [`chunk`]: validated names and the 512 KiB chunk hashing;
//! - [`identity`]: key ids, who a connection's other end proved to be;
//! - [`meta`]: the tracker's replicated metadata state machine, `apply(command)`;
//! - [`tracker`]: a tracker node: requests ([`tracker::node`]), soft state,
//!   links to the other trackers ([`tracker::links`]), the persist-before-send
//!   barrier ([`tracker::outbox`]), the replicated log ([`tracker::omni`]);
//! - [`wal`]: the log's record format and recovery;
//! - [`client`]: the client engine: its tracker link, commands, downloads
//!   ([`client::fetch`], [`client::download`], [`client::picker`]),
//!   verification ([`client::verify`]), the receive path ([`client::receive`]),
//!   the chunk server ([`client::serve`]), the disk interface
//!   ([`client::disk`]), the sidecar and the peer protocol;
//! - [`shell`]: the shell's command parser and how results read to a person;
//! - [`config`]: the `tracker_info.txt` parser;
//! - [`rate`], [`rng`], [`time`]: a token bucket, the seeded PRNG, logical time;
//! - [`fuzzing`]: the fuzz targets' bodies, and an in-memory disk for tests.

pub mod chunk;
pub mod client;
pub mod config;
pub mod fuzzing;
pub mod identity;
pub mod ids;
pub mod meta;
pub mod proto;
pub mod rate;
pub mod rng;
pub mod shell;
pub mod time;
pub mod tracker;
pub mod wal;
pub mod wire;

pub use time::Millis;
