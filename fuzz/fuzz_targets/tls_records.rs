//! What a peer sends once its handshake is done: TLS 1.3 records opened in
//! place (see `shoal_net_mio::records::fuzz_records_input`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shoal_net_mio::records::fuzz_records_input(data));
