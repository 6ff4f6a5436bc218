//! The tracker's range store: chunk-list ranges by hash, in a redb database
//! beside the log (`<data dir>/ranges.redb`), or in memory without a data dir.
//!
//! Writes commit without an fsync ([`redb::Durability::None`]); the sync
//! thread makes them durable with one durable commit before it reports the
//! log's sync, so a range is durable exactly when the log records written
//! with it are ([`shoal_core::tracker::TrackerOutput::StoreRange`]).

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use shoal_core::chunk::Sha1Digest;

const RANGES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("ranges");

/// redb's own page cache (its default is 1 GiB, which a tracker holding
/// gigabytes of ranges filled: a tracker's memory would grow with the content
/// shared). Ranges are read once per download start; the OS's page cache
/// serves them as well.
const CACHE_BYTES: usize = 32 * 1024 * 1024;

fn err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("range store: {e}"))
}

/// A handle on the store; clones share it.
#[derive(Clone)]
pub struct RangeStore {
    db: Arc<Database>,
    /// Written since the last durable commit.
    dirty: Arc<AtomicBool>,
}

impl RangeStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<RangeStore, String> {
        let path = dir.join("ranges.redb");
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        RangeStore::over(db).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// A store that lives in memory (no data dir: tests, the demo).
    pub fn in_memory() -> RangeStore {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .expect("an in-memory database opens");
        RangeStore::over(db).expect("an in-memory database opens")
    }

    fn over(db: Database) -> io::Result<RangeStore> {
        let tx = db.begin_write().map_err(err)?;
        tx.open_table(RANGES).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(RangeStore { db: Arc::new(db), dirty: Arc::new(AtomicBool::new(false)) })
    }

    /// Every range held.
    pub fn hashes(&self) -> io::Result<Vec<Sha1Digest>> {
        let tx = self.db.begin_read().map_err(err)?;
        let t = tx.open_table(RANGES).map_err(err)?;
        let mut out = Vec::new();
        for kv in t.iter().map_err(err)? {
            let (k, _) = kv.map_err(err)?;
            if let Ok(h) = <[u8; 20]>::try_from(k.value()) {
                out.push(Sha1Digest(h));
            }
        }
        Ok(out)
    }

    /// Writes a range (durable after the next [`RangeStore::sync`]).
    pub fn put(&self, hash: &Sha1Digest, bytes: &[u8]) -> io::Result<()> {
        let mut tx = self.db.begin_write().map_err(err)?;
        tx.set_durability(Durability::None).map_err(err)?;
        {
            let mut t = tx.open_table(RANGES).map_err(err)?;
            t.insert(&hash.0[..], bytes).map_err(err)?;
        }
        tx.commit().map_err(err)?;
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// Removes a range (a crash before the next sync may bring it back).
    pub fn remove(&self, hash: &Sha1Digest) -> io::Result<()> {
        let mut tx = self.db.begin_write().map_err(err)?;
        tx.set_durability(Durability::None).map_err(err)?;
        {
            let mut t = tx.open_table(RANGES).map_err(err)?;
            t.remove(&hash.0[..]).map_err(err)?;
        }
        tx.commit().map_err(err)?;
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }

    pub fn get(&self, hash: &Sha1Digest) -> io::Result<Option<Vec<u8>>> {
        let tx = self.db.begin_read().map_err(err)?;
        let t = tx.open_table(RANGES).map_err(err)?;
        Ok(t.get(&hash.0[..]).map_err(err)?.map(|v| v.value().to_vec()))
    }

    /// Makes every range written so far durable (one fsync), if any was.
    pub fn sync(&self) -> io::Result<()> {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let mut tx = self.db.begin_write().map_err(err)?;
        tx.set_durability(Durability::Immediate).map_err(err)?;
        tx.commit().map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_written_and_synced_are_there_after_reopening() {
        let dir = std::env::temp_dir().join(format!("shoal-ranges-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let a = Sha1Digest::of(b"a");
        {
            let s = RangeStore::open(&dir).unwrap();
            s.put(&a, b"0123456789012345678901234567890123456789").unwrap();
            s.sync().unwrap();
            assert_eq!(s.hashes().unwrap(), vec![a]);
        }
        let s = RangeStore::open(&dir).unwrap();
        assert_eq!(s.get(&a).unwrap().as_deref(), Some(&b"0123456789012345678901234567890123456789"[..]));
        assert_eq!(s.get(&Sha1Digest::of(b"b")).unwrap(), None);
        s.remove(&a).unwrap();
        s.sync().unwrap();
        assert_eq!(s.get(&a).unwrap(), None);
        assert!(s.hashes().unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
