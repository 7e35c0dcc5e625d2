//! The SD2 models, one file per component, weights loaded by their diffusers names.
//! Models know shapes and names, never kernels: they call `backend::ops`.

pub mod attention;
pub mod clip_text;
pub mod config;
pub mod linear;
pub mod tokenizer;
pub mod unet;
pub mod unet_blocks;
pub mod vae;
