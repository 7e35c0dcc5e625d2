//! Launchers of the normalisation kernels of `cuda/norm.cu`: group norm (optionally fused with
//! SiLU, as SD2's ResNet blocks apply it) and layer norm, for f32 / f16 / bf16 activations with
//! f32 statistics and f32 `gamma` / `beta`.
//!
//! As in `pointwise.rs`, a `plan_*` function checks everything on the host first (shapes, group
//! divisibility, dtypes, buffer sizes, the 2^31-element and grid limits), and the CPU twins are
//! the references of `backend::cpu::norm`, compared in the `test_device!` tests below.

use super::decompress::DeviceValues;
use super::device::CudaDevice;
use super::params::{GroupNormParams, LayerNormParams, NORM_FLAG_SILU, NORM_MAX_SPLITS};
use super::pointwise::{
    check_operand, elements, grid_1d, kernel_name, run, to_i32, Launch, Operand, THREADS,
};
use crate::error::{Error, Result};
use crate::format::DType;
use cudarc::driver::LaunchConfig;

/// Values per statistics slice the group norm aims for: enough CTAs for a large GPU on the
/// VAE's 10^6-value groups without slicing small groups.
const VALUES_PER_SPLIT: usize = 16384;
/// grid.y limit of a launch.
const MAX_GRID_Y: usize = 65535;
/// Rows per CTA of the layer norm kernel (one warp each).
const LAYER_NORM_ROWS_PER_CTA: usize = THREADS as usize / 32;

/// The two launches of one group norm and the f32 workspace they share.
#[derive(Debug, Clone)]
pub struct GroupNormPlan {
    pub stats: Launch<GroupNormParams>,
    pub apply: Launch<GroupNormParams>,
    /// Length of the `partials` workspace in f32 elements.
    pub partials_len: usize,
}

/// Slices per group of `group_len` values (1..=NORM_MAX_SPLITS).
pub fn group_norm_splits(group_len: usize) -> usize {
    group_len.div_ceil(VALUES_PER_SPLIT).clamp(1, NORM_MAX_SPLITS)
}

/// Group norm of `x[batch, channels, spatial]` in `groups` groups (+ SiLU when `silu`).
#[allow(clippy::too_many_arguments)]
pub fn plan_group_norm(
    (batch, channels, spatial): (usize, usize, usize),
    groups: usize,
    eps: f32,
    silu: bool,
    x: Operand,
    gamma: Operand,
    beta: Operand,
    y: Operand,
) -> Result<GroupNormPlan> {
    let op = "group_norm";
    let n = elements(op, "input", &[batch, channels, spatial])?;
    if groups == 0 || !channels.is_multiple_of(groups) {
        return Err(Error::Shape(format!("{op}: {channels} channels cannot form {groups} groups")));
    }
    if !(eps.is_finite() && eps > 0.0) {
        return Err(Error::Invalid(format!("{op}: eps {eps} must be positive")));
    }
    // grid.y of the apply kernel is batch * channels (>= batch * groups of the stats kernel).
    if batch * channels > MAX_GRID_Y {
        return Err(Error::Invalid(format!(
            "{op}: batch {batch} x {channels} channels exceeds the {MAX_GRID_Y} CTAs of grid.y"
        )));
    }
    check_operand(op, "input", x, x.dtype, n as usize)?;
    check_operand(op, "gamma", gamma, DType::F32, channels)?;
    check_operand(op, "beta", beta, DType::F32, channels)?;
    check_operand(op, "output", y, x.dtype, n as usize)?;
    let splits = group_norm_splits(channels / groups * spatial);
    let params = GroupNormParams {
        batch: to_i32(op, "batch", batch)?,
        channels: to_i32(op, "channels", channels)?,
        spatial: to_i32(op, "spatial", spatial)?,
        groups: to_i32(op, "groups", groups)?,
        splits: splits as i32,
        flags: if silu { NORM_FLAG_SILU } else { 0 },
        eps,
        ..Default::default()
    };
    let block = (THREADS, 1, 1);
    Ok(GroupNormPlan {
        stats: Launch {
            kernel: kernel_name("groupnorm_stats", x.dtype),
            cfg: LaunchConfig {
                grid_dim: (splits as u32, (batch * groups) as u32, 1),
                block_dim: block,
                shared_mem_bytes: 0,
            },
            params,
        },
        apply: Launch {
            kernel: kernel_name("groupnorm_apply", x.dtype),
            cfg: LaunchConfig {
                grid_dim: ((spatial as u32).div_ceil(THREADS), (batch * channels) as u32, 1),
                block_dim: block,
                shared_mem_bytes: 0,
            },
            params,
        },
        partials_len: batch * groups * splits * 2,
    })
}

