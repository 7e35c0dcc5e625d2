// Unstructured sparse GEMM: Y[M,N] = epilogue(X[M,K] . W[N,K]^T), X/Y f16, f32 accumulate.
//
// "Load as sparse, compute as dense" (Flash-LLM / SpInfer): W lives on the GPU as 64x64 tiles,
// each a 64-word bitmap plus its kept f16 values packed row-major (layout in
// sdsparse_unstructured_params.h, built by src/backend/cuda/unstructured.rs). A CTA streams
// the compressed tiles of its 64 output features along K with cp.async, expands each tile
// into a dense [64 x 64] f16 tile in shared memory, and multiplies on tensor cores with
// mma.sync m16n8k16 (f32 accumulators). Global traffic for W is the compressed size
// (~0.71x of dense f16 at 35% sparsity), which is what pays on memory-bound shapes (small M).
//
// CPU reference and checker: `reference_gemm` and the tests in tests/unstructured_gemm.rs
// (relative error vs the f64 reference on the f16-rounded operands, NaN never passes).
//
// Variants, side by side:
//   sdsparse_uns_gemm_naive   one thread per output, decodes W elements with popcounts (oracle)
//   sdsparse_uns_gemm_bm32    BM=32,  4 warps (1x4), for M <= 64 (text encoder, low UNet levels)
//   sdsparse_uns_gemm_bm64    BM=64,  4 warps (2x2), mid M
//   sdsparse_uns_gemm_bm128   BM=128, 8 warps (4x2), compute-bound M >= 1024 (dynamic smem > 48 KB)
//   split-K: any tensor-core variant with grid.z > 1 writes f32 partials to a workspace and
//   sdsparse_uns_gemm_splitk_reduce sums them and applies the epilogue (skinny shapes whose
//   tiles_n x M-blocks grid would leave SMs idle, e.g. the text encoder at M = 154)
// All tensor-core variants use mma.sync, which is what sm_80/86/89 have and which also runs
// on sm_90a. A wgmma path for sm_90a is not written yet (see the report in the issue); every
// variant compiles for sm_80, sm_86, sm_89 and sm_90a.
#include <cuda_fp16.h>
#include <stdint.h>

#include "sdsparse_uns_ptx.h"
#include "sdsparse_unstructured_params.h"

