//! TLS 1.3 records once the handshake is over, for the bulk connections
//! between peers: the part kTLS does in the kernel (which this project
//! cannot count on: many kernels are built without it).
//!
//! rustls runs the handshake and derives the traffic keys, then hands them
//! over (`dangerous_extract_secrets`, the entry point it offers for kTLS).
//! From there this layer protects records as RFC 8446 section 5.2 says, in
//! place: a sharer reads a file straight into the record it seals, a
//! downloader opens each record inside the buffer the socket filled. rustls's
//! buffered API copies every received byte twice more (into its deframer,
//! then into a buffer of its own) and every sent byte once more (with an
//! allocation per record).
//!
//! Opening uses rustls's own record decrypter (its length, padding and
//! content type checks); sealing uses ring, rustls's provider here, with
//! rustls's nonce and additional-data helpers. Neither side ever sends a
//! key update or a session ticket (tickets are off on the peer server
//! configuration); a record with a handshake message in it ends the
//! connection, as does reaching the cipher's confidentiality limit (for
//! AES-128-GCM 2^24 records: 256 GiB), after which the downloader dials
//! again and a new handshake makes new keys.

use std::ops::Range;

use ring::aead;
use rustls::crypto::cipher::{make_tls13_aad, InboundOpaqueMessage, Iv, MessageDecrypter, Nonce};
use rustls::{ConnectionTrafficSecrets, ContentType, ProtocolVersion, SupportedCipherSuite};
use thiserror::Error;

/// A record's header: type, legacy version, length.
pub const HEADER: usize = 5;
/// Most plaintext bytes in one record.
pub const MAX_PLAIN: usize = 16 * 1024;
/// What sealing adds after the plaintext: the inner content type and the tag.
pub const TRAILER: usize = 1 + TAG;
const TAG: usize = 16;
/// Longest ciphertext a record may declare (RFC 8446: 2^14 + 256).
const MAX_CIPHERTEXT: usize = MAX_PLAIN + 256;
/// Most bytes one record takes on the wire.
pub const MAX_WIRE: usize = HEADER + MAX_CIPHERTEXT;

#[derive(Debug, Error)]
pub enum RecordError {
    #[error("the cipher suite {0:?} is not one this layer seals")]
    Suite(SupportedCipherSuite),
    #[error("the connection sealed as many records as its key may")]
    Limit,
    #[error("a record of type {0} after the handshake")]
    OuterType(u8),
    #[error("a record declaring {0} bytes")]
    Length(usize),
    #[error("a record that does not open: {0}")]
    Open(rustls::Error),
    #[error("a handshake message after the handshake (a key update or ticket, never sent here)")]
    Handshake,
    #[error("alert {0} from the other end")]
    Alert(u8),
    #[error("a record of inner type {0:?}")]
    InnerType(ContentType),
}

/// What one record held.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// Application data, at this range of the buffer given to
    /// [`Records::open`].
    Data(Range<usize>),
    /// The other end's close_notify: nothing follows.
    CloseNotify,
}

/// The two directions' keys and record counts.
pub struct Records {
    seal: aead::LessSafeKey,
    seal_iv: Iv,
    tx_seq: u64,
    open: Box<dyn MessageDecrypter>,
    rx_seq: u64,
    /// Records one key may seal.
    limit: u64,
}

