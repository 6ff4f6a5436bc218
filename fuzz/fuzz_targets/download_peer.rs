//! Arbitrary peer frames into a Download: no panic, no unverified chunk released.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shoal_core::fuzzing::download_peer(data));
