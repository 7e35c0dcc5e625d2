//! Launchers of the element-wise and data-movement kernels of `cuda/pointwise.cu`: GELU, SiLU,
//! GEGLU, broadcast (residual) add, the classifier-free-guidance combine, nearest upsampling (2x
//! and to an explicit size), concatenation and the sinusoidal timestep embedding.
//!
//! Operands are [`DeviceValues`] (f32, f16 or bf16 storage; all operands of one call share the
//! dtype, except the f32 timesteps); the kernels compute in f32. Every launcher first builds a
//! [`Launch`] with a `plan_*` function that checks everything on the host — shapes, dtypes,
//! buffer sizes, and that no tensor reaches 2^31 elements (the kernels index with 32 bits) —
//! so a bad call is a one-line error, never an out-of-bounds kernel. The plans need no GPU and
//! are unit-tested here; the CPU twin of each kernel is the CPU reference of `backend::cpu`
//! (the twins' table is in the tests below), and the `test_device!` tests compare them on fresh
//! random inputs. Not wired into `backend::ops` yet (the f32-only `Tensor` has no f16 storage):
//! that is the next phase of issue 8, see docs/CUDA.md.

use super::decompress::{kernel_type, DeviceValues};
use super::device::CudaDevice;
use super::params::{ConcatParams, EltwiseParams, GegluParams, TimestepParams, UpsampleParams};
use crate::error::{Error, Result};
use crate::format::DType;
use cudarc::driver::{DeviceRepr, LaunchConfig};

/// Threads per block of every kernel in `norm.cu` and `pointwise.cu` (their `kThreads`).
pub(super) const THREADS: u32 = 256;

/// What the host knows about a device operand before a launch: its dtype and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Operand {
    pub dtype: DType,
    pub len: usize,
}

impl Operand {
    pub fn new(dtype: DType, len: usize) -> Operand {
        Operand { dtype, len }
    }
    pub fn of(values: &DeviceValues) -> Operand {
        Operand { dtype: values.dtype(), len: values.len() }
    }
}

/// A checked launch: the kernel's name, its grid and its parameters with the device pointers
/// still 0 (the launcher fills them in).
#[derive(Debug, Clone)]
pub struct Launch<P> {
    pub kernel: String,
    pub cfg: LaunchConfig,
    pub params: P,
}

/// `v` as the kernels' int32, or the error for tensors the 32-bit indexing cannot address.
pub(super) fn to_i32(op: &str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        Error::Invalid(format!("{op}: {what} = {v} is too large for the GPU kernels (limit 2^31 - 1)"))
    })
}

/// The element count of `dims`, checked to be non-zero and below 2^31.
pub(super) fn elements(op: &str, what: &str, dims: &[usize]) -> Result<i32> {
    let n = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::Invalid(format!("{op}: {what} {dims:?} overflows")))?;
    if n == 0 {
        return Err(Error::Invalid(format!("{op}: {what} {dims:?} is empty")));
    }
    to_i32(op, &format!("{what} {dims:?} elements"), n)
}

/// `got` has `dtype` and at least `len` elements.
pub(super) fn check_operand(op: &str, name: &str, got: Operand, dtype: DType, len: usize) -> Result<()> {
    if got.dtype != dtype {
        return Err(Error::Invalid(format!(
            "{op}: {name} is {} but the kernel expects {}",
            got.dtype.name(),
            dtype.name()
        )));
    }
    if got.len < len {
        return Err(Error::Shape(format!("{op}: {name} holds {} elements, needs {len}", got.len)));
    }
    Ok(())
}

/// One thread per output element, `THREADS` per block (`n` < 2^31, so the grid fits grid.x).
pub(super) fn grid_1d(n: i32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(THREADS).max(1), 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `sdsparse_<base>_<dtype>`.
pub(super) fn kernel_name(base: &str, dtype: DType) -> String {
    format!("sdsparse_{base}_{}", kernel_type(dtype))
}

/// Launches a checked plan.
pub(super) fn run<P: DeviceRepr>(device: &CudaDevice, launch: &Launch<P>) -> Result<()> {
    // SAFETY: every plan checked the operands' dtypes and lengths against the sizes in
    // `params`, the launcher filled in the pointers of exactly those operands, and the grid is
    // the one the plan computed for the kernel's THREADS-wide blocks.
    unsafe { device.launch(&launch.kernel, launch.cfg, &launch.params) }
}

/// The unary element-wise kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unary {
    /// Exact (erf) GELU.
    Gelu,
    /// `x * sigmoid(x)`.
    Silu,
}

impl Unary {
    fn name(self) -> &'static str {
        match self {
            Unary::Gelu => "gelu",
            Unary::Silu => "silu",
        }
    }
}

/// `y[i] = f(x[i])` over `n` elements.
pub fn plan_unary(op: Unary, n: usize, x: Operand, y: Operand) -> Result<Launch<EltwiseParams>> {
    let what = op.name();
    let n32 = elements(what, "input", &[n])?;
    check_operand(what, "input", x, x.dtype, n)?;
    check_operand(what, "output", y, x.dtype, n)?;
    Ok(Launch {
        kernel: kernel_name(&format!("eltwise_{what}"), x.dtype),
        cfg: grid_1d(n32),
        params: EltwiseParams { n: n32, b_div: 1, b_len: n32, ..Default::default() },
    })
}

