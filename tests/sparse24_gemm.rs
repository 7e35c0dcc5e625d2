//! 2:4 sparse GEMM: the device packing round trip on the CPU (always runs) and the GPU
//! kernels against a CPU reference (skip cleanly without a GPU or without the fatbin).
//!
//! The round trip below reads through the same `meta_position` the packer writes with, so it
//! checks padding and value placement, not the PTX layout (kernel review P1); the layout check
//! is tests/ptx_emulation.rs, which runs the kernels' index math on the documented `mma.sp`
//! semantics, plus the hand-written anchors of `metadata_follows_the_ptx_thread_assignment`.
//! GPU tests bound the error norm-wise (2e-3) and element-wise (`test_util::check_close`);
//! `SDSPARSE_GPU_VARIANTS` picks variants (the device check runs each in its own process).

use half::f16;
use sdsparse::backend::cuda::sparse24::{
    canonical_to_dense, geglu_interleave, meta_position, prune_dense_24, Sparse24Packed, META_BLOCK_K,
    ROW_PAD,
};
use sdsparse::backend::test_util::TestRng;
use sdsparse::format::{sparse24_meta_row_bytes, HostData, Sparse24Weight};

fn random_24(n: usize, k: usize, seed: u64) -> Sparse24Weight {
    let mut rng = TestRng::new(seed);
    prune_dense_24(&rng.vec(n * k), n, k).unwrap()
}

/// Below sm_80 no 2:4 variant runs (mma.sp is sm_80+; the kernels are traps on sm_75), so the
/// dispatcher and the tuner have nothing to pick there; sm_90 adds the wgmma variant.
#[test]
fn no_variant_below_sm80() {
    use sdsparse::backend::cuda::sparse24::Sp24Variant;
    assert!(Sp24Variant::all_for((7, 5)).is_empty());
    assert_eq!(Sp24Variant::all_for((8, 0)).len(), 4);
    assert_eq!(Sp24Variant::all_for((8, 9)).len(), 4);
    assert!(Sp24Variant::all_for((9, 0)).contains(&Sp24Variant::Wgmma));
}

#[test]
fn pack_decode_round_trip_matches_canonical() {
    // SD2-like, awkward (N, K not multiples of the pads) and minimum shapes.
    for &(n, k) in &[(320, 320), (64, 64), (1, 4), (16, 32), (70, 100), (1280, 5120), (8, 12), (130, 68)] {
        let w = random_24(n, k, (n * 1000 + k) as u64);
        let p = Sparse24Packed::pack(&w).unwrap();
        p.validate().unwrap();
        assert_eq!(p.n_pad % ROW_PAD, 0);
        assert_eq!(p.k_pad % META_BLOCK_K, 0);
        let dense_ref = canonical_to_dense(&w);
        let dense = p.decode_dense();
        assert_eq!(dense.len(), n * k);
        for (i, (a, b)) in dense.iter().zip(&dense_ref).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "[{n},{k}] element {i}: {a} vs {b}");
        }
    }
}

#[test]
fn every_metadata_slot_is_used_exactly_once() {
    // The (row, group) -> (word, shift) map must be a bijection onto all nibbles.
    for &(n_pad, k_pad) in &[(64usize, 64usize), (128, 192)] {
        let words = (n_pad / 16) * (k_pad / 64) * 32;
        let mut seen = vec![0u8; words * 8];
        for r in 0..n_pad {
            for g in 0..k_pad / 4 {
                let (w, s) = meta_position(r, g, k_pad);
                assert_eq!(s % 4, 0);
                seen[w * 8 + (s / 4) as usize] += 1;
            }
        }
        assert!(seen.iter().all(|&c| c == 1));
    }
}

