//! The unstructured sparse GEMM: CPU checks of the GPU weight layout (always run) and GPU
//! checks of every kernel variant against the CPU reference (skipped without a GPU).
//!
//! GPU tests use fresh random data each run (the seed is printed), poison the output with
//! f16 NaN before each launch, and bound the error norm-wise (2e-3) and element-wise
//! (`test_util::check_close`); NaN never passes. `SDSPARSE_GPU_VARIANTS` picks variants. Run
//! them on a GPU machine with `tools/gpu_check.sh` (docs/CUDA.md). The kernels' index math is
//! checked without a GPU in tests/ptx_emulation.rs.

use half::f16;
use sdsparse::backend::cuda::unstructured::{
    bitmap_from_dense, gpu_for_test, reference_gemm, relative_error, DeviceTiledWeight, Epilogue, GemmPlan,
    GemmVariant, TiledBitmapWeight, UnstructuredGemm, TILE_K, TILE_N, VALUE_ALIGN,
};
use sdsparse::backend::test_util::{
    check_close, from_f16_bits, to_f16_bits, variant_selected, TestRng as Rng, GPU_ELEM_TOL, GPU_NORM_TOL,
};
use sdsparse::format::{BitmapWeight, HostData};

fn round_f16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| f16::from_f32(x).to_f32()).collect()
}

/// Magnitude pruning of the whole matrix to exactly `round(sparsity * len)` zeros (values
/// first rounded to f16, ties broken by index so the count is exact).
fn magnitude_prune(w: &[f32], sparsity: f64) -> Vec<f32> {
    let mut w = round_f16(w);
    for x in w.iter_mut() {
        if *x == 0.0 {
            *x = f16::from_f32(1e-3).to_f32(); // keep "zero" meaning "pruned" only
        }
    }
    let zeros = (sparsity * w.len() as f64).round() as usize;
    let mut order: Vec<usize> = (0..w.len()).collect();
    if zeros > 0 && zeros < w.len() {
        order.select_nth_unstable_by(zeros, |&a, &b| w[a].abs().total_cmp(&w[b].abs()).then(a.cmp(&b)));
    }
    for &i in &order[..zeros] {
        w[i] = 0.0;
    }
    w
}

fn tiled(dense: &[f32], rows: usize, cols: usize) -> TiledBitmapWeight {
    TiledBitmapWeight::from_bitmap(&bitmap_from_dense(dense, rows, cols)).expect("valid bitmap weight")
}

#[test]
fn tiled_layout_decodes_to_the_dense_weight() {
    let mut rng = Rng::fresh("layout");
    // Awkward shapes: edge tiles in both dimensions, a single element, odd column counts.
    for &(rows, cols) in &[(1, 1), (77, 200), (64, 64), (130, 65), (320, 320), (5, 1000), (1280, 77)] {
        for &sparsity in &[0.0, 0.35, 0.475, 0.9, 1.0] {
            let dense = magnitude_prune(&rng.vec(rows * cols), sparsity);
            let t = tiled(&dense, rows, cols);
            assert_eq!((t.tiles_n, t.tiles_k), (rows.div_ceil(TILE_N), cols.div_ceil(TILE_K)));
            assert_eq!(t.bitmap.len(), t.tiles_n * t.tiles_k * TILE_N);
            assert!(
                t.tile_offsets.iter().all(|&o| (o as usize).is_multiple_of(VALUE_ALIGN)),
                "tile runs 16 B aligned"
            );
            assert!(t.tile_offsets.windows(2).all(|w| w[0] <= w[1]));
            assert_eq!(t.to_dense(), dense, "[{rows}, {cols}] at {sparsity}");
        }
    }
}

