//! Launchers of `cuda/tensor.cu` (affine map, dtype casts, strided copies for permute /
//! transpose / narrow, embedding gather, the f32 softmax with scale and causal mask, im2col) and
//! of the broadcast `sub` / `mul` / `div` kernels of `cuda/pointwise.cu`.
//!
//! Same conventions as `pointwise.rs`: operands are [`DeviceValues`]; each launcher first builds
//! a [`Launch`] with a `plan_*` function that needs no GPU and checks shapes, dtypes, buffer
//! sizes and the 2^31-element limit of the kernels' 32-bit indexing (unit-tested here); the
//! `test_device!` tests compare every kernel with its CPU twin on fresh random inputs
//! (`check_close`, and exact equality for the copies).

use super::decompress::{kernel_type, DeviceValues};
use super::device::CudaDevice;
use super::params::{
    AffineParams, EltwiseParams, EmbeddingParams, Im2colParams, SoftmaxParams, StridedCopyParams,
    STRIDED_MAX_RANK,
};
use super::pointwise::{
    broadcast_run, check_operand, elements, grid_1d, kernel_name, run, to_i32, Launch, Operand, THREADS,
};
use crate::error::{Error, Result};
use crate::format::DType;
use cudarc::driver::{CudaSlice, LaunchConfig};

/// The broadcast binary kernels (`b` broadcast to `a`, see [`broadcast_run`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binary {
    Add,
    Sub,
    Mul,
    Div,
}

impl Binary {
    pub fn name(self) -> &'static str {
        match self {
            Binary::Add => "add",
            Binary::Sub => "sub",
            Binary::Mul => "mul",
            Binary::Div => "div",
        }
    }
    /// The operation, as the CPU twin computes it.
    pub fn apply(self, a: f32, b: f32) -> f32 {
        match self {
            Binary::Add => a + b,
            Binary::Sub => a - b,
            Binary::Mul => a * b,
            Binary::Div => a / b,
        }
    }
}

/// `y = a (op) b` with `b` broadcast to `a_shape`.
pub fn plan_binary(
    op: Binary,
    a_shape: &[usize],
    b_shape: &[usize],
    a: Operand,
    b: Operand,
    y: Operand,
) -> Result<Launch<EltwiseParams>> {
    let what = op.name();
    let n = elements(what, "a", a_shape)?;
    let (b_div, b_len) = broadcast_run(a_shape, b_shape)?;
    check_operand(what, "a", a, a.dtype, n as usize)?;
    check_operand(what, "b", b, a.dtype, b_len)?;
    check_operand(what, "output", y, a.dtype, n as usize)?;
    Ok(Launch {
        kernel: kernel_name(&format!("eltwise_{what}"), a.dtype),
        cfg: grid_1d(n),
        params: EltwiseParams {
            n,
            b_div: to_i32(what, "b_div", b_div)?,
            b_len: to_i32(what, "b_len", b_len)?,
            ..Default::default()
        },
    })
}

/// `y[..n] = x[..n] * mul + add`.
pub fn plan_affine(n: usize, mul: f32, add: f32, x: Operand, y: Operand) -> Result<Launch<AffineParams>> {
    let op = "affine";
    let n32 = elements(op, "input", &[n])?;
    if !(mul.is_finite() && add.is_finite()) {
        return Err(Error::Invalid(format!("{op}: x * {mul} + {add} is not finite")));
    }
    check_operand(op, "input", x, x.dtype, n)?;
    check_operand(op, "output", y, x.dtype, n)?;
    Ok(Launch {
        kernel: kernel_name(op, x.dtype),
        cfg: grid_1d(n32),
        params: AffineParams { n: n32, mul, add, ..Default::default() },
    })
}

/// `y[..n] = x[..n]` converted from `x`'s dtype to `y`'s (f32 to and from f16 / bf16).
pub fn plan_cast(n: usize, x: Operand, y: Operand) -> Result<Launch<AffineParams>> {
    let op = "cast";
    let n32 = elements(op, "input", &[n])?;
    let supported = matches!(
        (x.dtype, y.dtype),
        (DType::F32, DType::F16)
            | (DType::F16, DType::F32)
            | (DType::F32, DType::BF16)
            | (DType::BF16, DType::F32)
    );
    if !supported {
        return Err(Error::Invalid(format!(
            "{op}: no GPU kernel converts {} to {}",
            x.dtype.name(),
            y.dtype.name()
        )));
    }
    check_operand(op, "input", x, x.dtype, n)?;
    check_operand(op, "output", y, y.dtype, n)?;
    Ok(Launch {
        kernel: format!("sdsparse_cast_{}_{}", kernel_type(x.dtype), kernel_type(y.dtype)),
        cfg: grid_1d(n32),
        params: AffineParams { n: n32, mul: 1.0, add: 0.0, ..Default::default() },
    })
}

