//! What the client engine asks of its disk, and what comes back.
//!
//! The engine decides what to read, hash, write and rename, and where; the
//! driver moves the bytes (on whatever threads it likes) and reports each
//! [`DiskOp`] done with one [`DiskDone`]. Results of one download may come
//! back in any order. The engine never has more than [`MAX_DISK_OPS`]
//! operations of one download out at once, so a driver's queues need no
//! other bound and the engine never waits on one.
//!
//! Paths follow one rule, decided by [`resolve`]: a download writes only
//! `<final>.part`, `<final>.part.state` and, at the end, `<final>` itself,
//! where `<final>` is the destination the user named (or the file's name
//! inside it, for a directory). It never replaces an existing `<final>` and
//! never writes through a symbolic link.

use std::path::Path;

use crate::chunk::FileDigest;
use crate::client::verify::HashJob;
use crate::client::DownloadId;
use crate::ids::FileName;

/// Disk operations one download has out at most: its chunk writes and reads
/// ([`crate::client::verify::MAX_WRITES`], [`crate::client::verify::MAX_READS`]),
/// its hash jobs ([`crate::client::verify::MAX_JOBS`]), one sidecar save and
/// the final rename (or close).
pub const MAX_DISK_OPS: usize =
    crate::client::verify::MAX_WRITES + crate::client::verify::MAX_READS + crate::client::verify::MAX_JOBS + 2;

/// Where a download's files live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartPaths {
    /// The name the file gets once its whole-file SHA1 matches.
    pub final_path: String,
    pub part: String,
    /// The sidecar ([`crate::client::sidecar`]).
    pub state: String,
}

/// What the driver finds at a path, without following a final symlink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathKind {
    Missing,
    Dir,
    /// A file, device, socket...: anything that is neither a directory nor a link.
    Other,
    Symlink {
        to_dir: bool,
    },
}

impl PathKind {
    fn is_dir(self) -> bool {
        matches!(self, PathKind::Dir | PathKind::Symlink { to_dir: true })
    }
}

/// Where `download_file <dest>` puts `name`: `dest` itself, or `dest/name`
/// when `dest` is a directory. `probe` tells what is at a path (the
/// driver's file system, or a simulated one).
pub fn resolve(dest: &str, name: &FileName, probe: impl Fn(&str) -> PathKind) -> Result<PartPaths, String> {
    let d = Path::new(dest);
    let final_path = if probe(dest).is_dir() {
        d.join(name.as_str())
    } else if dest.ends_with('/') || d.file_name().is_none() {
        return Err(format!("no such directory: {dest}"));
    } else {
        d.to_path_buf()
    };
    if let Some(parent) = final_path.parent() {
        let parent = parent.to_string_lossy();
        if !parent.is_empty() && !probe(&parent).is_dir() {
            return Err(format!("no such directory: {parent}"));
        }
    }
    let final_path = final_path.to_string_lossy().into_owned();
    if probe(&final_path) != PathKind::Missing {
        return Err(format!("{final_path} already exists"));
    }
    let paths = PartPaths { part: format!("{final_path}.part"), state: format!("{final_path}.part.state"), final_path };
    for p in [&paths.part, &paths.state] {
        if matches!(probe(p), PathKind::Symlink { .. }) {
            return Err(format!("{p} is a symbolic link; not writing through it"));
        }
    }
    Ok(paths)
}

/// What the engine asks of the disk.
#[derive(Debug)]
pub enum DiskOp {
    /// Read and hash the file at `path` for `upload_file`
    /// ([`crate::chunk::FileHasher`], streaming).
    HashFile { job: u64, path: String },
    /// Resolve `dest` with [`resolve`], open (creating if need be, never
    /// truncating) the part and state files, read the state file (at most
    /// [`crate::client::sidecar::MAX_STATE_FILE_LEN`] bytes), give the part
    /// file its full `size` and reserve its blocks (a full disk is an error
    /// now, not halfway).
    OpenPart { id: DownloadId, dest: String, name: FileName, size: u64 },
    /// Read chunk `chunk` of the part file into `buf` (as long as the chunk).
    Read { id: DownloadId, chunk: u32, buf: Vec<u8> },
    /// Run the job ([`HashJob::run`]) and hand it back: the costly part of
    /// verifying, which is why it is the driver's to place.
    Hash { id: DownloadId, job: HashJob },
    /// Write `data` at chunk `chunk` of the part file.
    Write { id: DownloadId, chunk: u32, data: Vec<u8> },
    /// Write `bytes` at `offset` of the state file, in place.
    SaveState { id: DownloadId, offset: u64, bytes: Vec<u8> },
    /// Hint: the download reads no chunk below `below` again (it may still
    /// serve them); their pages may leave the cache once written back.
    Release { id: DownloadId, below: u32 },
    /// Every chunk is written and the whole file matched: rename the part
    /// file to its final name (never replacing a file that appeared
    /// meanwhile), remove the state file, close both.
    Finish { id: DownloadId },
    /// The download stopped: close its files after what is queued.
    Close { id: DownloadId },
}

