//! A tracker's write-ahead log file into recovery.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shoal_core::fuzzing::wal_log(data));