/// A strided view of a row-major tensor: output dims, the source stride of each, and the
/// source offset of element 0. What [`plan_strided_copy`] gathers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StridedView {
    pub dims: Vec<usize>,
    pub strides: Vec<usize>,
    pub offset: usize,
}

impl StridedView {
    /// `x[shape]` permuted (`perm[i]` = source axis of output axis `i`), with size-1 axes
    /// dropped and output axes that stay adjacent in the source merged (so SD2's rank-4
    /// permutes become rank <= 3 gathers).
    pub fn permute(shape: &[usize], perm: &[usize]) -> StridedView {
        let mut src_strides = vec![1usize; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            src_strides[d] = src_strides[d + 1] * shape[d + 1];
        }
        let mut dims: Vec<usize> = Vec::new();
        let mut strides: Vec<usize> = Vec::new();
        for &p in perm.iter().filter(|&&p| shape[p] != 1) {
            match (dims.last_mut(), strides.last_mut()) {
                // The previous output axis steps exactly over this one: merge them.
                (Some(d), Some(s)) if *s == src_strides[p] * shape[p] => {
                    *d *= shape[p];
                    *s = src_strides[p];
                }
                _ => {
                    dims.push(shape[p]);
                    strides.push(src_strides[p]);
                }
            }
        }
        if dims.is_empty() {
            dims.push(1);
            strides.push(1);
        }
        StridedView { dims, strides, offset: 0 }
    }

    /// `x[outer, size, inner]` narrowed to `start..start + len` of the middle axis.
    pub fn narrow(outer: usize, size: usize, inner: usize, start: usize, len: usize) -> StridedView {
        StridedView {
            dims: vec![outer, len, inner],
            strides: vec![size * inner, inner, 1],
            offset: start * inner,
        }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.dims.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Gathers the strided view `v` of `x` into the row-major `y`.
pub fn plan_strided_copy(v: &StridedView, x: Operand, y: Operand) -> Result<Launch<StridedCopyParams>> {
    let op = "strided_copy";
    let rank = v.dims.len();
    if rank == 0 || rank > STRIDED_MAX_RANK || v.strides.len() != rank {
        return Err(Error::Invalid(format!(
            "{op}: {rank} dims ({} strides); the kernel takes 1..={STRIDED_MAX_RANK}",
            v.strides.len()
        )));
    }
    let n = elements(op, "output", &v.dims)?;
    // The largest source index read: offset + sum (dim - 1) * stride.
    let last = v
        .dims
        .iter()
        .zip(&v.strides)
        .try_fold(v.offset, |acc, (&d, &s)| (d - 1).checked_mul(s).and_then(|t| acc.checked_add(t)))
        .ok_or_else(|| Error::Invalid(format!("{op}: {v:?} overflows")))?;
    to_i32(op, "largest source index", last)?;
    check_operand(op, "input", x, x.dtype, last + 1)?;
    check_operand(op, "output", y, x.dtype, n as usize)?;
    let mut params = StridedCopyParams {
        n,
        rank: rank as i32,
        offset: to_i32(op, "offset", v.offset)?,
        ..Default::default()
    };
    for (d, (&dim, &stride)) in v.dims.iter().zip(&v.strides).enumerate() {
        params.dims[d] = to_i32(op, "dim", dim)?;
        params.strides[d] = to_i32(op, "stride", stride)?;
    }
    Ok(Launch { kernel: kernel_name(op, x.dtype), cfg: grid_1d(n), params })
}

/// Rows `ids` (`count` of them, already checked `< vocab` by the caller and again here when
/// given) of `table[vocab, dim]` → `y[count, dim]`.
pub fn plan_embedding(
    count: usize,
    dim: usize,
    vocab: usize,
    ids: &[u32],
    table: Operand,
    y: Operand,
) -> Result<Launch<EmbeddingParams>> {
    let op = "embedding";
    let n = elements(op, "output", &[count, dim])?;
    let table_len = elements(op, "table", &[vocab, dim])?;
    if ids.len() != count {
        return Err(Error::Shape(format!("{op}: {} ids for {count} rows", ids.len())));
    }
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(Error::Invalid(format!("{op}: id {bad} outside a table of {vocab} rows")));
    }
    check_operand(op, "table", table, table.dtype, table_len as usize)?;
    check_operand(op, "output", y, table.dtype, n as usize)?;
    Ok(Launch {
        kernel: kernel_name(op, table.dtype),
        cfg: grid_1d(n),
        params: EmbeddingParams {
            count: to_i32(op, "count", count)?,
            dim: to_i32(op, "dim", dim)?,
            vocab: table_len / to_i32(op, "dim", dim)?,
            ..Default::default()
        },
    })
}

/// Softmax of `x[rows, cols] * scale` over the last dim; `causal_q_len = Some(q)` masks as
/// `cpu::attention::softmax_scaled` (its CPU twin). One CTA per row. `y` is in `x`'s dtype, or
/// in f16 / bf16 from f32 scores (`sdsparse_softmax_f32_<dtype>`: the attention scores path
/// writes P in the activation dtype directly).
pub fn plan_softmax(
    rows: usize,
    cols: usize,
    scale: f32,
    causal_q_len: Option<usize>,
    x: Operand,
    y: Operand,
) -> Result<Launch<SoftmaxParams>> {
    let op = "softmax";
    let n = elements(op, "input", &[rows, cols])?;
    if !scale.is_finite() {
        return Err(Error::Invalid(format!("{op}: scale {scale} is not finite")));
    }
    if causal_q_len == Some(0) {
        return Err(Error::Invalid(format!("{op}: causal mask over 0 queries")));
    }
    // The probabilities: in the scores' dtype, or narrowed from f32 scores.
    let narrowing = x.dtype == DType::F32 && y.dtype != DType::F32;
    check_operand(op, "input", x, x.dtype, n as usize)?;
    check_operand(op, "output", y, if narrowing { y.dtype } else { x.dtype }, n as usize)?;
    let kernel = if narrowing {
        format!("sdsparse_softmax_f32_{}", kernel_type(y.dtype))
    } else {
        kernel_name(op, x.dtype)
    };
    Ok(Launch {
        kernel,
        cfg: LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 },
        params: SoftmaxParams {
            rows: to_i32(op, "rows", rows)?,
            cols: to_i32(op, "cols", cols)?,
            scale,
            causal: causal_q_len.is_some() as u32,
            q_len: to_i32(op, "q_len", causal_q_len.unwrap_or(1))?,
            ..Default::default()
        },
    })
}

