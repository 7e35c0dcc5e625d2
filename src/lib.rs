//! sdsparse: pruned Stable Diffusion 2 made real, as a library.
//!
//! Data flows one way: checkpoint → prune → sparse format → device weights → model →
//! pipeline → image (`docs/ARCHITECTURE.md`). The stable API is the handful of items
//! re-exported here at the crate root (`docs/API.md` says what is stable and what is not);
//! the C ABI over it is `include/sdsparse.h`.
//!
//! - **Generate**: [`StableDiffusion::load`] a diffusers SD2 folder (dense, or converted by
//!   [`convert()`]), then [`StableDiffusion::generate`] a [`GenerateRequest`] into a
//!   [`Generated`]: the image, the final latents and per-stage [`Timings`].
//! - **Convert**: [`convert()`] prunes a dense checkpoint into a sparse one with
//!   [`ConvertOptions`] (its `Default` is the study's recipe) and returns a [`ConvertReport`].
//! - **Kernels only**: [`SparseLinear`] multiplies activations by a pruned weight
//!   ([`Sparse24Weight`], [`BitmapWeight`]) on the CPU or on CUDA.
//!
//! ```no_run
//! use sdsparse::{Device, GenerateRequest, StableDiffusion};
//! use std::path::Path;
//!
//! let sd = StableDiffusion::load(Path::new("sd21-base-sparse"), &Device::Cpu)?;
//! let mut req = GenerateRequest::new("a photograph of an astronaut riding a horse");
//! req.steps = 25;
//! req.seed = 42;
//! let out = sd.generate(&req, &mut |done, total| eprintln!("UNet call {done}/{total}"))?;
//! let rgb = out.to_rgb8()?; // 3 * width * height bytes, RGB interleaved
//! println!(
//!     "{}x{}, final latents {:?}, text encoder {:?}",
//!     rgb.width,
//!     rgb.height,
//!     out.latents.shape(),
//!     out.timings.text_encoder
//! );
//! # Ok::<(), sdsparse::Error>(())
//! ```
//!
//! ```no_run
//! use sdsparse::{convert, ConvertOptions, Pattern};
//! use std::path::Path;
//!
//! // The study's targets (text encoder 47.5%, UNet 35%, unstructured), but the UNet 2:4.
//! let opts = ConvertOptions { unet_pattern: Some(Pattern::Sparse24), ..ConvertOptions::default() };
//! let report =
//!     convert(Path::new("stable-diffusion-2-1-base"), Path::new("sd21-base-sparse"), &opts, &mut |_| {})?;
//! for c in &report.components {
//!     println!("{}: {:.1}% sparse", c.name, 100.0 * c.achieved_sparsity());
//! }
//! # Ok::<(), sdsparse::Error>(())
//! ```
//!
//! The modules below are public for the `sdsparse` command line, the tests and the benches;
//! they are hidden from the documentation and carry no stability promise.

#[doc(hidden)]
pub mod backend;
#[doc(hidden)]
pub mod calibrate;
#[doc(hidden)]
pub mod checkpoint;
#[doc(hidden)]
pub mod convert;
#[doc(hidden)]
pub mod error;
#[doc(hidden)]
pub mod format;
#[doc(hidden)]
pub mod model;
#[doc(hidden)]
pub mod output;
#[doc(hidden)]
pub mod pipeline;
#[doc(hidden)]
pub mod plan;
#[doc(hidden)]
pub mod prune;
#[doc(hidden)]
pub mod prune_model;
#[doc(hidden)]
pub mod quality;
#[doc(hidden)]
pub mod scheduler;
#[doc(hidden)]
pub mod sweep;
#[doc(hidden)]
pub mod synth;
#[doc(hidden)]
pub mod toy;
#[doc(hidden)]
pub mod tune;

mod capi;
mod sparse_linear;

// The stable API (docs/API.md).
pub use backend::cuda::CudaDevice;
pub use backend::{Device, Tensor};
pub use checkpoint::SingleFileOptions;
pub use convert::{
    convert, ComponentPlan, ComponentReport, ConvertOptions, ConvertReport, LayerReport, Progress,
};
pub use error::{Error, Result};
pub use format::{BitmapWeight, DType, HostData, Sparse24Weight, Weight};
pub use pipeline::{GenerateRequest, Generated, RgbImage, StableDiffusion, Timings, WeightMemory};
pub use prune::{Glob, Method, Pattern, Scope, Selection};
pub use scheduler::SchedulerKind;
pub use sparse_linear::{plan_epilogue, EpiloguePlan, LinearAct, SparseLinear};