namespace sds_uns {

constexpr int TILE_N = SDS_UNS_TILE_N;  // output features per tile (= CTA BN)
constexpr int TILE_K = SDS_UNS_TILE_K;  // input features per tile (= CTA BK)
constexpr int TILE_ELEMS = TILE_N * TILE_K;
static_assert(TILE_K == 64, "one u64 bitmap word per tile row");
static_assert(SDS_UNS_VALUE_ALIGN == 8, "tile value runs are 16 B (8 x f16) aligned");

__device__ __forceinline__ float gelu_erf(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

__device__ __forceinline__ float epilogue(const SdsUnstructuredGemmParams& p, float acc, int row, int col) {
    if (p.flags & SDS_EPI_BIAS) acc += p.bias[col];
    if (p.flags & SDS_EPI_GELU) acc = gelu_erf(acc);
    if (p.flags & SDS_EPI_RESIDUAL)
        acc += __half2float(static_cast<const __half*>(p.residual)[(int64_t)row * p.ldr + col]);
    return acc;
}

template <int BM_, int WARPS_M_, int WARPS_N_>
struct GemmConfig {
    static constexpr int BM = BM_, BN = TILE_N, BK = TILE_K;
    static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_;
    static constexpr int WARPS = WARPS_M * WARPS_N, THREADS = WARPS * 32;
    static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // per-warp output tile
    static constexpr int MT = WM / 16, NT = WN / 8;              // mma tiles per warp
    static constexpr int LDS = BK + 8;  // smem row stride (halves): +16 B keeps ldmatrix conflict-free
    // Dynamic shared memory: X double buffer, one dense W tile, compressed W double buffer.
    static constexpr int X_HALVES = 2 * BM * LDS;
    static constexpr int W_HALVES = BN * LDS;
    static constexpr int V_HALVES = 2 * TILE_ELEMS;
    static constexpr int BITMAP_WORDS = 2 * TILE_N;
    static constexpr int SMEM_BYTES = (X_HALVES + W_HALVES + V_HALVES) * 2 + BITMAP_WORDS * 8;

    static_assert(BM % (16 * WARPS_M) == 0, "each warp owns whole 16-row mma tiles");
    static_assert(WN % 16 == 0, "B fragments are loaded 16 columns (two n8 tiles) at a time");
    static_assert((BM * BK / 8) % THREADS == 0, "X tile loads split evenly over the threads");
    static_assert(THREADS >= TILE_N * 8 / 16, "one 16 B bitmap chunk per thread at most");
    static_assert(TILE_N % WARPS == 0, "expansion: whole tile rows per warp");
    static_assert(SMEM_BYTES <= 227 * 1024, "fits the largest sm_80+ shared memory carve-out");
};

// Issues the cp.async copies of k-tile `kt` (X rows [m0, m0+BM), the compressed W tile of
// output block `tn`) into stage buffers. Every thread takes part; nothing is waited for.
template <class C>
__device__ __forceinline__ void load_stage(const SdsUnstructuredGemmParams& p, int m0, int tn, int kt,
                                           __half* xs, uint64_t* bm, __half* vs) {
    const int tid = threadIdx.x;
    const __half* x = static_cast<const __half*>(p.x);
    // X tile: BM rows x 8 chunks of 8 halves. K % 8 == 0, so a chunk is all in or all out.
#pragma unroll
    for (int i = 0; i < C::BM * C::BK / 8 / C::THREADS; ++i) {
        const int chunk = tid + i * C::THREADS;
        const int r = chunk / (C::BK / 8), c8 = chunk % (C::BK / 8);
        const int gm = m0 + r, gk = kt * C::BK + c8 * 8;
        const bool valid = gm < p.m && gk < p.k;
        const __half* src = valid ? x + (int64_t)gm * p.ldx + gk : x;
        cp_async16(xs + r * C::LDS + c8 * 8, src, valid);
    }
    const int tile = tn * p.tiles_k + kt;
    // Bitmap: 64 words = 32 chunks of 16 B.
    if (tid < TILE_N / 2) cp_async16(bm + tid * 2, p.bitmap + (int64_t)tile * TILE_N + tid * 2, true);
    // Packed values: the run is a multiple of 8 halves and 16 B aligned by construction.
    const uint32_t begin = p.tile_offsets[tile], end = p.tile_offsets[tile + 1];
    const __half* vals = static_cast<const __half*>(p.values) + begin;
    const int chunks = (int)(end - begin) / 8;
    for (int c = tid; c < chunks; c += C::THREADS) cp_async16(vs + c * 8, vals + c * 8, true);
}

// Expands one compressed tile (bitmap + packed values in smem) into the dense tile ws[64][LDS].
// Lane l of a warp handles columns 2l and 2l+1 of a row; a row's first value index is the
// exclusive prefix of the popcounts of the rows above it, which every warp computes for itself
// with one shuffle scan (lane l owns rows 2l and 2l+1), so no extra block barrier is needed.
template <class C>
__device__ __forceinline__ void expand_tile(const uint64_t* bm, const __half* vs, __half* ws) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int c0 = __popcll(bm[2 * lane]);
    const int pair = c0 + __popcll(bm[2 * lane + 1]);
    int incl = pair;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
        const int t = __shfl_up_sync(0xffffffffu, incl, d);
        if (lane >= d) incl += t;
    }
    const int excl = incl - pair;  // first value of row 2*lane
    const uint64_t below_mask = (1ull << (2 * lane)) - 1;  // columns left of this lane's pair
#pragma unroll 4
    for (int r = warp; r < TILE_N; r += C::WARPS) {
        const int src = r / 2;
        const int row_start = __shfl_sync(0xffffffffu, excl, src) + ((r & 1) ? __shfl_sync(0xffffffffu, c0, src) : 0);
        const uint64_t word = bm[r];
        const uint32_t bits = (uint32_t)(word >> (2 * lane)) & 3u;
        int idx = row_start + __popcll(word & below_mask);
        const __half zero = __float2half(0.0f);
        const __half lo = (bits & 1u) ? vs[idx] : zero;
        idx += bits & 1u;
        const __half hi = (bits & 2u) ? vs[idx] : zero;
        *reinterpret_cast<__half2*>(ws + r * C::LDS + 2 * lane) = __halves2half2(lo, hi);
    }
}

