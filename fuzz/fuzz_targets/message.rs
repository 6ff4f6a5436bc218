//! One frame body into the message decoder; what decodes must re-encode the same.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shoal_core::fuzzing::message(data));