/// How `b_shape` broadcasts over `a_shape` in the add kernel: `b[(i / b_div) % b_len]` for
/// element `i` of `a`. `b_shape` (right-aligned, missing leading dims = 1) must equal `a_shape`
/// on one contiguous run of dims and be 1 elsewhere: the same shape, `[B, C, 1, 1]` over
/// `[B, C, H, W]` (time embedding), `[C]` over `[B, S, C]` (bias). Returns `(b_div, b_len)`.
pub fn broadcast_run(a_shape: &[usize], b_shape: &[usize]) -> Result<(usize, usize)> {
    let err = || Error::Shape(format!("add: cannot broadcast {b_shape:?} to {a_shape:?} on the GPU"));
    if b_shape.len() > a_shape.len() {
        return Err(err());
    }
    let mut b = vec![1usize; a_shape.len() - b_shape.len()];
    b.extend_from_slice(b_shape);
    // Dims where b is broadcast (1 while a is not) must surround one run where b matches a.
    let kept: Vec<bool> = a_shape.iter().zip(&b).map(|(&ad, &bd)| bd == ad && ad != 1).collect();
    for (&ad, &bd) in a_shape.iter().zip(&b) {
        if bd != ad && bd != 1 {
            return Err(err());
        }
    }
    let first = kept.iter().position(|&k| k);
    let last = kept.iter().rposition(|&k| k);
    let (Some(first), Some(last)) = (first, last) else {
        return Ok((a_shape.iter().product(), 1)); // b is one value
    };
    // Inside the run every dim must match (size-1 dims of a match trivially).
    if (first..=last).any(|d| b[d] != a_shape[d]) {
        return Err(err());
    }
    let b_div = a_shape[last + 1..].iter().product();
    let b_len = a_shape[first..=last].iter().product();
    Ok((b_div, b_len))
}

/// `y = a + b` with `b` broadcast to `a_shape` (see [`broadcast_run`]).
pub fn plan_add(
    a_shape: &[usize],
    b_shape: &[usize],
    a: Operand,
    b: Operand,
    y: Operand,
) -> Result<Launch<EltwiseParams>> {
    let n = elements("add", "a", a_shape)?;
    let (b_div, b_len) = broadcast_run(a_shape, b_shape)?;
    check_operand("add", "a", a, a.dtype, n as usize)?;
    check_operand("add", "b", b, a.dtype, b_len)?;
    check_operand("add", "output", y, a.dtype, n as usize)?;
    Ok(Launch {
        kernel: kernel_name("eltwise_add", a.dtype),
        cfg: grid_1d(n),
        params: EltwiseParams {
            n,
            b_div: to_i32("add", "b_div", b_div)?,
            b_len: to_i32("add", "b_len", b_len)?,
            ..Default::default()
        },
    })
}

/// Classifier-free guidance: `pred` holds the batched UNet output `[2, n]` (unconditional
/// first, as diffusers batches `[uncond, cond]`); `y[i] = u[i] + guidance * (c[i] - u[i])`.
/// The launcher points `b` at the second half.
pub fn plan_cfg(n: usize, guidance: f32, pred: Operand, y: Operand) -> Result<Launch<EltwiseParams>> {
    let n32 = elements("cfg_combine", "half of the prediction", &[n])?;
    if !guidance.is_finite() {
        return Err(Error::Invalid(format!("cfg_combine: guidance {guidance} is not finite")));
    }
    elements("cfg_combine", "prediction", &[2, n])?;
    check_operand("cfg_combine", "prediction", pred, pred.dtype, 2 * n)?;
    check_operand("cfg_combine", "output", y, pred.dtype, n)?;
    Ok(Launch {
        kernel: kernel_name("eltwise_cfg", pred.dtype),
        cfg: grid_1d(n32),
        params: EltwiseParams { n: n32, b_div: 1, b_len: n32, alpha: guidance, ..Default::default() },
    })
}

/// GEGLU over `rows` rows of `2 * half` values → `[rows, half]`.
pub fn plan_geglu(rows: usize, half: usize, x: Operand, y: Operand) -> Result<Launch<GegluParams>> {
    elements("geglu", "input", &[rows, 2, half])?;
    let n = elements("geglu", "output", &[rows, half])?;
    check_operand("geglu", "input", x, x.dtype, 2 * rows * half)?;
    check_operand("geglu", "output", y, x.dtype, n as usize)?;
    Ok(Launch {
        kernel: kernel_name("geglu", x.dtype),
        cfg: grid_1d(n),
        params: GegluParams {
            rows: to_i32("geglu", "rows", rows)?,
            half: to_i32("geglu", "half", half)?,
            ..Default::default()
        },
    })
}

/// Nearest upsampling of `x[planes, h, w]` to `[planes, out_h, out_w]` (`planes` = B·C), with
/// PyTorch's index rule (2x when `out = 2 * in`; diffusers passes an explicit size when the skip
/// connection's size is odd).
pub fn plan_upsample_nearest(
    planes: usize,
    (h, w): (usize, usize),
    (out_h, out_w): (usize, usize),
    x: Operand,
    y: Operand,
) -> Result<Launch<UpsampleParams>> {
    let op = "upsample_nearest";
    let n_in = elements(op, "input", &[planes, h, w])?;
    let n = elements(op, "output", &[planes, out_h, out_w])?;
    check_operand(op, "input", x, x.dtype, n_in as usize)?;
    check_operand(op, "output", y, x.dtype, n as usize)?;
    Ok(Launch {
        kernel: kernel_name(op, x.dtype),
        cfg: grid_1d(n),
        params: UpsampleParams {
            planes: to_i32(op, "planes", planes)?,
            h: to_i32(op, "h", h)?,
            w: to_i32(op, "w", w)?,
            out_h: to_i32(op, "out_h", out_h)?,
            out_w: to_i32(op, "out_w", out_w)?,
            ..Default::default()
        },
    })
}

