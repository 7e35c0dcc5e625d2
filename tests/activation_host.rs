//! The activation and tensor kernels' own CUDA source (`cuda/norm.cu`, `cuda/pointwise.cu`,
//! `cuda/tensor.cu`), compiled for
//! the host on the CUDA stand-in of `tests/kernel_index/cuda_shim/` (fiber threads with exact
//! `__syncthreads` and warp-shuffle semantics), launched with the grids and parameters of the
//! Rust launch plans (`backend::cuda::{norm, pointwise}`) and compared with the CPU references
//! by the GPU tests' `check_close`, on fresh random inputs in f32, f16 and bf16 storage with
//! NaN-poisoned outputs. This is the kernels' logic and index math checked without a GPU; the
//! GPU tests (`test_device!` in the launcher files) repeat it on the device.

use half::{bf16, f16};
use sdsparse::backend::cpu;
use sdsparse::backend::cuda::norm::{plan_group_norm, plan_layer_norm};
use sdsparse::backend::cuda::pointwise::{
    plan_add, plan_cfg, plan_concat_channels, plan_geglu, plan_timestep_embedding, plan_unary,
    plan_upsample_nearest, Launch, Operand, Unary,
};
use sdsparse::backend::test_util::{check_close, TestRng, GPU_ELEM_TOL, GPU_NORM_TOL};
use sdsparse::format::DType;
use std::ffi::{c_void, CString};

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// A CPU reference of a unary op.
type Reference = fn(&[f32]) -> Vec<f32>;

/// A host buffer in a storage dtype (f16 / bf16 as bit patterns, as on the device).
enum Buf {
    F32(Vec<f32>),
    Bits(Vec<u16>, DType),
}

impl Buf {
    fn of(values: &[f32], dtype: DType) -> Buf {
        match dtype {
            DType::F32 => Buf::F32(values.to_vec()),
            DType::F16 => Buf::Bits(values.iter().map(|&v| f16::from_f32(v).to_bits()).collect(), dtype),
            DType::BF16 => Buf::Bits(values.iter().map(|&v| bf16::from_f32(v).to_bits()).collect(), dtype),
        }
    }
    /// An output buffer of NaNs: an element the kernel never writes fails the check.
    fn poisoned(len: usize, dtype: DType) -> Buf {
        match dtype {
            DType::F32 => Buf::F32(vec![f32::NAN; len]),
            _ => Buf::Bits(vec![0xFFFF; len], dtype),
        }
    }
    fn values(&self) -> Vec<f32> {
        match self {
            Buf::F32(v) => v.clone(),
            Buf::Bits(v, DType::F16) => v.iter().map(|&b| f16::from_bits(b).to_f32()).collect(),
            Buf::Bits(v, _) => v.iter().map(|&b| bf16::from_bits(b).to_f32()).collect(),
        }
    }
    fn op(&self) -> Operand {
        match self {
            Buf::F32(v) => Operand::new(DType::F32, v.len()),
            Buf::Bits(v, d) => Operand::new(*d, v.len()),
        }
    }
    fn ptr(&self) -> u64 {
        match self {
            Buf::F32(v) => v.as_ptr() as u64,
            Buf::Bits(v, _) => v.as_ptr() as u64,
        }
    }
}

/// `values` rounded to `dtype`.
fn rounded(values: &[f32], dtype: DType) -> Vec<f32> {
    Buf::of(values, dtype).values()
}

/// Runs a planned launch on the host stand-in.
fn run<P>(l: &Launch<P>) {
    let (g, b) = (l.cfg.grid_dim, l.cfg.block_dim);
    assert_eq!((g.2, b.1, b.2), (1, 1, 1), "{}: the stand-in runs 2-D grids of 1-D blocks", l.kernel);
    let name = CString::new(l.kernel.as_str()).unwrap();
    // SAFETY: the plan checked every buffer's length against the sizes in `params`, and the
    // pointers were filled in from those buffers, which outlive the call.
    let rc = unsafe {
        sdsparse_kernel_index::sds_host_launch(
            name.as_ptr(),
            &l.params as *const P as *const c_void,
            g.0,
            g.1,
            b.0,
        )
    };
    assert_eq!(rc, 0, "{} is not among the host kernels", l.kernel);
}

fn check(what: &str, got: &Buf, expected: &[f32]) {
    let got = got.values();
    if let Err(e) = check_close(&got, expected, GPU_NORM_TOL, GPU_ELEM_TOL) {
        panic!("{what}: {e}");
    }
}

