//! The fused attention forward: CPU checks of the layouts and of the kernel's online-softmax
//! algorithm (always run), and GPU checks of both kernel variants against the CPU reference
//! (skipped without a GPU; run with `tools/gpu_check.sh`, docs/CUDA.md).
//!
//! GPU tests: fresh random data each run (seed printed), outputs poisoned with f16 NaN before
//! each launch, error bounded norm-wise (2e-3) and element-wise (`test_util::check_close`),
//! NaN never passes; sequence lengths 1, 77 and others that are not multiples of the 64-row
//! tiles, both [B, H, S, 64] and [B, S, H*64] layouts, with and without the causal mask; an
//! adversarial mask test where one unmasked padding key would dominate. `SDSPARSE_GPU_VARIANTS` picks variants. The kernel's
//! index math is checked without a GPU in tests/ptx_emulation.rs.

use half::f16;
use sdsparse::backend::cuda::attention::{
    reference_attention, AttentionShape, AttentionVariant, FusedAttention, HeadLayout, HEAD_DIM,
};
use sdsparse::backend::cuda::unstructured::gpu_for_test;
use sdsparse::backend::test_util::{
    check_close, from_f16_bits as unbits, rel_error as relative_error, to_f16_bits as bits, variant_selected,
    TestRng as Rng, GPU_ELEM_TOL, GPU_NORM_TOL,
};

const SCALE: f32 = 0.125; // 1 / sqrt(64)

/// Keys `[0, end)` visible to query `row` (the kernel's `attn_key_end`, written out again).
fn key_end(shape: &AttentionShape, row: usize) -> usize {
    if shape.causal {
        (row + 1 + shape.seq_kv).saturating_sub(shape.seq_q).min(shape.seq_kv)
    } else {
        shape.seq_kv
    }
}

/// CPU emulation of the kernel's algorithm for one (b, h): 64-key tiles, running max and sum
/// in f32 (log2 domain), masking past seq_kv and (causal) past the row's diagonal, a query
/// block visiting only the tiles up to its last row's last visible key, P rounded to f16
/// before P V. `skip_one_more` plants a bug: each block skips one tile too many.
fn emulate_flash(shape: &AttentionShape, q: &[f32], k: &[f32], v: &[f32], skip_one_more: bool) -> Vec<f32> {
    let sq = shape.seq_q;
    let scale_log2 = shape.scale * std::f32::consts::LOG2_E;
    let mut out = vec![0.0f32; sq * HEAD_DIM];
    for i in 0..sq {
        let (mut m_run, mut l_run) = (f32::NEG_INFINITY, 0.0f32);
        let mut o = [0.0f32; HEAD_DIM];
        let last_row = ((i / 64) * 64 + 63).min(sq - 1);
        let n_tiles = key_end(shape, last_row).div_ceil(64).max(1) - usize::from(skip_one_more);
        let end = key_end(shape, i);
        for t in 0..n_tiles {
            let s: Vec<f32> = (0..64)
                .map(|j| {
                    let key = t * 64 + j;
                    if key >= end {
                        return f32::NEG_INFINITY;
                    }
                    let dot: f32 = (0..HEAD_DIM).map(|d| q[i * HEAD_DIM + d] * k[key * HEAD_DIM + d]).sum();
                    dot * scale_log2
                })
                .collect();
            let mx = s.iter().fold(m_run, |a, &b| a.max(b));
            // The kernel's guard (review A1): an all-masked row subtracts 0, not -inf.
            let m_use = if mx == f32::NEG_INFINITY { 0.0 } else { mx };
            let alpha = (m_run - m_use).exp2();
            m_run = mx;
            l_run *= alpha;
            o.iter_mut().for_each(|x| *x *= alpha);
            for (j, &sj) in s.iter().enumerate() {
                let p = (sj - m_use).exp2();
                l_run += p;
                let p16 = f16::from_f32(p).to_f32();
                if p16 != 0.0 {
                    for d in 0..HEAD_DIM {
                        o[d] += p16 * v[(t * 64 + j) * HEAD_DIM + d];
                    }
                }
            }
        }
        let inv = if l_run > 0.0 { 1.0 / l_run } else { 0.0 };
        for d in 0..HEAD_DIM {
            out[i * HEAD_DIM + d] = o[d] * inv;
        }
    }
    out
}