/// Concatenation of `a[outer, a_inner]` and `b[outer, b_inner]` → `[outer, a_inner + b_inner]`.
pub fn plan_concat(
    outer: usize,
    a_inner: usize,
    b_inner: usize,
    a: Operand,
    b: Operand,
    y: Operand,
) -> Result<Launch<ConcatParams>> {
    let op = "concat";
    let row = a_inner
        .checked_add(b_inner)
        .ok_or_else(|| Error::Invalid(format!("{op}: rows of {a_inner} + {b_inner} overflow")))?;
    let n = elements(op, "output", &[outer, row])?;
    let na = elements(op, "a", &[outer, a_inner])?;
    let nb = elements(op, "b", &[outer, b_inner])?;
    check_operand(op, "a", a, a.dtype, na as usize)?;
    check_operand(op, "b", b, a.dtype, nb as usize)?;
    check_operand(op, "output", y, a.dtype, n as usize)?;
    Ok(Launch {
        kernel: kernel_name(op, a.dtype),
        cfg: grid_1d(n),
        params: ConcatParams {
            outer: to_i32(op, "outer", outer)?,
            a_inner: to_i32(op, "a_inner", a_inner)?,
            b_inner: to_i32(op, "b_inner", b_inner)?,
            ..Default::default()
        },
    })
}

/// Concatenation along channels of `a[B, Ca, ...]` and `b[B, Cb, ...]` (the UNet's skip
/// connections): the shapes must agree except in dim 1.
pub fn plan_concat_channels(
    a_shape: &[usize],
    b_shape: &[usize],
    a: Operand,
    b: Operand,
    y: Operand,
) -> Result<Launch<ConcatParams>> {
    if a_shape.len() < 2
        || a_shape.len() != b_shape.len()
        || a_shape[0] != b_shape[0]
        || a_shape[2..] != b_shape[2..]
    {
        return Err(Error::Shape(format!("concat along channels: {a_shape:?} and {b_shape:?} do not match")));
    }
    let inner: usize = a_shape[2..].iter().product();
    let a_inner = a_shape[1].checked_mul(inner);
    let b_inner = b_shape[1].checked_mul(inner);
    match (a_inner, b_inner) {
        (Some(ai), Some(bi)) => plan_concat(a_shape[0], ai, bi, a, b, y),
        _ => Err(Error::Invalid(format!("concat along channels: {a_shape:?} overflows"))),
    }
}

/// diffusers' `get_timestep_embedding` of `count` f32 timesteps → `[count, dim]` in `y`'s dtype.
pub fn plan_timestep_embedding(
    count: usize,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f32,
    timesteps: Operand,
    y: Operand,
) -> Result<Launch<TimestepParams>> {
    let op = "timestep_embedding";
    if dim / 2 == 0 || (dim / 2) as f32 == freq_shift || !freq_shift.is_finite() {
        return Err(Error::Invalid(format!(
            "{op}: dim {dim} with frequency shift {freq_shift} has no frequencies"
        )));
    }
    let n = elements(op, "output", &[count, dim])?;
    check_operand(op, "timesteps", timesteps, DType::F32, count)?;
    check_operand(op, "output", y, y.dtype, n as usize)?;
    Ok(Launch {
        kernel: kernel_name(op, y.dtype),
        cfg: grid_1d(n),
        params: TimestepParams {
            count: to_i32(op, "count", count)?,
            dim: to_i32(op, "dim", dim)?,
            flip_sin_to_cos: flip_sin_to_cos as u32,
            freq_shift,
            ..Default::default()
        },
    })
}

/// `y[..n] = gelu(x[..n])` or `silu(x[..n])`.
pub fn unary(device: &CudaDevice, op: Unary, n: usize, x: &DeviceValues, y: &mut DeviceValues) -> Result<()> {
    let mut l = plan_unary(op, n, Operand::of(x), Operand::of(y))?;
    l.params.a = x.device_ptr(device);
    l.params.y = y.device_ptr(device);
    run(device, &l)
}

/// `y = a + b`, `b` broadcast to `a_shape` (see [`broadcast_run`]).
pub fn add(
    device: &CudaDevice,
    a_shape: &[usize],
    b_shape: &[usize],
    a: &DeviceValues,
    b: &DeviceValues,
    y: &mut DeviceValues,
) -> Result<()> {
    let mut l = plan_add(a_shape, b_shape, Operand::of(a), Operand::of(b), Operand::of(y))?;
    l.params.a = a.device_ptr(device);
    l.params.b = b.device_ptr(device);
    l.params.y = y.device_ptr(device);
    run(device, &l)
}

/// `y[..n] = uncond + guidance * (cond - uncond)` for `pred = [uncond (n), cond (n)]`.
pub fn cfg_combine(
    device: &CudaDevice,
    n: usize,
    guidance: f32,
    pred: &DeviceValues,
    y: &mut DeviceValues,
) -> Result<()> {
    let mut l = plan_cfg(n, guidance, Operand::of(pred), Operand::of(y))?;
    l.params.a = pred.device_ptr_at(device, 0);
    l.params.b = pred.device_ptr_at(device, n);
    l.params.y = y.device_ptr(device);
    run(device, &l)
}

