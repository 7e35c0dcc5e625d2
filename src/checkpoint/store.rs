//! One component's safetensors files (single, sharded via `*.safetensors.index.json`, or a
//! `*.fp16.safetensors` variant), memory-mapped, with legacy-name aliases.

use crate::backend::Tensor;
use crate::error::{Error, Result};
use crate::format::codec::SparseHeader;
use crate::format::{DType, HostData, Weight};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, Metadata, TensorInfo};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One memory-mapped safetensors file with its parsed, validated header.
pub struct SafetensorsFile {
    pub path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    pub metadata: Metadata,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is opened read-only; we never write through the map. A file
        // truncated by another process while mapped is outside what we can defend against.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (n, metadata) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
            Error::Checkpoint(format!("{}: not a valid safetensors file ({e})", path.display()))
        })?;
        Ok(SafetensorsFile { path: path.to_path_buf(), mmap, data_start: 8 + n, metadata })
    }

    /// The raw little-endian bytes of a tensor (offsets validated at open).
    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        let (a, b) = info.data_offsets;
        &self.mmap[self.data_start + a..self.data_start + b]
    }

    /// Tells the kernel this process is done with a tensor's pages of the map (once it has
    /// been copied out), so that they leave its resident set: without it a loaded model is
    /// counted twice (the copy plus the touched map). Best effort; see [`release_pages`].
    pub fn release(&self, info: &TensorInfo) {
        let (a, b) = info.data_offsets;
        release_pages(&self.mmap, self.data_start + a, b - a);
    }
}

/// `madvise(MADV_DONTNEED)` on the whole pages inside `offset..offset + len` of a read-only
/// file map: they leave the resident set and, if read again, fault back in from the page
/// cache with the same contents. Partial pages at either end are kept (a neighbouring
/// tensor may still be in use). A no-op where unsupported.
pub(crate) fn release_pages(map: &Mmap, offset: usize, len: usize) {
    #[cfg(target_os = "linux")]
    {
        let page = 4096usize;
        let base = map.as_ptr() as usize;
        let start = (base + offset).next_multiple_of(page) - base;
        let end = (base + offset + len) / page * page - base;
        if end > start && end <= map.len() {
            // SAFETY: the map is read-only and file-backed (MAP_SHARED, PROT_READ): dropping
            // its pages changes no contents; a later read faults the same bytes back in. No
            // borrow of these bytes is used after this call by the loader.
            let _ =
                unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (map, offset, len);
}

/// A tensor as stored: dtype, shape and bytes borrowed from the map.
pub struct RawTensor<'a> {
    pub name: &'a str,
    pub dtype: StDtype,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

impl RawTensor<'_> {
    /// The values as a [`HostData`] in their stored float dtype.
    pub fn host_data(&self) -> Result<HostData> {
        let b = self.bytes;
        // Fast path: an aligned little-endian buffer is reinterpreted, not parsed.
        if cfg!(target_endian = "little") {
            match self.dtype {
                StDtype::F32 if b.len().is_multiple_of(4) => {
                    let mut v = vec![0f32; b.len() / 4];
                    bytemuck::cast_slice_mut::<f32, u8>(&mut v).copy_from_slice(b);
                    return Ok(HostData::F32(v));
                }
                StDtype::F16 if b.len().is_multiple_of(2) => {
                    let mut v = vec![f16::ZERO; b.len() / 2];
                    bytemuck::cast_slice_mut::<f16, u8>(&mut v).copy_from_slice(b);
                    return Ok(HostData::F16(v));
                }
                StDtype::BF16 if b.len().is_multiple_of(2) => {
                    let mut v = vec![bf16::ZERO; b.len() / 2];
                    bytemuck::cast_slice_mut::<bf16, u8>(&mut v).copy_from_slice(b);
                    return Ok(HostData::BF16(v));
                }
                _ => {}
            }
        }
        Ok(match self.dtype {
            StDtype::F32 => HostData::F32(
                b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            ),
            StDtype::F16 => {
                HostData::F16(b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]])).collect())
            }
            StDtype::BF16 => {
                HostData::BF16(b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]])).collect())
            }
            // Community checkpoints hold float64 tensors; they are cast to f32 on load, as
            // diffusers casts them to the pipeline's dtype.
            StDtype::F64 => HostData::F32(
                b.chunks_exact(8)
                    .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
                    .collect(),
            ),
            d => return Err(Error::Checkpoint(unsupported_dtype(self.name, d))),
        })
    }

    /// The dtype as stored, when it is one the sparse format stores (f32, f16, bf16).
    pub fn float_dtype(&self) -> Option<DType> {
        match self.dtype {
            StDtype::F32 => Some(DType::F32),
            StDtype::F16 => Some(DType::F16),
            StDtype::BF16 => Some(DType::BF16),
            _ => None,
        }
    }

    /// The dtype [`RawTensor::host_data`] returns: the stored one, f32 for f64; `None` for
    /// integer and other non-float tensors.
    pub fn load_dtype(&self) -> Option<DType> {
        match self.dtype {
            StDtype::F64 => Some(DType::F32),
            _ => self.float_dtype(),
        }
    }

    /// Whether the tensor holds floating-point values of any width (including ones sdsparse
    /// does not read, such as float8).
    pub fn is_float(&self) -> bool {
        is_float_dtype(self.dtype)
    }

    /// NaN and infinite elements of a float tensor, counted on the stored bytes (0 for other
    /// dtypes).
    pub fn count_nonfinite(&self) -> usize {
        count_nonfinite_bytes(self.bytes, self.dtype)
    }
}