#[test]
fn metadata_follows_the_ptx_thread_assignment() {
    // Row 0 cols 0..16 -> lane 0 bits [15:0]; row 8 -> lane 0 bits [31:16]; row 0 cols
    // 16..32 -> lane 1; cols 32..64 (selector 1) -> lanes 2, 3; row 1 -> lane 4.
    assert_eq!(meta_position(0, 0, 64), (0, 0));
    assert_eq!(meta_position(0, 3, 64), (0, 12));
    assert_eq!(meta_position(8, 0, 64), (0, 16));
    assert_eq!(meta_position(0, 4, 64), (1, 0));
    assert_eq!(meta_position(0, 8, 64), (2, 0));
    assert_eq!(meta_position(0, 12, 64), (3, 0));
    assert_eq!(meta_position(1, 0, 64), (4, 0));
    assert_eq!(meta_position(15, 15, 64), (31, 28));
    // Next 64-column block, then next 16-row block.
    assert_eq!(meta_position(0, 16, 128), (32, 0));
    assert_eq!(meta_position(16, 0, 128), (64, 0));
}

#[test]
fn a_known_weight_packs_to_known_words() {
    // One row, 8 groups with distinct nibbles; the rest of the 64x64 block is padding.
    let nibbles: [u8; 16] = [0x4, 0x8, 0xc, 0x9, 0xd, 0xe, 0x4, 0x8, 0xc, 0x9, 0xd, 0xe, 0x4, 0x8, 0xc, 0x9];
    let mut meta = vec![0u8; sparse24_meta_row_bytes(64)];
    for (g, &nib) in nibbles.iter().enumerate() {
        meta[g / 2] |= if g % 2 == 0 { nib } else { nib << 4 };
    }
    let values = HostData::F16((0..32).map(|i| f16::from_f32(i as f32 + 1.0)).collect());
    let w = Sparse24Weight { rows: 1, cols: 64, values, meta };
    let p = Sparse24Packed::pack(&w).unwrap();
    // Lane 0: groups 0..4 of row 0 in bits [15:0], row 8 (padding, 0x4 each) in [31:16].
    assert_eq!(p.meta[0], 0x4444_0000 | 0x9c84);
    // Lane 1: groups 4..8 of row 0.
    assert_eq!(p.meta[1], 0x4444_0000 | 0x84ed);
    // Lane 2 (selector 1, columns 32..48): groups 8..12.
    assert_eq!(p.meta[2], 0x4444_0000 | 0xed9c);
    assert_eq!(p.meta[3], 0x4444_0000 | 0x9c84);
    // Values keep the canonical order, row 0 first.
    assert_eq!(p.values[0].to_f32(), 1.0);
    assert_eq!(p.values[31].to_f32(), 32.0);
    assert_eq!(p.values[32].to_f32(), 0.0);
}

#[test]
fn bad_canonical_weights_are_rejected() {
    let mut w = random_24(16, 64, 7);
    w.meta[3] = 0x55; // idx0 == idx1
    assert!(Sparse24Packed::pack(&w).is_err());
    let mut w = random_24(16, 64, 7);
    w.meta[0] = (w.meta[0] & 0xf0) | 0b0001; // idx0 = 1 > idx1 = 0: not ordered
    assert!(Sparse24Packed::pack(&w).is_err());
    let mut w = random_24(16, 64, 7);
    w.cols = 66;
    assert!(Sparse24Packed::pack(&w).is_err());
    let mut w = random_24(16, 64, 7);
    w.meta.pop();
    assert!(Sparse24Packed::pack(&w).is_err());
}

#[test]
fn geglu_interleave_puts_value_and_gate_rows_in_one_tile() {
    let (n, k) = (256, 64);
    let w = random_24(n, k, 11);
    let bias: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let (wi, bi) = geglu_interleave(&w, Some(&bias)).unwrap();
    let (d, di) = (canonical_to_dense(&w), canonical_to_dense(&wi));
    let bi = bi.unwrap();
    for r in 0..n {
        let (block, j) = (r / 128, r % 128);
        let src = if j < 64 { 64 * block + j } else { n / 2 + 64 * block + j - 64 };
        assert_eq!(&di[r * k..(r + 1) * k], &d[src * k..(src + 1) * k], "row {r}");
        assert_eq!(bi[r], src as f32);
    }
    assert!(geglu_interleave(&random_24(192, 64, 1), None).is_err());
}

