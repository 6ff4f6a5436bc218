//! An arbitrary byte stream, split at arbitrary points, into the frame decoder.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shoal_core::fuzzing::frame_stream(data));
