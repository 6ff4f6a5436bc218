//! The write-ahead log's record format, and recovery after a crash.
//!
//! A tracker's log file is a sequence of records, each
//! `[payload length: u32 LE][CRC32 of the length: u32 LE][CRC32 of the payload: u32 LE][payload]`.
//! The length has its own checksum so that a damaged length can never pass
//! for a record running past the end of the file. Records are appended and
//! fsync'ed in groups; a crash can leave the last record incomplete,
//! half-written, or (on some file systems) followed by zeros. [`recover`]
//! reads a file back:
//!
//! - every whole record whose checksums match is returned, in order;
//! - an incomplete last record, a last record whose header or payload does not
//!   match its checksum (followed by nothing but zeros: log files are
//!   preallocated with zeros), or a tail of zeros is a torn write: recovery
//!   stops there and reports where valid data ends;
//! - anything else that fails a checksum is corruption of data that may have
//!   been acknowledged: an error, never silently dropped.
//!
//! Pure: the driver reads and truncates the file.

use thiserror::Error;

const HEADER: usize = 12;

/// Largest record accepted; bigger lengths are damage, not data.
pub const MAX_RECORD: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WalError {
    #[error("log corrupt at byte {offset}: {reason}, with {after} more bytes after it")]
    Corrupt { offset: u64, reason: &'static str, after: u64 },
}

/// A record [`encode_record`] refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("a log record of {len} bytes, over the {MAX_RECORD}-byte limit")]
pub struct TooLarge {
    pub len: usize,
}

/// Appends one record holding `payload` to `out`; a payload over
/// [`MAX_RECORD`] is refused (and `out` left as it was): recovery would
/// take it for damage.
pub fn encode_record(payload: &[u8], out: &mut Vec<u8>) -> Result<(), TooLarge> {
    if payload.len() > MAX_RECORD {
        return Err(TooLarge { len: payload.len() });
    }
    let len = (payload.len() as u32).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&crc32fast::hash(&len).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

/// What a log file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered<'a> {
    pub records: Vec<&'a [u8]>,
    /// Bytes of whole, valid records: truncate the file to this length.
    pub valid_len: u64,
    /// Whether a torn record was found (and must be cut off).
    pub torn: bool,
}

/// Reads back a log file's bytes.
pub fn recover(bytes: &[u8]) -> Result<Recovered<'_>, WalError> {
    let mut records = Vec::new();
    let mut at = 0usize;
    let torn = |records, at: usize| Ok(Recovered { records, valid_len: at as u64, torn: true });
    while at < bytes.len() {
        let rest = &bytes[at..];
        if rest.len() < HEADER {
            return torn(records, at);
        }
        let word = |i: usize| u32::from_le_bytes([rest[i], rest[i + 1], rest[i + 2], rest[i + 3]]);
        let (len, len_crc, crc) = (word(0) as usize, word(4), word(8));
        if crc32fast::hash(&rest[..4]) != len_crc || len > MAX_RECORD {
            // A header written in part, then nothing (zeros: the file is
            // preallocated) is the last append, torn by a crash.
            if rest[HEADER..].iter().all(|&b| b == 0) {
                return torn(records, at);
            }
            let after = (rest.len() - HEADER) as u64;
            return Err(WalError::Corrupt { offset: at as u64, reason: "damaged record header", after });
        }
        if rest.len() < HEADER + len {
            return torn(records, at);
        }
        let payload = &rest[HEADER..HEADER + len];
        if crc32fast::hash(payload) != crc {
            let after = (rest.len() - HEADER - len) as u64;
            if rest[HEADER + len..].iter().all(|&b| b == 0) {
                return torn(records, at);
            }
            return Err(WalError::Corrupt { offset: at as u64, reason: "checksum mismatch", after });
        }
        records.push(payload);
        at += HEADER + len;
    }
    Ok(Recovered { records, valid_len: at as u64, torn: false })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn log_of(records: &[Vec<u8>]) -> (Vec<u8>, Vec<usize>) {
        let mut out = Vec::new();
        let mut ends = Vec::new();
        for r in records {
            encode_record(r, &mut out).unwrap();
            ends.push(out.len());
        }
        (out, ends)
    }

    #[test]
    fn a_record_over_the_limit_is_refused_and_nothing_written() {
        let mut out = vec![1, 2, 3];
        let big = vec![0u8; MAX_RECORD + 1];
        assert_eq!(encode_record(&big, &mut out), Err(TooLarge { len: MAX_RECORD + 1 }));
        assert_eq!(out, [1, 2, 3]);
        assert_eq!(encode_record(&big[..MAX_RECORD], &mut out), Ok(()));
        assert_eq!(recover(&out[3..]).unwrap().records.len(), 1);
    }

    proptest! {
        /// A log cut at any byte (a crash mid-append) recovers exactly the
        /// records that were whole: a prefix of what was acknowledged.
        #[test]
        fn a_log_cut_anywhere_recovers_a_prefix(records in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..12), cut in any::<proptest::sample::Index>()) {
            let (log, ends) = log_of(&records);
            let cut = if log.is_empty() { 0 } else { cut.index(log.len() + 1) };
            let r = recover(&log[..cut]).expect("a cut log is never corrupt");
            let whole = ends.iter().filter(|&&e| e <= cut).count();
            prop_assert_eq!(r.records.len(), whole);
            for (got, want) in r.records.iter().zip(&records) {
                prop_assert_eq!(*got, &want[..]);
            }
            prop_assert_eq!(r.valid_len as usize, if whole == 0 { 0 } else { ends[whole - 1] });
            prop_assert_eq!(r.torn, cut != r.valid_len as usize);
        }

        /// The same in a preallocated file: whatever part of the last append
        /// reached the disk, followed by zeros, recovers a prefix, never an error.
        #[test]
        fn a_torn_append_into_zeros_recovers_a_prefix(records in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..12), cut in any::<proptest::sample::Index>(), zeros in 0usize..5000) {
            let (mut log, ends) = log_of(&records);
            let cut = cut.index(log.len() + 1);
            log.truncate(cut);
            log.resize(cut + zeros, 0);
            let r = recover(&log).expect("a torn append is never corrupt");
            let whole = ends.iter().filter(|&&e| e <= cut).count();
            prop_assert!(r.records.len() == whole || (r.records.len() > whole && cut + zeros >= ends[r.records.len() - 1]));
            for (got, want) in r.records.iter().zip(&records) {
                prop_assert_eq!(*got, &want[..]);
            }
        }

        /// A flipped bit inside the log is an error unless it is in the last
        /// record (then that record is treated as torn); never a silent skip.
        #[test]
        fn damage_is_detected(records in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..100), 1..8), pos in any::<proptest::sample::Index>(), bit in 0u8..8) {
            let (mut log, ends) = log_of(&records);
            let pos = pos.index(log.len());
            log[pos] ^= 1 << bit;
            let last_start = if ends.len() > 1 { ends[ends.len() - 2] } else { 0 };
            match recover(&log) {
                Ok(r) => {
                    // Only the last record may be lost, and only as torn.
                    prop_assert!(pos >= last_start, "damage at {} before the last record went unnoticed", pos);
                    prop_assert!(r.torn);
                    prop_assert_eq!(r.records.len(), records.len() - 1);
                    for (got, want) in r.records.iter().zip(&records) {
                        prop_assert_eq!(*got, &want[..]);
                    }
                }
                Err(WalError::Corrupt { offset, .. }) => prop_assert!(offset as usize <= pos),
            }
        }
    }

    #[test]
    fn a_zeroed_tail_is_torn_but_zeros_before_data_are_corrupt() {
        let (mut log, ends) = log_of(&[vec![1, 2, 3], vec![4, 5]]);
        log.extend_from_slice(&[0; 4096]);
        let r = recover(&log).unwrap();
        assert_eq!((r.records.len(), r.valid_len as usize, r.torn), (2, ends[1], true));
        let (mut log, _) = log_of(&[vec![1, 2, 3], vec![4, 5]]);
        log[..ends[0]].fill(0);
        assert!(matches!(recover(&log), Err(WalError::Corrupt { offset: 0, .. })));
    }

    #[test]
    fn an_empty_log_is_fine() {
        assert_eq!(recover(&[]), Ok(Recovered { records: vec![], valid_len: 0, torn: false }));
    }
}