// ---------------------------------------------------------------------------------------
// GPU: every variant against the CPU reference (skips without a GPU or fatbin)
// ---------------------------------------------------------------------------------------

mod gpu {
    use super::*;
    use cudarc::driver::{CudaContext, CudaStream};
    use rayon::prelude::*;
    use sdsparse::backend::cuda::sparse24::{Sp24Epilogue, Sp24Kernels, Sp24Variant, Sparse24Gpu};
    use sdsparse::backend::cuda::unstructured::erf;
    pub use sdsparse::backend::test_util::{
        check_close, from_f16_bits, to_f16_bits, variant_selected, GPU_ELEM_TOL, GPU_NORM_TOL,
    };
    use std::sync::Arc;

    /// f16 NaN: the poison every output element starts as, so an unwritten one fails.
    const POISON: u16 = 0x7e00;

    /// The GPU's context and stream with the 2:4 kernels loaded from the crate's embedded
    /// fatbin, or `None` after `skipped: ...` when no GPU opens (a panic instead under
    /// `SDSPARSE_REQUIRE_GPU=1`, as on the device machine).
    pub fn setup(test: &str) -> Option<(Arc<CudaContext>, Arc<CudaStream>, Sp24Kernels)> {
        let dev = sdsparse::backend::test_util::cuda_device_or_skip(test)?;
        if dev.compute_capability() < (8, 0) {
            eprintln!("{test}: skipped: the 2:4 kernels need sm_80 ({} is dense-only)", dev.gpu_name());
            return None;
        }
        let fatbin = sdsparse::backend::cuda::kernels::fatbin().expect("an open CudaDevice implies kernels");
        let kernels = Sp24Kernels::load(dev.context(), fatbin).expect("load 2:4 kernels");
        Some((dev.context().clone(), dev.stream().clone(), kernels))
    }

    /// The variants of this GPU that `SDSPARSE_GPU_VARIANTS` selects (all by default).
    pub fn variants(kernels: &Sp24Kernels) -> Vec<Sp24Variant> {
        Sp24Variant::all_for(kernels.compute_capability())
            .into_iter()
            .filter(|v| variant_selected(&v.name()))
            .collect()
    }

    /// The T1 check of f16 outputs against an f32 reference.
    pub fn check(y: &[u16], reference: &[f32]) -> Result<f64, String> {
        check_close(&from_f16_bits(y), reference, GPU_NORM_TOL, GPU_ELEM_TOL)
    }