template <class C>
__device__ __forceinline__ void gemm_tc(const SdsUnstructuredGemmParams& p) {
    extern __shared__ __align__(16) unsigned char smem[];
    __half* xs = reinterpret_cast<__half*>(smem);                // [2][BM][LDS]
    __half* ws = xs + C::X_HALVES;                               // [BN][LDS]
    __half* vs = ws + C::W_HALVES;                               // [2][TILE_ELEMS]
    uint64_t* bm = reinterpret_cast<uint64_t*>(vs + C::V_HALVES);  // [2][TILE_N]
    static_assert(((C::X_HALVES + C::W_HALVES + C::V_HALVES) * 2) % 16 == 0, "bitmap stays 16 B aligned");

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int warp_m = warp / C::WARPS_N, warp_n = warp % C::WARPS_N;
    const int tn = blockIdx.x;            // output-feature block (one tile row of W)
    const int m0 = blockIdx.y * C::BM;    // first X row of this CTA
    const int n0 = tn * C::BN;
    // Split-K: this CTA's k-tiles are [kt_begin, kt_end) (all of them when splits == 1).
    const int kt_begin = blockIdx.z * p.k_tiles_per_split;
    const int kt_end = min(p.tiles_k, kt_begin + p.k_tiles_per_split);

    float acc[C::MT][C::NT][4];
#pragma unroll
    for (int i = 0; i < C::MT; ++i)
#pragma unroll
        for (int j = 0; j < C::NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    if (kt_begin < kt_end) load_stage<C>(p, m0, tn, kt_begin, xs, bm, vs);
    cp_async_commit();

    for (int kt = kt_begin; kt < kt_end; ++kt) {
        const int s = (kt - kt_begin) & 1;
        // Prefetch k-tile kt+1 into the other stage (freed by the barrier ending iteration kt-1).
        if (kt + 1 < kt_end)
            load_stage<C>(p, m0, tn, kt + 1, xs + (s ^ 1) * C::BM * C::LDS, bm + (s ^ 1) * TILE_N,
                          vs + (s ^ 1) * TILE_ELEMS);
        cp_async_commit();
        cp_async_wait<1>();  // stage s has landed (only the newest group may be pending)
        __syncthreads();

        expand_tile<C>(bm + s * TILE_N, vs + s * TILE_ELEMS, ws);
        __syncthreads();

        const __half* xst = xs + s * C::BM * C::LDS;
#pragma unroll
        for (int ks = 0; ks < C::BK / 16; ++ks) {
            uint32_t a[C::MT][4];
#pragma unroll
            for (int i = 0; i < C::MT; ++i) {
                // A 16x16: lanes 0-15 address rows 0-15 at k 0, lanes 16-31 rows 0-15 at k 8.
                const int row = warp_m * C::WM + i * 16 + (lane % 16);
                const int col = ks * 16 + (lane / 16) * 8;
                ldmatrix_x4(a[i], xst + row * C::LDS + col);
            }
#pragma unroll
            for (int j = 0; j < C::NT; j += 2) {
                // B for two n8 tiles: matrices (n0-7,k0-7), (n0-7,k8-15), (n8-15,k0-7), (n8-15,k8-15);
                // W rows are k-contiguous, exactly mma's "col" B fragment without a transpose.
                uint32_t b[4];
                const int row = warp_n * C::WN + j * 8 + (lane & 7) + ((lane >> 4) << 3);
                const int col = ks * 16 + ((lane >> 3) & 1) * 8;
                ldmatrix_x4(b, ws + row * C::LDS + col);
#pragma unroll
                for (int i = 0; i < C::MT; ++i) {
                    mma_16816(acc[i][j], a[i], b[0], b[1]);
                    mma_16816(acc[i][j + 1], a[i], b[2], b[3]);
                }
            }
        }
        __syncthreads();  // ws and stage s are rewritten next iteration
    }
    cp_async_wait<0>();

    // Accumulator fragment: c0,c1 at (lane/4, 2*(lane%4) + {0,1}), c2,c3 at row + 8.
    if (p.splits > 1) {  // raw partial sums; the reduce kernel applies the epilogue
        float* ws_out = p.workspace + (int64_t)blockIdx.z * p.m * p.n;
#pragma unroll
        for (int i = 0; i < C::MT; ++i)
#pragma unroll
            for (int j = 0; j < C::NT; ++j)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int row = m0 + warp_m * C::WM + i * 16 + lane / 4 + h * 8;
                    const int col = n0 + warp_n * C::WN + j * 8 + 2 * (lane % 4);
                    if (row >= p.m) continue;
                    float* dst = ws_out + (int64_t)row * p.n + col;
                    if (col < p.n) dst[0] = acc[i][j][2 * h];
                    if (col + 1 < p.n) dst[1] = acc[i][j][2 * h + 1];
                }
        return;
    }
    __half* y = static_cast<__half*>(p.y);
    const bool pairs_aligned = (p.ldy % 2 == 0);
#pragma unroll
    for (int i = 0; i < C::MT; ++i)
#pragma unroll
        for (int j = 0; j < C::NT; ++j)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = m0 + warp_m * C::WM + i * 16 + lane / 4 + h * 8;
                const int col = n0 + warp_n * C::WN + j * 8 + 2 * (lane % 4);
                if (row >= p.m) continue;
                const float v0 = acc[i][j][2 * h], v1 = acc[i][j][2 * h + 1];
                __half* dst = y + (int64_t)row * p.ldy + col;
                if (col + 1 < p.n && pairs_aligned) {
                    *reinterpret_cast<__half2*>(dst) =
                        __floats2half2_rn(epilogue(p, v0, row, col), epilogue(p, v1, row, col + 1));
                } else {
                    if (col < p.n) dst[0] = __float2half(epilogue(p, v0, row, col));
                    if (col + 1 < p.n) dst[1] = __float2half(epilogue(p, v1, row, col + 1));
                }
            }
}

