//! Diffusers configs from an original LDM inference config (`v2-inference.yaml`,
//! `v2-inference-v.yaml`), derived as diffusers' `create_*_diffusers_config_from_ldm` do.

use super::single_file::Sd2Variant;
use super::store::MappedTensor;
use crate::error::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The config files (`unet/config.json`, ...) an LDM yaml implies.
pub fn configs_from_yaml(
    path: &Path,
    _variant: Sd2Variant,
    _tensors: &HashMap<String, MappedTensor>,
) -> Result<BTreeMap<String, String>> {
    Err(Error::Invalid(format!(
        "--config {}: original .yaml configs are not supported yet; give a diffusers folder's configs",
        path.display()
    )))
}
