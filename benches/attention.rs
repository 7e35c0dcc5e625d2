//! Fused attention forward on SD2 shapes: `cargo bench --bench attention` (skips without a GPU).
//!
//! SD2.1-base at 512x512 with CFG (batch 2): self-attention over 4096/1024/256/64 tokens with
//! 5/10/20/20 heads, cross-attention over 77 text tokens, plus 768x768 (9216 tokens). Throughput
//! is reported as elements = FLOPs (4 B H Sq Skv 64: Q K^T and P V), so "elem/s" reads as
//! FLOP/s; tools/bench_peers_unstructured.py runs PyTorch SDPA on the same shapes.

use criterion::{Criterion, Throughput};
use half::f16;
use sdsparse::backend::cuda::attention::{
    AttentionShape, AttentionVariant, FusedAttention, HeadLayout, HEAD_DIM,
};
use sdsparse::backend::cuda::unstructured::try_gpu_context;
use std::time::{Duration, Instant};

/// (label, batch, heads, seq_q, seq_kv).
const SHAPES: &[(&str, usize, usize, usize, usize)] = &[
    ("self_64x64", 2, 5, 4096, 4096),
    ("cross_64x64", 2, 5, 4096, 77),
    ("self_32x32", 2, 10, 1024, 1024),
    ("cross_32x32", 2, 10, 1024, 77),
    ("self_16x16", 2, 20, 256, 256),
    ("cross_16x16", 2, 20, 256, 77),
    ("self_8x8", 2, 20, 64, 64),
    ("cross_8x8", 2, 20, 64, 77),
    ("self_96x96_768px", 2, 5, 9216, 9216),
];

fn values(n: usize, mut state: u64) -> Vec<u16> {
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            f16::from_f32(((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0).to_bits()
        })
        .collect()
}

fn main() {
    let Some(ctx) = try_gpu_context() else {
        println!("attention: no GPU, skipped");
        return;
    };
    let attn = FusedAttention::load(&ctx).expect("kernel image (tools/build_unstructured_kernels.sh)");
    if !attn.flash_runs() {
        println!("attention: the flash kernel needs sm_80, not benched on this GPU");
        return;
    }
    let stream = ctx.default_stream();
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    for &(label, b, h, sq, skv) in SHAPES {
        let shape =
            AttentionShape { batch: b, heads: h, seq_q: sq, seq_kv: skv, scale: 0.125, causal: false };
        // Q/K/V as the projections produce them: [B, S, H*64].
        let (lq, lk) = (HeadLayout::bshd(h, sq), HeadLayout::bshd(h, skv));
        let q = stream.clone_htod(&values(b * sq * h * HEAD_DIM, 1)).expect("upload");
        let k = stream.clone_htod(&values(b * skv * h * HEAD_DIM, 2)).expect("upload");
        let v = stream.clone_htod(&values(b * skv * h * HEAD_DIM, 3)).expect("upload");
        let mut o = stream.alloc_zeros::<u16>(b * sq * h * HEAD_DIM).expect("alloc");
        let mut group = c.benchmark_group(format!("attention/{label}_B{b}_H{h}_Sq{sq}_Skv{skv}"));
        group.throughput(Throughput::Elements((4 * b * h * sq * skv * HEAD_DIM) as u64));
        group.bench_function("flash_d64", |bench| {
            bench.iter_custom(|iters| {
                stream.synchronize().expect("sync");
                let start = Instant::now();
                for _ in 0..iters {
                    attn.forward(
                        &stream,
                        AttentionVariant::Flash,
                        &shape,
                        (&q, lq),
                        (&k, lk),
                        (&v, lk),
                        (&mut o, lq),
                    )
                    .expect("launch");
                }
                stream.synchronize().expect("sync");
                start.elapsed()
            })
        });
        group.finish();
    }
    c.final_summary();
}
