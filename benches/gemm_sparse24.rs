//! 2:4 sparse GEMM benchmarks on the GPU: cuBLAS dense (variant 0, `cublasGemmEx` f16 in,
//! f32 compute) against every 2:4 kernel variant and the dispatcher's pick, on the linears
//! SD2.1-base runs at 512x512 with classifier-free guidance (batch 2) and on 4096³ / 8192³.
//! Throughput is dense-equivalent work, 2·M·N·K per GEMM (criterion reports it as
//! elements/s = FLOP/s); a TFLOP/s table with speedups over cuBLAS is printed at the end.
//! Without a GPU (or in a build without the CUDA kernels) it prints why and exits.
//!
//! Run: `cargo bench --bench gemm_sparse24` on a GPU machine, or from here through
//! `tools/gpu_check.sh` (docs/CUDA.md) and the device tool.

use criterion::{BenchmarkId, Criterion, Throughput};
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{sys, CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::f16;
use sdsparse::backend::cuda::sparse24::{
    prune_dense_24, Sp24Epilogue, Sp24Kernels, Sp24Variant, Sparse24Gpu, Sparse24Packed,
};
use std::ffi::c_void;
use std::sync::Arc;
use std::time::Duration;

/// (label, M, N, K). SD2.1-base UNet at 512x512 with CFG: tokens per level M = 2·64², 2·32²,
/// 2·16², 2·8² with channels C = 320, 640, 1280, 1280; attention q/k/v/out and proj_in/out
/// are C→C, GEGLU C→8C, feed-forward out 4C→C; cross-attention K/V map the 2x77 text
/// tokens 1024→C; the text encoder runs 2x77 tokens through 1024→1024, 1024→4096, 4096→1024.
fn shapes() -> Vec<(String, usize, usize, usize)> {
    let mut v = Vec::new();
    for (m, c) in [(8192, 320), (2048, 640), (512, 1280), (128, 1280)] {
        v.push((format!("unet_attn_proj_m{m}_c{c}"), m, c, c));
        v.push((format!("unet_geglu_m{m}_c{c}"), m, 8 * c, c));
        v.push((format!("unet_ff_out_m{m}_c{c}"), m, c, 4 * c));
    }
    for c in [320, 640, 1280] {
        v.push((format!("cross_kv_m154_c{c}"), 154, c, 1024));
    }
    v.push(("text_qkvo_m154".into(), 154, 1024, 1024));
    v.push(("text_fc1_m154".into(), 154, 4096, 1024));
    v.push(("text_fc2_m154".into(), 154, 1024, 4096));
    v.push(("square_4096".into(), 4096, 4096, 4096));
    v.push(("square_8192".into(), 8192, 8192, 8192));
    v
}

struct Rng(u64);
impl Rng {
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }
}

/// What one benchmark launches.
#[derive(Clone, Copy, PartialEq)]
enum Run {
    Cublas,
    Sparse(Sp24Variant),
}

impl Run {
    fn name(&self) -> String {
        match self {
            Run::Cublas => "v0_cublas_dense".into(),
            Run::Sparse(v) => v.name(),
        }
    }
}

struct Problem {
    m: usize,
    n: usize,
    k: usize,
    x: CudaSlice<u16>,
    w_dense: CudaSlice<u16>,
    w_sparse: Sparse24Gpu,
    y: CudaSlice<u16>,
}

struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Sp24Kernels,
    /// `None` when libcublas cannot be loaded: variant 0 is then left out (and said so).
    blas: Option<CudaBlas>,
}

impl Gpu {
    fn setup() -> Option<Gpu> {
        let dev = match sdsparse::backend::cuda::CudaDevice::new(0) {
            Ok(dev) => dev,
            Err(e) => {
                eprintln!("gemm_sparse24: skipped, no GPU ({e})");
                return None;
            }
        };
        if dev.compute_capability() < (8, 0) {
            eprintln!("gemm_sparse24: the 2:4 kernels need sm_80; {} is not benched", dev.gpu_name());
            return None;
        }
        let fatbin = sdsparse::backend::cuda::kernels::fatbin()?;
        let kernels = Sp24Kernels::load(dev.context(), fatbin).expect("load 2:4 kernels");
        let stream = dev.stream().clone();
        let blas = std::panic::catch_unwind(|| CudaBlas::new(stream.clone())).ok().and_then(|r| r.ok());
        if blas.is_none() {
            eprintln!("gemm_sparse24: cuBLAS could not be loaded; the dense baseline is left out");
        }
        Some(Gpu { ctx: dev.context().clone(), stream, kernels, blas })
    }

    fn problem(&self, m: usize, n: usize, k: usize, seed: u64) -> Problem {
        let mut rng = Rng(seed | 1);
        let w = prune_dense_24(&rng.vec(n * k), n, k).unwrap();
        let packed = Sparse24Packed::pack(&w).unwrap();
        // The dense baseline multiplies the same pruned weight (zeros included).
        let bits = |v: &[f32]| v.iter().map(|&x| f16::from_f32(x).to_bits()).collect::<Vec<u16>>();
        let w_dense = self.stream.clone_htod(&bits(&packed.decode_dense())).unwrap();
        let w_sparse = Sparse24Gpu::upload(&self.stream, &packed).unwrap();
        let x = self.stream.clone_htod(&bits(&rng.vec(m * k))).unwrap();
        let y = self.stream.alloc_zeros::<u16>(m * n).unwrap();
        Problem { m, n, k, x, w_dense, w_sparse, y }
    }