/// The index arithmetic of `sdsparse_uns_gemm_naive` (popcount of the rows above, then of the
/// bits left of the column) against the layout's own decode. The tensor-core variants' expansion
/// and fragments run on the PTX-semantics emulator in tests/ptx_emulation.rs.
#[test]
fn naive_kernel_index_math_matches_the_layout() {
    let mut rng = Rng::fresh("naive decode");
    let (rows, cols) = (150, 190);
    let dense = magnitude_prune(&rng.vec(rows * cols), 0.35);
    let t = tiled(&dense, rows, cols);
    let mut naive = vec![0.0f32; rows * cols];
    for tn in 0..t.tiles_n {
        for tk in 0..t.tiles_k {
            let tile = tn * t.tiles_k + tk;
            let bm = &t.bitmap[tile * TILE_N..(tile + 1) * TILE_N];
            let vs = &t.values[t.tile_offsets[tile] as usize..t.tile_offsets[tile + 1] as usize];
            for (r, &word) in bm.iter().enumerate() {
                let before: usize = bm[..r].iter().map(|w| w.count_ones() as usize).sum();
                for c in 0..TILE_K {
                    if word >> c & 1 == 1 {
                        let idx = before + (word & ((1u64 << c) - 1)).count_ones() as usize;
                        naive[(tn * TILE_N + r) * cols + tk * TILE_K + c] = vs[idx].to_f32();
                    }
                }
            }
        }
    }
    assert_eq!(naive, dense);
}

/// The memory bound: weight bytes on the GPU (values + padding + bitmap + offsets) at
/// most 0.72x / 0.60x of dense f16 at 35% / 47.5% sparsity, on SD2's linear shapes.
#[test]
fn gpu_weight_bytes_meet_the_bounds() {
    let mut rng = Rng::fresh("bytes");
    // [out, in]: UNet attention/proj (320..1280), GEGLU (2560 x 320 ...), FF out, time MLP,
    // conv as GEMM (C*9); text encoder (1024, 4096).
    let shapes = [
        (320, 320),
        (640, 640),
        (1280, 1280),
        (2560, 320),
        (320, 1280),
        (5120, 1280),
        (1280, 320),
        (320, 2880),
        (1024, 1024),
        (4096, 1024),
        (1024, 4096),
        (320, 1024),
        (1280, 1024),
    ];
    for &(sparsity, bound) in &[(0.35, 0.72), (0.475, 0.60)] {
        let mut worst = 0.0f64;
        for &(rows, cols) in &shapes {
            let dense = magnitude_prune(&rng.vec(rows * cols), sparsity);
            let t = tiled(&dense, rows, cols);
            let b = t.gpu_bytes();
            let ratio = t.gpu_bytes_ratio();
            println!(
                "sparsity {sparsity}: [{rows:5}, {cols:5}] values {} + bitmap {} + offsets {} = {} B, dense f16 {} B, ratio {ratio:.4}",
                b.values,
                b.bitmap,
                b.offsets,
                b.total(),
                t.dense_f16_bytes()
            );
            assert!(ratio <= bound, "[{rows}, {cols}] at {sparsity}: {ratio:.4} > {bound}");
            worst = worst.max(ratio);
        }
        println!("sparsity {sparsity}: worst ratio {worst:.4} (bound {bound})");
    }
}

#[test]
fn corrupt_bitmap_weights_are_clear_errors() {
    let good = bitmap_from_dense(&[1.0, 0.0, 2.0, 0.0, 0.0, 3.0], 2, 3);
    assert!(TiledBitmapWeight::from_bitmap(&good).is_ok());
    let mut short_bitmap = good.clone();
    short_bitmap.bitmap.pop();
    let mut bad_offsets = good.clone();
    bad_offsets.row_offsets[1] = 1;
    let mut stray_bit = good.clone();
    stray_bit.bitmap[0] |= 0x80;
    let mut few_values = good.clone();
    few_values.values = HostData::F16(vec![f16::ONE; 2]);
    let empty = BitmapWeight {
        rows: 0,
        cols: 4,
        bitmap: vec![],
        row_offsets: vec![0],
        values: HostData::F16(vec![]),
    };
    for (name, w) in [
        ("short bitmap", short_bitmap),
        ("bad offsets", bad_offsets),
        ("stray bit", stray_bit),
        ("few values", few_values),
        ("empty", empty),
    ] {
        let err = TiledBitmapWeight::from_bitmap(&w).expect_err(name);
        assert!(!err.to_string().contains('\n'), "{name}: one-line error: {err}");
    }
}

#[test]
fn reference_gemm_epilogue_order() {
    // 1x1: y = gelu(x*w + b) + r, against hand values.
    let y = reference_gemm(&[2.0], &[0.5], 1, 1, 1, Some(&[0.5]), true, Some(&[10.0]));
    let gelu_1_5 = 0.5 * 1.5 * (1.0 + sdsparse::backend::cuda::unstructured::erf(1.5 / 2f64.sqrt()));
    assert!((y[0] as f64 - (gelu_1_5 + 10.0)).abs() < 1e-6);
    // erf against known values.
    for (x, e) in [(0.5, 0.5204998778130465), (1.0, 0.8427007929497149), (3.0, 0.9999779095030014)] {
        assert!((sdsparse::backend::cuda::unstructured::erf(x) - e).abs() < 1e-12, "erf({x})");
    }
    assert!(relative_error(&[f32::NAN], &[1.0]).is_infinite(), "NaN never passes");
}

