//! The bodies of the fuzz targets, shared by `fuzz/` (cargo-fuzz, nightly) and
//! the corpus replay test that runs on stable with every `cargo test`.
//!
//! Each function takes arbitrary bytes and must not panic, hang, or allocate
//! beyond the limits the code under test claims.

use crate::proto::{Message, Role, PROTOCOL_VERSION};
use crate::rng::Rng;
use crate::time::Millis;
use crate::tracker::{ConnId, SoloReplicator, TrackerConfig, TrackerNode};
use crate::wire::{decode, encode, FrameDecoder};

/// Frame limit for fuzzing: small, so the fuzzer reaches "too large" cheaply.
const FUZZ_FRAME_LIMIT: usize = 4096;

/// The first byte picks the split size; the rest is the stream.
pub fn frame_stream(data: &[u8]) {
    let Some((&split, stream)) = data.split_first() else { return };
    let split = split as usize + 1;
    let mut dec = FrameDecoder::new(FUZZ_FRAME_LIMIT);
    for piece in stream.chunks(split) {
        dec.push(piece);
        loop {
            match dec.next_message::<Message>() {
                Ok(Some(m)) => round_trip(&m),
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(dec.buffered() <= FUZZ_FRAME_LIMIT + 4 + split, "decoder buffers beyond its limit");
    }
}

pub fn message(data: &[u8]) {
    if let Ok(m) = decode(data) {
        round_trip(&m);
    }
}

fn round_trip(m: &Message) {
    let bytes = encode(m);
    assert_eq!(&decode::<Message>(&bytes[4..]).expect("re-decodes"), m);
}

pub fn shell_command(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = crate::shell::parse(s);
    }
}

pub fn tracker_info(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(list) = crate::config::parse_tracker_info(s) {
            assert!(!list.is_empty());
        }
    }
}

/// Each record: a connection byte (0-3) and a length byte, then that many
/// bytes for that connection. Connections 0 and 1 start with a valid Hello so
/// the fuzzer reaches request handling.
pub fn tracker_node(data: &[u8]) {
    let cfg = TrackerConfig { password_params: crate::meta::PasswordParams::INSECURE_FAST, ..TrackerConfig::default() };
    let mut node = TrackerNode::new(cfg, Rng::from_u64(0), SoloReplicator::default());
    let hello = encode(&Message::Hello { protocol_version: PROTOCOL_VERSION, role: Role::Client });
    for c in 0..4 {
        node.handle_connected(ConnId(c), Millis(0));
    }
    node.handle_bytes(ConnId(0), &hello, Millis(0));
    node.handle_bytes(ConnId(1), &hello, Millis(0));
    let mut rest = data;
    let mut now = 0;
    while let [conn, len, tail @ ..] = rest {
        let n = (*len as usize).min(tail.len());
        now += 1;
        node.handle_bytes(ConnId(*conn as u64 % 4), &tail[..n], Millis(now));
        while node.poll_output().is_some() {}
        rest = &tail[n..];
    }
}