#[test]
fn online_softmax_algorithm_matches_reference() {
    let mut rng = Rng::fresh("emulation");
    // Causal: the text encoder's 77, a multiple of the tile (128: the second block skips
    // nothing, the first skips one tile), ragged 130 / 200 over several blocks, fewer queries
    // than keys (the mask aligned at the end) and more (the first rows see no key: zeros).
    let cases = [
        (1, 1, false),
        (3, 77, false),
        (5, 130, false),
        (2, 64, false),
        (4, 200, false),
        (77, 77, true),
        (128, 128, true),
        (130, 130, true),
        (200, 200, true),
        (70, 77, true),
        (80, 77, true),
    ];
    for &(sq, skv, causal) in &cases {
        let shape = AttentionShape { batch: 1, heads: 1, seq_q: sq, seq_kv: skv, scale: SCALE, causal };
        // Larger amplitude so the running max really moves between tiles.
        let q = rng.vec_f16(sq * HEAD_DIM, 3.0);
        let k = rng.vec_f16(skv * HEAD_DIM, 3.0);
        let v = rng.vec_f16(skv * HEAD_DIM, 1.0);
        let l = HeadLayout::bhsd(1, sq);
        let lk = HeadLayout::bhsd(1, skv);
        let mut reference = vec![0.0f32; sq * HEAD_DIM];
        reference_attention(&shape, &q, &l, &k, &lk, &v, &lk, &mut reference, &l);
        let err = check(&emulate_flash(&shape, &q, &k, &v, false), &reference)
            .unwrap_or_else(|e| panic!("seq_q {sq} seq_kv {skv} causal {causal}: {e}"));
        println!("seq_q {sq} seq_kv {skv} causal {causal}: rel err {err:.2e}");
        // The reference itself: with the mask, row 0 of a square problem is V's row 0.
        if causal && sq == skv {
            assert_eq!(&reference[..HEAD_DIM], &v[..HEAD_DIM]);
        }
        // Planted bug: one tile too few per block is caught wherever a block has two tiles.
        if causal && skv > 64 {
            assert!(check(&emulate_flash(&shape, &q, &k, &v, true), &reference).is_err());
        }
    }
    // And a reference without the mask does not pass for a causal problem (the mask matters).
    let shape = AttentionShape { batch: 1, heads: 1, seq_q: 77, seq_kv: 77, scale: SCALE, causal: true };
    let (q, k, v) =
        (rng.vec_f16(77 * HEAD_DIM, 3.0), rng.vec_f16(77 * HEAD_DIM, 3.0), rng.vec_f16(77 * HEAD_DIM, 1.0));
    let l = HeadLayout::bhsd(1, 77);
    let mut unmasked = vec![0.0f32; 77 * HEAD_DIM];
    reference_attention(
        &AttentionShape { causal: false, ..shape },
        &q,
        &l,
        &k,
        &l,
        &v,
        &l,
        &mut unmasked,
        &l,
    );
    assert!(check(&emulate_flash(&shape, &q, &k, &v, false), &unmasked).is_err());
}

#[test]
fn layouts_address_the_same_elements() {
    let (b, h, s) = (2, 5, 77);
    let bhsd = HeadLayout::bhsd(h, s);
    let bshd = HeadLayout::bshd(h, s);
    assert_eq!(bhsd.min_len(b, h, s), b * h * s * HEAD_DIM);
    assert_eq!(bshd.min_len(b, h, s), b * h * s * HEAD_DIM);
    assert_eq!(bhsd.offset(1, 2, 3), ((h + 2) * s + 3) * HEAD_DIM);
    assert_eq!(bshd.offset(1, 2, 3), ((s + 3) * h + 2) * HEAD_DIM);
    // The reference gives the same answer through either layout.
    let mut rng = Rng::fresh("layouts");
    let shape = AttentionShape { batch: b, heads: h, seq_q: 9, seq_kv: 11, scale: SCALE, causal: false };
    let (lq1, lk1) = (HeadLayout::bhsd(h, 9), HeadLayout::bhsd(h, 11));
    let (lq2, lk2) = (HeadLayout::bshd(h, 9), HeadLayout::bshd(h, 11));
    let q1 = rng.vec_f16(b * h * 9 * HEAD_DIM, 1.0);
    let k1 = rng.vec_f16(b * h * 11 * HEAD_DIM, 1.0);
    let v1 = rng.vec_f16(b * h * 11 * HEAD_DIM, 1.0);
    let permute = |src: &[f32], from: &HeadLayout, to: &HeadLayout, seq: usize| {
        let mut dst = vec![0.0; src.len()];
        for bi in 0..b {
            for hi in 0..h {
                for si in 0..seq {
                    let (f, t) = (from.offset(bi, hi, si), to.offset(bi, hi, si));
                    dst[t..t + HEAD_DIM].copy_from_slice(&src[f..f + HEAD_DIM]);
                }
            }
        }
        dst
    };
    let mut o1 = vec![0.0; q1.len()];
    let mut o2 = vec![0.0; q1.len()];
    reference_attention(&shape, &q1, &lq1, &k1, &lk1, &v1, &lk1, &mut o1, &lq1);
    let (q2, k2, v2) =
        (permute(&q1, &lq1, &lq2, 9), permute(&k1, &lk1, &lk2, 11), permute(&v1, &lk1, &lk2, 11));
    reference_attention(&shape, &q2, &lq2, &k2, &lk2, &v2, &lk2, &mut o2, &lq2);
    assert_eq!(permute(&o2, &lq2, &lq1, 9), o1);
}

