//! A download state file into its decoder.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shoal_core::fuzzing::sidecar(data));
