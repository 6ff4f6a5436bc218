//! A download's files on a real disk: the part file and its state file, and
//! the thread that does a download's disk operations in order.
//!
//! Where the files go is core's decision ([`shoal_core::client::disk::resolve`],
//! fed by [`probe`]); this module opens them without following a symbolic
//! link, reads, writes and renames, and reports each operation's result.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender};

use shoal_core::client::disk::{resolve, DiskDone, DiskOp, OpenedPart, PartPaths, PathKind};
use shoal_core::client::download::chunk_offset;
use shoal_core::client::sidecar::MAX_STATE_FILE_LEN;
use shoal_core::client::DownloadId;
use shoal_core::ids::FileName;

use crate::pageout::{self, PageOut};

/// What is at `p`, for [`resolve`]: the final component is not followed.
pub fn probe(p: &str) -> PathKind {
    match Path::new(p).symlink_metadata() {
        Err(_) => PathKind::Missing,
        Ok(m) if m.file_type().is_symlink() => {
            PathKind::Symlink { to_dir: Path::new(p).metadata().is_ok_and(|m| m.is_dir()) }
        }
        Ok(m) if m.is_dir() => PathKind::Dir,
        Ok(_) => PathKind::Other,
    }
}

/// A download's open files.
pub struct PartFile {
    file: File,
    state: File,
    paths: PartPaths,
}

