//! One peer frame body into the peer message decoders.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shoal_core::fuzzing::peer_message(data));