/// The mma.sync variants are traps below sm_80; only the naive oracle runs on sm_75 (and wgmma
/// only on sm_90).
#[test]
fn tensor_core_variants_need_sm80() {
    for v in GemmVariant::ALL {
        assert_eq!(v.runs_on((7, 5)), v == GemmVariant::Naive, "{v:?} on sm_75");
        assert_eq!(v.runs_on((8, 6)), v != GemmVariant::WgmmaBm128, "{v:?} on sm_86");
    }
    assert!(GemmVariant::ALL.into_iter().all(|v| v.runs_on((9, 0))));
    assert!(GemmVariant::ALL.into_iter().all(|v| !v.runs_on((7, 0))));
}

// ---------------------------------------------------------------------------------------
// GPU

/// Every kernel variant this GPU runs (and `SDSPARSE_GPU_VARIANTS` selects) without split-K,
/// and the tensor-core ones with 2 and 3 K slices.
fn plans(gemm: &UnstructuredGemm, k: usize) -> Vec<GemmPlan> {
    let tiles_k = k.div_ceil(TILE_K);
    let runs: Vec<GemmVariant> = GemmVariant::ALL
        .into_iter()
        .filter(|&v| gemm.supports(v) && variant_selected(&format!("{v:?}")))
        .collect();
    let mut plans: Vec<GemmPlan> = runs.iter().map(|&v| GemmPlan::new(v, 1, tiles_k)).collect();
    for &v in runs.iter().filter(|&&v| v != GemmVariant::Naive) {
        for splits in [2, 3] {
            let plan = GemmPlan::new(v, splits, tiles_k);
            if plan.splits > 1 && !plans.contains(&plan) {
                plans.push(plan);
            }
        }
    }
    plans
}

#[test]
fn split_k_plans_cover_every_k_tile_once() {
    for tiles_k in 1..40 {
        for requested in 1..50 {
            for v in GemmVariant::ALL {
                let p = GemmPlan::new(v, requested, tiles_k);
                // Slice z covers [z * per, min(tiles_k, (z + 1) * per)): non-empty, disjoint, complete.
                assert!(p.splits >= 1 && p.k_tiles_per_split >= 1);
                assert_eq!(p.splits, tiles_k.div_ceil(p.k_tiles_per_split), "{p:?}");
                assert!((p.splits - 1) * p.k_tiles_per_split < tiles_k, "last slice has work: {p:?}");
                assert!(p.splits <= requested.max(1));
                if v == GemmVariant::Naive {
                    assert_eq!(p.splits, 1);
                }
            }
        }
    }
    // The dispatcher: a skinny text-encoder GEMM on a 132-SM GPU gets split, a big one not.
    let skinny = GemmPlan::choose(154, 1024, 1024, 1_500_000, 132);
    assert!(skinny.splits > 1, "{skinny:?}");
    assert_eq!(GemmPlan::choose(8192, 2560, 320, 1_200_000, 132).splits, 1);
    assert_eq!(GemmPlan::choose(8192, 2560, 320, 1_200_000, 132).variant, GemmVariant::Bm128);
}

