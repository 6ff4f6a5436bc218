//! The download sidecar: `<file>.part.state`, the small record beside a part
//! file that says which file it is and which chunks were verified.
//!
//! It is read back from disk, so it is untrusted: [`decode`] checks it against
//! the digest of the file being downloaded and returns a typed error for
//! anything else (then the download starts afresh). The driver also re-hashes
//! every chunk the sidecar claims before trusting it, so a sidecar written
//! before its chunks reached the disk costs a re-fetch, never a bad file.
//!
//! On disk the record lives in one of two fixed slots ([`slot`], [`latest`]),
//! each with a sequence number and a CRC, overwritten in place in turn: an
//! update never creates or deletes a file (replacing one by rename frees the
//! old one's blocks, which with ext4's `discard` option waits for the disk:
//! measured 0.5-1 ms a save, stalling the download's writer), and a write
//! torn by a crash damages only the slot being written, never the other.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::chunk::{FileDigest, Sha1Digest};
use crate::client::peer::Bitmap;

const MAGIC: &[u8; 8] = b"SHOALDL1";

/// Largest sidecar read: the chunk map of the largest file plus a header.
pub const MAX_SIDECAR_LEN: usize = crate::client::peer::MAX_PEER_FRAME + 64;

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

/// Bytes a slot adds around a record: length, sequence number, CRC.
const SLOT_OVERHEAD: usize = 4 + 8 + 4;

/// A record in a slot: its length, `seq`, the record, a CRC32 of all before.
/// Slot `seq % 2` of a file of two, at `seq % 2 * bytes.len()`: a download's
/// records all have one length (the chunk map's size is the file's).
pub fn slot(record: &[u8], seq: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(record.len() + SLOT_OVERHEAD);
    out.extend_from_slice(&(record.len() as u32).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(record);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Largest state file read: two slots of the largest record.
pub const MAX_STATE_FILE_LEN: usize = 2 * (MAX_SIDECAR_LEN + SLOT_OVERHEAD);

/// Whether a state file is in the first format: one bare record.
pub fn is_first_format(file: &[u8]) -> bool {
    file.starts_with(MAGIC)
}

/// The newest intact record of a state file (two slots, see [`slot`]) for
/// `digest`'s file, and its sequence number. A file in the first format
/// (one bare record) reads as sequence 0.
pub fn latest(file: &[u8], digest: &FileDigest) -> Result<(Bitmap, u64), SidecarError> {
    if is_first_format(file) {
        return decode(file, digest).map(|b| (b, 0));
    }
    let mut best: Option<(Bitmap, u64)> = None;
    let mut first_error = SidecarError::NotASidecar;
    let mut rest = file;
    for _ in 0..2 {
        let Some(len) = rest.get(..4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize) else {
            break;
        };
        if len > MAX_SIDECAR_LEN || rest.len() < len + SLOT_OVERHEAD {
            break;
        }
        let (this, next) = rest.split_at(len + SLOT_OVERHEAD);
        rest = next;
        let (body, crc) = this.split_at(len + 12);
        if crc32fast::hash(body).to_le_bytes() != crc {
            first_error = SidecarError::Corrupt("slot checksum".into());
            continue;
        }
        let seq = u64::from_le_bytes(body[4..12].try_into().expect("8 bytes"));
        match decode(&body[12..], digest) {
            Ok(have) if best.as_ref().is_none_or(|(_, s)| seq > *s) => best = Some((have, seq)),
            Ok(_) => {}
            Err(e) => first_error = e,
        }
    }
    best.ok_or(first_error)
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

    /// Writes slot `seq % 2` of a two-slot file in place, like the driver.
    fn put(file: &mut Vec<u8>, d: &FileDigest, have: &Bitmap, seq: u64) {
        let s = slot(&encode(d, have), seq);
        let at = (seq % 2) as usize * s.len();
        if file.len() < at + s.len() {
            file.resize(at + s.len(), 0);
        }
        file[at..at + s.len()].copy_from_slice(&s);
    }

    #[test]
    fn the_newest_intact_slot_wins_and_a_torn_write_keeps_the_other() {
        let d = digest(100);
        let mut file = Vec::new();
        let mut maps = Vec::new();
        for seq in 0..5u64 {
            let mut have = Bitmap::new(100);
            for c in 0..=seq as u32 * 10 {
                have.set(c);
            }
            put(&mut file, &d, &have, seq);
            maps.push(have);
            assert_eq!(latest(&file, &d), Ok((maps[seq as usize].clone(), seq)));
        }
        // Seq 5 goes to slot 1; any tear of it leaves seq 4 (slot 0).
        let mut have = maps[4].clone();
        have.set(99);
        let s = slot(&encode(&d, &have), 5);
        for cut in 0..s.len() {
            let mut torn = file.clone();
            torn[s.len()..s.len() + cut].copy_from_slice(&s[..cut]);
            let got = latest(&torn, &d).unwrap();
            assert!(got == (maps[4].clone(), 4) || (cut == s.len() - 1 && got.1 == 5), "cut {cut}: seq {}", got.1);
        }
        // A flipped byte anywhere in the newest slot also falls back.
        for i in 0..s.len() {
            let mut bad = file.clone();
            bad[s.len()..].copy_from_slice(&s);
            bad[s.len() + i] ^= 0x40;
            assert_eq!(latest(&bad, &d).unwrap(), (maps[4].clone(), 4), "byte {i}");
        }
        assert_eq!(latest(&file, &digest(7)), Err(SidecarError::OtherFile));
        assert!(latest(b"", &d).is_err() && latest(&[0xff; 64], &d).is_err());
    }

    #[test]
    fn a_state_file_of_the_first_format_still_reads() {
        let d = digest(10);
        let mut have = Bitmap::new(10);
        have.set(4);
        assert_eq!(latest(&encode(&d, &have), &d), Ok((have, 0)));
    }
}
