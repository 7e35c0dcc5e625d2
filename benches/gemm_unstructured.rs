//! Unstructured sparse GEMM vs cuBLAS dense f16 (same process, same GPU, same shapes).
//!
//! `cargo bench --bench gemm_unstructured`; skips without a GPU. Throughput is reported as
//! elements = FLOPs of the dense problem (2 M N K), so criterion's "elem/s" reads as FLOP/s
//! for both the dense baseline and the sparse kernel. Shapes: memory-bound M <= 256 (text
//! encoder M = 154, cross-attention K/V projections, the UNet's 8x8 and 16x16 levels with CFG)
//! and compute-bound M >= 2048 (the 32x32 and 64x64 levels), at 35% and 50% sparsity.

use criterion::{Criterion, Throughput};
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::f16;
use sdsparse::backend::cuda::unstructured::{
    bitmap_from_dense, try_gpu_context, DeviceTiledWeight, Epilogue, GemmPlan, GemmVariant,
    TiledBitmapWeight, UnstructuredGemm,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// (label, M, N, K).
const SHAPES: &[(&str, usize, usize, usize)] = &[
    ("clip_qkv", 154, 1024, 1024),
    ("clip_fc1", 154, 4096, 1024),
    ("clip_fc2", 154, 1024, 4096),
    ("xattn_kv_320", 154, 320, 1024),
    ("xattn_kv_1280", 154, 1280, 1024),
    ("unet8x8_proj", 128, 1280, 1280),
    ("unet8x8_ff", 128, 10240, 1280),
    ("unet16x16_proj", 256, 1280, 1280),
    ("unet16x16_cfg_proj", 512, 1280, 1280),
    ("unet32x32_proj", 2048, 640, 640),
    ("unet32x32_ff", 2048, 5120, 640),
    ("unet64x64_proj", 8192, 320, 320),
    ("unet64x64_ff", 8192, 2560, 320),
];

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, mut state: u64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Magnitude pruning of the whole matrix to `sparsity`.
fn prune(mut w: Vec<f32>, sparsity: f64) -> Vec<f32> {
    let zeros = (sparsity * w.len() as f64) as usize;
    let mut mags: Vec<f32> = w.iter().map(|x| x.abs()).collect();
    if zeros > 0 {
        let (_, &mut threshold, _) = mags.select_nth_unstable_by(zeros - 1, f32::total_cmp);
        let mut left = zeros;
        for x in w.iter_mut() {
            if left > 0 && x.abs() <= threshold {
                *x = 0.0;
                left -= 1;
            }
        }
    }
    w
}

fn f16_bits(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| f16::from_f32(x).to_bits()).collect()
}

/// Times `iters` launches between two stream synchronisations.
fn time_launches(stream: &Arc<CudaStream>, iters: u64, mut launch: impl FnMut()) -> Duration {
    stream.synchronize().expect("sync");
    let start = Instant::now();
    for _ in 0..iters {
        launch();
    }
    stream.synchronize().expect("sync");
    start.elapsed()
}

/// Dense `y[M, N] = x[M, K] w[N, K]^T` in f16 with f32 accumulation through cublasGemmEx
/// (column-major view: y^T[N, M] = w (as K x N, transposed) * x^T (K x M)).
#[allow(clippy::too_many_arguments)]
fn cublas_gemm(
    blas: &CudaBlas,
    stream: &Arc<CudaStream>,
    m: usize,
    n: usize,
    k: usize,
    x: &CudaSlice<u16>,
    w: &CudaSlice<u16>,
    y: &mut CudaSlice<u16>,
) {
    let (alpha, beta) = (1.0f32, 0.0f32);
    let (xp, _gx) = x.device_ptr(stream);
    let (wp, _gw) = w.device_ptr(stream);
    let (yp, _gy) = y.device_ptr_mut(stream);
    // SAFETY: buffers hold M*K, N*K and M*N f16 values; alpha/beta are f32 for COMPUTE_32F.
    unsafe {
        blas::gemm_ex(
            *blas.handle(),
            blas_sys::cublasOperation_t::CUBLAS_OP_T,
            blas_sys::cublasOperation_t::CUBLAS_OP_N,
            n as i32,
            m as i32,
            k as i32,
            &alpha as *const f32 as *const _,
            wp as *const _,
            blas_sys::cudaDataType::CUDA_R_16F,
            k as i32,
            xp as *const _,
            blas_sys::cudaDataType::CUDA_R_16F,
            k as i32,
            &beta as *const f32 as *const _,
            yp as *mut _,
            blas_sys::cudaDataType::CUDA_R_16F,
            n as i32,
            blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
        )
    }
    .expect("cublasGemmEx");
}