/// Whether a safetensors dtype is a floating-point one.
pub fn is_float_dtype(d: StDtype) -> bool {
    matches!(d, StDtype::F64 | StDtype::F32 | StDtype::F16 | StDtype::BF16)
        || format!("{d:?}").starts_with('F')
}

/// The error for a float tensor in a dtype sdsparse does not read.
pub fn unsupported_dtype(name: &str, d: StDtype) -> String {
    format!("tensor {name} has dtype {d:?}; sdsparse reads f64, f32, f16 and bf16 weights (convert to one of those)")
}

/// NaN / infinite elements in little-endian `bytes` of dtype `d` (exponent bits all set).
pub fn count_nonfinite_bytes(bytes: &[u8], d: StDtype) -> usize {
    match d {
        StDtype::F64 => {
            bytes.chunks_exact(8).filter(|c| (u16::from_le_bytes([c[6], c[7]]) & 0x7ff0) == 0x7ff0).count()
        }
        StDtype::F32 => {
            bytes.chunks_exact(4).filter(|c| (u16::from_le_bytes([c[2], c[3]]) & 0x7f80) == 0x7f80).count()
        }
        StDtype::F16 => bytes.chunks_exact(2).filter(|c| (c[1] & 0x7c) == 0x7c).count(),
        StDtype::BF16 => {
            bytes.chunks_exact(2).filter(|c| (u16::from_le_bytes([c[0], c[1]]) & 0x7f80) == 0x7f80).count()
        }
        _ => 0,
    }
}

/// The error for a tensor holding NaN / infinite values.
pub fn nonfinite_error(where_: &str, name: &str, bad: usize, numel: usize) -> Error {
    Error::Checkpoint(format!(
        "{where_}: tensor {name} holds {bad} NaN/infinite value(s) of {numel}; the checkpoint is broken \
         (e.g. an overflowing half-precision cast) and would generate a black image"
    ))
}

/// Bytes that tensors of a single-file checkpoint borrow from: the file's memory map, or an
/// owned buffer (a decompressed or re-strided PyTorch storage).
pub enum Backing {
    Mmap(Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mmap(m) => m,
            Backing::Owned(v) => v,
        }
    }
    /// Drops a copied-out range's pages from the resident set (maps only; see
    /// [`SafetensorsFile::release`]).
    pub fn release(&self, range: &std::ops::Range<usize>) {
        if let Backing::Mmap(m) = self {
            release_pages(m, range.start, range.len());
        }
    }
}