/// Geometry of one im2col: one image `[c_in, h, w]`, a `kh x kw` kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Im2colShape {
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
}

impl Im2colShape {
    /// `(out_h, out_w)`, or `None` when the kernel does not fit.
    pub fn out_hw(&self) -> Option<(usize, usize)> {
        if self.stride == 0 || self.h + 2 * self.pad < self.kh || self.w + 2 * self.pad < self.kw {
            return None;
        }
        Some((
            (self.h + 2 * self.pad - self.kh) / self.stride + 1,
            (self.w + 2 * self.pad - self.kw) / self.stride + 1,
        ))
    }
    /// Rows of the column matrix, `c_in * kh * kw`.
    pub fn col_rows(&self) -> usize {
        self.c_in * self.kh * self.kw
    }
}

/// im2col of `x` (one image) into `col[c_in * kh * kw, out_h * out_w]`.
pub fn plan_im2col(s: Im2colShape, x: Operand, col: Operand) -> Result<Launch<Im2colParams>> {
    let op = "im2col";
    let (oh, ow) = s
        .out_hw()
        .ok_or_else(|| Error::Shape(format!("{op}: kernel {}x{} does not fit {s:?}", s.kh, s.kw)))?;
    let n_in = elements(op, "input", &[s.c_in, s.h, s.w])?;
    let n = elements(op, "columns", &[s.c_in, s.kh, s.kw, oh, ow])?;
    check_operand(op, "input", x, x.dtype, n_in as usize)?;
    check_operand(op, "columns", col, x.dtype, n as usize)?;
    Ok(Launch {
        kernel: kernel_name(op, x.dtype),
        cfg: grid_1d(n),
        params: Im2colParams {
            c_in: to_i32(op, "c_in", s.c_in)?,
            h: to_i32(op, "h", s.h)?,
            w: to_i32(op, "w", s.w)?,
            kh: to_i32(op, "kh", s.kh)?,
            kw: to_i32(op, "kw", s.kw)?,
            stride: to_i32(op, "stride", s.stride)?,
            pad: to_i32(op, "pad", s.pad)?,
            out_h: to_i32(op, "out_h", oh)?,
            out_w: to_i32(op, "out_w", ow)?,
            ..Default::default()
        },
    })
}

/// `y = a (op) b`, `b` broadcast to `a_shape`.
pub fn binary(
    device: &CudaDevice,
    op: Binary,
    (a_shape, b_shape): (&[usize], &[usize]),
    a: &DeviceValues,
    b: &DeviceValues,
    y: &mut DeviceValues,
) -> Result<()> {
    let mut l = plan_binary(op, a_shape, b_shape, Operand::of(a), Operand::of(b), Operand::of(y))?;
    l.params.a = a.device_ptr(device);
    l.params.b = b.device_ptr(device);
    l.params.y = y.device_ptr(device);
    run(device, &l)
}

/// `y[..n] = x[..n] * mul + add`.
pub fn affine(
    device: &CudaDevice,
    n: usize,
    mul: f32,
    add: f32,
    x: &DeviceValues,
    y: &mut DeviceValues,
) -> Result<()> {
    let mut l = plan_affine(n, mul, add, Operand::of(x), Operand::of(y))?;
    l.params.x = x.device_ptr(device);
    l.params.y = y.device_ptr(device);
    run(device, &l)
}

