//! The download sidecar: `<file>.part.state`, the small record beside a part
//! file that says which file it is and which chunks were verified.
//!
//! It is read back from disk, so it is untrusted: [`decode`] checks it against
//! the digest of the file being downloaded and returns a typed error for
//! anything else (then the download starts afresh). The driver also re-hashes
//! every chunk the sidecar claims before trusting it, so a sidecar written
//! before its chunks reached the disk costs a re-fetch, never a bad file.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::chunk::{FileDigest, Sha1Digest};
use crate::peer::Bitmap;

const MAGIC: &[u8; 8] = b"SHOALDL1";

/// Largest sidecar read: the chunk map of the largest file plus a header.
pub const MAX_SIDECAR_LEN: usize = crate::peer::MAX_PEER_FRAME + 64;

#[derive(Serialize, Deserialize)]
struct Record {
    size: u64,
    sha1: Sha1Digest,
    have: Bitmap,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SidecarError {
    #[error("not a shoal download state file")]
    NotASidecar,
    #[error("state file is for another file")]
    OtherFile,
    #[error("state file is corrupt: {0}")]
    Corrupt(String),
}

pub fn encode(digest: &FileDigest, have: &Bitmap) -> Vec<u8> {
    let rec = Record { size: digest.size, sha1: digest.sha1, have: have.clone() };
    postcard::to_extend(&rec, MAGIC.to_vec()).expect("postcard encoding into a Vec")
}

/// The chunks a sidecar claims, if it belongs to `digest`'s file.
pub fn decode(bytes: &[u8], digest: &FileDigest) -> Result<Bitmap, SidecarError> {
    if bytes.len() > MAX_SIDECAR_LEN {
        return Err(SidecarError::Corrupt("too large".into()));
    }
    let body = bytes.strip_prefix(MAGIC.as_slice()).ok_or(SidecarError::NotASidecar)?;
    let rec: Record = match postcard::take_from_bytes(body) {
        Ok((r, [])) => r,
        Ok(_) => return Err(SidecarError::Corrupt("trailing bytes".into())),
        Err(e) => return Err(SidecarError::Corrupt(e.to_string())),
    };
    if rec.size != digest.size || rec.sha1 != digest.sha1 {
        return Err(SidecarError::OtherFile);
    }
    let n = digest.chunks.len() as u32;
    Bitmap::from_bytes(n, rec.have.to_bytes().to_vec()).ok_or(SidecarError::Corrupt("bad chunk map".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: usize) -> FileDigest {
        FileDigest {
            size: n as u64 * crate::chunk::CHUNK_SIZE,
            sha1: Sha1Digest([3; 20]),
            chunks: vec![Sha1Digest([1; 20]); n],
        }
    }

    #[test]
    fn round_trip_and_refusals() {
        let d = digest(10);
        let mut have = Bitmap::new(10);
        have.set(3);
        let bytes = encode(&d, &have);
        assert_eq!(decode(&bytes, &d), Ok(have));
        assert_eq!(decode(&bytes, &digest(11)), Err(SidecarError::OtherFile));
        assert_eq!(decode(b"garbage", &d), Err(SidecarError::NotASidecar));
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut], &d).is_err());
        }
    }
}
