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

impl FileDigest {
    /// The index that names this digest's ranges.
    pub fn index(&self) -> FileIndex {
        let ranges = self.chunks.chunks(RANGE_CHUNKS as usize).map(range_hash).collect();
        FileIndex { size: self.size, sha1: self.sha1, ranges }
    }

    /// Range `i`'s chunk hashes (empty past the end).
    pub fn range(&self, i: u64) -> &[Sha1Digest] {
        self.chunks.chunks(RANGE_CHUNKS as usize).nth(i as usize).unwrap_or(&[])
    }
}

/// What a group shares: a name and the content's digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    pub name: FileName,
    pub digest: FileDigest,
}

impl FileMeta {
    /// What the log keeps of it.
    pub fn record(&self) -> FileRecord {
        FileRecord { name: self.name.clone(), index: self.digest.index() }
    }
}

/// What the log keeps of a shared file: its name and index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub name: FileName,
    pub index: FileIndex,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DigestError {
    #[error("file too large: {chunks} chunks, the limit is {MAX_FILE_CHUNKS}")]
    TooLarge { chunks: u64 },
    #[error("{got} chunk hashes for {size} bytes, expected {expected}")]
    ChunkCountMismatch { size: u64, expected: u64, got: u64 },
    #[error("{got} chunk-list ranges for {size} bytes, expected {expected}")]
    RangeCountMismatch { size: u64, expected: u64, got: u64 },
    #[error("chunk-list range {range} does not match the file's index")]
    RangeMismatch { range: u64 },
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

/// Chunk hashes in one range of a chunk list: the piece trackers store,
/// replicate and serve (320 KiB of hashes, for 8 GiB of content). A file's
/// log entry names each range by its hash ([`FileIndex`]), so the entry stays
/// small whatever the file's size (BitTorrent v2 keeps piece layers out of
/// the info dictionary the same way).
pub const RANGE_CHUNKS: u64 = 16_384;
/// Most ranges a file has: [`MAX_FILE_CHUNKS`] in [`RANGE_CHUNKS`].
pub const MAX_RANGES: u64 = MAX_FILE_CHUNKS.div_ceil(RANGE_CHUNKS);

/// The hash that names a range of chunk hashes: SHA1 over the 20-byte
/// hashes one after the other.
pub fn range_hash(hashes: &[Sha1Digest]) -> Sha1Digest {
    let mut h = Sha1::new();
    for c in hashes {
        h.update(&c.0);
    }
    Sha1Digest(h.finalize())
}

/// A range's hashes as stored: the 20-byte hashes one after the other.
pub fn range_bytes(hashes: &[Sha1Digest]) -> Vec<u8> {
    hashes.iter().flat_map(|c| c.0).collect()
}

/// The hashes of stored range bytes; `None` if they are not whole hashes.
pub fn range_from_bytes(bytes: &[u8]) -> Option<Vec<Sha1Digest>> {
    if !bytes.len().is_multiple_of(20) {
        return None;
    }
    Some(bytes.chunks_exact(20).map(|c| Sha1Digest(c.try_into().unwrap_or([0; 20]))).collect())
}

/// A file as its log entry describes it: size, whole-file SHA1 and the hash
/// of each range of its chunk list. The ranges themselves live beside the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIndex {
    pub size: u64,
    pub sha1: Sha1Digest,
    pub ranges: Vec<Sha1Digest>,
}

impl FileIndex {
    /// Checks the index fits the size; untrusted indexes must pass this.
    pub fn validate(&self) -> Result<(), DigestError> {
        let chunks = chunk_count(self.size);
        if chunks > MAX_FILE_CHUNKS {
            return Err(DigestError::TooLarge { chunks });
        }
        let expected = chunks.div_ceil(RANGE_CHUNKS);
        let got = self.ranges.len() as u64;
        if got != expected {
            return Err(DigestError::RangeCountMismatch { size: self.size, expected, got });
        }
        // A one-chunk file's chunk is the whole file: its range follows.
        if chunks == 1 && self.ranges[0] != range_hash(&[self.sha1]) {
            return Err(DigestError::RangeMismatch { range: 0 });
        }
        Ok(())
    }

    pub fn chunks(&self) -> u64 {
        chunk_count(self.size)
    }

    /// How many chunk hashes range `i` holds (0 past the end).
    pub fn range_len(&self, i: u64) -> u64 {
        let start = i.saturating_mul(RANGE_CHUNKS);
        self.chunks().saturating_sub(start).min(RANGE_CHUNKS)
    }