fn main() {
    let Some(ctx) = try_gpu_context() else {
        println!("gemm_unstructured: no GPU, skipped");
        return;
    };
    if ctx.compute_capability().is_ok_and(|cc| cc < (8, 0)) {
        println!("gemm_unstructured: the tiled-bitmap kernels need sm_80, not benched on this GPU");
        return;
    }
    let gemm = UnstructuredGemm::load(&ctx).expect("kernel image (tools/build_unstructured_kernels.sh)");
    let stream = ctx.default_stream();
    let blas = CudaBlas::new(stream.clone()).expect("cuBLAS");
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    for &(label, m, n, k) in SHAPES {
        let mut group = c.benchmark_group(format!("gemm/{label}_M{m}_N{n}_K{k}"));
        group.throughput(Throughput::Elements((2 * m * n * k) as u64));
        let x = stream.clone_htod(&f16_bits(&values(m * k, 1))).expect("upload");
        let w_dense = values(n * k, 2);
        let mut y = stream.alloc_zeros::<u16>(m * n).expect("alloc");
        let dw = stream.clone_htod(&f16_bits(&w_dense)).expect("upload");
        group.bench_function("cublas_dense_f16", |b| {
            b.iter_custom(|iters| {
                time_launches(&stream, iters, || cublas_gemm(&blas, &stream, m, n, k, &x, &dw, &mut y))
            })
        });
        for sparsity in [0.35, 0.5] {
            let pruned = prune(w_dense.clone(), sparsity);
            let tiled = TiledBitmapWeight::from_bitmap(&bitmap_from_dense(&pruned, n, k)).expect("layout");
            println!(
                "{label} sparsity {sparsity}: weight bytes {} vs dense f16 {} ({:.3}x)",
                tiled.gpu_bytes().total(),
                tiled.dense_f16_bytes(),
                tiled.gpu_bytes_ratio()
            );
            let sw = DeviceTiledWeight::upload(&stream, &tiled).expect("upload");
            let auto = GemmPlan::choose(m, n, k, sw.gpu_bytes, gemm.sm_count());
            println!("{label} sparsity {sparsity}: dispatcher plan {auto:?}");
            let pct = (sparsity * 100.0) as u32;
            group.bench_function(format!("sparse{pct}"), |b| {
                b.iter_custom(|iters| {
                    time_launches(&stream, iters, || {
                        gemm.forward(&stream, &x, m, &sw, &Epilogue::default(), &mut y).expect("launch")
                    })
                })
            });
            if m >= 1024 && gemm.supports(GemmVariant::WgmmaBm128) {
                let plan = GemmPlan::new(GemmVariant::WgmmaBm128, 1, k.div_ceil(64));
                group.bench_function(format!("sparse{pct}_wgmma"), |b| {
                    b.iter_custom(|iters| {
                        time_launches(&stream, iters, || {
                            gemm.forward_plan(&stream, plan, &x, m, &sw, &Epilogue::default(), &mut y)
                                .expect("launch")
                        })
                    })
                });
            }
            // Tuning data for the dispatcher on skinny shapes: fixed variants and split-K factors.
            if m <= 512 && sparsity == 0.35 {
                for variant in [GemmVariant::Bm32, GemmVariant::Bm64] {
                    for splits in [1, 2, 4, 8] {
                        let plan = GemmPlan::new(variant, splits, k.div_ceil(64));
                        if plan.splits != splits || plan == auto {
                            continue;
                        }
                        let id = format!("sparse{pct}_{variant:?}_split{splits}");
                        group.bench_function(id, |b| {
                            b.iter_custom(|iters| {
                                time_launches(&stream, iters, || {
                                    gemm.forward_plan(&stream, plan, &x, m, &sw, &Epilogue::default(), &mut y)
                                        .expect("launch")
                                })
                            })
                        });
                    }
                }
            }
        }
        group.finish();
    }
    c.final_summary();
}