/// GEGLU of `x[rows, 2 * half]` into `y[rows, half]`.
pub fn geglu(
    device: &CudaDevice,
    rows: usize,
    half: usize,
    x: &DeviceValues,
    y: &mut DeviceValues,
) -> Result<()> {
    let mut l = plan_geglu(rows, half, Operand::of(x), Operand::of(y))?;
    l.params.x = x.device_ptr(device);
    l.params.y = y.device_ptr(device);
    run(device, &l)
}

/// Nearest upsampling of `x[planes, h, w]` to `y[planes, out_h, out_w]`.
pub fn upsample_nearest(
    device: &CudaDevice,
    planes: usize,
    in_hw: (usize, usize),
    out_hw: (usize, usize),
    x: &DeviceValues,
    y: &mut DeviceValues,
) -> Result<()> {
    let mut l = plan_upsample_nearest(planes, in_hw, out_hw, Operand::of(x), Operand::of(y))?;
    l.params.x = x.device_ptr(device);
    l.params.y = y.device_ptr(device);
    run(device, &l)
}

/// Nearest 2x upsampling of `x[planes, h, w]`.
pub fn upsample_nearest2x(
    device: &CudaDevice,
    planes: usize,
    (h, w): (usize, usize),
    x: &DeviceValues,
    y: &mut DeviceValues,
) -> Result<()> {
    let out = (h.checked_mul(2), w.checked_mul(2));
    let (Some(oh), Some(ow)) = out else {
        return Err(Error::Invalid(format!("upsample_nearest2x: {h}x{w} overflows")));
    };
    upsample_nearest(device, planes, (h, w), (oh, ow), x, y)
}

/// `y = cat([a, b], dim = 1)` for `a[B, Ca, ...]`, `b[B, Cb, ...]`.
pub fn concat_channels(
    device: &CudaDevice,
    a_shape: &[usize],
    b_shape: &[usize],
    a: &DeviceValues,
    b: &DeviceValues,
    y: &mut DeviceValues,
) -> Result<()> {
    let mut l = plan_concat_channels(a_shape, b_shape, Operand::of(a), Operand::of(b), Operand::of(y))?;
    l.params.a = a.device_ptr(device);
    l.params.b = b.device_ptr(device);
    l.params.y = y.device_ptr(device);
    run(device, &l)
}

/// `y[outer, a_inner + b_inner]` = rows of `a[outer, a_inner]` followed by `b[outer, b_inner]`
/// (concatenation along any dim).
pub fn concat(
    device: &CudaDevice,
    outer: usize,
    a_inner: usize,
    b_inner: usize,
    a: &DeviceValues,
    b: &DeviceValues,
    y: &mut DeviceValues,
) -> Result<()> {
    let mut l = plan_concat(outer, a_inner, b_inner, Operand::of(a), Operand::of(b), Operand::of(y))?;
    l.params.a = a.device_ptr(device);
    l.params.b = b.device_ptr(device);
    l.params.y = y.device_ptr(device);
    run(device, &l)
}

/// The timestep embedding of `timesteps` (f32 on the device) into `y[count, dim]`.
pub fn timestep_embedding(
    device: &CudaDevice,
    count: usize,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f32,
    timesteps: &DeviceValues,
    y: &mut DeviceValues,
) -> Result<()> {
    let mut l = plan_timestep_embedding(
        count,
        dim,
        flip_sin_to_cos,
        freq_shift,
        Operand::of(timesteps),
        Operand::of(y),
    )?;
    l.params.timesteps = timesteps.device_ptr(device);
    l.params.y = y.device_ptr(device);
    run(device, &l)
}

/// Helpers of the GPU-vs-CPU-twin tests (here and in `norm.rs`).
#[cfg(test)]
pub(crate) mod test_support {
    use super::DeviceValues;
    use crate::backend::cuda::CudaDevice;
    use crate::backend::test_util::{check_close, host_data, GPU_ELEM_TOL, GPU_NORM_TOL};
    use crate::error::{Error, Result};
    use crate::format::DType;

    /// The storage types every kernel is instantiated for.
    pub const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