/// Opens (or resumes) the part file of a download: [`DiskOp::OpenPart`].
pub fn open(dest: &str, name: &FileName, size: u64) -> Result<(OpenedPart, PartFile), String> {
    let paths = resolve(dest, name, probe)?;
    let open = |p: &str| {
        let mut o = OpenOptions::new();
        o.read(true).write(true).create(true).truncate(false);
        // Never through a symbolic link, whatever appeared since the probe.
        #[cfg(target_os = "linux")]
        o.custom_flags(libc::O_NOFOLLOW);
        o.open(p).map_err(|e| format!("{p}: {e}"))
    };
    let (file, mut state) = (open(&paths.part)?, open(&paths.state)?);
    let mut bytes = Vec::new();
    (&mut state)
        .take(MAX_STATE_FILE_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{}: {e}", paths.state))?;
    // Without a sidecar nothing in an old part file counts: every chunk is
    // written whole before it is read back, so stale bytes need no clearing.
    // (Truncating to zero first would also make ext4 flush the whole file
    // to disk when it is closed, its replace-by-truncate heuristic: measured
    // as 0.6 s of a 3 s download of 1 GiB.)
    file.set_len(size).map_err(|e| format!("{}: {e}", paths.part))?;
    if !pageout::reserve(&file, size) {
        return Err(format!("not enough disk space for {} ({size} bytes)", paths.part));
    }
    let opened = OpenedPart { paths: paths.clone(), state: bytes };
    Ok((opened, PartFile { file, state, paths }))
}

impl PartFile {
    /// Starts the thread that does this download's disk operations, in the
    /// order they are sent, reporting each through `report`. It ends after
    /// [`DiskOp::Finish`] or [`DiskOp::Close`], or when the sender is dropped.
    pub fn spawn(
        self,
        id: DownloadId,
        report: impl Fn(DiskDone) + Send + 'static,
    ) -> io::Result<(Sender<DiskOp>, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel::<DiskOp>();
        let pageout = PageOut::start(&self.file)?;
        let thread =
            std::thread::Builder::new().name("shoal-disk".into()).spawn(move || self.run(id, rx, pageout, report))?;
        Ok((tx, thread))
    }

    fn run(self, id: DownloadId, rx: Receiver<DiskOp>, pageout: PageOut, report: impl Fn(DiskDone)) {
        let part_err = |e: io::Error| format!("{}: {e}", self.paths.part);
        for op in rx {
            match op {
                DiskOp::Read { chunk, mut buf, .. } => {
                    let result = self.file.read_exact_at(&mut buf, chunk_offset(chunk)).map_err(part_err);
                    report(DiskDone::Read { id, chunk, buf, result });
                }
                DiskOp::Write { chunk, data, .. } => {
                    let result = self.file.write_all_at(&data, chunk_offset(chunk)).map_err(part_err);
                    report(DiskDone::Written { id, chunk, data, result });
                }
                DiskOp::SaveState { offset, bytes, .. } => {
                    let result =
                        self.state.write_all_at(&bytes, offset).map_err(|e| format!("{}: {e}", self.paths.state));
                    report(DiskDone::StateSaved { id, result });
                }
                DiskOp::Release { below, .. } => pageout.advance(below),
                DiskOp::Finish { .. } => {
                    let result = self.rename_final();
                    let complete = result.is_ok();
                    report(DiskDone::Finished { id, result });
                    if complete {
                        // Only after reporting: freeing the state file's
                        // block waits for the disk with ext4's `discard`
                        // option (measured once 0.8 s, queued behind the
                        // download's writeback), and the download is
                        // complete without it. The driver joins this
                        // thread before the client exits.
                        let _ = std::fs::remove_file(&self.paths.state);
                    }
                    return;
                }
                DiskOp::Close { .. } => return,
                // Not this thread's (the driver sends them elsewhere).
                DiskOp::HashFile { .. } | DiskOp::OpenPart { .. } | DiskOp::Hash { .. } => {}
            }
        }
    }

    /// Gives the finished part file its final name.
    fn rename_final(&self) -> Result<(), String> {
        let p = &self.paths;
        if Path::new(&p.final_path).symlink_metadata().is_ok() {
            return Err(format!("{} appeared meanwhile; not replacing it", p.final_path));
        }
        std::fs::rename(&p.part, &p.final_path).map_err(|e| format!("{}: {e}", p.final_path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("shoal-part-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_symlink_in_place_of_the_part_file_is_never_written_through() {
        let dir = scratch("symlink");
        let target = dir.join("victim");
        std::fs::write(&target, b"precious").unwrap();
        std::os::unix::fs::symlink(&target, dir.join("f.bin.part")).unwrap();
        let name = FileName::new("f.bin").unwrap();
        let err = open(&dir.display().to_string(), &name, 10).err().expect("refused");
        assert!(err.contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn operations_run_in_order_and_the_file_gets_its_name() {
        let dir = scratch("ops");
        let name = FileName::new("f.bin").unwrap();
        let (opened, part) = open(&dir.display().to_string(), &name, 5).unwrap();
        assert!(opened.state.is_empty());
        let (tx, rx) = mpsc::channel();
        let id = DownloadId(1);
        let (ops, thread) = part.spawn(id, move |d| drop(tx.send(d))).unwrap();
        ops.send(DiskOp::Write { id, chunk: 0, data: b"hello".to_vec() }).unwrap();
        ops.send(DiskOp::SaveState { id, offset: 3, bytes: b"xy".to_vec() }).unwrap();
        ops.send(DiskOp::Read { id, chunk: 0, buf: vec![0; 5] }).unwrap();
        ops.send(DiskOp::Finish { id }).unwrap();
        thread.join().unwrap();
        let done: Vec<DiskDone> = rx.try_iter().collect();
        assert!(matches!(&done[0], DiskDone::Written { result: Ok(()), .. }));
        assert!(matches!(&done[1], DiskDone::StateSaved { result: Ok(()), .. }));
        assert!(matches!(&done[2], DiskDone::Read { buf, result: Ok(()), .. } if buf == b"hello"));
        assert!(matches!(&done[3], DiskDone::Finished { result: Ok(()), .. }));
        assert_eq!(std::fs::read(dir.join("f.bin")).unwrap(), b"hello");
        assert!(!dir.join("f.bin.part.state").exists(), "the state file goes with the finished download");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