    /// Range `i`'s hashes when the index alone gives them (a one-chunk file:
    /// its chunk's hash is the whole file's), so no tracker stores them.
    pub fn implied_range(&self, i: u64) -> Option<Vec<Sha1Digest>> {
        (self.chunks() == 1 && i == 0).then(|| vec![self.sha1])
    }

    /// The ranges trackers must hold for this file: (index, hash).
    pub fn stored_ranges(&self) -> impl Iterator<Item = (u64, Sha1Digest)> + '_ {
        let implied = self.chunks() == 1;
        self.ranges.iter().enumerate().filter(move |_| !implied).map(|(i, h)| (i as u64, *h))
    }

    /// Checks that `hashes` are range `i` of this file.
    pub fn check_range(&self, i: u64, hashes: &[Sha1Digest]) -> Result<(), DigestError> {
        let Some(want) = self.ranges.get(i as usize) else { return Err(DigestError::RangeMismatch { range: i }) };
        if hashes.len() as u64 != self.range_len(i) || range_hash(hashes) != *want {
            return Err(DigestError::RangeMismatch { range: i });
        }
        Ok(())
    }

    /// The whole digest, from every range's hashes in order (each checked).
    pub fn digest(&self, ranges: Vec<Vec<Sha1Digest>>) -> Result<FileDigest, DigestError> {
        self.validate()?;
        let mut chunks = Vec::with_capacity(self.chunks() as usize);
        for (i, r) in ranges.into_iter().enumerate() {
            self.check_range(i as u64, &r)?;
            chunks.extend(r);
        }
        let d = FileDigest { size: self.size, sha1: self.sha1, chunks };
        d.validate()?;
        Ok(d)
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

    fn digest_of(chunks: usize, seed: u8) -> FileDigest {
        let chunks: Vec<Sha1Digest> = (0..chunks).map(|i| Sha1Digest::of(&[seed, i as u8, (i >> 8) as u8])).collect();
        let size = (chunks.len() as u64 * CHUNK_SIZE).saturating_sub(7);
        let sha1 = if chunks.len() == 1 { chunks[0] } else { Sha1Digest::of(&[seed]) };
        FileDigest { size, sha1, chunks }
    }

    #[test]
    fn a_one_chunk_file_needs_no_stored_range() {
        let d = digest_of(1, 3);
        let index = d.index();
        index.validate().unwrap();
        assert_eq!(index.stored_ranges().count(), 0);
        assert_eq!(index.implied_range(0), Some(d.chunks.clone()));
        // An index whose range does not follow from its SHA1 is refused.
        let bad = FileIndex { ranges: vec![Sha1Digest([1; 20])], ..index };
        assert_eq!(bad.validate(), Err(DigestError::RangeMismatch { range: 0 }));
    }

    proptest! {
        /// Any chunk list splits into ranges that its index names and checks,
        /// and puts back together into the same digest; a range with one hash
        /// changed, one missing or one too many is refused.
        #[test]
        fn ranges_rebuild_the_digest_their_index_names(
            chunks in prop_oneof![0usize..4, (RANGE_CHUNKS as usize - 2)..(RANGE_CHUNKS as usize * 2 + 3)],
            seed in any::<u8>(),
            flip in any::<prop::sample::Index>(),
        ) {
            let d = digest_of(chunks, seed);
            let index = d.index();
            prop_assert!(index.validate().is_ok());
            prop_assert_eq!(index.ranges.len() as u64, (chunks as u64).div_ceil(RANGE_CHUNKS));
            let ranges: Vec<Vec<Sha1Digest>> = (0..index.ranges.len() as u64).map(|i| d.range(i).to_vec()).collect();
            for (i, r) in ranges.iter().enumerate() {
                prop_assert_eq!(r.len() as u64, index.range_len(i as u64));
                let back = range_from_bytes(&range_bytes(r));
                prop_assert_eq!(back.as_ref(), Some(r));
            }
            prop_assert_eq!(&index.digest(ranges.clone()).unwrap(), &d);
            if chunks > 0 {
                let at = flip.index(chunks);
                let (ri, ci) = (at / RANGE_CHUNKS as usize, at % RANGE_CHUNKS as usize);
                let mut bad = ranges.clone();
                bad[ri][ci].0[0] ^= 1;
                prop_assert!(index.check_range(ri as u64, &bad[ri]).is_err());
                prop_assert!(index.digest(bad).is_err());
                let mut short = ranges.clone();
                short[ri].pop();
                prop_assert!(index.check_range(ri as u64, &short[ri]).is_err());
                let mut long = ranges;
                long[ri].push(Sha1Digest([0; 20]));
                prop_assert!(index.check_range(ri as u64, &long[ri]).is_err());
            }
        }

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