#[test]
fn reference_attention_sanity() {
    // One key: the output is that key's value row, whatever the scores.
    let shape = AttentionShape { batch: 1, heads: 1, seq_q: 2, seq_kv: 1, scale: SCALE, causal: false };
    let q: Vec<f32> = (0..2 * HEAD_DIM).map(|i| i as f32).collect();
    let k = vec![1.0; HEAD_DIM];
    let v: Vec<f32> = (0..HEAD_DIM).map(|i| i as f32 * 0.5).collect();
    let mut o = vec![0.0; 2 * HEAD_DIM];
    let (lq, lk) = (HeadLayout::bhsd(1, 2), HeadLayout::bhsd(1, 1));
    reference_attention(&shape, &q, &lq, &k, &lk, &v, &lk, &mut o, &lq);
    assert_eq!(&o[..HEAD_DIM], &v[..]);
    assert_eq!(&o[HEAD_DIM..], &v[..]);
}

// ---------------------------------------------------------------------------------------
// GPU

/// The variants `SDSPARSE_GPU_VARIANTS` selects, oracle first.
/// The variants to check: those `SDSPARSE_GPU_VARIANTS` selects, without the flash kernel on a
/// GPU below sm_80 (a trap there, refused by `forward`; the naive oracle still runs).
fn variants(attn: &FusedAttention) -> Vec<AttentionVariant> {
    [AttentionVariant::Naive, AttentionVariant::Flash]
        .into_iter()
        .filter(|v| variant_selected(&format!("{v:?}")))
        .filter(|v| *v != AttentionVariant::Flash || attn.flash_runs())
        .collect()
}

fn check(out: &[f32], reference: &[f32]) -> Result<f64, String> {
    check_close(out, reference, GPU_NORM_TOL, GPU_ELEM_TOL)
}

/// Runs every selected variant on (q, k, v) (f16-representable values in layouts lq, lk, lk) with
/// NaN-poisoned outputs and checks each against the CPU reference; `label` names the case.
#[allow(clippy::too_many_arguments)]
fn check_variants(
    attn: &FusedAttention,
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    shape: &AttentionShape,
    (q, lq): (&[f32], HeadLayout),
    (k, lk): (&[f32], HeadLayout),
    v: &[f32],
    label: &str,
) {
    let mut reference = vec![0.0; q.len()];
    reference_attention(shape, q, &lq, k, &lk, v, &lk, &mut reference, &lq);
    let (dq, dk, dv) = (
        stream.clone_htod(&bits(q)).unwrap(),
        stream.clone_htod(&bits(k)).unwrap(),
        stream.clone_htod(&bits(v)).unwrap(),
    );
    for variant in variants(attn) {
        let mut dout = stream.clone_htod(&vec![0x7e00u16; q.len()]).unwrap(); // f16 NaN
        attn.forward(stream, variant, shape, (&dq, lq), (&dk, lk), (&dv, lk), (&mut dout, lq))
            .expect("launch");
        let out = unbits(&stream.clone_dtoh(&dout).unwrap());
        let err = check(&out, &reference).unwrap_or_else(|e| panic!("{variant:?} {label}: {e}"));
        println!("{variant:?} {label}: rel err {err:.2e}");
    }
}

