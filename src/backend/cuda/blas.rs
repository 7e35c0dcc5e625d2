//! Dense GEMMs through cuBLAS in the row-major terms of the rest of the crate: Linear layers,
//! batched matmul, the attention fallback's `Q·Kᵀ` and `P·V`, and convolutions after im2col.
//!
//! cuBLAS is column-major; a row-major `C[m, n] = A[m, k] · op(B)` is the column-major
//! `Cᵀ[n, m] = op(B)ᵀ · Aᵀ`, so every call passes B first. [`plan_gemm`] does that mapping and
//! checks, without a GPU, that every dimension fits cuBLAS's `int` and that each buffer holds
//! what the batched call reads and writes (unit-tested below). f32 SGEMM with cuBLAS's default
//! math mode: full f32 (no TF32), so the f32 pipeline can be compared with the CPU to 1e-4.

use super::decompress::DeviceValues;
use super::device::CudaDevice;
use crate::error::{Error, Result};
use crate::format::DType;
use cudarc::cublas::sys::cublasOperation_t;

/// One (batched) row-major product `C[b] = alpha · A[b] · op(B[b])`, `A[b]` `[m, k]` at
/// `a_offset + b · stride_a`, `B[b]` `[k, n]` (or `[n, k]` when `b_transposed`) at
/// `b_offset + b · stride_b` (a stride of 0 shares one matrix, e.g. a weight), `C[b]` `[m, n]`
/// packed at `b · m · n`. Offsets and strides count elements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gemm {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub b_transposed: bool,
    pub alpha: f32,
    pub a_offset: usize,
    pub stride_a: usize,
    pub b_offset: usize,
    pub stride_b: usize,
}

impl Gemm {
    /// A single product `A[m, k] · op(B)` of packed operands.
    pub fn new(m: usize, n: usize, k: usize, b_transposed: bool) -> Gemm {
        Gemm {
            batch: 1,
            m,
            n,
            k,
            b_transposed,
            alpha: 1.0,
            a_offset: 0,
            stride_a: m * k,
            b_offset: 0,
            stride_b: k * n,
        }
    }
    /// `batch` products of packed `[m, k]` and `[k, n]` (`[n, k]`) operands.
    pub fn batched(batch: usize, m: usize, n: usize, k: usize, b_transposed: bool) -> Gemm {
        Gemm { batch, ..Gemm::new(m, n, k, b_transposed) }
    }
}

/// The cuBLAS column-major call for a [`Gemm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmPlan {
    pub transa: bool,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub lda: i32,
    pub ldb: i32,
    pub ldc: i32,
    pub stride_a: i64,
    pub stride_b: i64,
    pub stride_c: i64,
    pub batch: i32,
}

fn fits(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| Error::Invalid(format!("gemm: {what} = {v} is too large for cuBLAS (limit 2^31 - 1)")))
}

/// Elements a batched operand spans: `offset + (batch - 1) · stride + len`.
fn extent(batch: usize, offset: usize, stride: usize, len: usize) -> Option<usize> {
    (batch - 1).checked_mul(stride)?.checked_add(len)?.checked_add(offset)
}

