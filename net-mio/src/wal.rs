//! The tracker's write-ahead log file: `<data dir>/log`, records in the
//! [`shoal_core::wal`] format, appended in groups with one fsync per group.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use shoal_core::wal::{encode_record, recover};

pub struct WalFile {
    file: File,
    path: PathBuf,
    /// Records appended since the last sync.
    pending: Vec<u8>,
    /// Where valid data ends: the next record goes here.
    len: u64,
    /// Bytes of the file, zero-filled ahead of `len`.
    allocated: u64,
}

/// The log grows by this much at a time, written with zeros once: appends
/// then overwrite allocated blocks and never change the file's size, so an
/// fdatasync flushes data only, without a metadata journal commit (that
/// commit made every durable write several times slower).
pub const PREALLOCATE: u64 = 4 << 20;

/// What opening the log found.
pub struct Opened {
    pub wal: WalFile,
    pub records: Vec<Vec<u8>>,
    /// Bytes of a torn last record that were cut off.
    pub torn_bytes: u64,
}

impl WalFile {
    /// Opens (or creates) the log in `dir`, keeps every whole record and cuts
    /// off a torn tail (zeroing it). Any other damage is an error: nothing
    /// acknowledged is dropped silently.
    pub fn open(dir: &Path) -> Result<Opened, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.join("log");
        let err = |e: io::Error| format!("{}: {e}", path.display());
        // A rewrite that crashed before its rename: the old log is still whole.
        let _ = std::fs::remove_file(path.with_extension("new"));
        let mut file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(err)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(err)?;
        let r = recover(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        let records: Vec<Vec<u8>> = r.records.iter().map(|r| r.to_vec()).collect();
        let tail = &bytes[r.valid_len as usize..];
        let torn_bytes = tail.iter().rposition(|&b| b != 0).map_or(0, |i| i as u64 + 1);
        if torn_bytes > 0 {
            file.write_all_at(&vec![0; torn_bytes as usize], r.valid_len).and_then(|_| file.sync_all()).map_err(err)?;
        }
        let wal =
            WalFile { file, path: path.clone(), pending: Vec::new(), len: r.valid_len, allocated: bytes.len() as u64 };
        Ok(Opened { wal, records, torn_bytes })
    }

    /// Queues a record for the next write; refused if over the record
    /// limit (the log would read it back as damage).
    pub fn append(&mut self, record: &[u8]) -> io::Result<()> {
        encode_record(record, &mut self.pending).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    }

    /// Queues records already encoded ([`encode_record`]) for the next write.
    pub fn append_encoded(&mut self, records: &[u8]) -> io::Result<()> {
        self.pending.extend_from_slice(records);
        Ok(())
    }

    /// Makes what was written durable.
    pub fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Writes what was appended to the file, without waiting for the disk:
    /// [`WalFile::sync`] then makes it durable.
    pub fn write_pending(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let end = self.len + self.pending.len() as u64;
        if end > self.allocated {
            // Zero-fill the next stretch (a size change: one full sync).
            let grow = (end - self.allocated).div_ceil(PREALLOCATE) * PREALLOCATE;
            let zeros = vec![0u8; grow as usize];
            self.file.write_all_at(&zeros, self.allocated)?;
            self.file.sync_all()?;
            self.allocated += grow;
        }
        self.file.write_all_at(&self.pending, self.len)?;
        self.len = end;
        self.pending.clear();
        Ok(())
    }

    /// Replaces the whole log with `records` (an image of the state after
    /// compaction, in parts), atomically: written to a temporary file, synced, renamed
    /// over the log, directory synced. Records appended and not yet synced
    /// are dropped: the image includes them.
    pub fn rewrite(&mut self, records: &[Vec<u8>]) -> io::Result<()> {
        self.rewrite_with(|put| records.iter().try_for_each(|r| put(r)))
    }

    /// [`WalFile::rewrite`] with the records `fill` hands over one at a
    /// time: each is written as it comes, so the log never holds a second
    /// copy of the image in memory.
    pub fn rewrite_with(
        &mut self,
        fill: impl FnOnce(&mut dyn FnMut(&[u8]) -> io::Result<()>) -> io::Result<()>,
    ) -> io::Result<()> {
        self.pending.clear();
        let tmp = self.path.with_extension("new");
        let mut out = io::BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
        let mut len = 0u64;
        let mut framed = Vec::new();
        fill(&mut |r: &[u8]| {
            framed.clear();
            encode_record(r, &mut framed).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            len += framed.len() as u64;
            out.write_all(&framed)
        })?;
        let allocated = len.div_ceil(PREALLOCATE) * PREALLOCATE;
        let zeros = vec![0u8; 64 * 1024];
        let mut left = allocated - len;
        while left > 0 {
            let n = left.min(zeros.len() as u64);
            out.write_all(&zeros[..n as usize])?;
            left -= n;
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        self.file = OpenOptions::new().read(true).write(true).open(&self.path)?;
        self.len = len;
        self.allocated = allocated;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
