//! The CPU backend: the reference implementation of every op in `backend::ops`, fast enough
//! to run SD2 (GEMM through the `gemm` crate, parallel loops through rayon).