impl Records {
    /// The layer for a connection whose handshake negotiated `suite` and
    /// whose traffic keys and record counts are `secrets`.
    pub fn new(suite: SupportedCipherSuite, secrets: rustls::ExtractedSecrets) -> Result<Records, RecordError> {
        let tls13 = suite.tls13().ok_or(RecordError::Suite(suite))?;
        let (tx_seq, tx) = secrets.tx;
        let (rx_seq, rx) = secrets.rx;
        let (alg, key, seal_iv) = match tx {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&aead::CHACHA20_POLY1305, key, iv),
            _ => return Err(RecordError::Suite(suite)),
        };
        let seal = aead::UnboundKey::new(alg, key.as_ref()).map_err(|_| RecordError::Suite(suite))?;
        let open = match rx {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv }
            | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
            | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => tls13.aead_alg.decrypter(key, iv),
            _ => return Err(RecordError::Suite(suite)),
        };
        Ok(Records {
            seal: aead::LessSafeKey::new(seal),
            seal_iv,
            tx_seq,
            open,
            rx_seq,
            limit: tls13.common.confidentiality_limit,
        })
    }

    /// Seals the record laid out at `buf[start..]`: `HEADER` bytes reserved,
    /// then `n` plaintext bytes, then `TRAILER` bytes of room (`buf` must
    /// hold them all: `start + HEADER + n + TRAILER <= buf.len()`, with
    /// `n <= MAX_PLAIN`). Writes the header, the inner type and the tag.
    pub fn seal(&mut self, buf: &mut [u8], start: usize, n: usize, typ: ContentType) -> Result<(), RecordError> {
        if self.tx_seq >= self.limit {
            return Err(RecordError::Limit);
        }
        let body = start + HEADER;
        let record = &mut buf[start..body + n + TRAILER];
        let header = make_tls13_aad(n + TRAILER);
        record[..HEADER].copy_from_slice(&header);
        record[HEADER + n] = u8::from(typ);
        let nonce = aead::Nonce::assume_unique_for_key(Nonce::new(&self.seal_iv, self.tx_seq).0);
        let (inner, tag) = record[HEADER..].split_at_mut(n + 1);
        let t = self
            .seal
            .seal_in_place_separate_tag(nonce, aead::Aad::from(header), inner)
            .map_err(|_| RecordError::Limit)?;
        tag.copy_from_slice(t.as_ref());
        self.tx_seq += 1;
        Ok(())
    }

    /// Seals a record of `plain` of type `typ` into `buf` at `start` (small
    /// records: alerts, tests): the bytes it took, `buf` having room for
    /// them.
    pub fn seal_copy(
        &mut self,
        buf: &mut [u8],
        start: usize,
        plain: &[u8],
        typ: ContentType,
    ) -> Result<usize, RecordError> {
        let n = plain.len();
        buf[start + HEADER..start + HEADER + n].copy_from_slice(plain);
        self.seal(buf, start, n, typ)?;
        Ok(HEADER + n + TRAILER)
    }

    /// Appends a sealed record of `plain` of type `typ` to `buf`.
    pub fn seal_append(&mut self, buf: &mut Vec<u8>, plain: &[u8], typ: ContentType) -> Result<(), RecordError> {
        let start = buf.len();
        buf.resize(start + HEADER + plain.len() + TRAILER, 0);
        let r = self.seal_copy(buf, start, plain, typ).map(|_| ());
        if r.is_err() {
            buf.truncate(start);
        }
        r
    }

    /// Opens the record at the start of `buf`, in place: `None` until the
    /// whole record is there, else the bytes it took and what it held.
    pub fn open(&mut self, buf: &mut [u8]) -> Result<Option<(usize, Opened)>, RecordError> {
        let Some(header) = buf.get(..HEADER) else { return Ok(None) };
        if header[0] != u8::from(ContentType::ApplicationData) {
            return Err(RecordError::OuterType(header[0]));
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len > MAX_CIPHERTEXT {
            return Err(RecordError::Length(len));
        }
        let Some(record) = buf.get_mut(HEADER..HEADER + len) else { return Ok(None) };
        let opaque = InboundOpaqueMessage::new(ContentType::ApplicationData, ProtocolVersion::TLSv1_2, record);
        let plain = self.open.decrypt(opaque, self.rx_seq).map_err(RecordError::Open)?;
        // Unpadding shortens the payload from its end: it starts where the
        // ciphertext did.
        let data = HEADER..HEADER + plain.payload.len();
        let opened = match plain.typ {
            ContentType::ApplicationData => Opened::Data(data),
            ContentType::Alert => match plain.payload {
                [_, 0] => Opened::CloseNotify,
                [_, desc] => return Err(RecordError::Alert(*desc)),
                _ => return Err(RecordError::Alert(u8::MAX)),
            },
            ContentType::Handshake => return Err(RecordError::Handshake),
            other => return Err(RecordError::InnerType(other)),
        };
        self.rx_seq = self.rx_seq.checked_add(1).ok_or(RecordError::Limit)?;
        Ok(Some((HEADER + len, opened)))
    }
}

/// A close_notify alert's body (level warning, description 0).
pub const CLOSE_NOTIFY: [u8; 2] = [1, 0];