    /// `values` rounded to `dtype` (what the kernels read and write).
    pub fn rounded(values: &[f32], dtype: DType) -> Vec<f32> {
        host_data(values, dtype).to_f32()
    }
    pub fn upload(dev: &CudaDevice, values: &[f32], dtype: DType) -> Result<DeviceValues> {
        DeviceValues::upload(dev, &host_data(values, dtype))
    }
    /// A NaN-poisoned output buffer, so an element the kernel never writes fails the check.
    pub fn output(dev: &CudaDevice, dtype: DType, len: usize) -> Result<DeviceValues> {
        DeviceValues::poisoned(dev, dtype, len)
    }
    pub fn download(dev: &CudaDevice, v: &DeviceValues) -> Result<Vec<f32>> {
        Ok(v.to_host(dev)?.to_f32())
    }
    /// The kernel tests' bound (`check_close`: norm-wise AND element-wise, NaN never passes)
    /// between a kernel's output and its CPU twin's, both in the storage dtype.
    pub fn check(what: &str, got: &[f32], expected: &[f32]) -> Result<f64> {
        check_close(got, expected, GPU_NORM_TOL, GPU_ELEM_TOL)
            .map_err(|e| Error::Invalid(format!("{what}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{check, download, output, rounded, upload, DTYPES};
    use super::*;
    use crate::backend::cpu;
    use crate::backend::test_util::TestRng;
    use crate::backend::Device;
    use crate::test_device;

    // CPU twins (the reference each kernel is compared with, on dtype-rounded inputs, its
    // output rounded to the dtype):
    //   eltwise_gelu / silu   cpu::elementwise::{gelu, silu}
    //   eltwise_add           cpu::elementwise::broadcast_binary(+)
    //   eltwise_cfg           cpu::elementwise::cfg_combine (also what the pipeline runs)
    //   geglu                 cpu::elementwise::geglu
    //   upsample_nearest      cpu::layout::upsample_nearest_to (== upsample_nearest2x for 2x)
    //   concat                cpu::layout::cat
    //   timestep_embedding    cpu::embed::timestep_embedding

    /// A CPU reference of a unary op.
    type Reference = fn(&[f32]) -> Vec<f32>;
    /// (planes, input size, output size).
    type UpsampleCase = (usize, (usize, usize), (usize, usize));

    fn op(dtype: DType, len: usize) -> Operand {
        Operand::new(dtype, len)
    }

    fn gelu_silu_match_cpu(device: &Device) -> Result<()> {
        let mut rng = TestRng::fresh("gelu_silu");
        for dtype in DTYPES {
            for n in [1, 257, 5000, 70_001] {
                let x = rounded(&rng.vec(n).iter().map(|v| 5.0 * v).collect::<Vec<_>>(), dtype);
                let cases: [(Unary, Reference); 2] =
                    [(Unary::Gelu, cpu::elementwise::gelu), (Unary::Silu, cpu::elementwise::silu)];
                for (u, reference) in cases {
                    let expected = rounded(&reference(&x), dtype);
                    let plan = plan_unary(u, n, op(dtype, n), op(dtype, n))?;
                    let got = match device {
                        Device::Cpu => expected.clone(),
                        Device::Cuda(dev) => {
                            let mut y = output(dev, dtype, n)?;
                            unary(dev, u, n, &upload(dev, &x, dtype)?, &mut y)?;
                            download(dev, &y)?
                        }
                    };
                    check(&format!("{} n {n}", plan.kernel), &got, &expected)?;
                }
            }
        }
        Ok(())
    }
    test_device!(gelu_silu_match_cpu);

    /// Residual add (same shape), the time embedding's `[B, C, 1, 1]` over `[B, C, H, W]`, a
    /// bias `[C]` over `[B, S, C]`, a scalar.
    const ADD_SHAPES: &[(&[usize], &[usize])] = &[
        (&[2, 3, 5, 7], &[2, 3, 5, 7]),
        (&[2, 320, 9, 9], &[2, 320, 1, 1]),
        (&[2, 77, 64], &[64]),
        (&[3, 5], &[1]),
        (&[1, 70_001], &[1, 70_001]),
    ];

    fn add_and_cfg_match_cpu(device: &Device) -> Result<()> {
        let mut rng = TestRng::fresh("add_cfg");
        for dtype in DTYPES {
            for &(a_shape, b_shape) in ADD_SHAPES {
                let (na, nb) = (a_shape.iter().product::<usize>(), b_shape.iter().product::<usize>());
                let a = rounded(&rng.vec(na), dtype);
                let b = rounded(&rng.vec(nb), dtype);
                let mut b_full = vec![1; a_shape.len() - b_shape.len()];
                b_full.extend_from_slice(b_shape);
                let expected = rounded(
                    &cpu::elementwise::broadcast_binary(&a, a_shape, &b, &b_full, |x, y| x + y),
                    dtype,
                );
                let plan = plan_add(a_shape, b_shape, op(dtype, na), op(dtype, nb), op(dtype, na))?;
                let got = match device {
                    Device::Cpu => expected.clone(),
                    Device::Cuda(dev) => {
                        let mut y = output(dev, dtype, na)?;
                        let (ad, bd) = (upload(dev, &a, dtype)?, upload(dev, &b, dtype)?);
                        add(dev, a_shape, b_shape, &ad, &bd, &mut y)?;
                        download(dev, &y)?
                    }
                };
                check(&format!("{} {a_shape:?} + {b_shape:?}", plan.kernel), &got, &expected)?;
            }
            for n in [1, 4 * 64 * 64, 70_001] {
                let pred = rounded(&rng.vec(2 * n), dtype);
                let g = 1.0 + 9.0 * rng.uniform();
                let expected = rounded(&cpu::elementwise::cfg_combine(&pred[..n], &pred[n..], g), dtype);
                let plan = plan_cfg(n, g, op(dtype, 2 * n), op(dtype, n))?;
                let got = match device {
                    Device::Cpu => expected.clone(),
                    Device::Cuda(dev) => {
                        let mut y = output(dev, dtype, n)?;
                        cfg_combine(dev, n, g, &upload(dev, &pred, dtype)?, &mut y)?;
                        download(dev, &y)?
                    }
                };
                check(&format!("{} n {n} guidance {g}", plan.kernel), &got, &expected)?;
            }
        }
        Ok(())
    }
    test_device!(add_and_cfg_match_cpu);

    fn geglu_matches_cpu(device: &Device) -> Result<()> {
        let mut rng = TestRng::fresh("geglu");
        for dtype in DTYPES {
            for (rows, half) in [(1, 1), (3, 5), (77, 160), (2, 1280)] {
                let x = rounded(&rng.vec(rows * 2 * half).iter().map(|v| 4.0 * v).collect::<Vec<_>>(), dtype);
                let expected = rounded(&cpu::elementwise::geglu(&x, half), dtype);
                let plan = plan_geglu(rows, half, op(dtype, x.len()), op(dtype, rows * half))?;
                let got = match device {
                    Device::Cpu => expected.clone(),
                    Device::Cuda(dev) => {
                        let mut y = output(dev, dtype, rows * half)?;
                        geglu(dev, rows, half, &upload(dev, &x, dtype)?, &mut y)?;
                        download(dev, &y)?
                    }
                };
                check(&format!("{} [{rows}, 2 x {half}]", plan.kernel), &got, &expected)?;
            }
        }
        Ok(())
    }
    test_device!(geglu_matches_cpu);

    /// (planes, in, out): 2x (even and odd sizes), explicit odd sizes up and down, identity.
    const UPSAMPLE_CASES: &[UpsampleCase] = &[
        (6, (5, 7), (10, 14)),
        (640, (8, 8), (16, 16)),
        (4, (5, 7), (11, 13)),
        (3, (3, 3), (7, 5)),
        (2, (9, 9), (4, 6)),
        (2, (8, 8), (8, 8)),
    ];

    fn upsample_matches_cpu(device: &Device) -> Result<()> {
        let mut rng = TestRng::fresh("upsample");
        for dtype in DTYPES {
            for &(planes, (h, w), (oh, ow)) in UPSAMPLE_CASES {
                let x = rounded(&rng.vec(planes * h * w), dtype);
                let expected = cpu::layout::upsample_nearest_to(&x, planes, (h, w), (oh, ow));
                let n = planes * oh * ow;
                let plan = plan_upsample_nearest(planes, (h, w), (oh, ow), op(dtype, x.len()), op(dtype, n))?;
                let got = match device {
                    Device::Cpu => expected.clone(),
                    Device::Cuda(dev) => {
                        let mut y = output(dev, dtype, n)?;
                        let xd = upload(dev, &x, dtype)?;
                        if (oh, ow) == (2 * h, 2 * w) {
                            upsample_nearest2x(dev, planes, (h, w), &xd, &mut y)?;
                        } else {
                            upsample_nearest(dev, planes, (h, w), (oh, ow), &xd, &mut y)?;
                        }
                        download(dev, &y)?
                    }
                };
                // A copy: exact.
                check(&format!("{} {planes} x {h}x{w} -> {oh}x{ow}", plan.kernel), &got, &expected)?;
                assert_eq!(got, expected, "{} {planes} x {h}x{w} -> {oh}x{ow} is a copy", plan.kernel);
            }
        }
        Ok(())
    }
    test_device!(upsample_matches_cpu);

    fn concat_matches_cpu(device: &Device) -> Result<()> {
        let mut rng = TestRng::fresh("concat");
        let cases: [(&[usize], &[usize]); 3] = [
            (&[2, 3, 4, 5], &[2, 6, 4, 5]),
            (&[1, 1, 1, 1], &[1, 2, 1, 1]),
            (&[2, 640, 16, 16], &[2, 320, 16, 16]),
        ];
        for dtype in DTYPES {
            for (a_shape, b_shape) in cases {
                let (na, nb) = (a_shape.iter().product::<usize>(), b_shape.iter().product::<usize>());
                let (a, b) = (rounded(&rng.vec(na), dtype), rounded(&rng.vec(nb), dtype));
                let inner: usize = a_shape[2..].iter().product();
                let expected = cpu::layout::cat(&[(&a, a_shape[1]), (&b, b_shape[1])], a_shape[0], inner);
                let plan =
                    plan_concat_channels(a_shape, b_shape, op(dtype, na), op(dtype, nb), op(dtype, na + nb))?;
                let got = match device {
                    Device::Cpu => expected.clone(),
                    Device::Cuda(dev) => {
                        let mut y = output(dev, dtype, na + nb)?;
                        let (ad, bd) = (upload(dev, &a, dtype)?, upload(dev, &b, dtype)?);
                        concat_channels(dev, a_shape, b_shape, &ad, &bd, &mut y)?;
                        download(dev, &y)?
                    }
                };
                check(&format!("{} {a_shape:?} ++ {b_shape:?}", plan.kernel), &got, &expected)?;
                assert_eq!(got, expected, "{} is a copy", plan.kernel);
            }
        }
        Ok(())
    }
    test_device!(concat_matches_cpu);

    fn timestep_embedding_matches_cpu(device: &Device) -> Result<()> {
        let mut rng = TestRng::fresh("timestep_embedding");
        // SD2's UNet (320, flip, shift 0), an odd dim, the other convention, one timestep.
        let cases = [(2, 320, true, 0.0), (3, 321, true, 0.0), (2, 256, false, 1.0), (1, 1280, true, 0.0)];
        for dtype in DTYPES {
            for (count, dim, flip, shift) in cases {
                let t: Vec<f32> = (0..count).map(|_| (1000.0 * rng.uniform()).floor()).collect();
                let expected = rounded(&cpu::embed::timestep_embedding(&t, dim, flip, shift), dtype);
                let plan = plan_timestep_embedding(
                    count,
                    dim,
                    flip,
                    shift,
                    op(DType::F32, count),
                    op(dtype, count * dim),
                )?;
                let got = match device {
                    Device::Cpu => expected.clone(),
                    Device::Cuda(dev) => {
                        let mut y = output(dev, dtype, count * dim)?;
                        timestep_embedding(
                            dev,
                            count,
                            dim,
                            flip,
                            shift,
                            &upload(dev, &t, DType::F32)?,
                            &mut y,
                        )?;
                        download(dev, &y)?
                    }
                };
                check(
                    &format!("{} t {t:?} dim {dim} flip {flip} shift {shift}", plan.kernel),
                    &got,
                    &expected,
                )?;
            }
        }
        Ok(())
    }
    test_device!(timestep_embedding_matches_cpu);

    #[test]
    fn plans_pick_kernels_and_grids() -> Result<()> {
        let l = plan_unary(Unary::Silu, 1000, op(DType::F16, 1000), op(DType::F16, 1000))?;
        assert_eq!(l.kernel, "sdsparse_eltwise_silu_f16");
        assert_eq!((l.cfg.grid_dim, l.cfg.block_dim), ((4, 1, 1), (256, 1, 1)));
        let l = plan_add(
            &[2, 320, 64, 64],
            &[2, 320, 1, 1],
            op(DType::BF16, 2 * 320 * 4096),
            op(DType::BF16, 640),
            op(DType::BF16, 2 * 320 * 4096),
        )?;
        assert_eq!(l.kernel, "sdsparse_eltwise_add_bf16");
        assert_eq!((l.params.n, l.params.b_div, l.params.b_len), (2 * 320 * 4096, 4096, 640));
        let l = plan_cfg(100, 7.5, op(DType::F32, 200), op(DType::F32, 100))?;
        assert_eq!((l.kernel.as_str(), l.params.alpha), ("sdsparse_eltwise_cfg_f32", 7.5));
        let l = plan_upsample_nearest(
            640,
            (8, 8),
            (16, 16),
            op(DType::F16, 640 * 64),
            op(DType::F16, 640 * 256),
        )?;
        assert_eq!((l.params.out_h, l.cfg.grid_dim.0), (16, 640));
        let l = plan_timestep_embedding(2, 320, true, 0.0, op(DType::F32, 2), op(DType::F16, 640))?;
        assert_eq!((l.kernel.as_str(), l.params.flip_sin_to_cos), ("sdsparse_timestep_embedding_f16", 1));
        Ok(())
    }

    #[test]
    fn broadcast_runs() {
        assert_eq!(broadcast_run(&[2, 3, 4], &[2, 3, 4]).unwrap(), (1, 24));
        assert_eq!(broadcast_run(&[2, 3, 4, 5], &[2, 3, 1, 1]).unwrap(), (20, 6));
        assert_eq!(broadcast_run(&[2, 5, 8], &[8]).unwrap(), (1, 8));
        assert_eq!(broadcast_run(&[2, 1, 8], &[2, 1, 8]).unwrap(), (1, 16));
        assert_eq!(broadcast_run(&[2, 3], &[1]).unwrap(), (6, 1));
        assert_eq!(broadcast_run(&[1, 3], &[3]).unwrap(), (1, 3));
        // A gap inside the run, a mismatch, a b larger than a: not expressible, clear errors.
        assert!(broadcast_run(&[2, 3, 4], &[2, 1, 4]).is_err());
        assert!(broadcast_run(&[2, 3, 4], &[5]).is_err());
        assert!(broadcast_run(&[4], &[2, 4]).is_err());
    }

    /// Every launcher's host-side validation, without a GPU: shapes, dtypes, buffer sizes, the
    /// 2^31-element limit of the 32-bit indexing, parameters that make no sense.
    #[test]
    fn plans_reject_bad_arguments() {
        let f16 = |len| op(DType::F16, len);
        let big = usize::MAX / 4;
        let msg = |r: Result<Launch<EltwiseParams>>| r.unwrap_err().to_string();
        // 2^31 elements: rejected before any buffer is looked at.
        assert!(msg(plan_unary(Unary::Gelu, 1 << 31, f16(big), f16(big))).contains("too large"));
        assert!(plan_unary(Unary::Gelu, (1 << 31) - 1, f16(big), f16(big)).is_ok());
        assert!(msg(plan_unary(Unary::Gelu, 0, f16(1), f16(1))).contains("empty"));
        // Dtype mismatches and short buffers.
        assert!(msg(plan_unary(Unary::Silu, 10, f16(10), op(DType::F32, 10))).contains("expects f16"));
        assert!(msg(plan_unary(Unary::Silu, 10, f16(9), f16(10))).contains("needs 10"));
        assert!(msg(plan_unary(Unary::Silu, 10, f16(10), f16(9))).contains("output"));
        assert!(plan_add(&[2, 3], &[2, 3], f16(6), f16(5), f16(6)).is_err());
        assert!(plan_add(&[2, 3], &[3, 2], f16(6), f16(6), f16(6)).is_err());
        assert!(plan_add(&[65536, 32768], &[1], f16(big), f16(1), f16(big)).is_err());
        assert!(plan_add(&[usize::MAX, 3], &[1], f16(big), f16(1), f16(big)).is_err());
        // CFG: the prediction holds both halves; the guidance is finite.
        assert!(plan_cfg(10, 7.5, f16(19), f16(10)).is_err());
        assert!(plan_cfg(10, f32::NAN, f16(20), f16(10)).is_err());
        assert!(plan_cfg(1 << 30, 7.5, f16(big), f16(big)).is_err(), "2n past 2^31");
        // GEGLU reads 2 * half per row.
        assert!(plan_geglu(4, 8, f16(63), f16(32)).is_err());
        assert!(plan_geglu(4, 0, f16(64), f16(32)).is_err());
        assert!(plan_geglu(1 << 16, 1 << 14, f16(big), f16(big)).is_err(), "input past 2^31");
        // Upsampling and concatenation.
        assert!(plan_upsample_nearest(2, (4, 4), (8, 8), f16(31), f16(128)).is_err());
        assert!(plan_upsample_nearest(2, (4, 0), (8, 8), f16(32), f16(128)).is_err());
        assert!(plan_upsample_nearest(1 << 20, (4, 4), (64, 64), f16(big), f16(big)).is_err());
        assert!(plan_concat_channels(&[2, 3, 4], &[2, 3, 5], f16(24), f16(30), f16(54)).is_err());
        assert!(plan_concat_channels(&[2, 3, 4], &[3, 3, 4], f16(24), f16(36), f16(60)).is_err());
        assert!(plan_concat_channels(&[2, 3, 4], &[2, 1, 4], f16(24), f16(8), f16(31)).is_err());
        assert!(plan_concat_channels(&[2, 3, 4], &[2, 1, 4], f16(24), op(DType::BF16, 8), f16(32)).is_err());
        assert!(plan_concat_channels(&[2, 3, 4], &[2, 1, 4], f16(24), f16(8), f16(32)).is_ok());
        // Timestep embedding: f32 timesteps, a dim with frequencies.
        assert!(plan_timestep_embedding(2, 320, true, 0.0, f16(2), f16(640)).is_err());
        assert!(plan_timestep_embedding(2, 1, true, 0.0, op(DType::F32, 2), f16(2)).is_err());
        assert!(plan_timestep_embedding(2, 4, true, 2.0, op(DType::F32, 2), f16(8)).is_err());
        assert!(plan_timestep_embedding(2, 320, true, 0.0, op(DType::F32, 1), f16(640)).is_err());
    }

    #[test]
    fn upsample_reference_follows_pytorch() {
        // F.interpolate(torch.arange(3.).view(1, 1, 1, 3), size=(1, 7), mode="nearest"):
        // [0, 0, 0, 1, 1, 2, 2]; (1, 9) -> (1, 4): [0, 2, 4, 6].
        assert_eq!(
            cpu::layout::upsample_nearest_to(&[0.0, 1.0, 2.0], 1, (1, 3), (1, 7)),
            [0., 0., 0., 1., 1., 2., 2.]
        );
        let x: Vec<f32> = (0..9).map(|v| v as f32).collect();
        assert_eq!(cpu::layout::upsample_nearest_to(&x, 1, (1, 9), (1, 4)), [0., 2., 4., 6.]);
        // For 2x it is the existing reference.
        let x = TestRng::new(5).vec(3 * 5 * 7);
        assert_eq!(
            cpu::layout::upsample_nearest_to(&x, 3, (5, 7), (10, 14)),
            cpu::layout::upsample_nearest2x(&x, 3, 5, 7)
        );
    }

    /// The check of the GPU tests fails on the bugs these kernels could plausibly have (each a
    /// mutant of the CPU twin standing in for a wrong kernel): a check that cannot fail is worth
    /// nothing.
    #[test]
    fn checks_catch_planted_bugs() {
        let mut rng = TestRng::new(11);
        let x = rounded(&rng.vec(2 * 3 * 5 * 7), DType::F16);
        // Broadcast add indexing b[i % b_len] instead of b[(i / b_div) % b_len].
        let (a_shape, b_shape) = ([2, 3, 5, 7], [2, 3, 1, 1]);
        let b = rng.vec(6);
        let good = cpu::elementwise::broadcast_binary(&x, &a_shape, &b, &b_shape, |p, q| p + q);
        let bad: Vec<f32> = x.iter().enumerate().map(|(i, v)| v + b[i % 6]).collect();
        assert!(check("add", &bad, &good).is_err());
        // CFG with uncond and cond swapped.
        let (u, c) = x.split_at(x.len() / 2);
        assert!(check(
            "cfg",
            &cpu::elementwise::cfg_combine(c, u, 7.5),
            &cpu::elementwise::cfg_combine(u, c, 7.5)
        )
        .is_err());
        // GEGLU with hidden and gate swapped.
        let swapped: Vec<f32> = x.chunks(10).flat_map(|r| [&r[5..], &r[..5]].concat()).collect();
        assert!(
            check("geglu", &cpu::elementwise::geglu(&swapped, 5), &cpu::elementwise::geglu(&x, 5)).is_err()
        );
        // Upsampling rounding the source index instead of flooring it.
        let good = cpu::layout::upsample_nearest_to(&x, 6, (5, 7), (11, 13));
        let src =
            |d: usize, i: usize, o: usize| ((d as f32 * i as f32 / o as f32).round() as usize).min(i - 1);
        let bad: Vec<f32> = (0..6 * 11 * 13)
            .map(|k| {
                let (p, oy, ox) = (k / 143, k / 13 % 11, k % 13);
                x[(p * 5 + src(oy, 5, 11)) * 7 + src(ox, 7, 13)]
            })
            .collect();
        assert!(check("upsample", &bad, &good).is_err());
        // Concatenation in the wrong order.
        let (a, b) = x.split_at(2 * 3 * 7);
        assert!(check(
            "concat",
            &cpu::layout::cat(&[(b, 2), (a, 3)], 2, 7),
            &cpu::layout::cat(&[(a, 3), (b, 2)], 2, 7)
        )
        .is_err());
        // Timestep embedding without the sin/cos flip, or with SD1's frequency shift.
        let t = [981.0, 1.0];
        let good = cpu::embed::timestep_embedding(&t, 320, true, 0.0);
        assert!(check("timestep", &cpu::embed::timestep_embedding(&t, 320, false, 0.0), &good).is_err());
        assert!(check("timestep", &cpu::embed::timestep_embedding(&t, 320, true, 1.0), &good).is_err());
        // An output element never written (the poisoned buffer's NaN).
        let mut unwritten = good.clone();
        unwritten[319] = f32::NAN;
        assert!(check("timestep", &unwritten, &good).is_err());
    }
}
