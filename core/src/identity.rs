//! Who a party is: a [`KeyId`], the SHA-256 of its public key.
//!
//! Every tracker and client holds a key pair; the driver's TLS layer proves
//! that the other end of a connection holds the private key of the public
//! key it presents, and reports that key's id. The core decides what an id
//! may do (be tracker 2, be the sharer a downloader was sent to); it never
//! sees a key or a certificate. As Syncthing's device ids, a `KeyId` is
//! written in base32 (RFC 4648 letters, no padding): 52 characters, shown in
//! four groups of 13 joined by `-`. Parsing ignores the dashes and the case.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The SHA-256 of a party's public key (its DER SubjectPublicKeyInfo).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct KeyId(pub [u8; 32]);

/// Base32 letters of a [`KeyId`] (256 bits, 5 a letter, the last with 4 zero bits).
pub const KEY_ID_LETTERS: usize = 52;
const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyIdError {
    #[error("a key id has {KEY_ID_LETTERS} letters (A-Z, 2-7; dashes ignored), found {0}")]
    Length(usize),
    #[error("a key id has letters A-Z and digits 2-7 only, found {0:?}")]
    Letter(char),
    #[error("not a key id: its last letter has bits past the key's 256")]
    Trailing,
}

impl KeyId {
    /// The id of a public key given as DER SubjectPublicKeyInfo.
    pub fn of_public_key(spki_der: &[u8]) -> KeyId {
        use sha2::Digest;
        KeyId(sha2::Sha256::digest(spki_der).into())
    }

    /// The first 13 letters: enough to tell keys apart in a log line.
    pub fn short(&self) -> String {
        self.to_string()[..13].to_string()
    }

    /// [`KeyId::short`] of a key that may be missing (`none`): what a
    /// connection proved, for a message.
    pub fn short_or_none(key: Option<KeyId>) -> String {
        key.map_or_else(|| "none".to_string(), |k| k.short())
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut letters = [0u8; KEY_ID_LETTERS];
        let (mut acc, mut bits, mut n) = (0u32, 0u32, 0usize);
        for &b in &self.0 {
            acc = (acc << 8) | b as u32;
            bits += 8;
            while bits >= 5 {
                bits -= 5;
                letters[n] = ALPHABET[((acc >> bits) & 31) as usize];
                n += 1;
            }
        }
        // 256 = 51 * 5 + 1: the last letter holds one bit, then zeros.
        letters[n] = ALPHABET[((acc << (5 - bits)) & 31) as usize];
        for (i, group) in letters.chunks(13).enumerate() {
            if i > 0 {
                f.write_str("-")?;
            }
            f.write_str(std::str::from_utf8(group).map_err(|_| fmt::Error)?)?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.short())
    }
}

impl FromStr for KeyId {
    type Err = KeyIdError;

    fn from_str(s: &str) -> Result<KeyId, KeyIdError> {
        let letters = s.chars().filter(|c| *c != '-');
        let count = letters.clone().count();
        if count != KEY_ID_LETTERS {
            return Err(KeyIdError::Length(count));
        }
        let mut out = [0u8; 32];
        let (mut acc, mut bits, mut n) = (0u32, 0u32, 0usize);
        for c in letters {
            let v = match c.to_ascii_uppercase() {
                u @ 'A'..='Z' => u as u32 - 'A' as u32,
                d @ '2'..='7' => d as u32 - '2' as u32 + 26,
                other => return Err(KeyIdError::Letter(other)),
            };
            acc = (acc << 5) | v;
            bits += 5;
            if bits >= 8 {
                bits -= 8;
                if n < 32 {
                    out[n] = (acc >> bits) as u8;
                    n += 1;
                }
            }
            acc &= (1 << bits) - 1;
        }
        if acc != 0 {
            return Err(KeyIdError::Trailing);
        }
        Ok(KeyId(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_id_reads_as_four_groups_and_parses_back() {
        let id = KeyId::of_public_key(b"a public key");
        let s = id.to_string();
        assert_eq!(s.len(), KEY_ID_LETTERS + 3);
        assert_eq!(s.split('-').map(str::len).collect::<Vec<_>>(), vec![13, 13, 13, 13]);
        assert_eq!(s.parse::<KeyId>(), Ok(id));
        assert_eq!(s.to_lowercase().replace('-', "").parse::<KeyId>(), Ok(id));
        assert_eq!(
            KeyId([0; 32]).to_string(),
            format!("{}-{}-{}-{}", "A".repeat(13), "A".repeat(13), "A".repeat(13), "A".repeat(13))
        );
    }

    #[test]
    fn bad_ids_are_refused_with_a_reason() {
        assert_eq!("ABC".parse::<KeyId>(), Err(KeyIdError::Length(3)));
        assert_eq!(format!("{}1", "A".repeat(51)).parse::<KeyId>(), Err(KeyIdError::Letter('1')));
        assert_eq!(format!("{}B", "A".repeat(51)).parse::<KeyId>(), Err(KeyIdError::Trailing));
        assert_eq!(format!("{}Q", "A".repeat(51)).parse::<KeyId>().map(|k| k.0[31]), Ok(1));
    }

    proptest! {
        #[test]
        fn every_id_round_trips(bytes in proptest::array::uniform32(any::<u8>())) {
            let id = KeyId(bytes);
            prop_assert_eq!(id.to_string().parse::<KeyId>(), Ok(id));
        }

        #[test]
        fn any_text_parses_or_is_refused_without_panicking(s in "\\PC{0,80}") {
            if let Ok(id) = s.parse::<KeyId>() {
                prop_assert_eq!(id.to_string().replace('-', ""), s.replace('-', "").to_uppercase());
            }
        }
    }
}