    /// CPU reference in f64 from the same f16 operands the GPU sees.
    #[allow(clippy::too_many_arguments)]
    pub fn reference(
        x: &[u16],
        w_dense: &[f32],
        m: usize,
        n: usize,
        k: usize,
        bias: Option<&[f32]>,
        residual: Option<&[u16]>,
        gelu: bool,
    ) -> Vec<f32> {
        let xf: Vec<f32> = x.iter().map(|&b| f16::from_bits(b).to_f32()).collect();
        let mut y = vec![0f32; m * n];
        y.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
            let xr = &xf[i * k..(i + 1) * k];
            for (j, out) in row.iter_mut().enumerate() {
                let wr = &w_dense[j * k..(j + 1) * k];
                let mut acc: f64 = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
                acc += bias.map_or(0.0, |b| b[j] as f64);
                if gelu {
                    acc = 0.5 * acc * (1.0 + erf(acc / std::f64::consts::SQRT_2));
                }
                acc += residual.map_or(0.0, |r| f16::from_bits(r[i * n + j]).to_f32() as f64);
                *out = acc as f32;
            }
        });
        y
    }

    /// One GEMM of every variant on fresh random data; returns the worst relative error.
    #[allow(clippy::too_many_arguments)]
    pub fn check_shape(
        stream: &Arc<CudaStream>,
        kernels: &Sp24Kernels,
        m: usize,
        n: usize,
        k: usize,
        with_bias: bool,
        with_residual: bool,
        gelu: bool,
        seed: u64,
    ) {
        let mut rng = TestRng::new(seed);
        let w = prune_dense_24(&rng.vec(n * k), n, k).unwrap();
        let packed = Sparse24Packed::pack(&w).unwrap();
        let w_dense = packed.decode_dense();
        let x = to_f16_bits(&rng.vec(m * k));
        let bias: Option<Vec<f32>> = with_bias.then(|| rng.vec(n));
        let residual: Option<Vec<u16>> = with_residual.then(|| to_f16_bits(&rng.vec(m * n)));
        let reference = reference(&x, &w_dense, m, n, k, bias.as_deref(), residual.as_deref(), gelu);

        let wg = Sparse24Gpu::upload(stream, &packed).unwrap();
        let xd = stream.clone_htod(&x).unwrap();
        let bd = bias.as_ref().map(|b| stream.clone_htod(b).unwrap());
        let rd = residual.as_ref().map(|r| stream.clone_htod(r).unwrap());
        let epi = Sp24Epilogue { bias: bd.as_ref(), residual: rd.as_ref(), gelu, geglu: false };
        for variant in variants(kernels) {
            // Fresh poisoned output for every run: an unwritten element stays NaN.
            let mut yd = stream.clone_htod(&vec![POISON; m * n]).unwrap();
            kernels.gemm(stream, variant, &xd, m, &wg, &epi, &mut yd).unwrap();
            let y = stream.clone_dtoh(&yd).unwrap();
            stream.synchronize().unwrap();
            match check(&y, &reference) {
                Ok(err) => eprintln!("[{m}, {k}] x [{n}, {k}]^T {}: rel err {err:.2e}", variant.name()),
                Err(e) => panic!("{} on M {m} N {n} K {k}: {e} (NaN = unwritten)", variant.name()),
            }
        }
    }

    /// Identity probe: X = I (M = K), so Y[t][n] = W[n][t] exactly in f16. A mismatch names
    /// the weight row and k group, and the metadata lane / bit position that hold them, which
    /// points at the lane, half or selector at fault (or at LBO/SBO for whole 8x8 blocks).
    pub fn identity_probe(stream: &Arc<CudaStream>, kernels: &Sp24Kernels, n: usize, k: usize, seed: u64) {
        let w = random_24(n, k, seed);
        let packed = Sparse24Packed::pack(&w).unwrap();
        let dense = canonical_to_dense(&w);
        let m = k;
        let x: Vec<f32> = (0..m * k).map(|i| if i / k == i % k { 1.0 } else { 0.0 }).collect();
        let wg = Sparse24Gpu::upload(stream, &packed).unwrap();
        let xd = stream.clone_htod(&to_f16_bits(&x)).unwrap();
        for variant in variants(kernels) {
            let mut yd = stream.clone_htod(&vec![POISON; m * n]).unwrap();
            kernels.gemm(stream, variant, &xd, m, &wg, &Sp24Epilogue::default(), &mut yd).unwrap();
            let y = stream.clone_dtoh(&yd).unwrap();
            let mut bad = Vec::new();
            for t in 0..m {
                for j in 0..n {
                    let want = f16::from_f32(dense[j * k + t]).to_bits();
                    if y[t * n + j] != want {
                        bad.push((t, j));
                    }
                }
            }
            for &(t, j) in bad.iter().take(8) {
                let (word, shift) = meta_position(j, t / 4, packed.k_pad);
                eprintln!(
                    "{} identity probe: Y[{t}][{j}] = {} want W[{j}][{t}] = {}: row {j} (g {} {}), k group {} -> meta word {word} lane {} bits {shift}",
                    variant.name(),
                    f16::from_bits(y[t * n + j]),
                    dense[j * k + t],
                    j % 8,
                    if j % 16 >= 8 { "upper" } else { "lower" },
                    t / 4,
                    word % 32
                );
            }
            assert!(
                bad.is_empty(),
                "{} identity probe N {n} K {k}: {} of {} outputs differ",
                variant.name(),
                bad.len(),
                m * n
            );
            eprintln!("{} identity probe N {n} K {k}: exact", variant.name());
        }
    }
}

