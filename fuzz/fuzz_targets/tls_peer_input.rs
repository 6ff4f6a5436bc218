//! What a peer sends before and during a TLS handshake, and the
//! certificate it presents (see `shoal_net_mio::tls::fuzz_peer_input`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shoal_net_mio::tls::fuzz_peer_input(data));