/// A tensor of a single-file checkpoint under its diffusers name: a byte range of a shared
/// backing (a q/k/v third of a fused `in_proj` is such a range), with the shape the model
/// expects (a VAE attention `[c, c, 1, 1]` conv weight is viewed as the `[c, c]` Linear).
#[derive(Clone)]
pub struct MappedTensor {
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    pub backing: std::sync::Arc<Backing>,
    pub range: std::ops::Range<usize>,
    /// The name in the original file (for messages and `inspect`).
    pub original: String,
}

/// All tensors of one component folder.
pub struct ComponentStore {
    pub dir: PathBuf,
    pub files: Vec<SafetensorsFile>,
    /// stored name → file index
    index: HashMap<String, usize>,
    /// Tensors mapped out of a single-file checkpoint, by diffusers name.
    mapped: HashMap<String, MappedTensor>,
    /// In-memory tensors (tests, synthesised models, dry runs over a manifest).
    memory: HashMap<String, Tensor>,
    /// The sparse-format header when this is a converted (sdsparse) component.
    sparse: Option<SparseHeader>,
}

/// Legacy spellings of the same tensor; the model asks for the current (transformers 5 /
/// diffusers 0.42) name and the store also tries these.
pub fn aliases(name: &str) -> Vec<String> {
    let mut out = vec![format!("text_model.{name}")];
    for (new, old) in
        [(".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."), (".to_out.0.", ".proj_attn.")]
    {
        if name.contains(new) {
            out.push(name.replace(new, old));
        }
    }
    out
}