/// `y[..n] = x[..n]` in `y`'s dtype.
pub fn cast(device: &CudaDevice, n: usize, x: &DeviceValues, y: &mut DeviceValues) -> Result<()> {
    let mut l = plan_cast(n, Operand::of(x), Operand::of(y))?;
    l.params.x = x.device_ptr(device);
    l.params.y = y.device_ptr(device);
    run(device, &l)
}

/// f32 values to f16 bits (the sparse GEMM kernels take f16 activations as `u16`).
pub fn f32_to_f16_bits(device: &CudaDevice, n: usize, x: &DeviceValues) -> Result<CudaSlice<u16>> {
    let mut y = device.alloc_zeros::<u16>(n.max(1))?;
    let mut l = plan_cast(n, Operand::of(x), Operand::new(DType::F16, y.len()))?;
    l.params.x = x.device_ptr(device);
    l.params.y = device.device_ptr_mut(&mut y);
    run(device, &l)?;
    Ok(y)
}

/// f16 bits (a sparse GEMM's output) widened to f32 values.
pub fn f16_bits_to_f32(device: &CudaDevice, n: usize, x: &CudaSlice<u16>) -> Result<DeviceValues> {
    let y = DeviceValues::poisoned(device, DType::F32, n)?;
    let mut l = plan_cast(n, Operand::new(DType::F16, x.len()), Operand::of(&y))?;
    l.params.x = device.device_ptr(x);
    l.params.y = y.device_ptr(device);
    run(device, &l)?;
    Ok(y)
}

/// Gathers the strided view `v` of `x` into `y`.
pub fn strided_copy(
    device: &CudaDevice,
    v: &StridedView,
    x: &DeviceValues,
    y: &mut DeviceValues,
) -> Result<()> {
    let mut l = plan_strided_copy(v, Operand::of(x), Operand::of(y))?;
    l.params.x = x.device_ptr(device);
    l.params.y = y.device_ptr(device);
    run(device, &l)
}

/// `y[count, dim] = table[ids]`.
pub fn embedding(
    device: &CudaDevice,
    (vocab, dim): (usize, usize),
    ids: &[u32],
    table: &DeviceValues,
    y: &mut DeviceValues,
) -> Result<()> {
    let mut l = plan_embedding(ids.len(), dim, vocab, ids, Operand::of(table), Operand::of(y))?;
    let ids_d = device.htod(ids)?;
    l.params.table = table.device_ptr(device);
    l.params.ids = device.device_ptr(&ids_d);
    l.params.y = y.device_ptr(device);
    run(device, &l)?;
    // The ids buffer must outlive the kernel: wait before it is freed.
    device.synchronize()
}

/// Softmax of `x[rows, cols] * scale` (causal when `causal_q_len` is given) into `y`.
pub fn softmax(
    device: &CudaDevice,
    (rows, cols): (usize, usize),
    scale: f32,
    causal_q_len: Option<usize>,
    x: &DeviceValues,
    y: &mut DeviceValues,
) -> Result<()> {
    let mut l = plan_softmax(rows, cols, scale, causal_q_len, Operand::of(x), Operand::of(y))?;
    l.params.x = x.device_ptr(device);
    l.params.y = y.device_ptr(device);
    run(device, &l)
}

/// im2col of image `image` of `x` (`[.., c_in, h, w]`) into rows of `col` starting at element
/// `col_offset`.
pub fn im2col(
    device: &CudaDevice,
    s: Im2colShape,
    (x, image): (&DeviceValues, usize),
    (col, col_offset): (&mut DeviceValues, usize),
) -> Result<()> {
    let per_image = s.c_in * s.h * s.w;
    let (oh, ow) = s.out_hw().unwrap_or((0, 0));
    let col_len = s.col_rows() * oh * ow;
    // The plan checks the operands as the single image / column block the kernel sees.
    let x_view = Operand::new(x.dtype(), x.len().saturating_sub(image * per_image));
    let col_view = Operand::new(col.dtype(), col.len().saturating_sub(col_offset));
    let mut l = plan_im2col(s, x_view, col_view)?;
    if col_view.len < col_len {
        return Err(Error::Shape("im2col: column buffer too small".into()));
    }
    l.params.x = x.device_ptr_at(device, image * per_image);
    l.params.col = col.device_ptr_at(device, col_offset);
    run(device, &l)
}

#[cfg(test)]
mod tests {
    use super::super::pointwise::test_support::{check, download, output, rounded, upload, DTYPES};
    use super::*;
    use crate::backend::cpu;
    use crate::backend::test_util::TestRng;
    use crate::backend::Device;
    use crate::test_device;

    // CPU twins (on dtype-rounded inputs, outputs rounded to the dtype):
    //   eltwise_{sub,mul,div}   cpu::elementwise::broadcast_binary
    //   affine                  cpu::elementwise::affine
    //   cast_*                  half::{f16, bf16}::from_f32 / to_f32 (test_util::host_data)
    //   strided_copy            cpu::layout::{permute, narrow}
    //   embedding               cpu::layout::embedding
    //   softmax                 cpu::attention::softmax_scaled
    //   im2col                  cpu::conv::im2col_image

