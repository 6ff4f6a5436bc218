//! Chunking: files are cut into 512 KiB chunks, each with its own SHA1.
//!
//! [`FileHasher`] takes a file's bytes as a stream of slices of any size and
//! yields the SHA1 of every chunk and of the whole file in constant memory.

use serde::{Deserialize, Serialize};
use shoal_sha1x::Sha1;
use thiserror::Error;

use crate::ids::FileName;

/// Size of every chunk but the last.
pub const CHUNK_SIZE: u64 = 512 * 1024;

/// Largest file the system describes: 2^20 chunks, 512 GiB. It bounds the
/// chunk list an untrusted peer or client can make anyone hold.
pub const MAX_FILE_CHUNKS: u64 = 1 << 20;

/// A SHA1 digest.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Sha1Digest(pub [u8; 20]);

impl Sha1Digest {
    pub fn of(data: &[u8]) -> Sha1Digest {
        Sha1Digest(Sha1::digest(data))
    }

    /// The digests of two inputs, computed together (two SHA1 streams at
    /// once: on x86 with SHA-NI barely slower than one).
    pub fn of_two(a: &[u8], b: &[u8]) -> (Sha1Digest, Sha1Digest) {
        let (a, b) = Sha1::digest2(a, b);
        (Sha1Digest(a), Sha1Digest(b))
    }

    /// Whether `data` hashes to this digest: the check every received chunk
    /// passes before it is written or shared.
    pub fn matches(&self, data: &[u8]) -> bool {
        Sha1Digest::of(data) == *self
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Debug for Sha1Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl std::fmt::Display for Sha1Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// How many chunks a file of `size` bytes has (an empty file has none).
pub fn chunk_count(size: u64) -> u64 {
    size.div_ceil(CHUNK_SIZE)
}

/// The length of chunk `index` of a file of `size` bytes.
pub fn chunk_len(size: u64, index: u64) -> u64 {
    let start = index.saturating_mul(CHUNK_SIZE);
    size.saturating_sub(start).min(CHUNK_SIZE)
}

/// Size and hashes of a file's content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub size: u64,
    pub sha1: Sha1Digest,
    pub chunks: Vec<Sha1Digest>,
}

/// What a group shares: a name and the content's digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    pub name: FileName,
    pub digest: FileDigest,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DigestError {
    #[error("file too large: {chunks} chunks, the limit is {MAX_FILE_CHUNKS}")]
    TooLarge { chunks: u64 },
    #[error("{got} chunk hashes for {size} bytes, expected {expected}")]
    ChunkCountMismatch { size: u64, expected: u64, got: u64 },
}

impl FileDigest {
    /// Checks that the chunk list fits the size; untrusted digests must pass this.
    pub fn validate(&self) -> Result<(), DigestError> {
        let expected = chunk_count(self.size);
        if expected > MAX_FILE_CHUNKS {
            return Err(DigestError::TooLarge { chunks: expected });
        }
        let got = self.chunks.len() as u64;
        if got != expected {
            return Err(DigestError::ChunkCountMismatch { size: self.size, expected, got });
        }
        Ok(())
    }
}

/// Streaming hasher for a whole file and each of its chunks.
pub struct FileHasher {
    whole: Sha1,
    chunk: Sha1,
    in_chunk: u64,
    size: u64,
    chunks: Vec<Sha1Digest>,
}

impl Default for FileHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl FileHasher {
    pub fn new() -> FileHasher {
        FileHasher { whole: Sha1::new(), chunk: Sha1::new(), in_chunk: 0, size: 0, chunks: Vec::new() }
    }

    /// Feeds the next bytes of the file. The whole file's hash and the
    /// chunk's run as two streams at once over the same bytes.
    pub fn update(&mut self, mut data: &[u8]) -> Result<(), DigestError> {
        while !data.is_empty() {
            let room = (CHUNK_SIZE - self.in_chunk) as usize;
            let take = room.min(data.len());
            Sha1::update2(&mut self.whole, &data[..take], &mut self.chunk, &data[..take]);
            self.in_chunk += take as u64;
            self.size += take as u64;
            data = &data[take..];
            if self.in_chunk == CHUNK_SIZE {
                self.close_chunk()?;
            }
        }
        Ok(())
    }

    fn close_chunk(&mut self) -> Result<(), DigestError> {
        if self.chunks.len() as u64 >= MAX_FILE_CHUNKS {
            return Err(DigestError::TooLarge { chunks: self.chunks.len() as u64 + 1 });
        }
        let done = std::mem::replace(&mut self.chunk, Sha1::new());
        self.chunks.push(Sha1Digest(done.finalize()));
        self.in_chunk = 0;
        Ok(())
    }

    /// Bytes fed so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn finish(mut self) -> Result<FileDigest, DigestError> {
        if self.in_chunk > 0 {
            self.close_chunk()?;
        }
        Ok(FileDigest { size: self.size, sha1: Sha1Digest(self.whole.finalize()), chunks: self.chunks })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// With the `sha1` crate: an implementation independent of ours.
    fn digest_at_once(data: &[u8]) -> FileDigest {
        use sha1::Digest;
        let of = |d: &[u8]| Sha1Digest(sha1::Sha1::digest(d).into());
        FileDigest {
            size: data.len() as u64,
            sha1: of(data),
            chunks: data.chunks(CHUNK_SIZE as usize).map(of).collect(),
        }
    }

    #[test]
    fn empty_file_has_no_chunks() {
        let d = FileHasher::new().finish().unwrap();
        assert_eq!(d.size, 0);
        assert!(d.chunks.is_empty());
        assert_eq!(d.sha1.to_hex(), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        d.validate().unwrap();
    }

    #[test]
    fn chunk_geometry() {
        assert_eq!(chunk_count(1), 1);
        assert_eq!(chunk_count(CHUNK_SIZE), 1);
        assert_eq!(chunk_count(CHUNK_SIZE + 1), 2);
        assert_eq!(chunk_len(CHUNK_SIZE + 1, 1), 1);
        assert_eq!(chunk_len(CHUNK_SIZE + 1, 2), 0);
        assert_eq!(chunk_count(u64::MAX), u64::MAX / CHUNK_SIZE + 1);
    }

    #[test]
    fn a_claimed_huge_file_is_refused_without_allocating() {
        let d = FileDigest { size: 10 << 40, sha1: Sha1Digest([0; 20]), chunks: vec![] };
        assert!(matches!(d.validate(), Err(DigestError::TooLarge { .. })));
    }

    proptest! {
        #[test]
        fn streaming_equals_hashing_at_once(len in 0usize..(3 * CHUNK_SIZE as usize), cuts in proptest::collection::vec(1usize..200_000, 0..20)) {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let mut h = FileHasher::new();
            let mut rest = &data[..];
            for c in cuts {
                let c = c.min(rest.len());
                h.update(&rest[..c]).unwrap();
                rest = &rest[c..];
            }
            h.update(rest).unwrap();
            let d = h.finish().unwrap();
            prop_assert_eq!(&d, &digest_at_once(&data));
            prop_assert!(d.validate().is_ok());
        }
    }
}
