//! sdsparse: pruned Stable Diffusion 2 made real.
//!
//! Data flows one way: checkpoint → prune → sparse format → device weights → model →
//! pipeline → image. Each module below owns one step of that flow; see
//! `docs/ARCHITECTURE.md` for who may touch what.

pub mod backend;
pub mod calibrate;
pub mod checkpoint;
pub mod convert;
pub mod error;
pub mod format;
pub mod model;
pub mod output;
pub mod pipeline;
pub mod plan;
pub mod prune;
pub mod prune_model;
pub mod quality;
pub mod scheduler;
pub mod sweep;
pub mod synth;
pub mod toy;

pub use backend::{Device, Tensor};
pub use error::{Error, Result};
pub use format::{BitmapWeight, DType, HostData, Sparse24Weight, Weight};