impl ComponentStore {
    /// Opens the weights of a component folder. Prefers `*.safetensors.index.json` shards,
    /// then a single non-variant `*.safetensors`, then an `*.fp16.safetensors` variant.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Checkpoint(format!("{}: component folder not found", dir.display())));
        }
        let paths = find_weight_files(dir)?;
        let mut files = Vec::new();
        let mut index = HashMap::new();
        let mut sparse: Option<SparseHeader> = None;
        for p in paths {
            let f = SafetensorsFile::open(&p)?;
            let fi = files.len();
            for name in f.metadata.tensors().keys() {
                index.insert(name.clone(), fi);
            }
            let label = p.display().to_string();
            if let Some(h) = SparseHeader::from_metadata(f.metadata.metadata().as_ref(), &label)? {
                match &mut sparse {
                    None => sparse = Some(h),
                    Some(s) => s.layers.extend(h.layers),
                }
            }
            files.push(f);
        }
        if let Some(h) = &sparse {
            for (name, rec) in &h.layers {
                for suffix in rec.pattern.suffixes() {
                    if !index.contains_key(&format!("{name}{suffix}")) {
                        return Err(Error::Format(format!(
                            "{}: sparse tensor {name} has no stored part {name}{suffix}",
                            dir.display()
                        )));
                    }
                }
            }
        }
        Ok(ComponentStore {
            dir: dir.to_path_buf(),
            files,
            index,
            mapped: HashMap::new(),
            memory: HashMap::new(),
            sparse,
        })
    }

    /// A store over in-memory f32 tensors; `label` names it in errors.
    pub fn from_tensors(label: &str, tensors: HashMap<String, Tensor>) -> Self {
        ComponentStore {
            dir: PathBuf::from(label),
            files: Vec::new(),
            index: HashMap::new(),
            mapped: HashMap::new(),
            memory: tensors,
            sparse: None,
        }
    }

    /// A store over tensors mapped out of a single-file checkpoint; `label` names it in
    /// errors (`FILE [unet]`).
    pub fn from_mapped(label: &str, tensors: HashMap<String, MappedTensor>) -> Self {
        ComponentStore {
            dir: PathBuf::from(label),
            files: Vec::new(),
            index: HashMap::new(),
            mapped: tensors,
            memory: HashMap::new(),
            sparse: None,
        }
    }

    /// Whether the tensors come from a single-file checkpoint (already checked against
    /// their config when the file was opened).
    pub fn is_mapped(&self) -> bool {
        !self.mapped.is_empty()
    }

    /// The original single-file name of a mapped tensor.
    pub fn original_name(&self, name: &str) -> Option<&str> {
        self.mapped.get(name).map(|m| m.original.as_str())
    }

    /// Bytes of tensor data held (all files, or all mapped tensors).
    pub fn data_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.metadata.data_len() as u64).sum::<u64>()
            + self.mapped.values().map(|m| m.range.len() as u64).sum::<u64>()
    }

    pub fn describe(&self) -> String {
        self.dir.display().to_string()
    }

    /// The stored name for a requested name (itself or a legacy alias).
    pub fn resolve(&self, name: &str) -> Option<String> {
        let has = |n: &str| {
            self.index.contains_key(n) || self.mapped.contains_key(n) || self.memory.contains_key(n)
        };
        if has(name) {
            return Some(name.to_string());
        }
        aliases(name).into_iter().find(|a| has(a))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.resolve(name).is_some()
    }

    /// Every stored tensor name, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> =
            self.index.keys().chain(self.mapped.keys()).chain(self.memory.keys()).cloned().collect();
        v.sort();
        v
    }

    /// The stored tensor under exactly this name (no aliasing).
    pub fn raw(&self, stored_name: &str) -> Result<RawTensor<'_>> {
        if let Some((key, m)) = self.mapped.get_key_value(stored_name) {
            return Ok(RawTensor {
                name: key.as_str(),
                dtype: m.dtype,
                shape: &m.shape,
                bytes: &m.backing.bytes()[m.range.clone()],
            });
        }
        let (key, fi) = self.index.get_key_value(stored_name).ok_or_else(|| {
            Error::Checkpoint(format!("{}: tensor {stored_name} not found", self.describe()))
        })?;
        let f = &self.files[*fi];
        let info = f.metadata.info(stored_name).ok_or_else(|| {
            Error::Checkpoint(format!("{}: tensor {stored_name} not found", self.describe()))
        })?;
        Ok(RawTensor { name: key.as_str(), dtype: info.dtype, shape: &info.shape, bytes: f.bytes(info) })
    }

    /// The sparse-format header of a converted component (`None` for a dense one).
    pub fn sparse_header(&self) -> Option<&SparseHeader> {
        self.sparse.as_ref()
    }

    /// Tensor names as the model sees them: stored dense names plus compressed tensors'
    /// names without their part suffixes, sorted.
    pub fn logical_names(&self) -> Vec<String> {
        let mut v: Vec<String> = match &self.sparse {
            None => self.names(),
            Some(h) => self
                .names()
                .into_iter()
                .filter(|n| {
                    !crate::format::codec::ALL_SUFFIXES
                        .iter()
                        .any(|s| n.strip_suffix(s).is_some_and(|base| h.layers.contains_key(base)))
                })
                .chain(h.layers.keys().cloned())
                .collect(),
        };
        v.sort();
        v
    }

    /// A tensor (by requested name, aliases tried) widened to f32. A compressed tensor is
    /// decompressed (zeros in place) to its original shape.
    pub fn tensor_f32(&self, name: &str) -> Result<Tensor> {
        self.tensor_stored(name)?.to_dtype(DType::F32)
    }

    /// A tensor (by requested name, aliases tried) in its stored dtype: f32, f16 or bf16 as
    /// the file holds it (f64 is narrowed to f32, as diffusers casts it), so that a loaded
    /// model takes the checkpoint's size in memory. Its pages of the file map are released
    /// once copied. A compressed tensor is decompressed (zeros in place) to its original
    /// shape, in its values' dtype. NaN / infinite values are refused.
    pub fn tensor_stored(&self, name: &str) -> Result<Tensor> {
        let Some(stored) = self.resolve(name) else {
            if let Some((stored, _)) = crate::checkpoint::compressed::compressed_name(self, name) {
                let w = crate::checkpoint::compressed::load_compressed(self, &stored)?;
                let shape = self.sparse.as_ref().map(|h| h.layers[&stored].shape.clone()).unwrap_or_default();
                let values = w.to_dense_host()?;
                self.check_finite_host(&stored, &values)?;
                return Tensor::from_host_data(values, &shape);
            }
            return Err(Error::Checkpoint(format!(
                "{}: tensor {name} not found in the checkpoint",
                self.describe()
            )));
        };
        if let Some(t) = self.memory.get(&stored) {
            return Ok(t.clone());
        }
        let raw = self.raw(&stored)?;
        let bad = raw.count_nonfinite();
        if bad > 0 {
            let numel = raw.shape.iter().product();
            return Err(nonfinite_error(&self.describe(), &stored, bad, numel));
        }
        let values = raw.host_data().map_err(|e| self.located(e))?;
        if raw.dtype == StDtype::F64 {
            // f64 values beyond f32's range become infinite when narrowed.
            self.check_finite_host(&stored, &values)?;
        }
        let t = Tensor::from_host_data(values, raw.shape)?;
        self.release(&stored);
        Ok(t)
    }

    /// Releases a copied-out tensor's pages of its file map (see [`SafetensorsFile::release`]).
    pub(crate) fn release(&self, stored_name: &str) {
        if let Some(m) = self.mapped.get(stored_name) {
            m.backing.release(&m.range);
        } else if let Some(&fi) = self.index.get(stored_name) {
            let f = &self.files[fi];
            if let Some(info) = f.metadata.info(stored_name) {
                f.release(info);
            }
        }
    }

    /// An error from reading one of this store's tensors, prefixed with the folder.
    fn located(&self, e: Error) -> Error {
        match e {
            Error::Checkpoint(m) => Error::Checkpoint(format!("{}: {m}", self.describe())),
            other => other,
        }
    }

    /// Refuses NaN / infinite weights at load (one pass over the stored bytes).
    fn check_finite_host(&self, name: &str, values: &HostData) -> Result<()> {
        let bad = count_nonfinite_bytes(values.as_bytes(), st_dtype_of(values.dtype()));
        if bad > 0 {
            return Err(nonfinite_error(&self.describe(), name, bad, values.len()));
        }
        Ok(())
    }

    /// A Linear weight as stored: dense (in its stored dtype), or compressed in a sparse
    /// checkpoint.
    pub fn weight(&self, name: &str) -> Result<Weight> {
        if self.contains(name) {
            return Ok(Weight::Dense(self.tensor_stored(name)?));
        }
        let w = crate::checkpoint::compressed::load_compressed(self, name)?;
        let values = match &w {
            Weight::Sparse24(s) => Some(&s.values),
            Weight::Bitmap(b) => Some(&b.values),
            Weight::Dense(_) => None,
        };
        if let Some(v) = values {
            self.check_finite_host(name, v)?;
        }
        Ok(w)
    }
}

