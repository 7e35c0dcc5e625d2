//! GEMM throughput on SD2.1-base shapes (512x512, CFG batch 2) through the `gemm` crate: the
//! projections of the 64x64 level and the im2col GEMMs of the UNet / VAE 3x3 convolutions.
//! Build with and without `--features v4` to compare its AVX2 and AVX-512 kernels.
use std::time::Instant;
fn main() {
    // (name, m, n, k): dst[m,n] = lhs[m,k] * rhs[k,n], row-major both
    let shapes: &[(&str, usize, usize, usize)] = &[
        ("unet linear 8192x320x320", 8192, 320, 320),
        ("unet ff 8192x2560x320", 8192, 2560, 320),
        ("unet ff-out 8192x320x1280", 8192, 320, 1280),
        ("unet conv3x3 320ch 64px", 320, 4096, 2880),
        ("unet conv3x3 1280ch 16px", 1280, 256, 11520),
        ("vae conv3x3 512ch 64px", 512, 4096, 4608),
        ("vae conv3x3 256ch 256px tile", 256, 768, 2304),
        ("vae conv3x3 128ch 512px tile", 128, 1536, 1152),
    ];
    let reps: usize = std::env::var("REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    for &(name, m, n, k) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32) * 0.01).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32) * 0.01).collect();
        let mut c = vec![0f32; m * n];
        let mut best = f64::MAX;
        for _ in 0..reps {
            let t = Instant::now();
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    c.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a.as_ptr(),
                    1,
                    k as isize,
                    b.as_ptr(),
                    1,
                    n as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(0),
                );
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("{name:34} {:7.1} GFLOP/s ({:.2} ms)", 2.0 * (m * n * k) as f64 / best / 1e9, best * 1e3);
    }
}
