//! Open files of shared content, for serving blocks with `sendfile`.

use std::collections::HashMap;
use std::fs::File;
use std::sync::Arc;

/// Open files of shared content, for serving blocks.
#[derive(Default)]
pub struct ReadCache {
    files: HashMap<String, Arc<File>>,
}

/// Files kept open for serving at once.
const MAX_OPEN_SHARED: usize = 64;

impl ReadCache {
    /// The open file at `path`, checked to hold `len` bytes at `offset`.
    pub fn open_range(&mut self, path: &str, offset: u64, len: u64) -> Result<Arc<File>, String> {
        if !self.files.contains_key(path) {
            if self.files.len() >= MAX_OPEN_SHARED {
                self.files.clear();
            }
            let f = File::open(path).map_err(|e| format!("{path}: {e}"))?;
            self.files.insert(path.to_string(), Arc::new(f));
        }
        let f = &self.files[path];
        match f.metadata() {
            Ok(m) if m.len() >= offset + len => Ok(f.clone()),
            Ok(_) => {
                self.files.remove(path);
                Err(format!("{path}: shorter than when it was shared"))
            }
            Err(e) => {
                self.files.remove(path);
                Err(format!("{path}: {e}"))
            }
        }
    }
}