/// Every `(batch, heads, seq_q, seq_kv)` of `shapes`, in both head layouts, on every variant
/// against the CPU reference, with the causal mask or without; fresh random Q, K, V per case.
fn check_shapes_against_cpu(what: &str, shapes: &[(usize, usize, usize, usize)], causal: bool) {
    let Some(ctx) = gpu_for_test() else {
        println!("no GPU: skipped");
        return;
    };
    let attn = FusedAttention::load(&ctx).expect("kernel image");
    let stream = ctx.default_stream();
    let mut rng = Rng::fresh(what);
    for &(b, h, sq, skv) in shapes {
        let shape = AttentionShape { batch: b, heads: h, seq_q: sq, seq_kv: skv, scale: SCALE, causal };
        for bshd in [false, true] {
            let layout = |s| if bshd { HeadLayout::bshd(h, s) } else { HeadLayout::bhsd(h, s) };
            let (lq, lk) = (layout(sq), layout(skv));
            let q = rng.vec_f16(b * h * sq * HEAD_DIM, 2.0);
            let k = rng.vec_f16(b * h * skv * HEAD_DIM, 2.0);
            let v = rng.vec_f16(b * h * skv * HEAD_DIM, 1.0);
            let mask = if causal { "causal " } else { "" };
            let label = format!("{mask}b={b} h={h} seq_q={sq} seq_kv={skv} bshd={bshd}");
            check_variants(&attn, &stream, &shape, (&q, lq), (&k, lk), &v, &label);
        }
    }
}

/// Without a mask: 1, 77 (cross-attention), ragged self-attention, SD2's CFG shapes.
#[test]
fn gpu_attention_matches_cpu_reference() {
    let shapes = [
        (1, 1, 1, 1),
        (1, 2, 1, 77),
        (2, 5, 77, 77),
        (2, 5, 256, 77),
        (1, 3, 130, 200),
        (2, 5, 256, 256),
        (1, 2, 1024, 1024),
    ];
    check_shapes_against_cpu("gpu attention", &shapes, false);
}

/// The causal mask (the CLIP text encoder: 77 tokens, 16 heads of 64 in SD2) on both variants
/// against the CPU reference: 77, a multiple of the 64-key tile (128), ragged lengths over
/// several query blocks (130, 200), fewer queries than keys (70 / 77, the mask aligned at the
/// end) and more (80 / 77: the first 3 rows see no key and must be exactly zero, not NaN).
#[test]
fn gpu_attention_causal_matches_cpu_reference() {
    let shapes = [
        (1, 1, 1, 1),
        (2, 16, 77, 77),
        (1, 2, 128, 128),
        (1, 3, 130, 130),
        (2, 2, 200, 200),
        (1, 2, 70, 77),
        (1, 2, 80, 77),
    ];
    check_shapes_against_cpu("gpu attention causal", &shapes, true);
}

/// Long self-attention (up to 9216 tokens, 768x768 images): flash vs the f32 naive kernel on
/// the GPU (the CPU reference would take minutes at this size).
#[test]
fn gpu_attention_long_sequences_match_naive_kernel() {
    let Some(ctx) = gpu_for_test() else {
        println!("no GPU: skipped");
        return;
    };
    let attn = FusedAttention::load(&ctx).expect("kernel image");
    if !attn.flash_runs() {
        println!("the flash kernel needs sm_80: not run on this GPU");
        return;
    }
    let stream = ctx.default_stream();
    let mut rng = Rng::fresh("gpu attention long");
    // Causal 4099: blocks visit 1..=65 of the 65 tiles (the skip across a long range).
    for &(b, h, s, causal) in
        &[(2, 5, 4096, false), (1, 1, 9216, false), (1, 2, 4099, false), (1, 2, 4099, true)]
    {
        let shape = AttentionShape { batch: b, heads: h, seq_q: s, seq_kv: s, scale: SCALE, causal };
        let l = HeadLayout::bshd(h, s);
        let n = b * h * s * HEAD_DIM;
        let (q, k, v) = (rng.vec_f16(n, 2.0), rng.vec_f16(n, 2.0), rng.vec_f16(n, 1.0));
        let (dq, dk, dv) = (
            stream.clone_htod(&bits(&q)).unwrap(),
            stream.clone_htod(&bits(&k)).unwrap(),
            stream.clone_htod(&bits(&v)).unwrap(),
        );
        let mut outs = Vec::new();
        for variant in [AttentionVariant::Naive, AttentionVariant::Flash] {
            let mut dout = stream.clone_htod(&vec![0x7e00u16; n]).unwrap();
            attn.forward(&stream, variant, &shape, (&dq, l), (&dk, l), (&dv, l), (&mut dout, l))
                .expect("launch");
            outs.push(unbits(&stream.clone_dtoh(&dout).unwrap()));
        }
        assert!(relative_error(&outs[0], &outs[0]) == 0.0, "naive output has NaN");
        let err = check(&outs[1], &outs[0])
            .unwrap_or_else(|e| panic!("flash vs naive seq {s} causal {causal}: {e}"));
        println!("flash vs naive b={b} h={h} seq={s} causal {causal}: rel err {err:.2e}");
    }
}

