//! Hashing off the engine thread: the download's hash jobs on a small pool
//! of threads, and whole files for `upload_file`.
//!
//! A hash job ([`HashJob`]) is pure computation that core hands out and takes
//! back with its digests; any thread may run any job, so the pool needs no
//! order. Core keeps one job per download out at a time.

use std::fs::File;
use std::io::{self, Read};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};

use shoal_core::chunk::{FileDigest, FileHasher};
use shoal_core::client::disk::DiskDone;
use shoal_core::client::verify::HashJob;
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

/// Threads that run hash jobs and report them done.
pub struct Hashers {
    tx: Sender<(DownloadId, HashJob)>,
}

impl Hashers {
    /// `threads` workers (at least one), each reporting through `report`.
    pub fn start(threads: usize, report: impl Fn(DiskDone) + Send + Sync + 'static) -> io::Result<Hashers> {
        let (tx, rx) = mpsc::channel::<(DownloadId, HashJob)>();
        let rx = Arc::new(Mutex::new(rx));
        let report = Arc::new(report);
        for _ in 0..threads.max(1) {
            let (rx, report) = (rx.clone(), report.clone());
            std::thread::Builder::new().name("shoal-hasher".into()).spawn(move || loop {
                let next = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                let Ok((id, mut job)) = next else { return };
                job.run();
                report(DiskDone::Hashed { id, job });
            })?;
        }
        Ok(Hashers { tx })
    }

    /// Queues a job; it comes back if the workers are gone.
    pub fn run(&self, id: DownloadId, job: HashJob) -> Option<HashJob> {
        self.tx.send((id, job)).err().map(|e| e.0 .1)
    }
}
