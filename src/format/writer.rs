//! A streaming safetensors writer: the header (names, dtypes, shapes, offsets) is planned
//! up front, tensors are written one at a time in plan order, and the header is rewritten
//! at the end with metadata that is only known after the data (checksums). Nothing but
//! the tensor being written is held in memory.

use crate::error::{Error, Result};
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// One planned tensor.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl Entry {
    pub fn nbytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

pub struct StreamWriter {
    path: PathBuf,
    out: BufWriter<File>,
    entries: Vec<Entry>,
    header_len: usize,
    next: usize,
}

/// The header JSON for `entries` and `metadata`, padded with spaces to `min_len` and to a
/// multiple of 8 bytes (so tensor data stays aligned).
fn header_bytes(entries: &[Entry], metadata: &BTreeMap<String, String>, min_len: usize) -> Result<Vec<u8>> {
    let mut map = serde_json::Map::new();
    if !metadata.is_empty() {
        map.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).map_err(|e| Error::Format(e.to_string()))?,
        );
    }
    let mut offset = 0usize;
    for e in entries {
        let n = e.nbytes();
        map.insert(
            e.name.clone(),
            serde_json::json!({ "dtype": e.dtype, "shape": e.shape, "data_offsets": [offset, offset + n] }),
        );
        offset += n;
    }
    let mut bytes = serde_json::to_vec(&map).map_err(|e| Error::Format(e.to_string()))?;
    let len = bytes.len().max(min_len).next_multiple_of(8);
    bytes.resize(len, b' ');
    Ok(bytes)
}

impl StreamWriter {
    /// Creates `path` and writes a provisional header. `metadata` must have the same
    /// serialized length as the final one or be longer (checksums are fixed-width).
    pub fn create(path: &Path, entries: Vec<Entry>, metadata: &BTreeMap<String, String>) -> Result<Self> {
        let mut seen = std::collections::HashSet::new();
        for e in &entries {
            if !seen.insert(e.name.as_str()) {
                return Err(Error::Format(format!("duplicate tensor name {}", e.name)));
            }
        }
        let header = header_bytes(&entries, metadata, 0)?;
        let file = File::create(path).map_err(|e| Error::io(path, e))?;
        let mut out = BufWriter::with_capacity(8 << 20, file);
        out.write_all(&(header.len() as u64).to_le_bytes()).map_err(|e| Error::io(path, e))?;
        out.write_all(&header).map_err(|e| Error::io(path, e))?;
        Ok(StreamWriter { path: path.to_path_buf(), out, entries, header_len: header.len(), next: 0 })
    }

    /// Writes the next planned tensor's bytes.
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let e = self
            .entries
            .get(self.next)
            .ok_or_else(|| Error::Format(format!("{}: unplanned tensor {name}", self.path.display())))?;
        if e.name != name || e.nbytes() != bytes.len() {
            return Err(Error::Format(format!(
                "{}: tensor {name} ({} bytes) written where {} ({} bytes) was planned",
                self.path.display(),
                bytes.len(),
                e.name,
                e.nbytes()
            )));
        }
        self.out.write_all(bytes).map_err(|err| Error::io(&self.path, err))?;
        self.next += 1;
        Ok(())
    }

    /// Rewrites the header with the final `metadata` and flushes. Returns the file size.
    pub fn finish(mut self, metadata: &BTreeMap<String, String>) -> Result<u64> {
        if self.next != self.entries.len() {
            return Err(Error::Format(format!(
                "{}: {} of {} tensors written",
                self.path.display(),
                self.next,
                self.entries.len()
            )));
        }
        let header = header_bytes(&self.entries, metadata, self.header_len)?;
        if header.len() != self.header_len {
            return Err(Error::Format(format!(
                "{}: final header does not fit its reserved space",
                self.path.display()
            )));
        }
        let io = |e| Error::io(&self.path, e);
        self.out.flush().map_err(io)?;
        let mut file = self.out.into_inner().map_err(|e| Error::io(&self.path, e.into_error()))?;
        let size = file.stream_position().map_err(|e| Error::io(&self.path, e))?;
        file.seek(SeekFrom::Start(8)).map_err(|e| Error::io(&self.path, e))?;
        file.write_all(&header).map_err(|e| Error::io(&self.path, e))?;
        Ok(size)
    }
}
