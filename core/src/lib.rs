//! shoal-core: the deterministic, sans-IO heart of shoal.
//!
//! Nothing in this crate reads a clock, opens a socket or a file, spawns a thread
//! or draws from a global random source. Time comes in as [`time::Millis`]
//! arguments, randomness from a seed the driver passes in, and every effect
//! goes out as an output value the driver drains. Same inputs and seed give the
//! same outputs, bit for bit, which is what lets `sim` replay whole clusters.
//!
//! The state machines follow one calling contract (after quinn-proto and str0m):
//!
//! 1. feed an input with a `handle_*` method, passing `now`;
//! 2. drain `poll_output` until it returns `None`;
//! 3. ask `poll_timeout` for the next deadline and call `handle_timeout` when it
//!    passes (calling it early is harmless).
//!
//! Modules, by layer:
//! - [`wire`]: length-prefixed frames and the postcard codec;
//! - [`proto`]: the messages clients and trackers exchange;
//! - [`ids`], [`chunk`]: validated names and the 512 KiB chunk hashing;
//! - [`meta`]: the tracker's replicated metadata state machine, `apply(command)`;
//! - [`tracker`]: a tracker node that turns client requests into commands;
//! - [`client`]: the client engine (tracker side);
//! - [`shell`]: the shell's command parser and how results read to a person;
//! - [`config`]: the `tracker_info.txt` parser.

pub mod chunk;
pub mod client;
pub mod config;
pub mod fuzzing;
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