/// The result of a [`DiskOp`].
#[derive(Debug)]
pub enum DiskDone {
    FileHashed {
        job: u64,
        result: Result<FileDigest, String>,
    },
    PartOpened {
        id: DownloadId,
        result: Result<OpenedPart, String>,
    },
    /// `buf` comes back whatever the result.
    Read {
        id: DownloadId,
        chunk: u32,
        buf: Vec<u8>,
        result: Result<(), String>,
    },
    Hashed {
        id: DownloadId,
        job: HashJob,
    },
    /// `data` comes back for reuse whatever the result.
    Written {
        id: DownloadId,
        chunk: u32,
        data: Vec<u8>,
        result: Result<(), String>,
    },
    StateSaved {
        id: DownloadId,
        result: Result<(), String>,
    },
    Finished {
        id: DownloadId,
        result: Result<(), String>,
    },
}

/// Writes `bytes` at `offset` of a file held in memory, growing it as a
/// file system would (for in-memory disks: tests, fuzzing, the simulation).
pub fn write_in_memory(file: &mut Vec<u8>, offset: usize, bytes: &[u8]) {
    let end = offset + bytes.len();
    if file.len() < end {
        file.resize(end, 0);
    }
    file[offset..end].copy_from_slice(bytes);
}

/// A part file opened for a download.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenedPart {
    pub paths: PartPaths,
    /// The state file's bytes (empty for a new download).
    pub state: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn probe<'a>(fs: &'a BTreeMap<&'static str, PathKind>) -> impl Fn(&str) -> PathKind + 'a {
        |p| fs.get(p).copied().unwrap_or(PathKind::Missing)
    }

    #[test]
    fn destinations_resolve_as_the_shell_documents() {
        let name = FileName::new("f.bin").unwrap();
        let fs = BTreeMap::from([
            ("/dl", PathKind::Dir),
            ("/dl/", PathKind::Dir),
            ("/dl/taken", PathKind::Other),
            ("/dl/f.bin", PathKind::Missing),
            ("/link", PathKind::Symlink { to_dir: true }),
            ("/dl/evil.part", PathKind::Symlink { to_dir: false }),
            ("/dl/sub", PathKind::Other),
        ]);
        let ok = |dest: &str| resolve(dest, &name, probe(&fs)).map(|p| p.final_path);
        assert_eq!(ok("/dl"), Ok("/dl/f.bin".into()));
        assert_eq!(ok("/dl/"), Ok("/dl/f.bin".into()));
        assert_eq!(ok("/link"), Ok("/link/f.bin".into()), "a link to a directory is one");
        assert_eq!(ok("/dl/other.bin"), Ok("/dl/other.bin".into()));
        assert_eq!(ok("/dl/taken"), Err("/dl/taken already exists".into()));
        assert_eq!(ok("/nope/x"), Err("no such directory: /nope".into()));
        assert_eq!(ok("/nope/"), Err("no such directory: /nope/".into()));
        assert_eq!(ok("/dl/sub/x"), Err("no such directory: /dl/sub".into()));
        assert_eq!(ok("/dl/evil"), Err("/dl/evil.part is a symbolic link; not writing through it".into()));
        let p = resolve("/dl", &name, probe(&fs)).unwrap();
        assert_eq!((p.part.as_str(), p.state.as_str()), ("/dl/f.bin.part", "/dl/f.bin.part.state"));
        assert_eq!(ok("rel.bin"), Ok("rel.bin".into()), "a bare name is in the current directory");
    }
}
