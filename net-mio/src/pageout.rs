//! Drop-behind for a download's part file, and preallocation.

use std::fs::File;
use std::io;
use std::sync::mpsc::{sync_channel, SyncSender};

use shoal_core::client::download::chunk_offset;

/// Chunks whose writeback starts together, in file order, behind the whole-file hash.
const PAGE_OUT_BATCH: u32 = 16;
/// Chunks of a download kept in the page cache behind the whole-file hash (64 MiB);
/// older ones are dropped once on disk.
const PAGE_CACHE_WINDOW: u32 = 128;

/// Drop-behind: keeps a download's part file from piling up in the page cache.
///
/// The whole-file hash is the last to need a chunk's bytes, so once it has
/// passed a batch of chunks their writeback is started (in file order, so the
/// disk sees sequential writes), and a window later they are dropped from
/// the cache once written. This runs on a thread of its own: waiting for the
/// disk never holds up the download (measured: a 0.4 s stall of the whole
/// pipeline when the whole-file hasher waited itself); if it falls behind, the page
/// cache just grows as it would without it. A download then holds at most about 72 MiB of page
/// cache however large the file, does not push other programs' data out of
/// memory, and writes into pages it freed itself a moment ago: on a VM,
/// fresh pages the host has not backed cost several times more to fill
/// (bench: a plain writer's rate varies 0.6-1.9 GB/s with that). Files under
/// the window are never dropped. A chunk served to a peer after it was
/// dropped is read back from disk. Best effort: where the calls do nothing
/// (tmpfs, other systems) the page cache behaves as before.
///
/// The download says how far its whole-file hash has come with
/// [`shoal_core::client::disk::DiskOp::Release`].
pub struct PageOut {
    tx: SyncSender<u32>,
}

#[derive(Default)]
struct Window {
    /// Chunks below this have had their writeback started.
    started: u32,
    /// Chunks below this have been dropped from the page cache.
    dropped: u32,
}

impl PageOut {
    /// Starts the page-out thread of `file`; it ends when this is dropped.
    pub fn start(file: &File) -> io::Result<PageOut> {
        let file = file.try_clone()?;
        let (tx, rx) = sync_channel::<u32>(64);
        std::thread::Builder::new().name("shoal-pageout".into()).spawn(move || {
            let mut w = Window::default();
            while let Ok(mut hashed) = rx.recv() {
                while let Ok(later) = rx.try_recv() {
                    hashed = hashed.max(later);
                }
                w.advance(&file, hashed);
            }
        })?;
        Ok(PageOut { tx })
    }

    /// The whole-file hash has passed the chunks below `hashed`. A full queue
    /// only means the thread is behind; it will see a later position.
    pub fn advance(&self, hashed: u32) {
        let _ = self.tx.try_send(hashed);
    }
}

/// Preallocates `size` bytes of `file`; false if the disk has no room.
pub fn reserve(file: &File, size: u64) -> bool {
    os::reserve(file, size)
}

impl Window {
    fn advance(&mut self, file: &File, hashed: u32) {
        while hashed >= self.started + PAGE_OUT_BATCH {
            os::start_writeback(file, chunk_offset(self.started), chunk_offset(PAGE_OUT_BATCH));
            self.started += PAGE_OUT_BATCH;
        }
        while self.started >= self.dropped + PAGE_CACHE_WINDOW + PAGE_OUT_BATCH {
            os::drop_cached(file, chunk_offset(self.dropped), chunk_offset(PAGE_OUT_BATCH));
            self.dropped += PAGE_OUT_BATCH;
        }
    }
}

#[cfg(target_os = "linux")]
mod os {
    use std::fs::File;
    use std::os::fd::AsRawFd;

    /// Allocates the file's blocks up front (what is already there stays):
    /// a full disk shows at the start, not halfway, and writing back a
    /// chunk behind the writer need not allocate while the writer does (on
    /// ext4 both take the inode's block-map lock; measured: pwrite stalls of
    /// 0.1-0.3 s). A file system that cannot preallocate keeps a sparse file.
    /// False if the disk has no room for the file.
    pub fn reserve(file: &File, size: u64) -> bool {
        size == 0
            || rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, size)
                != Err(rustix::io::Errno::NOSPC)
    }

    /// Starts writing back `len` bytes from `offset`, without waiting.
    pub fn start_writeback(file: &File, offset: u64, len: u64) {
        // SAFETY: a plain system call on a descriptor `file` keeps open; no
        // memory is passed. Failure only means the kernel writes back later.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE);
        }
    }

    /// Waits until `len` bytes from `offset` are on disk, then drops them
    /// from the page cache (clean pages only; nothing is lost either way).
    pub fn drop_cached(file: &File, offset: u64, len: u64) {
        let all = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        // SAFETY: as in `start_writeback`.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, all);
        }
        if let Some(len) = std::num::NonZeroU64::new(len) {
            let _ = rustix::fs::fadvise(file, offset, Some(len), rustix::fs::Advice::DontNeed);
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod os {
    pub fn reserve(_: &std::fs::File, _: u64) -> bool {
        true
    }
    pub fn start_writeback(_: &std::fs::File, _: u64, _: u64) {}
    pub fn drop_cached(_: &std::fs::File, _: u64, _: u64) {}
}