/// What a fuzzer (or a test) feeds in as a peer would after a handshake:
/// bytes that the layer must refuse or open, never panic on, and never open
/// as anything the key did not seal.
#[doc(hidden)]
pub fn fuzz_records_input(data: &[u8]) {
    let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384;
    let secrets = || rustls::ExtractedSecrets {
        tx: (0, ConnectionTrafficSecrets::Aes256Gcm { key: [7u8; 32].into(), iv: [9u8; 12].into() }),
        rx: (0, ConnectionTrafficSecrets::Aes256Gcm { key: [7u8; 32].into(), iv: [9u8; 12].into() }),
    };
    let Ok(mut ours) = Records::new(suite, secrets()) else { return };
    // `data[0]` picks: bit 0 clear, the bytes as they come; set, the bytes
    // sealed first (so the opener sees real records; each piece's first byte
    // picks its inner type), then, with bit 1, one byte flipped.
    let Some((&door, rest)) = data.split_first() else { return };
    let mut wire = Vec::new();
    if door & 1 == 1 {
        let Ok(mut sealer) = Records::new(suite, secrets()) else { return };
        let size = usize::from(door >> 2) * 300 + 1;
        for piece in rest.chunks(size.min(MAX_PLAIN)) {
            let typ = match piece[0] % 4 {
                0 => ContentType::Alert,
                1 => ContentType::Handshake,
                2 => ContentType::ChangeCipherSpec,
                _ => ContentType::ApplicationData,
            };
            let _ = sealer.seal_append(&mut wire, piece, typ);
        }
        if door & 2 == 2 {
            if let Some(&flip) = rest.first() {
                let at = usize::from(flip) * 131 % (wire.len() + 1);
                if let Some(b) = wire.get_mut(at) {
                    *b ^= 0x5a;
                }
            }
        }
    } else {
        wire.extend_from_slice(rest);
    }
    let mut at = 0;
    while let Ok(Some((used, opened))) = ours.open(&mut wire[at..]) {
        if let Opened::Data(r) = &opened {
            assert!(r.end <= used, "opened data outside its record");
        }
        at += used;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two ends' layers, as a handshake would leave them (AES-256-GCM: the
    /// keys rustls hands over for AES-128 come from real handshakes, in
    /// conn.rs's tests).
    fn pair() -> (Records, Records) {
        let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384;
        let keys = |k: u8| ConnectionTrafficSecrets::Aes256Gcm { key: [k; 32].into(), iv: [k; 12].into() };
        let a = Records::new(suite, rustls::ExtractedSecrets { tx: (0, keys(1)), rx: (0, keys(2)) }).unwrap();
        let b = Records::new(suite, rustls::ExtractedSecrets { tx: (0, keys(2)), rx: (0, keys(1)) }).unwrap();
        (a, b)
    }

    #[test]
    fn sealed_records_open_in_order_and_tampering_is_refused() {
        let (mut a, mut b) = pair();
        let mut wire = Vec::new();
        let msgs: Vec<Vec<u8>> = vec![b"hello".to_vec(), vec![], vec![0xab; MAX_PLAIN]];
        for m in &msgs {
            a.seal_append(&mut wire, m, ContentType::ApplicationData).unwrap();
        }
        a.seal_append(&mut wire, &CLOSE_NOTIFY, ContentType::Alert).unwrap();
        let mut tampered = wire.clone();
        let mut at = 0;
        for m in &msgs {
            // Not yet whole: nothing.
            assert_eq!(b.open(&mut wire[at..at + 3]).unwrap(), None);
            let (used, opened) = b.open(&mut wire[at..]).unwrap().unwrap();
            let Opened::Data(r) = opened else { panic!("data expected") };
            assert_eq!(&wire[at..][r], &m[..]);
            at += used;
        }
        assert_eq!(b.open(&mut wire[at..]).unwrap().map(|o| o.1), Some(Opened::CloseNotify));
        // A flipped byte, a replayed or reordered record: refused.
        tampered[HEADER + 2] ^= 1;
        let (_, mut c) = pair();
        assert!(matches!(c.open(&mut tampered), Err(RecordError::Open(_))));
        let (mut d, mut e) = pair();
        let mut one = Vec::new();
        d.seal_append(&mut one, b"x", ContentType::ApplicationData).unwrap();
        let mut again = one.clone();
        e.open(&mut one).unwrap().unwrap();
        assert!(matches!(e.open(&mut again), Err(RecordError::Open(_))));
    }

    #[test]
    fn headers_that_no_record_has_are_refused_before_reading_on() {
        let (_, mut b) = pair();
        assert!(matches!(b.open(&mut [22, 3, 3, 0, 1, 0]), Err(RecordError::OuterType(22))));
        assert!(matches!(b.open(&mut [23, 3, 3, 0xff, 0xff]), Err(RecordError::Length(0xffff))));
    }

    #[test]
    fn the_confidentiality_limit_ends_sealing() {
        let (mut a, _) = pair();
        a.tx_seq = a.limit;
        assert!(matches!(a.seal_append(&mut Vec::new(), b"x", ContentType::ApplicationData), Err(RecordError::Limit)));
    }

    #[test]
    fn fuzz_body_survives_real_and_broken_records() {
        for n in [0usize, 1, 5, 100, MAX_PLAIN + 3] {
            for door in 0..4u8 {
                let mut input = vec![door];
                input.extend((0..n).map(|i| (i * 7 + usize::from(door)) as u8));
                fuzz_records_input(&input);
            }
        }
    }
}