#[test]
fn gpu_attention_rejects_bad_input() {
    let Some(ctx) = gpu_for_test() else {
        println!("no GPU: skipped");
        return;
    };
    let attn = FusedAttention::load(&ctx).expect("kernel image");
    let stream = ctx.default_stream();
    let buf = stream.clone_htod(&vec![0u16; 64 * 4]).unwrap();
    let mut out = stream.clone_htod(&vec![0u16; 64 * 4]).unwrap();
    let l = HeadLayout::bhsd(1, 4);
    let zero_keys = AttentionShape { batch: 1, heads: 1, seq_q: 4, seq_kv: 0, scale: SCALE, causal: false };
    assert!(attn
        .forward(&stream, AttentionVariant::Flash, &zero_keys, (&buf, l), (&buf, l), (&buf, l), (&mut out, l))
        .is_err());
    let too_long = AttentionShape { batch: 1, heads: 1, seq_q: 5, seq_kv: 4, scale: SCALE, causal: false };
    assert!(attn
        .forward(&stream, AttentionVariant::Flash, &too_long, (&buf, l), (&buf, l), (&buf, l), (&mut out, l))
        .is_err());
}

/// Small sizes for `compute-sanitizer` (memcheck, racecheck): both variants, ragged seq_q and
/// seq_kv spanning two K/V tiles, with and without the causal mask, still checked against the
/// reference.
#[test]
fn gpu_attention_small_for_sanitizer() {
    let Some(ctx) = gpu_for_test() else {
        println!("no GPU: skipped");
        return;
    };
    let attn = FusedAttention::load(&ctx).expect("kernel image");
    let stream = ctx.default_stream();
    let mut rng = Rng::fresh("sanitizer attention");
    for causal in [false, true] {
        let shape = AttentionShape { batch: 2, heads: 2, seq_q: 70, seq_kv: 77, scale: SCALE, causal };
        let (lq, lk) = (HeadLayout::bshd(2, 70), HeadLayout::bshd(2, 77));
        let q = rng.vec_f16(2 * 2 * 70 * HEAD_DIM, 2.0);
        let k = rng.vec_f16(2 * 2 * 77 * HEAD_DIM, 2.0);
        let v = rng.vec_f16(2 * 2 * 77 * HEAD_DIM, 1.0);
        check_variants(
            &attn,
            &stream,
            &shape,
            (&q, lq),
            (&k, lk),
            &v,
            &format!("sanitizer 2x2 70x77 causal {causal}"),
        );
    }
}

/// Adversarial mask (review item 3): every real key scores strongly negative (K = -c Q), so a
/// zero-filled padding key that escaped the mask (score 0) would dominate its row, and Q = 0
/// must give the exact mean of the valid V rows. seq_kv straddles the 64-key tiles.
#[test]
fn gpu_attention_adversarial_mask() {
    let Some(ctx) = gpu_for_test() else {
        println!("no GPU: skipped");
        return;
    };
    let attn = FusedAttention::load(&ctx).expect("kernel image");
    let stream = ctx.default_stream();
    let mut rng = Rng::fresh("adversarial mask");
    for &skv in &[1usize, 65, 77, 127] {
        for zero_q in [false, true] {
            let sq = 9;
            let shape =
                AttentionShape { batch: 1, heads: 1, seq_q: sq, seq_kv: skv, scale: SCALE, causal: false };
            let (lq, lk) = (HeadLayout::bhsd(1, sq), HeadLayout::bhsd(1, skv));
            let dir = rng.vec_f16(HEAD_DIM, 1.0);
            let q: Vec<f32> =
                (0..sq * HEAD_DIM).map(|i| if zero_q { 0.0 } else { dir[i % HEAD_DIM] }).collect();
            let k: Vec<f32> =
                (0..skv * HEAD_DIM).map(|i| half::f16::from_f32(-3.0 * dir[i % HEAD_DIM]).to_f32()).collect();
            let v = rng.vec_f16(skv * HEAD_DIM, 1.0);
            let label = format!("adversarial seq_kv {skv} zero_q {zero_q}");
            check_variants(&attn, &stream, &shape, (&q, lq), (&k, lk), &v, &label);
        }
    }
}