/// Maps `g` to cuBLAS and checks it against the operand lengths `a_len`, `b_len`, `c_len`.
pub fn plan_gemm(g: &Gemm, a_len: usize, b_len: usize, c_len: usize) -> Result<GemmPlan> {
    if g.batch == 0 || g.m == 0 || g.n == 0 || g.k == 0 {
        return Err(Error::Invalid(format!("gemm: empty product {g:?}")));
    }
    if !g.alpha.is_finite() {
        return Err(Error::Invalid(format!("gemm: alpha {} is not finite", g.alpha)));
    }
    let overflow = || Error::Invalid(format!("gemm: {g:?} overflows"));
    let need_a =
        g.m.checked_mul(g.k).and_then(|l| extent(g.batch, g.a_offset, g.stride_a, l)).ok_or_else(overflow)?;
    let need_b =
        g.k.checked_mul(g.n).and_then(|l| extent(g.batch, g.b_offset, g.stride_b, l)).ok_or_else(overflow)?;
    let need_c = g.m.checked_mul(g.n).and_then(|l| l.checked_mul(g.batch)).ok_or_else(overflow)?;
    for (name, need, have) in [("A", need_a, a_len), ("B", need_b, b_len), ("C", need_c, c_len)] {
        if have < need {
            return Err(Error::Shape(format!(
                "gemm: operand {name} holds {have} elements, the product needs {need}"
            )));
        }
    }
    let c_stride = g.m * g.n;
    // Row-major C = A · op(B) is column-major Cᵀ = op(B)ᵀ · Aᵀ: cuBLAS's A is our B.
    Ok(GemmPlan {
        transa: g.b_transposed,
        m: fits("n", g.n)?,
        n: fits("m", g.m)?,
        k: fits("k", g.k)?,
        lda: fits("lda", if g.b_transposed { g.k } else { g.n })?,
        ldb: fits("k", g.k)?,
        ldc: fits("n", g.n)?,
        stride_a: g.stride_b as i64,
        stride_b: g.stride_a as i64,
        stride_c: c_stride as i64,
        batch: fits("batch", g.batch)?,
    })
}

/// Runs `g` on f32 device buffers: `c = alpha · a · op(b)` (`c` is overwritten).
pub fn sgemm(
    device: &CudaDevice,
    g: &Gemm,
    a: &DeviceValues,
    b: &DeviceValues,
    c: &mut DeviceValues,
) -> Result<()> {
    let (DeviceValues::F32(a), DeviceValues::F32(b), DeviceValues::F32(c)) = (a, b, c) else {
        return Err(Error::Invalid("gemm: the cuBLAS path takes f32 operands".into()));
    };
    let p = plan_gemm(g, a.len(), b.len(), c.len())?;
    let blas = device.blas()?;
    // cuBLAS works in the calling thread's current context (cudarc binds it for its own calls).
    device.context().bind_to_thread().map_err(super::device::driver_err("cannot bind the CUDA context"))?;
    let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
    let a_ptr = device.device_ptr(a) + (g.a_offset * 4) as u64;
    let b_ptr = device.device_ptr(b) + (g.b_offset * 4) as u64;
    let c_ptr = device.device_ptr_mut(c);
    let beta = 0.0f32;
    // SAFETY: plan_gemm checked that each buffer holds every element the batched product reads
    // (A, B from their offsets) or writes (C); the handle is bound to the device's stream, which
    // orders this call after the kernels that produced A and B.
    unsafe {
        cudarc::cublas::result::sgemm_strided_batched(
            *blas.handle(),
            op(p.transa),
            cublasOperation_t::CUBLAS_OP_N,
            p.m,
            p.n,
            p.k,
            &g.alpha,
            b_ptr as *const f32,
            p.lda,
            p.stride_a,
            a_ptr as *const f32,
            p.ldb,
            p.stride_b,
            &beta,
            c_ptr as *mut f32,
            p.ldc,
            p.stride_c,
            p.batch,
        )
    }
    .map_err(|e| Error::Cuda(format!("cuBLAS SGEMM {g:?} failed: {e}")))
}

/// The operand types of a mixed-precision product ([`gemm_ex`]): `A` and `B` share one storage
/// type (f16, bf16 or f32), `C` is that type or f32 (the attention scores), accumulation is
/// always f32 (`CUBLAS_COMPUTE_32F`, no reduced-precision reductions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmTypes {
    pub ab: DType,
    pub c: DType,
}

/// Checks the dtypes of `A`, `B`, `C` for [`gemm_ex`] on the host: `A` and `B` must match, `C`
/// must be their type or f32. A mismatch is a one-line error naming the three.
pub fn plan_gemm_types(a: DType, b: DType, c: DType) -> Result<GemmTypes> {
    if a != b || (c != a && c != DType::F32) {
        return Err(Error::Invalid(format!(
            "gemm: operands A {}, B {}, C {}: A and B must share a dtype and C must be that dtype or f32",
            a.name(),
            b.name(),
            c.name()
        )));
    }
    Ok(GemmTypes { ab: a, c })
}