/// Layer norm over `rows` rows of `dim` values.
pub fn plan_layer_norm(
    rows: usize,
    dim: usize,
    eps: f32,
    x: Operand,
    gamma: Operand,
    beta: Operand,
    y: Operand,
) -> Result<Launch<LayerNormParams>> {
    let op = "layer_norm";
    let n = elements(op, "input", &[rows, dim])?;
    if !(eps.is_finite() && eps > 0.0) {
        return Err(Error::Invalid(format!("{op}: eps {eps} must be positive")));
    }
    check_operand(op, "input", x, x.dtype, n as usize)?;
    check_operand(op, "gamma", gamma, DType::F32, dim)?;
    check_operand(op, "beta", beta, DType::F32, dim)?;
    check_operand(op, "output", y, x.dtype, n as usize)?;
    let mut cfg = grid_1d(n);
    cfg.grid_dim.0 = rows.div_ceil(LAYER_NORM_ROWS_PER_CTA) as u32;
    Ok(Launch {
        kernel: kernel_name("layernorm", x.dtype),
        cfg,
        params: LayerNormParams {
            rows: to_i32(op, "rows", rows)?,
            dim: to_i32(op, "dim", dim)?,
            eps,
            ..Default::default()
        },
    })
}

/// Group norm (+ SiLU) of `x[batch, channels, spatial]` into `y`; `gamma`, `beta` f32 `[channels]`.
#[allow(clippy::too_many_arguments)]
pub fn group_norm(
    device: &CudaDevice,
    shape: (usize, usize, usize),
    groups: usize,
    eps: f32,
    silu: bool,
    x: &DeviceValues,
    gamma: &DeviceValues,
    beta: &DeviceValues,
    y: &mut DeviceValues,
) -> Result<()> {
    let mut plan = plan_group_norm(
        shape,
        groups,
        eps,
        silu,
        Operand::of(x),
        Operand::of(gamma),
        Operand::of(beta),
        Operand::of(y),
    )?;
    // A fresh workspace per call (a few KiB); a pooled one comes with the GPU pipeline.
    let partials = device.alloc_zeros::<f32>(plan.partials_len)?;
    for l in [&mut plan.stats, &mut plan.apply] {
        l.params.x = x.device_ptr(device);
        l.params.gamma = gamma.device_ptr(device);
        l.params.beta = beta.device_ptr(device);
        l.params.y = y.device_ptr(device);
        l.params.partials = device.device_ptr(&partials);
    }
    run(device, &plan.stats)?;
    run(device, &plan.apply)?;
    // The workspace is freed stream-ordered after the apply kernel that reads it.
    drop(partials);
    Ok(())
}

