//! The kernel fatbin that build.rs compiled from `cuda/*.cu` and embedded, if nvcc was found.

/// The error every CUDA entry point returns in a CPU-only build.
pub const NO_KERNELS: &str = "sdsparse was built without CUDA kernels (nvcc was not found at build time); \
     run tools/install_cuda.sh or set NVCC, then rebuild";

#[cfg(sdsparse_cuda_kernels)]
static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/sdsparse.fatbin"));

/// Whether this build carries the CUDA kernels.
pub const fn available() -> bool {
    cfg!(sdsparse_cuda_kernels)
}

/// The embedded fatbin (SASS for sm_80/86/89/90a, PTX for compute_80), if any.
#[cfg(sdsparse_cuda_kernels)]
pub fn fatbin() -> Option<&'static [u8]> {
    Some(FATBIN)
}

/// The embedded fatbin: none in a CPU-only build.
#[cfg(not(sdsparse_cuda_kernels))]
pub fn fatbin() -> Option<&'static [u8]> {
    None
}

/// The nvcc release the kernels were compiled with, e.g. "13.0.88" ("none" in a CPU-only build).
pub fn nvcc_version() -> &'static str {
    option_env!("SDSPARSE_NVCC_VERSION").unwrap_or("none")
}