#[test]
fn gpu_gemm_matches_cpu_reference() {
    let Some(ctx) = gpu_for_test() else {
        println!("no GPU: skipped");
        return;
    };
    let gemm = UnstructuredGemm::load(&ctx).expect("kernel image");
    let stream = ctx.default_stream();
    let mut rng = Rng::fresh("gpu gemm");
    // (M, N, K): M = 1, 77, 154 (text encoder), ragged N (77) and K (200 = 3 tiles + 8).
    let shapes =
        [(1, 64, 64), (77, 77, 200), (154, 1024, 1024), (300, 320, 320), (1030, 640, 1280), (64, 2560, 320)];
    for &(m, n, k) in &shapes {
        for &sparsity in &[0.35, 0.5] {
            let w = magnitude_prune(&rng.vec(n * k), sparsity);
            let dw = DeviceTiledWeight::upload(&stream, &tiled(&w, n, k)).expect("upload");
            let x = round_f16(&rng.vec(m * k));
            let bias: Vec<f32> = rng.vec(n);
            let residual = round_f16(&rng.vec(m * n));
            let dx = stream.clone_htod(&to_f16_bits(&x)).unwrap();
            let dbias = stream.clone_htod(&bias).unwrap();
            let dres = stream.clone_htod(&to_f16_bits(&residual)).unwrap();
            for (use_bias, gelu, use_res) in [(false, false, false), (true, true, true), (true, false, false)]
            {
                let reference = reference_gemm(
                    &x,
                    &w,
                    m,
                    n,
                    k,
                    use_bias.then_some(&bias[..]),
                    gelu,
                    use_res.then_some(&residual[..]),
                );
                for plan in plans(&gemm, k) {
                    let variant = plan.variant;
                    let mut dy = stream.clone_htod(&vec![0x7e00u16; m * n]).unwrap(); // f16 NaN
                    let epi = Epilogue {
                        bias: use_bias.then_some(&dbias),
                        gelu,
                        residual: use_res.then_some(&dres),
                    };
                    gemm.forward_plan(&stream, plan, &dx, m, &dw, &epi, &mut dy).expect("launch");
                    let y = from_f16_bits(&stream.clone_dtoh(&dy).unwrap());
                    let err = check_close(&y, &reference, GPU_NORM_TOL, GPU_ELEM_TOL)
                        .unwrap_or_else(|e| panic!("{plan:?} [{m}, {n}, {k}] at {sparsity}: {e}"));
                    println!(
                        "{variant:?} splits={} M={m} N={n} K={k} sparsity={sparsity} bias={use_bias} gelu={gelu} residual={use_res}: rel err {err:.2e}",
                        plan.splits
                    );
                }
            }
        }
    }
}

#[test]
fn gpu_gemm_rejects_bad_shapes() {
    let Some(ctx) = gpu_for_test() else {
        println!("no GPU: skipped");
        return;
    };
    let gemm = UnstructuredGemm::load(&ctx).expect("kernel image");
    let stream = ctx.default_stream();
    let w = DeviceTiledWeight::upload(&stream, &tiled(&vec![1.0; 8 * 12], 8, 12)).unwrap();
    let x = stream.clone_htod(&vec![0u16; 4 * 12]).unwrap();
    let mut y = stream.clone_htod(&vec![0u16; 4 * 8]).unwrap();
    let err = gemm.forward(&stream, &x, 4, &w, &Epilogue::default(), &mut y).expect_err("K % 8 != 0");
    assert!(err.to_string().contains("% 8"), "{err}");
}

/// Small sizes for `compute-sanitizer` (memcheck, racecheck): every variant once, ragged M,
/// N and K, all epilogue operands, still checked against the reference.
#[test]
fn gpu_gemm_small_for_sanitizer() {
    let Some(ctx) = gpu_for_test() else {
        println!("no GPU: skipped");
        return;
    };
    let gemm = UnstructuredGemm::load(&ctx).expect("kernel image");
    let stream = ctx.default_stream();
    let mut rng = Rng::fresh("sanitizer gemm");
    let (m, n, k) = (33, 70, 136);
    let w = magnitude_prune(&rng.vec(n * k), 0.35);
    let dw = DeviceTiledWeight::upload(&stream, &tiled(&w, n, k)).unwrap();
    let x = round_f16(&rng.vec(m * k));
    let bias = rng.vec(n);
    let residual = round_f16(&rng.vec(m * n));
    let (dx, dbias, dres) = (
        stream.clone_htod(&to_f16_bits(&x)).unwrap(),
        stream.clone_htod(&bias).unwrap(),
        stream.clone_htod(&to_f16_bits(&residual)).unwrap(),
    );
    let reference = reference_gemm(&x, &w, m, n, k, Some(&bias), true, Some(&residual));
    for plan in plans(&gemm, k) {
        let mut dy = stream.clone_htod(&vec![0x7e00u16; m * n]).unwrap();
        let epi = Epilogue { bias: Some(&dbias), gelu: true, residual: Some(&dres) };
        gemm.forward_plan(&stream, plan, &dx, m, &dw, &epi, &mut dy).expect("launch");
        let y = from_f16_bits(&stream.clone_dtoh(&dy).unwrap());
        let err = check_close(&y, &reference, GPU_NORM_TOL, GPU_ELEM_TOL)
            .unwrap_or_else(|e| panic!("{plan:?}: {e}"));
        println!("{plan:?}: rel err {err:.2e}");
    }
}