fn cuda_type(d: DType) -> cudarc::cublas::sys::cudaDataType {
    use cudarc::cublas::sys::cudaDataType::*;
    match d {
        DType::F16 => CUDA_R_16F,
        DType::BF16 => CUDA_R_16BF,
        DType::F32 => CUDA_R_32F,
    }
}

/// Runs `g` through `cublasGemmStridedBatchedEx`: f16 / bf16 (or f32) `a`, `b`, `c` in their
/// storage type or f32 ([`plan_gemm_types`]), f32 accumulation and f32 `alpha` / `beta`
/// (`CUBLAS_COMPUTE_32F`; tensor cores for f16 / bf16 inputs). The same row-major mapping and
/// extent checks as [`sgemm`] ([`plan_gemm`]).
pub fn gemm_ex(
    device: &CudaDevice,
    g: &Gemm,
    a: &DeviceValues,
    b: &DeviceValues,
    c: &mut DeviceValues,
) -> Result<()> {
    let t = plan_gemm_types(a.dtype(), b.dtype(), c.dtype())?;
    let p = plan_gemm(g, a.len(), b.len(), c.len())?;
    let blas = device.blas()?;
    device.context().bind_to_thread().map_err(super::device::driver_err("cannot bind the CUDA context"))?;
    let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
    let size = t.ab.size_in_bytes();
    let a_ptr = a.device_ptr(device) + (g.a_offset * size) as u64;
    let b_ptr = b.device_ptr(device) + (g.b_offset * size) as u64;
    let c_ptr = c.device_ptr(device);
    let beta = 0.0f32;
    // SAFETY: as in `sgemm` (extents checked by plan_gemm, the handle on the device's stream);
    // the data types passed match the buffers' (checked by plan_gemm_types), and alpha / beta
    // are f32 as CUBLAS_COMPUTE_32F requires.
    unsafe {
        cudarc::cublas::result::gemm_strided_batched_ex(
            *blas.handle(),
            op(p.transa),
            cublasOperation_t::CUBLAS_OP_N,
            p.m,
            p.n,
            p.k,
            (&g.alpha) as *const f32 as *const std::ffi::c_void,
            b_ptr as *const std::ffi::c_void,
            cuda_type(t.ab),
            p.lda,
            p.stride_a,
            a_ptr as *const std::ffi::c_void,
            cuda_type(t.ab),
            p.ldb,
            p.stride_b,
            (&beta) as *const f32 as *const std::ffi::c_void,
            c_ptr as *mut std::ffi::c_void,
            cuda_type(t.c),
            p.ldc,
            p.stride_c,
            p.batch,
            cudarc::cublas::sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cudarc::cublas::sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
        )
    }
    .map_err(|e| Error::Cuda(format!("cuBLAS GemmEx ({} -> {}) {g:?} failed: {e}", t.ab.name(), t.c.name())))
}