#[test]
fn host_unary_geglu_add_cfg() {
    let mut rng = TestRng::fresh("host_unary_geglu_add_cfg");
    for dtype in DTYPES {
        for n in [1, 300, 5000] {
            let x = Buf::of(&rng.vec(n).iter().map(|v| 5.0 * v).collect::<Vec<_>>(), dtype);
            let refs: [(Unary, Reference); 2] =
                [(Unary::Gelu, cpu::elementwise::gelu), (Unary::Silu, cpu::elementwise::silu)];
            for (u, reference) in refs {
                let y = Buf::poisoned(n, dtype);
                let mut l = plan_unary(u, n, x.op(), y.op()).unwrap();
                (l.params.a, l.params.y) = (x.ptr(), y.ptr());
                run(&l);
                check(&format!("{} n {n}", l.kernel), &y, &rounded(&reference(&x.values()), dtype));
            }
        }
        for (rows, half) in [(1, 1), (3, 5), (77, 160)] {
            let x = Buf::of(&rng.vec(rows * 2 * half).iter().map(|v| 4.0 * v).collect::<Vec<_>>(), dtype);
            let y = Buf::poisoned(rows * half, dtype);
            let mut l = plan_geglu(rows, half, x.op(), y.op()).unwrap();
            (l.params.x, l.params.y) = (x.ptr(), y.ptr());
            run(&l);
            check(&l.kernel, &y, &rounded(&cpu::elementwise::geglu(&x.values(), half), dtype));
        }
        let shapes: [(&[usize], &[usize]); 4] = [
            (&[2, 3, 5, 7], &[2, 3, 5, 7]),
            (&[2, 32, 9, 9], &[2, 32, 1, 1]),
            (&[2, 7, 64], &[64]),
            (&[3, 5], &[1]),
        ];
        for (a_shape, b_shape) in shapes {
            let na: usize = a_shape.iter().product();
            let (a, b) = (Buf::of(&rng.vec(na), dtype), Buf::of(&rng.vec(b_shape.iter().product()), dtype));
            let y = Buf::poisoned(na, dtype);
            let mut l = plan_add(a_shape, b_shape, a.op(), b.op(), y.op()).unwrap();
            (l.params.a, l.params.b, l.params.y) = (a.ptr(), b.ptr(), y.ptr());
            run(&l);
            let mut b_full = vec![1; a_shape.len() - b_shape.len()];
            b_full.extend_from_slice(b_shape);
            let reference =
                cpu::elementwise::broadcast_binary(&a.values(), a_shape, &b.values(), &b_full, |p, q| p + q);
            check(&format!("{} {a_shape:?} + {b_shape:?}", l.kernel), &y, &rounded(&reference, dtype));
        }
        let n = 4 * 9 * 9;
        let pred = Buf::of(&rng.vec(2 * n), dtype);
        let y = Buf::poisoned(n, dtype);
        let mut l = plan_cfg(n, 7.5, pred.op(), y.op()).unwrap();
        let elem = dtype.size_in_bytes() as u64;
        (l.params.a, l.params.b, l.params.y) = (pred.ptr(), pred.ptr() + n as u64 * elem, y.ptr());
        run(&l);
        let p = pred.values();
        check(&l.kernel, &y, &rounded(&cpu::elementwise::cfg_combine(&p[..n], &p[n..], 7.5), dtype));
    }
}

#[test]
fn host_upsample_concat_timestep() {
    let mut rng = TestRng::fresh("host_upsample_concat_timestep");
    for dtype in DTYPES {
        for (planes, hw, out) in
            [(6, (5, 7), (10, 14)), (4, (5, 7), (11, 13)), (3, (3, 3), (7, 5)), (2, (9, 9), (4, 6))]
        {
            let x = Buf::of(&rng.vec(planes * hw.0 * hw.1), dtype);
            let y = Buf::poisoned(planes * out.0 * out.1, dtype);
            let mut l = plan_upsample_nearest(planes, hw, out, x.op(), y.op()).unwrap();
            (l.params.x, l.params.y) = (x.ptr(), y.ptr());
            run(&l);
            let reference = cpu::layout::upsample_nearest_to(&x.values(), planes, hw, out);
            assert_eq!(y.values(), reference, "{} {hw:?} -> {out:?}", l.kernel);
        }
        let (a_shape, b_shape) = ([2, 3, 4, 5], [2, 6, 4, 5]);
        let (a, b) = (Buf::of(&rng.vec(120), dtype), Buf::of(&rng.vec(240), dtype));
        let y = Buf::poisoned(360, dtype);
        let mut l = plan_concat_channels(&a_shape, &b_shape, a.op(), b.op(), y.op()).unwrap();
        (l.params.a, l.params.b, l.params.y) = (a.ptr(), b.ptr(), y.ptr());
        run(&l);
        assert_eq!(
            y.values(),
            cpu::layout::cat(&[(&a.values(), 3), (&b.values(), 6)], 2, 20),
            "{}",
            l.kernel
        );
        for (count, dim, flip, shift) in [(2, 320, true, 0.0), (3, 321, true, 0.0), (2, 256, false, 1.0)] {
            let t: Vec<f32> = (0..count).map(|_| (1000.0 * rng.uniform()).floor()).collect();
            let tb = Buf::of(&t, DType::F32);
            let y = Buf::poisoned(count * dim, dtype);
            let mut l = plan_timestep_embedding(count, dim, flip, shift, tb.op(), y.op()).unwrap();
            (l.params.timesteps, l.params.y) = (tb.ptr(), y.ptr());
            run(&l);
            let reference = rounded(&cpu::embed::timestep_embedding(&t, dim, flip, shift), dtype);
            check(&format!("{} t {t:?} dim {dim}", l.kernel), &y, &reference);
        }
    }
}