    fn launch(&self, run: Run, p: &mut Problem) {
        match run {
            Run::Sparse(v) => self
                .kernels
                .gemm(&self.stream, v, &p.x, p.m, &p.w_sparse, &Sp24Epilogue::default(), &mut p.y)
                .unwrap(),
            Run::Cublas => {
                // Row-major Y[M,N] = X W^T is column-major Y^T[N,M] = W^T' X': op(A) = W^T
                // with A = W stored [N][K] (column-major K x N, lda K), B = X (lda K).
                let (alpha, beta) = (1f32, 0f32);
                let (w, _gw) = p.w_dense.device_ptr(&self.stream);
                let (x, _gx) = p.x.device_ptr(&self.stream);
                let (y, _gy) = p.y.device_ptr_mut(&self.stream);
                // SAFETY: pointers are live allocations of the sizes the dimensions imply.
                unsafe {
                    blas::gemm_ex(
                        *self.blas.as_ref().expect("cuBLAS present").handle(),
                        blas_sys::cublasOperation_t::CUBLAS_OP_T,
                        blas_sys::cublasOperation_t::CUBLAS_OP_N,
                        p.n as i32,
                        p.m as i32,
                        p.k as i32,
                        &alpha as *const f32 as *const c_void,
                        w as *const c_void,
                        blas_sys::cudaDataType::CUDA_R_16F,
                        p.k as i32,
                        x as *const c_void,
                        blas_sys::cudaDataType::CUDA_R_16F,
                        p.k as i32,
                        &beta as *const f32 as *const c_void,
                        y as *mut c_void,
                        blas_sys::cudaDataType::CUDA_R_16F,
                        p.n as i32,
                        blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                    .unwrap();
                }
            }
        }
    }

    /// Mean seconds per launch over `iters` back-to-back launches, timed with CUDA events.
    fn time(&self, run: Run, p: &mut Problem, iters: u64) -> f64 {
        let start = self.ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
        let end = self.ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
        start.record(&self.stream).unwrap();
        for _ in 0..iters {
            self.launch(run, p);
        }
        end.record(&self.stream).unwrap();
        self.stream.synchronize().unwrap();
        start.elapsed_ms(&end).unwrap() as f64 * 1e-3 / iters as f64
    }
}

fn main() {
    let Some(gpu) = Gpu::setup() else { return };
    let cc = gpu.kernels.compute_capability();
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(700))
        .configure_from_args();
    let mut table = Vec::new();
    for (i, (label, m, n, k)) in shapes().into_iter().enumerate() {
        let mut p = gpu.problem(m, n, k, 1000 + i as u64);
        let flop = 2.0 * m as f64 * n as f64 * k as f64;
        // Variant 1 (the oracle) is left out: it exists for correctness, not speed.
        let mut runs = if gpu.blas.is_some() { vec![Run::Cublas] } else { Vec::new() };
        runs.extend(
            Sp24Variant::all_for(cc).into_iter().filter(|v| *v != Sp24Variant::Direct).map(Run::Sparse),
        );
        let auto = gpu.kernels.choose(m, n, k);
        let mut group = c.benchmark_group(format!("gemm_sparse24/{label}"));
        group.throughput(Throughput::Elements(flop as u64));
        let mut row = Vec::new();
        for run in &runs {
            group.bench_function(BenchmarkId::from_parameter(run.name()), |b| {
                b.iter_custom(|iters| Duration::from_secs_f64(gpu.time(*run, &mut p, iters) * iters as f64))
            });
            gpu.time(*run, &mut p, 3); // warm
            let secs = gpu.time(*run, &mut p, 20);
            row.push((run.name(), flop / secs * 1e-12));
        }
        group.finish();
        table.push((label, m, n, k, auto.name(), row));
    }
    c.final_summary();

    println!("\n2:4 sparse GEMM, dense-equivalent TFLOP/s (2MNK), sm_{}{}, mean of 20 launches", cc.0, cc.1);
    for (label, m, n, k, auto, row) in &table {
        // Baseline: cuBLAS when present (first column), else no ratio.
        let base = row.iter().find(|(name, _)| name == "v0_cublas_dense").map(|r| r.1);
        let best = row
            .iter()
            .filter(|(name, _)| name != "v0_cublas_dense")
            .cloned()
            .fold(("".to_string(), 0.0), |a, b| if b.1 > a.1 { b } else { a });
        let cells: Vec<String> = row.iter().map(|(name, t)| format!("{name} {t:.1}")).collect();
        let ratio = base.map_or("n/a".to_string(), |b| format!("{:.2}x", best.1 / b));
        println!(
            "{label:28} M {m:5} N {n:5} K {k:5} | {} | best sparse {} {ratio} cuBLAS | dispatcher: {auto}",
            cells.join(" | "),
            best.0
        );
    }
    // The headline: geometric mean over the SD2 UNet shapes of the dispatcher's pick and
    // of the best variant, relative to cuBLAS dense.
    let ratios = |pick_best: bool| -> Option<f64> {
        let mut logs = Vec::new();
        for (_, _, _, _, auto, row) in table.iter().filter(|r| r.0.starts_with("unet_")) {
            let base = row.iter().find(|(name, _)| name == "v0_cublas_dense")?.1;
            let t = if pick_best {
                row.iter().filter(|(name, _)| name != "v0_cublas_dense").map(|r| r.1).fold(0.0, f64::max)
            } else {
                row.iter().find(|(name, _)| name == auto)?.1
            };
            logs.push((t / base).ln());
        }
        (!logs.is_empty()).then(|| (logs.iter().sum::<f64>() / logs.len() as f64).exp())
    };
    if let (Some(auto), Some(best)) = (ratios(false), ratios(true)) {
        println!("geomean over the UNet shapes vs cuBLAS: dispatcher {auto:.2}x, best variant per shape {best:.2}x");
    }
}