#[test]
fn gpu_matches_reference_on_sd2_shapes() {
    let Some((_ctx, stream, kernels)) = gpu::setup("gpu_matches_reference_on_sd2_shapes") else { return };
    // (M, N, K): UNet attention projections at each level, GEGLU (N = 8C), FF out,
    // proj_in/out, cross-attention K/V from the 1024-wide context (M = 154), text encoder.
    let shapes = [
        (4096, 320, 320),
        (1024, 640, 640),
        (256, 1280, 1280),
        (128, 1280, 1280),
        (1024, 5120, 640),
        (256, 1280, 5120),
        (154, 320, 1024),
        (154, 1280, 1024),
        (154, 1024, 1024),
        (154, 4096, 1024),
        (154, 1024, 4096),
    ];
    for (i, &(m, n, k)) in shapes.iter().enumerate() {
        gpu::check_shape(&stream, &kernels, m, n, k, false, false, false, 100 + i as u64);
    }
}

#[test]
fn gpu_matches_reference_on_awkward_shapes() {
    let Some((_ctx, stream, kernels)) = gpu::setup("gpu_matches_reference_on_awkward_shapes") else { return };
    // M = 1, M not a multiple of any tile, minimum N (8) and K (8), N and K off the pads.
    let shapes = [
        (1, 64, 64),
        (1, 320, 320),
        (3, 8, 8),
        (130, 200, 72),
        (129, 136, 136),
        (33, 64, 4096),
        (257, 8, 24),
    ];
    for (i, &(m, n, k)) in shapes.iter().enumerate() {
        gpu::check_shape(&stream, &kernels, m, n, k, false, false, false, 200 + i as u64);
    }
}

#[test]
fn gpu_fused_epilogue_matches_reference() {
    let Some((_ctx, stream, kernels)) = gpu::setup("gpu_fused_epilogue_matches_reference") else { return };
    for (i, &(m, n, k)) in [(1024, 640, 640), (77, 200, 72), (1, 64, 64)].iter().enumerate() {
        gpu::check_shape(&stream, &kernels, m, n, k, true, false, false, 300 + i as u64);
        gpu::check_shape(&stream, &kernels, m, n, k, true, false, true, 310 + i as u64);
        gpu::check_shape(&stream, &kernels, m, n, k, true, true, true, 320 + i as u64);
        gpu::check_shape(&stream, &kernels, m, n, k, false, true, false, 330 + i as u64);
    }
}

#[test]
fn gpu_rejects_bad_calls_without_launching() {
    let Some((_ctx, stream, kernels)) = gpu::setup("gpu_rejects_bad_calls_without_launching") else { return };
    let w = Sparse24Packed::pack(&random_24(64, 12, 1)).unwrap(); // K % 8 != 0
    let wg = sdsparse::backend::cuda::sparse24::Sparse24Gpu::upload(&stream, &w).unwrap();
    let x = stream.clone_htod(&vec![0u16; 4 * 12]).unwrap();
    let mut y = stream.clone_htod(&vec![0u16; 4 * 64]).unwrap();
    let epi = sdsparse::backend::cuda::sparse24::Sp24Epilogue::default();
    let v = sdsparse::backend::cuda::sparse24::Sp24Variant::Direct;
    assert!(kernels.gemm(&stream, v, &x, 4, &wg, &epi, &mut y).is_err());
    let w = Sparse24Packed::pack(&random_24(64, 64, 1)).unwrap();
    let wg = sdsparse::backend::cuda::sparse24::Sparse24Gpu::upload(&stream, &w).unwrap();
    assert!(kernels.gemm(&stream, v, &x, 4, &wg, &epi, &mut y).is_err()); // x too short
}

