//! The tracker's write-ahead log file: `<data dir>/log`, records in the
//! [`shoal_core::wal`] format, appended in groups with one fsync per group.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use shoal_core::wal::{encode_record, recover};

pub struct WalFile {
    file: File,
    path: PathBuf,
    /// Records appended since the last sync.
    pending: Vec<u8>,
}

/// What opening the log found.
pub struct Opened {
    pub wal: WalFile,
    pub records: Vec<Vec<u8>>,
    /// Bytes of a torn last record that were cut off.
    pub torn_bytes: u64,
}

impl WalFile {
    /// Opens (or creates) the log in `dir`, keeps every whole record and cuts
    /// off a torn tail. Any other damage is an error: nothing acknowledged is
    /// dropped silently.
    pub fn open(dir: &Path) -> Result<Opened, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.join("log");
        // A rewrite that crashed before its rename: the old log is still whole.
        let _ = std::fs::remove_file(path.with_extension("new"));
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        let r = recover(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        let records: Vec<Vec<u8>> = r.records.iter().map(|r| r.to_vec()).collect();
        let torn_bytes = bytes.len() as u64 - r.valid_len;
        if r.torn {
            file.set_len(r.valid_len).and_then(|_| file.sync_all()).map_err(|e| format!("{}: {e}", path.display()))?;
            file.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
        }
        Ok(Opened { wal: WalFile { file, path, pending: Vec::new() }, records, torn_bytes })
    }

    pub fn append(&mut self, record: &[u8]) {
        encode_record(record, &mut self.pending);
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Writes what was appended and waits until it is on disk.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.file.write_all(&self.pending)?;
        self.file.sync_data()?;
        self.pending.clear();
        Ok(())
    }

    /// Replaces the whole log with one record (an image of the state after
    /// compaction), atomically: written to a temporary file, synced, renamed
    /// over the log, directory synced. Records appended and not yet synced
    /// are dropped: the image includes them.
    pub fn rewrite(&mut self, record: &[u8]) -> io::Result<()> {
        self.pending.clear();
        let tmp = self.path.with_extension("new");
        let mut bytes = Vec::with_capacity(record.len() + 12);
        encode_record(record, &mut bytes);
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