/// Identity probe: X = I (M = K), so Y[t][n] = W[n][t] exactly in f16 for every variant and
/// split; a mismatch names the 16x8 mma tile and 8x8 core matrix at fault.
#[test]
fn gpu_identity_probe() {
    let Some(ctx) = gpu_for_test() else {
        println!("no GPU: skipped");
        return;
    };
    let gemm = UnstructuredGemm::load(&ctx).expect("kernel image");
    let stream = ctx.default_stream();
    let mut rng = Rng::fresh("identity probe");
    for &(n, k) in &[(320, 128), (70, 192)] {
        let w = magnitude_prune(&rng.vec(n * k), 0.35);
        let dw = DeviceTiledWeight::upload(&stream, &tiled(&w, n, k)).unwrap();
        let m = k;
        let x: Vec<f32> = (0..m * k).map(|i| if i / k == i % k { 1.0 } else { 0.0 }).collect();
        let dx = stream.clone_htod(&to_f16_bits(&x)).unwrap();
        for plan in plans(&gemm, k) {
            let mut dy = stream.clone_htod(&vec![0x7e00u16; m * n]).unwrap();
            gemm.forward_plan(&stream, plan, &dx, m, &dw, &Epilogue::default(), &mut dy).expect("launch");
            let y = from_f16_bits(&stream.clone_dtoh(&dy).unwrap());
            let bad: Vec<(usize, usize)> = (0..m * n)
                .filter(|&i| y[i].to_bits() != w[(i % n) * k + i / n].to_bits())
                .map(|i| (i / n, i % n))
                .collect();
            for &(t, j) in bad.iter().take(8) {
                println!(
                    "{plan:?}: Y[{t}][{j}] = {} want W[{j}][{t}] = {} (row tile {}, n8 tile {}, k core {})",
                    y[t * n + j],
                    w[j * k + t],
                    t / 16,
                    j / 8,
                    t / 8
                );
            }
            assert!(bad.is_empty(), "{plan:?} identity probe N {n} K {k}: {} outputs differ", bad.len());
            println!("{plan:?} identity probe N {n} K {k}: exact");
        }
    }
}

/// Split-K GEMMs on two streams at once (kernel review U2): each stream has its own partial-sum
/// workspace, so neither result is overwritten by the other's partials.
#[test]
fn gpu_split_k_on_two_streams() {
    let Some(ctx) = gpu_for_test() else {
        println!("no GPU: skipped");
        return;
    };
    if !variant_selected("Bm32") {
        return;
    }
    let gemm = UnstructuredGemm::load(&ctx).expect("kernel image");
    let streams = [ctx.new_stream().expect("stream"), ctx.new_stream().expect("stream")];
    let mut rng = Rng::fresh("two streams");
    let (m, n, k): (usize, usize, usize) = (154, 1024, 1024);
    let plan = GemmPlan::new(GemmVariant::Bm32, 4, k.div_ceil(TILE_K));
    assert!(plan.splits > 1);
    let mut runs = Vec::new();
    for stream in &streams {
        let w = magnitude_prune(&rng.vec(n * k), 0.35);
        let x = round_f16(&rng.vec(m * k));
        let reference = reference_gemm(&x, &w, m, n, k, None, false, None);
        let dw = DeviceTiledWeight::upload(stream, &tiled(&w, n, k)).unwrap();
        let dx = stream.clone_htod(&to_f16_bits(&x)).unwrap();
        let dy = stream.clone_htod(&vec![0x7e00u16; m * n]).unwrap();
        runs.push((reference, dw, dx, dy));
    }
    // Enqueue several rounds on both streams before reading anything back.
    for _ in 0..4 {
        for (stream, (_, dw, dx, dy)) in streams.iter().zip(runs.iter_mut()) {
            gemm.forward_plan(stream, plan, dx, m, dw, &Epilogue::default(), dy).expect("launch");
        }
    }
    for (stream, (reference, _, _, dy)) in streams.iter().zip(&runs) {
        let y = from_f16_bits(&stream.clone_dtoh(dy).unwrap());
        let err = check_close(&y, reference, GPU_NORM_TOL, GPU_ELEM_TOL).unwrap_or_else(|e| panic!("{e}"));
        println!("split-K on its own stream: rel err {err:.2e}");
    }
}
