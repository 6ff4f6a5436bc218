//! The client's file work: hashing uploads, serving blocks, and the part file,
//! sidecar and final rename of a download.
//!
//! Paths follow one rule: a download writes only `<final>.part`,
//! `<final>.part.state` (and its `.tmp`) and, at the end, `<final>` itself,
//! where `<final>` is the destination the user named (or the file's name
//! inside it, for a directory). It never replaces an existing `<final>` and
//! never writes through a symlink.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha1::{Digest, Sha1};
use shoal_core::chunk::{chunk_len, FileDigest, FileHasher, Sha1Digest, CHUNK_SIZE};
use shoal_core::client::Prepared;
use shoal_core::ids::FileName;
use shoal_core::peer::Bitmap;
use shoal_core::sidecar;

/// Streams a file through the chunk hasher in 1 MiB reads: constant memory.
pub fn hash_file(path: &str) -> Result<FileDigest, String> {
    let mut f = File::open(path).map_err(|e| e.to_string())?;
    if !f.metadata().map_err(|e| e.to_string())?.is_file() {
        return Err("not a regular file".into());
    }
    let mut h = FileHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]).map_err(|e| e.to_string())?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.to_string()),
        }
    }
    h.finish().map_err(|e| e.to_string())
}

/// Open files of shared content, for serving blocks.
#[derive(Default)]
pub struct ReadCache {
    files: HashMap<String, File>,
}

/// Files kept open for serving at once.
const MAX_OPEN_SHARED: usize = 64;

impl ReadCache {
    pub fn read(&mut self, path: &str, offset: u64, len: u32) -> Result<Vec<u8>, String> {
        if !self.files.contains_key(path) {
            if self.files.len() >= MAX_OPEN_SHARED {
                self.files.clear();
            }
            let f = File::open(path).map_err(|e| format!("{path}: {e}"))?;
            self.files.insert(path.to_string(), f);
        }
        let mut buf = vec![0u8; len as usize];
        match self.files[path].read_exact_at(&mut buf, offset) {
            Ok(()) => Ok(buf),
            Err(e) => {
                self.files.remove(path);
                Err(format!("{path}: {e}"))
            }
        }
    }
}

/// Where a download's files live.
#[derive(Clone, Debug)]
pub struct PartPaths {
    pub final_path: PathBuf,
    pub part: PathBuf,
    pub state: PathBuf,
}

/// A download's open part file.
pub struct PartFile {
    file: File,
    paths: PartPaths,
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn refuse_symlink(p: &Path) -> Result<(), String> {
    match p.symlink_metadata() {
        Ok(m) if m.file_type().is_symlink() => {
            Err(format!("{} is a symbolic link; not writing through it", p.display()))
        }
        _ => Ok(()),
    }
}

/// Resolves the destination, opens (or resumes) the part file and re-checks
/// every chunk the sidecar claims.
pub fn prepare(dest: &str, name: &FileName, digest: &FileDigest) -> Result<(Prepared, PartFile), String> {
    let d = Path::new(dest);
    let final_path = if d.is_dir() {
        d.join(name.as_str())
    } else if dest.ends_with('/') || d.file_name().is_none() {
        return Err(format!("no such directory: {dest}"));
    } else {
        d.to_path_buf()
    };
    if let Some(parent) = final_path.parent() {
        if !parent.as_os_str().is_empty() && !parent.is_dir() {
            return Err(format!("no such directory: {}", parent.display()));
        }
    }
    if final_path.symlink_metadata().is_ok() {
        return Err(format!("{} already exists", final_path.display()));
    }
    let paths = PartPaths {
        part: with_suffix(&final_path, ".part"),
        state: with_suffix(&final_path, ".part.state"),
        final_path,
    };
    refuse_symlink(&paths.part)?;
    refuse_symlink(&paths.state)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&paths.part)
        .map_err(|e| format!("{}: {e}", paths.part.display()))?;
    let n = digest.chunks.len() as u32;
    let claimed = read_state(&paths.state, digest);
    let mut have = Bitmap::new(n);
    match claimed {
        Some(claimed) => {
            let mut buf = vec![0u8; CHUNK_SIZE as usize];
            for c in claimed.iter_set() {
                let len = chunk_len(digest.size, c as u64) as usize;
                let ok = file.read_exact_at(&mut buf[..len], c as u64 * CHUNK_SIZE).is_ok()
                    && Sha1Digest::of(&buf[..len]) == digest.chunks[c as usize];
                if ok {
                    have.set(c);
                }
            }
        }
        None => file.set_len(0).map_err(|e| e.to_string())?,
    }
    file.set_len(digest.size).map_err(|e| format!("{}: {e}", paths.part.display()))?;
    let prepared = Prepared {
        final_path: paths.final_path.display().to_string(),
        part_path: paths.part.display().to_string(),
        have,
    };
    Ok((prepared, PartFile { file, paths }))
}

fn read_state(path: &Path, digest: &FileDigest) -> Option<Bitmap> {
    let f = File::open(path).ok()?;
    let mut bytes = Vec::new();
    f.take(sidecar::MAX_SIDECAR_LEN as u64 + 1).read_to_end(&mut bytes).ok()?;
    match sidecar::decode(&bytes, digest) {
        Ok(b) => Some(b),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring the download state file");
            None
        }
    }
}

impl PartFile {
    pub fn write_chunk(&self, chunk: u32, data: &[u8]) -> Result<(), String> {
        self.file
            .write_all_at(data, chunk as u64 * CHUNK_SIZE)
            .map_err(|e| format!("{}: {e}", self.paths.part.display()))
    }

    /// Replaces the sidecar atomically (write a temporary file, rename it).
    pub fn save_state(&self, bytes: &[u8]) -> Result<(), String> {
        let tmp = with_suffix(&self.paths.state, ".tmp");
        refuse_symlink(&tmp)?;
        std::fs::write(&tmp, bytes)
            .and_then(|_| std::fs::rename(&tmp, &self.paths.state))
            .map_err(|e| format!("{}: {e}", self.paths.state.display()))
    }

    pub fn paths(&self) -> PartPaths {
        self.paths.clone()
    }
}

impl PartPaths {
    /// Checks the whole file's SHA1, then renames the part to its final name.
    pub fn finish(self, sha1: Sha1Digest) -> Result<(), String> {
        let mut f = File::open(&self.part).map_err(|e| format!("{}: {e}", self.part.display()))?;
        let mut h = Sha1::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => h.update(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
        let got = Sha1Digest(h.finalize().into());
        if got != sha1 {
            return Err(format!("whole-file SHA1 mismatch: expected {sha1}, got {got}"));
        }
        if self.final_path.symlink_metadata().is_ok() {
            return Err(format!("{} appeared meanwhile; not replacing it", self.final_path.display()));
        }
        std::fs::rename(&self.part, &self.final_path).map_err(|e| format!("{}: {e}", self.final_path.display()))?;
        let _ = std::fs::remove_file(&self.state);
        Ok(())
    }
}