    fn op(dtype: DType, len: usize) -> Operand {
        Operand::new(dtype, len)
    }

    fn binary_and_affine_match_cpu(device: &Device) -> Result<()> {
        let mut rng = TestRng::fresh("binary_affine");
        let shapes: [(&[usize], &[usize]); 3] =
            [(&[2, 3, 5, 7], &[2, 3, 5, 7]), (&[2, 320, 9, 9], &[2, 320, 1, 1]), (&[2, 77, 64], &[64])];
        for dtype in DTYPES {
            for (a_shape, b_shape) in shapes {
                let (na, nb) = (a_shape.iter().product::<usize>(), b_shape.iter().product::<usize>());
                let a = rounded(&rng.vec(na), dtype);
                // Divisors away from 0 so the quotient is well conditioned.
                let b: Vec<f32> =
                    rounded(&rng.vec(nb).iter().map(|v| v + 3.0 * v.signum()).collect::<Vec<_>>(), dtype);
                let mut b_full = vec![1; a_shape.len() - b_shape.len()];
                b_full.extend_from_slice(b_shape);
                for bop in [Binary::Sub, Binary::Mul, Binary::Div] {
                    let expected = rounded(
                        &cpu::elementwise::broadcast_binary(&a, a_shape, &b, &b_full, |x, y| bop.apply(x, y)),
                        dtype,
                    );
                    let plan =
                        plan_binary(bop, a_shape, b_shape, op(dtype, na), op(dtype, nb), op(dtype, na))?;
                    let got = match device {
                        Device::Cpu => expected.clone(),
                        Device::Cuda(dev) => {
                            let mut y = output(dev, dtype, na)?;
                            binary(
                                dev,
                                bop,
                                (a_shape, b_shape),
                                &upload(dev, &a, dtype)?,
                                &upload(dev, &b, dtype)?,
                                &mut y,
                            )?;
                            download(dev, &y)?
                        }
                    };
                    check(&format!("{} {a_shape:?} {b_shape:?}", plan.kernel), &got, &expected)?;
                }
            }
            for n in [1, 257, 70_001] {
                let x = rounded(&rng.vec(n), dtype);
                let (mul, add) = (0.5 + rng.uniform(), rng.uniform() - 0.5);
                let expected = rounded(&cpu::elementwise::affine(&x, mul, add), dtype);
                let plan = plan_affine(n, mul, add, op(dtype, n), op(dtype, n))?;
                let got = match device {
                    Device::Cpu => expected.clone(),
                    Device::Cuda(dev) => {
                        let mut y = output(dev, dtype, n)?;
                        affine(dev, n, mul, add, &upload(dev, &x, dtype)?, &mut y)?;
                        download(dev, &y)?
                    }
                };
                check(&format!("{} n {n}", plan.kernel), &got, &expected)?;
            }
        }
        Ok(())
    }
    test_device!(binary_and_affine_match_cpu);

    fn casts_round_to_nearest_even(device: &Device) -> Result<()> {
        let mut rng = TestRng::fresh("cast");
        let n = 10_007;
        let x: Vec<f32> = rng.vec(n).iter().map(|v| 100.0 * v).collect();
        for narrow in [DType::F16, DType::BF16] {
            let expected = rounded(&x, narrow);
            let got = match device {
                Device::Cpu => expected.clone(),
                Device::Cuda(dev) => {
                    let mut y = output(dev, narrow, n)?;
                    cast(dev, n, &upload(dev, &x, DType::F32)?, &mut y)?;
                    let mut back = output(dev, DType::F32, n)?;
                    cast(dev, n, &y, &mut back)?;
                    download(dev, &back)?
                }
            };
            check(&format!("cast f32 -> {} -> f32", narrow.name()), &got, &expected)?;
            assert_eq!(got, expected, "casts are exact roundings");
        }
        Ok(())
    }
    test_device!(casts_round_to_nearest_even);