#[test]
fn host_group_norm_and_layer_norm() {
    let mut rng = TestRng::fresh("host_group_norm_and_layer_norm");
    // (batch, channels, spatial, groups, silu, offset, forced slices): the plan's slicing (one
    // slice; 3 slices of 34,000 values), and forced counts past one warp's 32 lanes (the apply
    // kernel's two-per-lane merge) up to the 64 cap, with empty slices (64 slices of a 98-value
    // group), one on a mean of 3 far from zero. Forcing keeps the tensors small: the fibers of
    // the host stand-in are slow (each CTA is 256 fibers), and the slicing plan itself is tested in `backend::cuda::norm`.
    let cases = [
        (2, 32, 49, 16, true, 0.0, None),
        (1, 4, 1, 2, false, 0.0, None),
        (1, 2, 17_000, 1, true, 0.0, None),
        (1, 4, 49, 2, false, 0.0, Some(64)),
        (1, 3, 5_000, 1, false, 3.0, Some(37)),
    ];
    for dtype in DTYPES {
        for (batch, channels, spatial, groups, silu, offset, forced) in cases {
            let n = batch * channels * spatial;
            // The larger cases in f16 only (the storage type changes loads and stores, not the
            // reduction; the fibers of the host stand-in are slow).
            if n > 10_000 && dtype != DType::F16 {
                continue;
            }
            let x = Buf::of(&rng.vec(n).iter().map(|v| offset + 2.0 * v).collect::<Vec<_>>(), dtype);
            let gamma: Vec<f32> = (0..channels).map(|_| 2.0 * rng.nonzero()).collect();
            let beta = rng.vec(channels);
            let (gb, bb) = (Buf::of(&gamma, DType::F32), Buf::of(&beta, DType::F32));
            let y = Buf::poisoned(n, dtype);
            let mut plan = plan_group_norm(
                (batch, channels, spatial),
                groups,
                1e-5,
                silu,
                x.op(),
                gb.op(),
                bb.op(),
                y.op(),
            )
            .unwrap();
            if let Some(splits) = forced {
                plan.stats.cfg.grid_dim.0 = splits;
                (plan.stats.params.splits, plan.apply.params.splits) = (splits as i32, splits as i32);
                plan.partials_len = batch * groups * splits as usize * 2;
            }
            let partials = vec![f32::NAN; plan.partials_len];
            for l in [&mut plan.stats, &mut plan.apply] {
                (l.params.x, l.params.gamma, l.params.beta) = (x.ptr(), gb.ptr(), bb.ptr());
                (l.params.y, l.params.partials) = (y.ptr(), partials.as_ptr() as u64);
            }
            run(&plan.stats);
            assert!(partials.iter().all(|v| v.is_finite()), "{}: every slice written", plan.stats.kernel);
            run(&plan.apply);
            let reference =
                cpu::norm::group_norm(&x.values(), channels, spatial, groups, &gamma, &beta, 1e-5, silu);
            let what = format!(
                "{} [{batch}, {channels}, {spatial}] {} slices",
                plan.apply.kernel, plan.stats.params.splits
            );
            check(&what, &y, &rounded(&reference, dtype));
        }
        for (rows, dim) in [(1, 1), (7, 33), (20, 1024), (9, 320)] {
            let x = Buf::of(&rng.vec(rows * dim).iter().map(|v| 0.5 + 3.0 * v).collect::<Vec<_>>(), dtype);
            let gamma: Vec<f32> = (0..dim).map(|_| 2.0 * rng.nonzero()).collect();
            let beta = rng.vec(dim);
            let (gb, bb) = (Buf::of(&gamma, DType::F32), Buf::of(&beta, DType::F32));
            let y = Buf::poisoned(rows * dim, dtype);
            let mut l = plan_layer_norm(rows, dim, 1e-5, x.op(), gb.op(), bb.op(), y.op()).unwrap();
            (l.params.x, l.params.gamma, l.params.beta, l.params.y) = (x.ptr(), gb.ptr(), bb.ptr(), y.ptr());
            run(&l);
            let reference = cpu::norm::layer_norm(&x.values(), dim, &gamma, &beta, 1e-5);
            check(&format!("{} [{rows}, {dim}]", l.kernel), &y, &rounded(&reference, dtype));
        }
    }
}

