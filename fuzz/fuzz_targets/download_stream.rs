//! A sharer's bytes into a downloading client engine, block data received in place.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shoal_core::fuzzing::download_stream(data));