    fn strided_copies_match_cpu(device: &Device) -> Result<()> {
        let mut rng = TestRng::fresh("strided_copy");
        // SD2's permutes: heads split / merged, channels-last and back, the VAE's [B, C, HW].
        let perms: [(&[usize], &[usize]); 5] = [
            (&[2, 77, 5, 64], &[0, 2, 1, 3]),
            (&[2, 5, 77, 64], &[0, 2, 1, 3]),
            (&[2, 32, 9, 11], &[0, 2, 3, 1]),
            (&[2, 9, 11, 32], &[0, 3, 1, 2]),
            (&[1, 3, 4, 5, 6, 7], &[5, 4, 3, 2, 1, 0]),
        ];
        for dtype in DTYPES {
            for (shape, perm) in perms {
                let n: usize = shape.iter().product();
                let x = rounded(&rng.vec(n), dtype);
                let expected = cpu::layout::permute(&x, shape, perm);
                let v = StridedView::permute(shape, perm);
                let got = match device {
                    Device::Cpu => expected.clone(),
                    Device::Cuda(dev) => {
                        let mut y = output(dev, dtype, n)?;
                        strided_copy(dev, &v, &upload(dev, &x, dtype)?, &mut y)?;
                        download(dev, &y)?
                    }
                };
                assert_eq!(got, expected, "permute {shape:?} by {perm:?} ({}) is a copy", dtype.name());
            }
            for (outer, size, inner, start, len) in [(1, 77, 32, 0, 7), (2, 10, 3, 4, 5), (3, 8, 1, 7, 1)] {
                let x = rounded(&rng.vec(outer * size * inner), dtype);
                let expected = cpu::layout::narrow(&x, outer, size, inner, start, len);
                let v = StridedView::narrow(outer, size, inner, start, len);
                let got = match device {
                    Device::Cpu => expected.clone(),
                    Device::Cuda(dev) => {
                        let mut y = output(dev, dtype, v.len())?;
                        strided_copy(dev, &v, &upload(dev, &x, dtype)?, &mut y)?;
                        download(dev, &y)?
                    }
                };
                assert_eq!(got, expected, "narrow {outer}x{size}x{inner} {start}+{len} is a copy");
            }
        }
        Ok(())
    }
    test_device!(strided_copies_match_cpu);

    fn embedding_matches_cpu(device: &Device) -> Result<()> {
        let mut rng = TestRng::fresh("embedding");
        let (vocab, dim) = (1000, 48);
        for dtype in DTYPES {
            let table = rounded(&rng.vec(vocab * dim), dtype);
            let ids: Vec<u32> =
                (0..154).map(|_| rng.below(vocab) as u32).chain([0, vocab as u32 - 1]).collect();
            let expected = cpu::layout::embedding(
                &crate::backend::CpuStorage::F32(std::sync::Arc::new(table.clone())),
                dim,
                &ids,
            );
            let got = match device {
                Device::Cpu => expected.clone(),
                Device::Cuda(dev) => {
                    let mut y = output(dev, dtype, ids.len() * dim)?;
                    embedding(dev, (vocab, dim), &ids, &upload(dev, &table, dtype)?, &mut y)?;
                    download(dev, &y)?
                }
            };
            assert_eq!(got, expected, "embedding ({}) is a copy", dtype.name());
        }
        Ok(())
    }
    test_device!(embedding_matches_cpu);

    fn softmax_matches_cpu(device: &Device) -> Result<()> {
        let mut rng = TestRng::fresh("softmax");
        // Text encoder (causal 77 x 77), UNet cross-attention (77 keys), the VAE's 4096 keys
        // over fewer rows, an odd width, causal with more keys than queries.
        let cases: [(usize, usize, f32, Option<usize>); 5] = [
            (2 * 77, 77, 0.125, Some(77)),
            (2 * 5 * 64, 77, 0.125, None),
            (8, 4096, 1.0 / 512f32.sqrt(), None),
            (33, 1000, 1.0, None),
            (2 * 10, 14, 0.3, Some(10)),
        ];
        // (scores, probabilities): each dtype in place, and f32 scores into f16 / bf16
        // probabilities (the attention scores path).
        let pairs =
            DTYPES.map(|d| (d, d)).into_iter().chain([(DType::F32, DType::F16), (DType::F32, DType::BF16)]);
        for (dtype, out_dtype) in pairs {
            for (rows, cols, scale, causal) in cases {
                let x = rounded(&rng.vec(rows * cols).iter().map(|v| 8.0 * v).collect::<Vec<_>>(), dtype);
                let expected = rounded(&cpu::attention::softmax_scaled(&x, cols, scale, causal), out_dtype);
                let plan =
                    plan_softmax(rows, cols, scale, causal, op(dtype, x.len()), op(out_dtype, x.len()))?;
                let got = match device {
                    Device::Cpu => expected.clone(),
                    Device::Cuda(dev) => {
                        let mut y = output(dev, out_dtype, x.len())?;
                        softmax(dev, (rows, cols), scale, causal, &upload(dev, &x, dtype)?, &mut y)?;
                        download(dev, &y)?
                    }
                };
                check(&format!("{} [{rows}, {cols}] causal {causal:?}", plan.kernel), &got, &expected)?;
            }
        }
        Ok(())
    }
    test_device!(softmax_matches_cpu);

