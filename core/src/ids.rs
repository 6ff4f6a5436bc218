//! Validated names: user and group ids, shared file names, session tokens.
//!
//! Every constructor checks its input, and deserialisation goes through the same
//! check, so a value of these types is valid wherever it came from.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Longest user or group id, in characters (all ASCII, so also bytes).
pub const MAX_ID_LEN: usize = 64;
/// Longest shared file name, in bytes (what common file systems allow).
pub const MAX_FILE_NAME_LEN: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    #[error("an id must be 1-{MAX_ID_LEN} characters of letters, digits, '_', '-', '.'")]
    BadId,
    #[error("a file name must be a base name of 1-{MAX_FILE_NAME_LEN} bytes, without '/', '\\', NUL or control characters, not '.' or '..', not a reserved device name (CON, NUL, COM1, ...) and not ending in '.part' or a space")]
    BadFileName,
}

fn valid_id(s: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Names some systems give a meaning of their own (Windows devices).
const RESERVED_NAMES: &[&str] = &[
    "CON", "PRN", "AUX", "NUL", "COM1", "COM2", "COM3", "COM4", "COM5", "COM6", "COM7", "COM8", "COM9", "LPT1", "LPT2",
    "LPT3", "LPT4", "LPT5", "LPT6", "LPT7", "LPT8", "LPT9",
];

/// Endings of a download's own working files, which a shared name must not mimic.
const WORKING_SUFFIXES: &[&str] = &[".part", ".part.state", ".part.state.tmp"];

fn valid_file_name(s: &str) -> bool {
    let stem = s.split('.').next().unwrap_or("");
    (1..=MAX_FILE_NAME_LEN).contains(&s.len())
        && s != "."
        && s != ".."
        && !s.chars().any(|c| c == '/' || c == '\\' || c.is_control())
        && !RESERVED_NAMES.iter().any(|r| r.eq_ignore_ascii_case(stem.trim_end()))
        && !WORKING_SUFFIXES.iter().any(|w| s.ends_with(w))
        && !s.ends_with(' ')
}

macro_rules! checked_name {
    ($(#[$doc:meta])* $name:ident, $check:ident, $err:expr) => {
        $(#[$doc])*
        ///
        /// Held as an `Arc<str>`: a copy (a sharer's user id on each of its
        /// files, a key copied with its map node) costs a count, not a string.
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
        #[serde(try_from = "String")]
        pub struct $name(Arc<str>);

        /// As a string, borrowed (a snapshot encodes millions of them).
        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl $name {
            pub fn new(s: impl Into<String>) -> Result<Self, NameError> {
                let s = s.into();
                if $check(&s) {
                    Ok($name(Arc::from(s)))
                } else {
                    Err($err)
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                $name::new(s)
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0.to_string()
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{:?}", self.0)
            }
        }
    };
}

checked_name!(
    /// A user's account name.
    UserId,
    valid_id,
    NameError::BadId
);
checked_name!(
    /// A group's name.
    GroupId,
    valid_id,
    NameError::BadId
);
checked_name!(
    /// The base name a file is shared under inside a group.
    FileName,
    valid_file_name,
    NameError::BadFileName
);

/// A login session: 128 random bits from the tracker's seeded CSPRNG.
///
/// Its `Debug` never shows the bits, so a session cannot leak through logs.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SessionToken(pub [u8; 16]);

impl std::fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionToken(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_accept_the_documented_alphabet_only() {
        assert!(UserId::new("alice_01-x.y").is_ok());
        assert!(UserId::new("a".repeat(64)).is_ok());
        assert_eq!(UserId::new("a".repeat(65)), Err(NameError::BadId));
        assert_eq!(UserId::new(""), Err(NameError::BadId));
        assert_eq!(GroupId::new("a b"), Err(NameError::BadId));
        assert_eq!(GroupId::new("é"), Err(NameError::BadId));
    }

    #[test]
    fn file_names_are_base_names() {
        assert!(FileName::new("report v2 (final).pdf").is_ok());
        assert!(FileName::new("console.txt").is_ok());
        assert!(FileName::new("partial.bin").is_ok());
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "../x",
            "a\\b",
            "a\0b",
            "a\nb",
            &"x".repeat(256),
            "CON",
            "nul.txt",
            "Com1",
            "x.part",
            "x.part.state",
            "x ",
        ] {
            assert_eq!(FileName::new(bad), Err(NameError::BadFileName), "{bad:?}");
        }
    }

    #[test]
    fn deserialising_an_invalid_id_fails() {
        let bytes = postcard::to_allocvec(&"no spaces allowed").unwrap();
        assert!(postcard::from_bytes::<UserId>(&bytes).is_err());
    }

    #[test]
    fn names_encode_as_their_string() {
        let name = FileName::new("report v2.pdf").unwrap();
        let bytes = postcard::to_allocvec(&name).unwrap();
        assert_eq!(bytes, postcard::to_allocvec("report v2.pdf").unwrap());
        assert_eq!(postcard::from_bytes::<FileName>(&bytes).unwrap(), name);
    }

    #[test]
    fn token_debug_is_redacted() {
        let t = SessionToken([0xab; 16]);
        assert!(!format!("{t:?}").contains("ab"));
    }
}
