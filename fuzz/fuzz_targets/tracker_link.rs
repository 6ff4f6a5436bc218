//! Frames from another tracker (consensus messages, soft state) into a replicated tracker node.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shoal_core::fuzzing::tracker_link(data));