/// Layer norm of `x[rows, dim]` into `y`; `gamma`, `beta` f32 `[dim]`.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm(
    device: &CudaDevice,
    rows: usize,
    dim: usize,
    eps: f32,
    x: &DeviceValues,
    gamma: &DeviceValues,
    beta: &DeviceValues,
    y: &mut DeviceValues,
) -> Result<()> {
    let mut l = plan_layer_norm(
        rows,
        dim,
        eps,
        Operand::of(x),
        Operand::of(gamma),
        Operand::of(beta),
        Operand::of(y),
    )?;
    l.params.x = x.device_ptr(device);
    l.params.gamma = gamma.device_ptr(device);
    l.params.beta = beta.device_ptr(device);
    l.params.y = y.device_ptr(device);
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

    // CPU twins: cpu::norm::group_norm (f64 two-pass statistics) and cpu::norm::layer_norm, on
    // dtype-rounded inputs with the output rounded to the dtype.

    fn op(dtype: DType, len: usize) -> Operand {
        Operand::new(dtype, len)
    }

    /// (batch, channels, spatial, groups, silu): tiny groups, SD2 UNet shapes (2 x 320 x 64x64
    /// is 3 slices per group), one spanning many slices (VAE-like, 40 x 16384 values per group:
    /// 40 slices), one at the 64-slice cap, and a mean far from zero (the one-pass-sum trap).
    const GROUP_NORM_CASES: &[(usize, usize, usize, usize, bool)] = &[
        (1, 4, 1, 2, false),
        (2, 64, 49, 32, true),
        (2, 320, 4096, 32, true),
        (1, 1280, 64, 32, false),
        (1, 40, 16384, 1, true),
        (1, 2, 600_000, 1, false),
    ];

    fn group_norm_matches_cpu(device: &Device) -> Result<()> {
        let mut rng = TestRng::fresh("group_norm");
        for dtype in DTYPES {
            for (i, &(batch, channels, spatial, groups, silu)) in GROUP_NORM_CASES.iter().enumerate() {
                let n = batch * channels * spatial;
                // The last case sits on a large offset: mean 3, spread 1.
                let offset = if i + 1 == GROUP_NORM_CASES.len() { 3.0 } else { 0.0 };
                let x = rounded(&rng.vec(n).iter().map(|v| offset + 2.0 * v).collect::<Vec<_>>(), dtype);
                let gamma: Vec<f32> = (0..channels).map(|_| rng.nonzero() * 2.0).collect();
                let beta = rng.vec(channels);
                let eps = 1e-5;
                let expected = rounded(
                    &cpu::norm::group_norm(&x, channels, spatial, groups, &gamma, &beta, eps, silu),
                    dtype,
                );
                let plan = plan_group_norm(
                    (batch, channels, spatial),
                    groups,
                    eps,
                    silu,
                    op(dtype, n),
                    op(DType::F32, channels),
                    op(DType::F32, channels),
                    op(dtype, n),
                )?;
                let got = match device {
                    Device::Cpu => expected.clone(),
                    Device::Cuda(dev) => {
                        let mut y = output(dev, dtype, n)?;
                        let (g, b) = (upload(dev, &gamma, DType::F32)?, upload(dev, &beta, DType::F32)?);
                        group_norm(
                            dev,
                            (batch, channels, spatial),
                            groups,
                            eps,
                            silu,
                            &upload(dev, &x, dtype)?,
                            &g,
                            &b,
                            &mut y,
                        )?;
                        download(dev, &y)?
                    }
                };
                let what = format!(
                    "{} [{batch}, {channels}, {spatial}] / {groups} groups, {} slices, silu {silu}",
                    plan.stats.kernel, plan.stats.params.splits
                );
                check(&what, &got, &expected)?;
            }
        }
        Ok(())
    }
    test_device!(group_norm_matches_cpu);

    fn layer_norm_matches_cpu(device: &Device) -> Result<()> {
        let mut rng = TestRng::fresh("layer_norm");
        for dtype in DTYPES {
            for (rows, dim) in [(1, 1), (7, 33), (154, 1024), (4096, 320), (3, 5000)] {
                let n = rows * dim;
                let x = rounded(&rng.vec(n).iter().map(|v| 0.5 + 3.0 * v).collect::<Vec<_>>(), dtype);
                let gamma: Vec<f32> = (0..dim).map(|_| rng.nonzero() * 2.0).collect();
                let beta = rng.vec(dim);
                let eps = 1e-5;
                let expected = rounded(&cpu::norm::layer_norm(&x, dim, &gamma, &beta, eps), dtype);
                let plan = plan_layer_norm(
                    rows,
                    dim,
                    eps,
                    op(dtype, n),
                    op(DType::F32, dim),
                    op(DType::F32, dim),
                    op(dtype, n),
                )?;
                let got = match device {
                    Device::Cpu => expected.clone(),
                    Device::Cuda(dev) => {
                        let mut y = output(dev, dtype, n)?;
                        let (g, b) = (upload(dev, &gamma, DType::F32)?, upload(dev, &beta, DType::F32)?);
                        layer_norm(dev, rows, dim, eps, &upload(dev, &x, dtype)?, &g, &b, &mut y)?;
                        download(dev, &y)?
                    }
                };
                check(&format!("{} [{rows}, {dim}]", plan.kernel), &got, &expected)?;
            }
        }
        Ok(())
    }
    test_device!(layer_norm_matches_cpu);

    #[test]
    fn plans_split_groups_and_size_grids() -> Result<()> {
        assert_eq!(group_norm_splits(1), 1);
        assert_eq!(group_norm_splits(16384), 1);
        assert_eq!(group_norm_splits(16385), 2);
        assert_eq!(group_norm_splits(10 * 4096), 3);
        assert_eq!(group_norm_splits(4 * 512 * 512), NORM_MAX_SPLITS);
        // SD2's VAE decoder at 512x512: 128 channels, 32 groups, 262144 positions.
        let n = 128 * 512 * 512;
        let p = plan_group_norm(
            (1, 128, 512 * 512),
            32,
            1e-6,
            true,
            op(DType::F16, n),
            op(DType::F32, 128),
            op(DType::F32, 128),
            op(DType::F16, n),
        )?;
        assert_eq!(
            (p.stats.kernel.as_str(), p.apply.kernel.as_str()),
            ("sdsparse_groupnorm_stats_f16", "sdsparse_groupnorm_apply_f16")
        );
        assert_eq!(p.stats.cfg.grid_dim, (64, 32, 1));
        assert_eq!(p.apply.cfg.grid_dim, (1024, 128, 1));
        assert_eq!((p.partials_len, p.apply.params.flags), (32 * 64 * 2, NORM_FLAG_SILU));
        let l = plan_layer_norm(
            4097,
            320,
            1e-5,
            op(DType::BF16, 4097 * 320),
            op(DType::F32, 320),
            op(DType::F32, 320),
            op(DType::BF16, 4097 * 320),
        )?;
        assert_eq!((l.kernel.as_str(), l.cfg.grid_dim.0), ("sdsparse_layernorm_bf16", 513));
        Ok(())
    }

    #[test]
    fn plans_reject_bad_arguments() {
        let f16 = |len| op(DType::F16, len);
        let f32 = |len| op(DType::F32, len);
        let big = usize::MAX / 4;
        let gn =
            |shape, groups, eps, x, gamma, y| plan_group_norm(shape, groups, eps, false, x, gamma, gamma, y);
        assert!(gn((2, 320, 64), 32, 1e-5, f16(40960), f32(320), f16(40960)).is_ok());
        assert!(gn((2, 320, 64), 30, 1e-5, f16(40960), f32(320), f16(40960)).is_err(), "320 % 30");
        assert!(gn((2, 320, 64), 0, 1e-5, f16(40960), f32(320), f16(40960)).is_err());
        assert!(gn((2, 320, 64), 32, 0.0, f16(40960), f32(320), f16(40960)).is_err(), "eps 0");
        assert!(gn((2, 320, 64), 32, 1e-5, f16(40960), f16(320), f16(40960)).is_err(), "gamma must be f32");
        assert!(gn((2, 320, 64), 32, 1e-5, f16(40960), f32(319), f16(40960)).is_err());
        assert!(gn((2, 320, 64), 32, 1e-5, f16(40960), f32(320), op(DType::BF16, 40960)).is_err());
        assert!(gn((2, 320, 64), 32, 1e-5, f16(40959), f32(320), f16(40960)).is_err());
        assert!(gn((2, 320, 0), 32, 1e-5, f16(1), f32(320), f16(1)).is_err(), "empty");
        assert!(gn((64, 1280, 64), 32, 1e-5, f16(big), f32(1280), f16(big)).is_err(), "grid.y");
        assert!(gn((1, 64, 1 << 25), 32, 1e-5, f16(big), f32(64), f16(big)).is_err(), "2^31 elements");
        let ln = |rows, dim, x, gamma, y| plan_layer_norm(rows, dim, 1e-5, x, gamma, gamma, y);
        assert!(ln(154, 1024, f16(154 * 1024), f32(1024), f16(154 * 1024)).is_ok());
        assert!(ln(154, 1024, f16(154 * 1024), f32(1023), f16(154 * 1024)).is_err());
        assert!(ln(154, 1024, f16(154 * 1024), f32(1024), f32(154 * 1024)).is_err());
        assert!(ln(1 << 21, 1024, f16(big), f32(1024), f16(big)).is_err(), "2^31 elements");
        assert!(ln(0, 1024, f16(1), f32(1024), f16(1)).is_err());
    }

    /// The workspace-size and flag constants agree with the header the kernels are built from.
    #[test]
    fn header_constants_agree() {
        let header =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/cuda/include/sdsparse_params.h"))
                .unwrap();
        assert!(header.contains(&format!("#define SDS_NORM_MAX_SPLITS {NORM_MAX_SPLITS}\n")));
        assert!(header.contains(&format!("#define SDS_NORM_FLAG_SILU {NORM_FLAG_SILU}u\n")));
    }

    /// The group norm check fails on the kernel bugs it is there for: a wrong channel-to-group
    /// map, statistics of a slice instead of the whole group, a forgotten SiLU, the unbiased
    /// variance in the layer norm.
    #[test]
    fn checks_catch_planted_bugs() {
        let mut rng = TestRng::new(13);
        let (c, s, g) = (64, 49, 32);
        let x: Vec<f32> =
            rng.vec(2 * c * s).iter().enumerate().map(|(i, v)| v + (i / s % 7) as f32).collect();
        let gamma: Vec<f32> = (0..c).map(|_| rng.nonzero()).collect();
        let beta = rng.vec(c);
        let good = cpu::norm::group_norm(&x, c, s, g, &gamma, &beta, 1e-5, true);
        // Channel c in group c % groups instead of c / (channels / groups).
        let mut permuted = vec![0.0; x.len()];
        let cpg = c / g;
        let perm = |ch: usize| (ch % g) * cpg + ch / g; // where channel ch sits if groups were interleaved
        for b in 0..2 {
            for ch in 0..c {
                let (src, dst) = ((b * c + ch) * s, (b * c + perm(ch)) * s);
                permuted[dst..dst + s].copy_from_slice(&x[src..src + s]);
            }
        }
        let gp: Vec<f32> = (0..c).map(|ch| gamma[(0..c).find(|&k| perm(k) == ch).unwrap()]).collect();
        let bp: Vec<f32> = (0..c).map(|ch| beta[(0..c).find(|&k| perm(k) == ch).unwrap()]).collect();
        let y = cpu::norm::group_norm(&permuted, c, s, g, &gp, &bp, 1e-5, true);
        let mut bad = vec![0.0; x.len()];
        for b in 0..2 {
            for ch in 0..c {
                let (src, dst) = ((b * c + perm(ch)) * s, (b * c + ch) * s);
                bad[dst..dst + s].copy_from_slice(&y[src..src + s]);
            }
        }
        assert!(check("group map", &bad, &good).is_err());
        // Statistics of the first half of each group only (a slice merge that drops slices).
        assert!(check("slices", &cpu::norm::group_norm(&x, c, s, 2 * g, &gamma, &beta, 1e-5, true), &good)
            .is_err());
        // SiLU forgotten.
        assert!(
            check("silu", &cpu::norm::group_norm(&x, c, s, g, &gamma, &beta, 1e-5, false), &good).is_err()
        );
        // Layer norm with the unbiased variance (n - 1), on rows of 33.
        let x = rng.vec(7 * 33);
        let (gamma, beta) = (vec![1.0; 33], vec![0.0; 33]);
        let good = cpu::norm::layer_norm(&x, 33, &gamma, &beta, 1e-5);
        let bad: Vec<f32> = good.iter().map(|v| v * (32.0f32 / 33.0).sqrt()).collect();
        assert!(check("unbiased", &bad, &good).is_err());
    }
}