    fn im2col_matches_cpu(device: &Device) -> Result<()> {
        let mut rng = TestRng::fresh("im2col");
        // 3x3 pad 1 (every ResNet conv), the stride-2 downsampler, a 1x1, odd sizes.
        let cases = [(4, 9, 11, 3, 1, 1), (8, 16, 16, 3, 2, 1), (6, 5, 7, 1, 1, 0), (3, 8, 8, 3, 2, 0)];
        for dtype in DTYPES {
            for (c_in, h, w, k, stride, pad) in cases {
                let s = Im2colShape { c_in, h, w, kh: k, kw: k, stride, pad };
                let images = 2;
                let x = rounded(&rng.vec(images * c_in * h * w), dtype);
                let cs = cpu::conv::ConvShape {
                    batch: 1,
                    c_in,
                    h,
                    w,
                    c_out: 1,
                    kh: k,
                    kw: k,
                    stride,
                    padding: pad,
                };
                let per = c_in * h * w;
                let expected: Vec<f32> = (0..images)
                    .flat_map(|i| cpu::conv::im2col_image(&x[i * per..(i + 1) * per], cs))
                    .collect();
                let got = match device {
                    Device::Cpu => expected.clone(),
                    Device::Cuda(dev) => {
                        let xd = upload(dev, &x, dtype)?;
                        let mut col = output(dev, dtype, expected.len())?;
                        let block = expected.len() / images;
                        for i in 0..images {
                            im2col(dev, s, (&xd, i), (&mut col, i * block))?;
                        }
                        download(dev, &col)?
                    }
                };
                assert_eq!(got, expected, "im2col {s:?} ({}) is a copy", dtype.name());
            }
        }
        Ok(())
    }
    test_device!(im2col_matches_cpu);

    #[test]
    fn strided_views_simplify() {
        // [B, S, H, D] -> [B, H, S, D]: rank 4 stays (nothing merges).
        let v = StridedView::permute(&[2, 77, 5, 64], &[0, 2, 1, 3]);
        assert_eq!(
            (v.dims.as_slice(), v.strides.as_slice()),
            (&[2, 5, 77, 64][..], &[77 * 320, 64, 320, 1][..])
        );
        // [B, C, H, W] -> [B, H, W, C]: H and W merge.
        let v = StridedView::permute(&[2, 32, 9, 11], &[0, 2, 3, 1]);
        assert_eq!((v.dims.as_slice(), v.strides.as_slice()), (&[2, 99, 32][..], &[32 * 99, 1, 99][..]));
        // The identity is one run; size-1 axes vanish.
        let v = StridedView::permute(&[1, 6, 1, 7], &[2, 1, 0, 3]);
        assert_eq!((v.dims.as_slice(), v.strides.as_slice()), (&[42][..], &[1][..]));
        let v = StridedView::narrow(2, 10, 3, 4, 5);
        assert_eq!((v.len(), v.offset), (30, 12));
    }