using CfgBm32 = GemmConfig<32, 1, 4>;
using CfgBm64 = GemmConfig<64, 2, 2>;
using CfgBm128 = GemmConfig<128, 4, 2>;
static_assert(CfgBm32::SMEM_BYTES == 35840, "launcher mirrors these sizes");
static_assert(CfgBm64::SMEM_BYTES == 45056, "launcher mirrors these sizes");
static_assert(CfgBm128::SMEM_BYTES == 63488, "launcher mirrors these sizes (needs the > 48 KB opt-in)");

}  // namespace sds_uns

// Oracle variant: one thread per output element; W[n, k] is decoded from its tile by the
// popcount of the bitmap bits that precede it in the tile (rows above, then columns left).
// grid = (ceil(N / 16), ceil(M / 16)), block = (16, 16).
extern "C" __global__ void sdsparse_uns_gemm_naive(const __grid_constant__ SdsUnstructuredGemmParams p) {
    const int col = blockIdx.x * 16 + threadIdx.x, row = blockIdx.y * 16 + threadIdx.y;
    if (row >= p.m || col >= p.n) return;
    const __half* x = static_cast<const __half*>(p.x);
    const __half* vals = static_cast<const __half*>(p.values);
    const int tn = col / sds_uns::TILE_N, r = col % sds_uns::TILE_N;
    float acc = 0.0f;
    for (int kt = 0; kt < p.tiles_k; ++kt) {
        const int64_t tile = (int64_t)tn * p.tiles_k + kt;
        const uint64_t* words = p.bitmap + tile * sds_uns::TILE_N;
        int before = 0;  // values of rows 0..r-1 of this tile
        for (int rr = 0; rr < r; ++rr) before += __popcll(words[rr]);
        const uint64_t word = words[r];
        const uint32_t base = p.tile_offsets[tile] + before;
        for (int c = 0; c < sds_uns::TILE_K; ++c) {
            if (!((word >> c) & 1ull)) continue;
            const int k = kt * sds_uns::TILE_K + c;
            const int idx = __popcll(word & ((1ull << c) - 1));
            acc += __half2float(x[(int64_t)row * p.ldx + k]) * __half2float(vals[base + idx]);
        }
    }
    static_cast<__half*>(p.y)[(int64_t)row * p.ldy + col] = __float2half(sds_uns::epilogue(p, acc, row, col));
}

// Tensor-core variants. grid = (tiles_n, ceil(M / BM), splits), block = THREADS, dynamic smem =
// SMEM_BYTES; splits = ceil(tiles_k / k_tiles_per_split) (1: no split-K).
extern "C" __global__ void __launch_bounds__(sds_uns::CfgBm32::THREADS)
    sdsparse_uns_gemm_bm32(const __grid_constant__ SdsUnstructuredGemmParams p) {
    sds_uns::gemm_tc<sds_uns::CfgBm32>(p);
}
extern "C" __global__ void __launch_bounds__(sds_uns::CfgBm64::THREADS)
    sdsparse_uns_gemm_bm64(const __grid_constant__ SdsUnstructuredGemmParams p) {
    sds_uns::gemm_tc<sds_uns::CfgBm64>(p);
}
extern "C" __global__ void __launch_bounds__(sds_uns::CfgBm128::THREADS)
    sdsparse_uns_gemm_bm128(const __grid_constant__ SdsUnstructuredGemmParams p) {
    sds_uns::gemm_tc<sds_uns::CfgBm128>(p);
}

// Split-K reduction: y[row, col] = epilogue(sum_z workspace[z, row, col]).
// grid = ceil(M * N / 256), block = 256.
extern "C" __global__ void __launch_bounds__(256)
    sdsparse_uns_gemm_splitk_reduce(const __grid_constant__ SdsUnstructuredGemmParams p) {
    const int64_t i = (int64_t)blockIdx.x * 256 + threadIdx.x;
    const int64_t mn = (int64_t)p.m * p.n;
    if (i >= mn) return;
    const int row = (int)(i / p.n), col = (int)(i % p.n);
    float acc = 0.0f;
    for (int z = 0; z < p.splits; ++z) acc += p.workspace[z * mn + i];
    static_cast<__half*>(p.y)[(int64_t)row * p.ldy + col] = __float2half(sds_uns::epilogue(p, acc, row, col));
}