/// The dense GEMM for any activation dtype: [`sgemm`] when every operand is f32 (exact f32, the
/// f32 pipeline's 1e-4 agreement), else [`gemm_ex`].
pub fn gemm(
    device: &CudaDevice,
    g: &Gemm,
    a: &DeviceValues,
    b: &DeviceValues,
    c: &mut DeviceValues,
) -> Result<()> {
    if (a.dtype(), b.dtype(), c.dtype()) == (DType::F32, DType::F32, DType::F32) {
        sgemm(device, g, a, b, c)
    } else {
        gemm_ex(device, g, a, b, c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu;
    use crate::backend::test_util::{check_close, TestRng};
    use crate::backend::Device;
    use crate::test_device;

    /// The row-major reference of a [`Gemm`] (the CPU twin: `cpu::gemm::matmul` per batch).
    fn reference(g: &Gemm, a: &[f32], b: &[f32]) -> Vec<f32> {
        (0..g.batch)
            .flat_map(|i| {
                let a0 = g.a_offset + i * g.stride_a;
                let b0 = g.b_offset + i * g.stride_b;
                let a = &a[a0..a0 + g.m * g.k];
                let b = &b[b0..b0 + g.k * g.n];
                let b =
                    if g.b_transposed { cpu::layout::permute(b, &[g.n, g.k], &[1, 0]) } else { b.to_vec() };
                cpu::gemm::matmul(a, &b, 1, g.m, g.k, g.n)
                    .into_iter()
                    .map(|v| v * g.alpha)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn sgemm_matches_cpu(device: &Device) -> Result<()> {
        let mut rng = TestRng::fresh("sgemm");
        let cases = [
            // Linear: x[154, 64] · W[96, 64]ᵀ; a weight shared across a batch (conv: stride 0).
            Gemm::new(154, 96, 64, true),
            Gemm { stride_a: 0, ..Gemm::batched(3, 32, 81, 36, false) },
            // Attention: Q·Kᵀ with alpha = scale over 10 heads, P·V.
            Gemm { alpha: 0.125, ..Gemm::batched(10, 77, 77, 64, true) },
            Gemm::batched(10, 77, 64, 77, false),
            // Odd sizes, offsets.
            Gemm { a_offset: 5, b_offset: 3, ..Gemm::new(7, 13, 11, false) },
        ];
        for g in cases {
            let a = rng.vec(g.a_offset + (g.batch - 1) * g.stride_a + g.m * g.k);
            let b = rng.vec(g.b_offset + (g.batch - 1) * g.stride_b + g.k * g.n);
            let expected = reference(&g, &a, &b);
            let got = match device {
                Device::Cpu => expected.clone(),
                Device::Cuda(dev) => {
                    let mut c = DeviceValues::poisoned(dev, crate::format::DType::F32, expected.len())?;
                    sgemm(
                        dev,
                        &g,
                        &DeviceValues::F32(dev.htod(&a)?),
                        &DeviceValues::F32(dev.htod(&b)?),
                        &mut c,
                    )?;
                    c.to_host(dev)?.to_f32()
                }
            };
            // f32 both sides: far tighter than the f16 kernels' bound.
            check_close(&got, &expected, 1e-5, 1e-4).map_err(|e| Error::Invalid(format!("{g:?}: {e}")))?;
        }
        Ok(())
    }
    test_device!(sgemm_matches_cpu);

    /// `cublasGemmStridedBatchedEx` with f16 / bf16 operands (f32 accumulation) against the CPU
    /// twin on the dtype-rounded inputs: C in the operand dtype (Linear, conv, `P·V`) and in f32
    /// (the attention scores). The bound is the output rounding of the dtype (f16 2^-11, bf16
    /// 2^-8) plus accumulation order; C in f32 is held to 1e-4.
    fn gemm_ex_matches_cpu(device: &Device) -> Result<()> {
        use crate::backend::cuda::pointwise::test_support::{download, output, rounded, upload};
        let mut rng = TestRng::fresh("gemm_ex");
        let cases = [
            Gemm::new(154, 96, 64, true),
            Gemm { stride_a: 0, ..Gemm::batched(3, 32, 81, 36, false) },
            Gemm { alpha: 0.125, ..Gemm::batched(10, 77, 77, 64, true) },
            Gemm { a_offset: 5, b_offset: 3, ..Gemm::new(7, 13, 11, false) },
        ];
        for dtype in [DType::F16, DType::BF16] {
            for c_dtype in [dtype, DType::F32] {
                for g in cases {
                    let a = rounded(&rng.vec(g.a_offset + (g.batch - 1) * g.stride_a + g.m * g.k), dtype);
                    let b = rounded(&rng.vec(g.b_offset + (g.batch - 1) * g.stride_b + g.k * g.n), dtype);
                    let expected = rounded(&reference(&g, &a, &b), c_dtype);
                    let got = match device {
                        Device::Cpu => expected.clone(),
                        Device::Cuda(dev) => {
                            let mut c = output(dev, c_dtype, expected.len())?;
                            gemm(dev, &g, &upload(dev, &a, dtype)?, &upload(dev, &b, dtype)?, &mut c)?;
                            download(dev, &c)?
                        }
                    };
                    let (norm, elem) = match c_dtype {
                        DType::F32 => (1e-5, 1e-4),
                        DType::F16 => (2e-3, 1e-2),
                        DType::BF16 => (1e-2, 4e-2),
                    };
                    check_close(&got, &expected, norm, elem).map_err(|e| {
                        Error::Invalid(format!("{} -> {} {g:?}: {e}", dtype.name(), c_dtype.name()))
                    })?;
                }
            }
        }
        Ok(())
    }
    test_device!(gemm_ex_matches_cpu);

    #[test]
    fn gemm_types_are_checked_on_the_host() {
        use DType::*;
        for (a, b, c, ok) in [
            (F16, F16, F16, true),
            (F16, F16, F32, true),
            (BF16, BF16, BF16, true),
            (BF16, BF16, F32, true),
            (F32, F32, F32, true),
            (F16, BF16, F16, false),
            (F16, F32, F32, false),
            (F32, F32, F16, false),
            (F16, F16, BF16, false),
            (BF16, BF16, F16, false),
        ] {
            let got = plan_gemm_types(a, b, c);
            assert_eq!(got.is_ok(), ok, "{a:?} {b:?} {c:?}: {got:?}");
            if let Err(e) = got {
                let msg = e.to_string();
                assert!(msg.contains("must share a dtype") && !msg.contains('\n'), "{msg}");
            }
        }
    }

    #[test]
    fn plans_map_row_major_to_cublas() {
        // Linear: y[m, n] = x[m, k] · W[n, k]ᵀ → cuBLAS m = n, n = m, W transposed, lda = k.
        let p = plan_gemm(&Gemm::new(154, 96, 64, true), 154 * 64, 96 * 64, 154 * 96).unwrap();
        assert_eq!((p.transa, p.m, p.n, p.k, p.lda, p.ldb, p.ldc), (true, 96, 154, 64, 64, 64, 96));
        // matmul: B [k, n] row-major is column-major n x k with lda = n.
        let p = plan_gemm(&Gemm::batched(4, 8, 16, 32, false), 4 * 256, 4 * 512, 4 * 128).unwrap();
        assert_eq!(
            (p.transa, p.lda, p.stride_a, p.stride_b, p.stride_c, p.batch),
            (false, 16, 512, 256, 128, 4)
        );
        // Too-short operands, offsets past the end, empty and huge products.
        assert!(plan_gemm(&Gemm::new(2, 3, 4, false), 7, 12, 6).is_err());
        assert!(plan_gemm(&Gemm::new(2, 3, 4, false), 8, 12, 5).is_err());
        assert!(plan_gemm(&Gemm { b_offset: 1, ..Gemm::new(2, 3, 4, false) }, 8, 12, 6).is_err());
        assert!(plan_gemm(&Gemm { stride_a: 0, ..Gemm::batched(5, 2, 3, 4, false) }, 8, 60, 30).is_ok());
        assert!(plan_gemm(&Gemm::new(0, 3, 4, false), 8, 12, 6).is_err());
        assert!(plan_gemm(&Gemm { alpha: f32::NAN, ..Gemm::new(2, 3, 4, false) }, 8, 12, 6).is_err());
        let big = usize::MAX / 2;
        assert!(plan_gemm(&Gemm::new(1 << 31, 1, 1, false), big, big, big).is_err());
        assert!(plan_gemm(&Gemm::new(1 << 40, 1 << 40, 1, false), big, big, big).is_err());
    }
}