fn st_dtype_of(d: DType) -> StDtype {
    match d {
        DType::F32 => StDtype::F32,
        DType::F16 => StDtype::F16,
        DType::BF16 => StDtype::BF16,
    }
}

/// The weight files of a component folder, in load order.
pub fn find_weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    let name = |p: &PathBuf| p.file_name().and_then(|s| s.to_str()).unwrap_or("").to_string();
    // Sharded: the index names the files.
    if let Some(idx) =
        entries.iter().find(|p| name(p).ends_with(".safetensors.index.json") && !name(p).contains(".fp16."))
    {
        return shards_from_index(dir, idx);
    }
    let plain: Vec<PathBuf> = entries
        .iter()
        .filter(|p| name(p).ends_with(".safetensors") && !name(p).contains(".fp16."))
        .cloned()
        .collect();
    if !plain.is_empty() {
        return Ok(plain);
    }
    if let Some(idx) = entries.iter().find(|p| name(p).ends_with(".safetensors.index.json")) {
        return shards_from_index(dir, idx);
    }
    let variants: Vec<PathBuf> =
        entries.iter().filter(|p| name(p).ends_with(".safetensors")).cloned().collect();
    if variants.is_empty() {
        return Err(Error::Checkpoint(format!("{}: no *.safetensors weights found", dir.display())));
    }
    Ok(variants)
}

fn shards_from_index(dir: &Path, idx: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(idx).map_err(|e| Error::io(idx, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Checkpoint(format!("{}: invalid JSON ({e})", idx.display())))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Checkpoint(format!("{}: no weight_map", idx.display())))?;
    let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
    files.sort();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}
