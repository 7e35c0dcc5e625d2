//! CPU 3x3 convolutions on the shapes of one SD2.1-base 512x512 run: im2col + GEMM against
//! Winograd F(2x2, 3x3), in the same process, interleaved. GFLOP/s counts the direct
//! convolution's 2·Cout·Cin·9·Ho·Wo per image for both (so the Winograd figure is an effective
//! rate). Run: `cargo bench --bench conv_cpu` (env CONV_BENCH_REPS, default 3; best of them).

use sdsparse::backend::cpu::conv::{conv2d_im2col, winograd_f23, ConvShape};
use std::hint::black_box;
use std::time::Instant;

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
        })
        .collect()
}

fn main() {
    let reps: usize = std::env::var("CONV_BENCH_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    // (name, batch, c_in, c_out, size): 3x3, stride 1, padding 1.
    let cases = [
        ("unet 320ch 64px b2", 2, 320, 320, 64),
        ("unet 640ch 32px b2", 2, 640, 640, 32),
        ("unet 1280ch 16px b2", 2, 1280, 1280, 16),
        ("unet 1280ch 8px b2", 2, 1280, 1280, 8),
        ("vae 512ch 64px", 1, 512, 512, 64),
        ("vae 512ch 128px", 1, 512, 512, 128),
        ("vae 256ch 256px", 1, 256, 256, 256),
        ("vae 128ch 512px", 1, 128, 128, 512),
    ];
    println!("{:24} {:>10} {:>10} {:>8}", "shape (3x3 s1 p1)", "im2col", "winograd", "speedup");
    for (name, batch, c_in, c_out, hw) in cases {
        let s = ConvShape { batch, c_in, h: hw, w: hw, c_out, kh: 3, kw: 3, stride: 1, padding: 1 };
        let x = values(batch * c_in * hw * hw, 1);
        let w = values(c_out * c_in * 9, 2);
        let b = values(c_out, 3);
        let flop = 2.0 * (batch * c_out * c_in * 9 * hw * hw) as f64;
        let (mut t_ref, mut t_win) = (f64::MAX, f64::MAX);
        for _ in 0..reps {
            let t = Instant::now();
            black_box(conv2d_im2col(&x, &w, Some(&b), s));
            t_ref = t_ref.min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            black_box(winograd_f23(&x, &w, Some(&b), s));
            t_win = t_win.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{name:24} {:>6.1} GF/s {:>6.1} GF/s {:>7.2}x   ({:.1} ms vs {:.1} ms)",
            flop / t_ref / 1e9,
            flop / t_win / 1e9,
            t_ref / t_win,
            t_ref * 1e3,
            t_win * 1e3
        );
    }
}
