//! Whole frames from another tracker (consensus parts, chunk-list ranges, soft state) into a tracker node.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shoal_core::fuzzing::tracker_frames(data));