#[test]
fn gpu_fused_geglu_matches_reference() {
    use sdsparse::backend::cuda::sparse24::{Sp24Epilogue, Sp24Variant, Sparse24Gpu};
    let Some((_ctx, stream, kernels)) = gpu::setup("gpu_fused_geglu_matches_reference") else { return };
    // GEGLU of SD2 levels (N = 8C, K = C) and a ragged M.
    for (i, &(m, n, k)) in [(2048, 5120, 640), (77, 2560, 320), (1, 256, 64)].iter().enumerate() {
        let mut rng = TestRng::new(400 + i as u64);
        let w = prune_dense_24(&rng.vec(n * k), n, k).unwrap();
        let bias = rng.vec(n);
        let x = gpu::to_f16_bits(&rng.vec(m * k));
        // Reference: full projection, then value * gelu(gate) on the canonical row order.
        let full = gpu::reference(&x, &canonical_to_dense(&w), m, n, k, Some(&bias), None, false);
        let gate = gpu::reference(&x, &canonical_to_dense(&w), m, n, k, Some(&bias), None, true);
        let h = n / 2;
        let mut reference = vec![0f32; m * h];
        for t in 0..m {
            for j in 0..h {
                // gelu(g) from the GELU reference of the gate column.
                reference[t * h + j] = full[t * n + j] * gate[t * n + h + j];
            }
        }
        let (wi, bi) = geglu_interleave(&w, Some(&bias)).unwrap();
        let wg = Sparse24Gpu::upload(&stream, &Sparse24Packed::pack(&wi).unwrap()).unwrap();
        let xd = stream.clone_htod(&x).unwrap();
        let bd = stream.clone_htod(&bi.unwrap()).unwrap();
        let epi = Sp24Epilogue { bias: Some(&bd), residual: None, gelu: false, geglu: true };
        for variant in gpu::variants(&kernels) {
            let mut yd = stream.clone_htod(&vec![0x7e00u16; m * h]).unwrap();
            let r = kernels.gemm(&stream, variant, &xd, m, &wg, &epi, &mut yd);
            if variant == Sp24Variant::Direct {
                assert!(r.is_err(), "the direct variant has no GEGLU epilogue");
                continue;
            }
            r.unwrap();
            let y = stream.clone_dtoh(&yd).unwrap();
            match gpu::check(&y, &reference) {
                Ok(err) => eprintln!("GEGLU [{m}, {k}] x [{n}, {k}]^T {}: rel err {err:.2e}", variant.name()),
                Err(e) => panic!("GEGLU {} M {m} N {n} K {k}: {e}", variant.name()),
            }
        }
    }
}

#[test]
fn gpu_identity_probe() {
    let Some((_ctx, stream, kernels)) = gpu::setup("gpu_identity_probe") else { return };
    // N = 320: n_pad % 128 == 64 (review S1/S2); K = 128: two metadata blocks; N = 200 ragged.
    gpu::identity_probe(&stream, &kernels, 320, 128, 500);
    gpu::identity_probe(&stream, &kernels, 200, 64, 501);
}

/// Small sizes for `compute-sanitizer` (memcheck, racecheck): every variant, ragged M, N and K,
/// the whole epilogue, still checked against the reference.
#[test]
fn gpu_small_for_sanitizer() {
    let Some((_ctx, stream, kernels)) = gpu::setup("gpu_small_for_sanitizer") else { return };
    gpu::check_shape(&stream, &kernels, 33, 200, 72, true, true, true, 600);
}
