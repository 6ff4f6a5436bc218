//! The partial snapshot base a tracker keeps beside its log
//! (`<data dir>/partial-snapshot`): the first bytes of a snapshot sync that
//! was arriving when the tracker stopped, so that after a restart the sync
//! resumes where it stopped instead of coming again whole
//! ([`shoal_core::tracker::TrackerOutput::SavePartial`]).
//!
//! The file is the base's SHA1 (20 bytes), then the bytes received, in
//! order. Nothing is fsynced: the node checks the whole base against its
//! hash when the sync completes, so bytes a crash tore only cost a sync
//! that comes again whole.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use shoal_core::chunk::Sha1Digest;
use shoal_core::tracker::stream::MAX_CONSENSUS_MESSAGE;

/// The file of a data dir's partial base.
pub struct PartialStore {
    path: PathBuf,
    /// The base being written, the file, and how many bytes of it it holds.
    open: Option<(Sha1Digest, File, u64)>,
}

impl PartialStore {
    /// The store in `dir`, and the partial base found there (none, or one
    /// that is not a partial base: removed).
    pub fn open(dir: &Path) -> (PartialStore, Option<(Sha1Digest, Vec<u8>)>) {
        let path = dir.join("partial-snapshot");
        let found = Self::read(&path).unwrap_or_else(|e| {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "ignoring a partial snapshot");
                let _ = fs::remove_file(&path);
            }
            None
        });
        (PartialStore { path, open: None }, found)
    }

    fn read(path: &Path) -> io::Result<Option<(Sha1Digest, Vec<u8>)>> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        if len <= 20 || len > 20 + MAX_CONSENSUS_MESSAGE as u64 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{len} bytes")));
        }
        let mut digest = [0u8; 20];
        f.read_exact(&mut digest)?;
        let mut bytes = Vec::with_capacity((len - 20) as usize);
        f.read_to_end(&mut bytes)?;
        Ok(Some((Sha1Digest(digest), bytes)))
    }

    /// Writes `bytes` at `offset` of base `base`'s partial: offset 0 starts
    /// it again; a write for another base or past the end is dropped.
    pub fn save(&mut self, base: Sha1Digest, offset: u64, bytes: &[u8]) -> io::Result<()> {
        if offset == 0 {
            let mut f = OpenOptions::new().create(true).write(true).truncate(true).open(&self.path)?;
            f.write_all(&base.0)?;
            self.open = Some((base, f, 0));
        } else if self.open.is_none() {
            // Resuming after a restart: the file holds what was found.
            let mut f = OpenOptions::new().read(true).write(true).open(&self.path)?;
            let mut digest = [0u8; 20];
            f.read_exact(&mut digest)?;
            let len = f.seek(SeekFrom::End(0))?.saturating_sub(20);
            if Sha1Digest(digest) == base {
                self.open = Some((base, f, len));
            }
        }
        let Some((d, f, len)) = self.open.as_mut() else { return Ok(()) };
        if *d != base || offset > *len {
            return Ok(());
        }
        if offset < *len {
            f.set_len(20 + offset)?;
        }
        f.seek(SeekFrom::Start(20 + offset))?;
        f.write_all(bytes)?;
        *len = offset + bytes.len() as u64;
        Ok(())
    }

    /// Removes the partial base.
    pub fn remove(&mut self) {
        self.open = None;
        if let Err(e) = fs::remove_file(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove a partial snapshot");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory removed when the test ends.
    struct Scratch(PathBuf);
    impl Scratch {
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// What is written comes back at the next open, in order; a write for
    /// another base or past the end changes nothing; offset 0 starts again;
    /// a removed or broken file gives nothing.
    #[test]
    fn a_partial_base_comes_back_after_a_restart() {
        let dir = std::env::temp_dir().join(format!("shoal-partial-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let dir = Scratch(dir);
        let (a, b) = (Sha1Digest([1; 20]), Sha1Digest([2; 20]));
        let (mut s, found) = PartialStore::open(dir.path());
        assert!(found.is_none());
        s.save(a, 0, b"abc").unwrap();
        s.save(a, 3, b"def").unwrap();
        s.save(b, 6, b"xyz").unwrap();
        s.save(a, 9, b"gap").unwrap();
        drop(s);
        let (mut s, found) = PartialStore::open(dir.path());
        assert_eq!(found, Some((a, b"abcdef".to_vec())));
        // Resumed after the restart, and rewound.
        s.save(a, 6, b"ghi").unwrap();
        s.save(a, 4, b"EF").unwrap();
        drop(s);
        let (mut s, found) = PartialStore::open(dir.path());
        assert_eq!(found, Some((a, b"abcdEF".to_vec())));
        s.save(b, 0, b"new").unwrap();
        drop(s);
        let (mut s, found) = PartialStore::open(dir.path());
        assert_eq!(found, Some((b, b"new".to_vec())));
        s.remove();
        assert!(PartialStore::open(dir.path()).1.is_none());
        fs::write(dir.path().join("partial-snapshot"), [0u8; 20]).unwrap();
        assert!(PartialStore::open(dir.path()).1.is_none(), "a digest and nothing after is not a partial");
        assert!(!dir.path().join("partial-snapshot").exists(), "and is removed");
    }
}
