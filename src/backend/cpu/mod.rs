//! The CPU backend: the reference implementation of every op in `backend::ops`, fast enough
//! to run SD2 (GEMM through the `gemm` crate, parallel loops through rayon).
//!
//! Functions here take plain slices plus dimensions that `ops` has already validated, and
//! return freshly allocated row-major outputs. One file per op family.

pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod embed;
pub mod gemm;
pub mod layout;
pub mod norm;
pub mod simd;
pub mod sparse;

/// Elementwise loops over fewer elements than this stay on the calling thread: handing work
/// to rayon costs a few microseconds, more than the loop itself.
pub(crate) const PAR_MIN_ELEMS: usize = 1 << 15;

/// Chunk length for parallel elementwise loops (large enough to amortise scheduling, small
/// enough to balance two to a few dozen cores).
pub(crate) const PAR_CHUNK: usize = 1 << 14;