/// The tensor kernels of `cuda/tensor.cu` (affine, casts, strided copies, embedding, softmax,
/// im2col) and the broadcast sub / mul / div of `cuda/pointwise.cu`, on the host stand-in, with
/// the plans of `backend::cuda::tensor_ops`, against their CPU twins.
#[test]
fn host_tensor_kernels() {
    use sdsparse::backend::cuda::tensor_ops::{
        plan_affine, plan_binary, plan_cast, plan_embedding, plan_im2col, plan_softmax, plan_strided_copy,
        Binary, Im2colShape, StridedView,
    };
    let mut rng = TestRng::fresh("host_tensor_kernels");
    for dtype in DTYPES {
        // Broadcast sub / mul / div.
        for (a_shape, b_shape) in [(&[2usize, 3, 5, 7][..], &[2usize, 3, 1, 1][..]), (&[2, 7, 16], &[16])] {
            let na: usize = a_shape.iter().product();
            let a = Buf::of(&rng.vec(na), dtype);
            let bv: Vec<f32> =
                rng.vec(b_shape.iter().product()).iter().map(|v| v + 3.0 * v.signum()).collect();
            let b = Buf::of(&bv, dtype);
            let mut b_full = vec![1; a_shape.len() - b_shape.len()];
            b_full.extend_from_slice(b_shape);
            for op in [Binary::Sub, Binary::Mul, Binary::Div] {
                let y = Buf::poisoned(na, dtype);
                let mut l = plan_binary(op, a_shape, b_shape, a.op(), b.op(), y.op()).unwrap();
                (l.params.a, l.params.b, l.params.y) = (a.ptr(), b.ptr(), y.ptr());
                run(&l);
                let reference =
                    cpu::elementwise::broadcast_binary(&a.values(), a_shape, &b.values(), &b_full, |p, q| {
                        op.apply(p, q)
                    });
                check(&format!("{} {a_shape:?} {b_shape:?}", l.kernel), &y, &rounded(&reference, dtype));
            }
        }
        // Affine.
        let x = Buf::of(&rng.vec(700), dtype);
        let y = Buf::poisoned(700, dtype);
        let mut l = plan_affine(700, 0.5, 0.5, x.op(), y.op()).unwrap();
        (l.params.x, l.params.y) = (x.ptr(), y.ptr());
        run(&l);
        check(&l.kernel, &y, &rounded(&cpu::elementwise::affine(&x.values(), 0.5, 0.5), dtype));
        // Strided copies: permutes of SD2's layouts and a narrow; exact.
        for (shape, perm) in
            [(&[2usize, 7, 3, 8][..], &[0usize, 2, 1, 3][..]), (&[2, 6, 3, 5], &[0, 2, 3, 1])]
        {
            let n: usize = shape.iter().product();
            let x = Buf::of(&rng.vec(n), dtype);
            let y = Buf::poisoned(n, dtype);
            let mut l = plan_strided_copy(&StridedView::permute(shape, perm), x.op(), y.op()).unwrap();
            (l.params.x, l.params.y) = (x.ptr(), y.ptr());
            run(&l);
            assert_eq!(
                y.values(),
                cpu::layout::permute(&x.values(), shape, perm),
                "{} {shape:?} {perm:?}",
                l.kernel
            );
        }
        let x = Buf::of(&rng.vec(2 * 10 * 3), dtype);
        let v = StridedView::narrow(2, 10, 3, 4, 5);
        let y = Buf::poisoned(v.len(), dtype);
        let mut l = plan_strided_copy(&v, x.op(), y.op()).unwrap();
        (l.params.x, l.params.y) = (x.ptr(), y.ptr());
        run(&l);
        assert_eq!(y.values(), cpu::layout::narrow(&x.values(), 2, 10, 3, 4, 5), "{} narrow", l.kernel);
        // Embedding gather; exact.
        let (vocab, dim) = (50, 12);
        let table = Buf::of(&rng.vec(vocab * dim), dtype);
        let ids: Vec<u32> = (0..9).map(|_| rng.below(vocab) as u32).chain([0, 49]).collect();
        let y = Buf::poisoned(ids.len() * dim, dtype);
        let mut l = plan_embedding(ids.len(), dim, vocab, &ids, table.op(), y.op()).unwrap();
        (l.params.table, l.params.ids, l.params.y) = (table.ptr(), ids.as_ptr() as u64, y.ptr());
        run(&l);
        assert_eq!(
            y.values(),
            cpu::layout::embedding(
                &sdsparse::backend::CpuStorage::F32(std::sync::Arc::new(table.values())),
                dim,
                &ids
            ),
            "{}",
            l.kernel
        );
        // Softmax: causal (text encoder), plain, rows wider than the CTA (several passes).
        for (rows, cols, scale, causal) in
            [(2 * 9, 9, 0.25, Some(9)), (6, 77, 0.125, None), (3, 600, 1.0, None), (4, 7, 0.5, Some(2))]
        {
            let x = Buf::of(&rng.vec(rows * cols).iter().map(|v| 8.0 * v).collect::<Vec<_>>(), dtype);
            let y = Buf::poisoned(rows * cols, dtype);
            let mut l = plan_softmax(rows, cols, scale, causal, x.op(), y.op()).unwrap();
            (l.params.x, l.params.y) = (x.ptr(), y.ptr());
            run(&l);
            let reference = rounded(&cpu::attention::softmax_scaled(&x.values(), cols, scale, causal), dtype);
            check(&format!("{} [{rows}, {cols}] causal {causal:?}", l.kernel), &y, &reference);
            // f32 scores into probabilities of this dtype (the attention scores path).
            if dtype != DType::F32 {
                let x =
                    Buf::of(&rng.vec(rows * cols).iter().map(|v| 8.0 * v).collect::<Vec<_>>(), DType::F32);
                let y = Buf::poisoned(rows * cols, dtype);
                let mut l = plan_softmax(rows, cols, scale, causal, x.op(), y.op()).unwrap();
                (l.params.x, l.params.y) = (x.ptr(), y.ptr());
                run(&l);
                let reference =
                    rounded(&cpu::attention::softmax_scaled(&x.values(), cols, scale, causal), dtype);
                check(&format!("{} [{rows}, {cols}] causal {causal:?}", l.kernel), &y, &reference);
            }
        }
        // im2col: 3x3 pad 1, stride 2, 1x1; exact.
        for (c_in, h, w, k, stride, pad) in [(3, 5, 7, 3, 1, 1), (2, 8, 8, 3, 2, 1), (4, 3, 5, 1, 1, 0)] {
            let s = Im2colShape { c_in, h, w, kh: k, kw: k, stride, pad };
            let cs =
                cpu::conv::ConvShape { batch: 1, c_in, h, w, c_out: 1, kh: k, kw: k, stride, padding: pad };
            let x = Buf::of(&rng.vec(c_in * h * w), dtype);
            let reference = cpu::conv::im2col_image(&x.values(), cs);
            let col = Buf::poisoned(reference.len(), dtype);
            let mut l = plan_im2col(s, x.op(), col.op()).unwrap();
            (l.params.x, l.params.col) = (x.ptr(), col.ptr());
            run(&l);
            assert_eq!(col.values(), reference, "{} {s:?}", l.kernel);
        }
    }
    // Casts f32 -> f16 / bf16 -> f32: round to nearest even, exact against half's conversions.
    let x = Buf::of(&rng.vec(1000).iter().map(|v| 300.0 * v).collect::<Vec<_>>(), DType::F32);
    for narrow in [DType::F16, DType::BF16] {
        let mid = Buf::poisoned(1000, narrow);
        let mut l = plan_cast(1000, x.op(), mid.op()).unwrap();
        (l.params.x, l.params.y) = (x.ptr(), mid.ptr());
        run(&l);
        let back = Buf::poisoned(1000, DType::F32);
        let mut l2 = plan_cast(1000, mid.op(), back.op()).unwrap();
        (l2.params.x, l2.params.y) = (mid.ptr(), back.ptr());
        run(&l2);
        assert_eq!(back.values(), rounded(&x.values(), narrow), "{} / {}", l.kernel, l2.kernel);
    }
}
