//! Hashing off the engine thread: each download's hash jobs on a thread of
//! its own, and whole files for `upload_file`.
//!
//! A hash job ([`HashJob`]) is pure computation that core hands out and takes
//! back with its digests. A download's jobs continue one another's whole-file
//! hash, so they run in order, on one thread; core keeps two out at a time,
//! so that thread always has the next one at hand.

use std::fs::File;
use std::io::{self, Read};
use std::sync::mpsc::{self, Sender};

use shoal_core::chunk::{FileDigest, FileHasher};
use shoal_core::client::disk::DiskDone;
use shoal_core::client::verify::{HashChain, HashJob};
use shoal_core::client::DownloadId;

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

/// A download's hashing thread: runs its hash jobs one after another, in
/// the order they come, with the download's [`HashChain`], and reports each.
pub struct Hasher {
    tx: Sender<HashJob>,
}

impl Hasher {
    pub fn start(id: DownloadId, report: impl Fn(DiskDone) + Send + 'static) -> io::Result<Hasher> {
        let (tx, rx) = mpsc::channel::<HashJob>();
        std::thread::Builder::new().name("shoal-hasher".into()).spawn(move || {
            let mut chain = HashChain::default();
            for mut job in rx {
                job.run(&mut chain);
                report(DiskDone::Hashed { id, job });
            }
        })?;
        Ok(Hasher { tx })
    }

    /// Queues a job; it comes back if the thread is gone.
    pub fn run(&self, job: HashJob) -> Option<HashJob> {
        self.tx.send(job).err().map(|e| e.0)
    }
}