    #[test]
    fn plans_check_their_arguments() {
        let f32op = |len| op(DType::F32, len);
        let big = usize::MAX / 4;
        // Binary: dtype, sizes, broadcast.
        assert!(plan_binary(Binary::Div, &[2, 3], &[3], f32op(6), f32op(3), f32op(6)).is_ok());
        assert!(plan_binary(Binary::Sub, &[2, 3], &[2], f32op(6), f32op(2), f32op(6)).is_err());
        assert!(plan_binary(Binary::Mul, &[2, 3], &[3], f32op(6), op(DType::F16, 3), f32op(6)).is_err());
        assert_eq!(
            plan_binary(Binary::Mul, &[4], &[4], f32op(4), f32op(4), f32op(4)).unwrap().kernel,
            "sdsparse_eltwise_mul_f32"
        );
        // Affine / cast.
        assert!(plan_affine(10, f32::NAN, 0.0, f32op(10), f32op(10)).is_err());
        assert!(plan_affine(10, 2.0, 0.0, f32op(9), f32op(10)).is_err());
        assert!(plan_affine(1 << 31, 2.0, 0.0, f32op(big), f32op(big)).is_err());
        assert_eq!(plan_cast(4, f32op(4), op(DType::F16, 4)).unwrap().kernel, "sdsparse_cast_f32_f16");
        assert!(plan_cast(4, op(DType::F16, 4), op(DType::BF16, 4)).is_err());
        assert!(plan_cast(4, f32op(4), f32op(4)).is_err());
        // Strided copy: rank, the source extent, 2^31.
        let v = StridedView::narrow(2, 10, 3, 4, 5);
        // Largest source index: 12 + 1 * 30 + 4 * 3 + 2 = 56.
        assert!(plan_strided_copy(&v, f32op(57), f32op(30)).is_ok());
        assert!(plan_strided_copy(&v, f32op(56), f32op(30)).is_err(), "reads element 56");
        assert!(plan_strided_copy(&v, f32op(60), f32op(29)).is_err());
        let deep = StridedView { dims: vec![1; 7], strides: vec![1; 7], offset: 0 };
        assert!(plan_strided_copy(&deep, f32op(1), f32op(1)).is_err());
        let huge = StridedView { dims: vec![1 << 16, 1 << 16], strides: vec![1 << 16, 1], offset: 0 };
        assert!(plan_strided_copy(&huge, f32op(big), f32op(big)).is_err());
        // Embedding: ids in range, the table's size.
        assert!(plan_embedding(2, 4, 10, &[0, 9], f32op(40), f32op(8)).is_ok());
        assert!(plan_embedding(2, 4, 10, &[0, 10], f32op(40), f32op(8)).is_err());
        assert!(plan_embedding(2, 4, 10, &[0, 1], f32op(39), f32op(8)).is_err());
        assert!(plan_embedding(3, 4, 10, &[0, 1], f32op(40), f32op(12)).is_err());
        // Softmax: one CTA per row, finite scale, a causal block of queries.
        let l = plan_softmax(154, 77, 0.125, Some(77), f32op(154 * 77), f32op(154 * 77)).unwrap();
        assert_eq!((l.cfg.grid_dim.0, l.params.causal, l.params.q_len), (154, 1, 77));
        assert!(plan_softmax(2, 3, f32::INFINITY, None, f32op(6), f32op(6)).is_err());
        assert!(plan_softmax(2, 3, 1.0, Some(0), f32op(6), f32op(6)).is_err());
        assert!(plan_softmax(2, 3, 1.0, None, f32op(5), f32op(6)).is_err());
        // f32 scores into f16 / bf16 probabilities; no other mixed pair.
        let half = |d: DType, n: usize| Operand::new(d, n);
        let l = plan_softmax(2, 3, 1.0, None, f32op(6), half(DType::F16, 6)).unwrap();
        assert_eq!(l.kernel, "sdsparse_softmax_f32_f16");
        let l = plan_softmax(2, 3, 1.0, None, f32op(6), half(DType::BF16, 6)).unwrap();
        assert_eq!(l.kernel, "sdsparse_softmax_f32_bf16");
        assert_eq!(plan_softmax(2, 3, 1.0, None, f32op(6), f32op(6)).unwrap().kernel, "sdsparse_softmax_f32");
        assert!(plan_softmax(2, 3, 1.0, None, half(DType::F16, 6), f32op(6)).is_err());
        assert!(plan_softmax(2, 3, 1.0, None, half(DType::F16, 6), half(DType::BF16, 6)).is_err());
        assert!(plan_softmax(2, 3, 1.0, None, f32op(6), half(DType::F16, 5)).is_err());
        // im2col: the kernel fits, the column buffer's size.
        let s = Im2colShape { c_in: 4, h: 8, w: 8, kh: 3, kw: 3, stride: 2, pad: 1 };
        let l = plan_im2col(s, f32op(256), f32op(36 * 16)).unwrap();
        assert_eq!((l.params.out_h, l.params.out_w), (4, 4));
        assert!(plan_im2col(s, f32op(256), f32op(36 * 16 - 1)).is_err());
        assert!(plan_im2col(Im2colShape { h: 1, pad: 0, ..s }, f32op(32), f32op(1000)).is_err());
        assert!(plan_im2col(Im2colShape { stride: 0, ..s }, f32op(256), f32op(1000)).is_err());
    }

    /// The checks of the GPU tests fail on plausible kernel bugs (mutants of the twins).
    #[test]
    fn checks_catch_planted_bugs() {
        let mut rng = TestRng::new(17);
        // Softmax: the causal mask off by one (one future key visible), a missing scale.
        let x: Vec<f32> = rng.vec(2 * 7 * 7).iter().map(|v| 4.0 * v).collect();
        let good = cpu::attention::softmax_scaled(&x, 7, 0.5, Some(7));
        let leaky: Vec<f32> = x
            .chunks(7)
            .enumerate()
            .flat_map(|(r, row)| {
                let q = r % 7;
                let end = (q + 2).min(7);
                let mut out = vec![0.0; 7];
                out[..end].copy_from_slice(&cpu::attention::softmax_scaled(&row[..end], end, 0.5, None));
                out
            })
            .collect();
        assert!(check("softmax", &leaky, &good).is_err());
        assert!(check("softmax", &cpu::attention::softmax_scaled(&x, 7, 1.0, Some(7)), &good).is_err());
        // im2col with the kernel's rows and columns swapped.
        let cs = cpu::conv::ConvShape {
            batch: 1,
            c_in: 2,
            h: 5,
            w: 6,
            c_out: 1,
            kh: 3,
            kw: 3,
            stride: 1,
            padding: 1,
        };
        let img = rng.vec(60);
        let good = cpu::conv::im2col_image(&img, cs);
        let swapped: Vec<f32> = (0..good.len())
            .map(|i| {
                let (row, pos) = (i / 30, i % 30);
                let (c, ki, kj) = (row / 9, row / 3 % 3, row % 3);
                good[(c * 9 + kj * 3 + ki) * 30 + pos]
            })
            .collect();
        assert!(check("im2col", &swapped, &good).is_err());
        // Division with the operands swapped.
        let (a, b) = (rng.vec(50), rng.vec(50).iter().map(|v| v + 3.0).collect::<Vec<_>>());
        let q = cpu::elementwise::broadcast_binary(&a, &[50], &b, &[50], |p, q| p / q);
        let r = cpu::elementwise::broadcast_binary(&b, &[50], &a, &[50], |p, q| p / q);
        assert!(check("div", &r, &q).is_err());
    }
}
