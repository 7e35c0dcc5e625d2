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
//   sdsparse_uns_gemm_wgmma_bm128  sm_90a only: the bm128 pipeline with wgmma.m64n64k16 from
//                             shared-memory descriptors (core-matrix layout, no swizzle)
// The mma.sync variants run on sm_80/86/89 and sm_90a; the wgmma one is a stub elsewhere, so
// every variant compiles (and links by name) for all four architectures.
#include <cuda_fp16.h>
#include <stdint.h>

#include "sdsparse_index.h"
#include "sdsparse_uns_ptx.h"
#include "sdsparse_unstructured_params.h"

namespace sds_uns {
using namespace sds_idx; // index math shared with the emulator tests (sdsparse_index.h)

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

// The no-swizzle "core matrix" smem layout that wgmma reads (sm_90a variant): uns_core_offset
// in sdsparse_index.h (8x8 core matrices of 128 B, LBO = 128 B along K, SBO = 1024 B along rows).

// Issues the cp.async copies of k-tile `kt` (X rows [m0, m0+BM), the compressed W tile of
// output block `tn`) into stage buffers. Every thread takes part; nothing is waited for.
template <class C, bool CORE = false>
__device__ __forceinline__ void load_stage(const SdsUnstructuredGemmParams& p, int m0, int tn, int kt,
                                           __half* xs, uint64_t* bm, __half* vs) {
    const int tid = threadIdx.x;
    const __half* x = static_cast<const __half*>(p.x);
    // X tile: BM rows x 8 chunks of 8 halves. K % 8 == 0, so a chunk is all in or all out.
#pragma unroll
    for (int i = 0; i < C::BM * C::BK / 8 / C::THREADS; ++i) {
        const int chunk = tid + i * C::THREADS;
        static_assert(C::BK / 8 == 8, "8 chunks per row (sdsparse_index.h)");
        const int r = uns_x_chunk_row(chunk, CORE), c8 = uns_x_chunk_col8(chunk, CORE);
        const int gm = m0 + r, gk = kt * C::BK + c8 * 8;
        const bool valid = gm < p.m && gk < p.k;
        const __half* src = valid ? x + (int64_t)gm * p.ldx + gk : x;
        cp_async16(xs + (CORE ? uns_core_offset(r, c8 * 8) : r * C::LDS + c8 * 8), src, valid);
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

// Expands one compressed tile (bitmap + packed values in smem) into the dense tile ws[64][LDS]
// (or the core layout for wgmma, see the CORE branch).
// Lane l of a warp handles columns 2l and 2l+1 of a row; a row's first value index is the
// exclusive prefix of the popcounts of the rows above it, which every warp computes for itself
// with one shuffle scan (lane l owns rows 2l and 2l+1), so no extra block barrier is needed.
template <class C, bool CORE = false>
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
    if constexpr (CORE) {
        // Core layout (wgmma): lane -> (row 8 rb + lane / 4, pair 4c + lane % 4), review U1.
        static_assert((TILE_N / 8) % C::WARPS == 0 && TILE_K == 64, "whole 8-row blocks per warp");
        for (int rb = warp; rb < TILE_N / 8; rb += C::WARPS) {
            const int r = uns_core_fill_row(rb, lane), src = r / 2;
            // Both shuffles unconditionally: the source lane differs per lane here.
            const int e = __shfl_sync(0xffffffffu, excl, src), first = __shfl_sync(0xffffffffu, c0, src);
            const int row_start = e + ((r & 1) ? first : 0);
            const uint64_t word = bm[r];
#pragma unroll
            for (int step = 0; step < TILE_K / 8; ++step) {  // core matrix (8 columns) `step`
                const int cp = uns_core_fill_pair(step, lane);  // column pair: columns 2cp, 2cp+1
                const uint32_t bits = (uint32_t)(word >> (2 * cp)) & 3u;
                int idx = row_start + __popcll(word & uns_below_mask(cp));
                const __half zero = __float2half(0.0f);
                const __half lo = (bits & 1u) ? vs[idx] : zero;
                idx += bits & 1u;
                const __half hi = (bits & 2u) ? vs[idx] : zero;
                *reinterpret_cast<__half2*>(ws + uns_core_offset(r, 2 * cp)) = __halves2half2(lo, hi);
            }
        }
        return;
    }
    const uint64_t below_mask = uns_below_mask(lane);  // columns left of this lane's pair
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

// Writes outputs (row, col) and (row, col + 1) (col even): raw f32 partials to the split-K
// workspace slice of this CTA when splits > 1, else epilogue + f16 store (a half2 when both
// columns exist and the row stride keeps it 4-byte aligned).
__device__ __forceinline__ void store_pair(const SdsUnstructuredGemmParams& p, int row, int col, float v0, float v1) {
    if (row >= p.m) return;
    if (p.splits > 1) {
        float* dst = p.workspace + uns_workspace_index(blockIdx.z, p.m, p.n, row, col);
        if (col < p.n) dst[0] = v0;
        if (col + 1 < p.n) dst[1] = v1;
        return;
    }
    __half* dst = static_cast<__half*>(p.y) + (int64_t)row * p.ldy + col;
    if (col + 1 < p.n && p.ldy % 2 == 0) {
        *reinterpret_cast<__half2*>(dst) = __floats2half2_rn(epilogue(p, v0, row, col), epilogue(p, v1, row, col + 1));
    } else {
        if (col < p.n) dst[0] = __float2half(epilogue(p, v0, row, col));
        if (col + 1 < p.n) dst[1] = __float2half(epilogue(p, v1, row, col + 1));
    }
}

template <class C>
__device__ __forceinline__ void gemm_tc(const SdsUnstructuredGemmParams& p) {
    extern __shared__ __align__(128) unsigned char sds_uns_smem[];
    __half* xs = reinterpret_cast<__half*>(sds_uns_smem);                // [2][BM][LDS]
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
    const int kt_begin = uns_split_begin(blockIdx.z, p.k_tiles_per_split);
    const int kt_end = uns_split_end(blockIdx.z, p.k_tiles_per_split, p.tiles_k);

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
                const int row = warp_m * C::WM + i * 16 + ldm_a_row(lane);
                const int col = ks * 16 + ldm_a_col(lane);
                ldmatrix_x4(a[i], xst + row * C::LDS + col);
            }
#pragma unroll
            for (int j = 0; j < C::NT; j += 2) {
                // B for two n8 tiles: matrices (n0-7,k0-7), (n0-7,k8-15), (n8-15,k0-7), (n8-15,k8-15);
                // W rows are k-contiguous, exactly mma's "col" B fragment without a transpose.
                uint32_t b[4];
                const int row = warp_n * C::WN + j * 8 + ldm_b_row(lane);
                const int col = ks * 16 + ldm_b_col(lane);
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
#pragma unroll
    for (int i = 0; i < C::MT; ++i)
#pragma unroll
        for (int j = 0; j < C::NT; ++j)
#pragma unroll
            for (int h = 0; h < 2; ++h)
                store_pair(p, m0 + warp_m * C::WM + i * 16 + frag_c_row(lane, 2 * h),
                           n0 + warp_n * C::WN + j * 8 + frag_c_col(lane, 0), acc[i][j][2 * h], acc[i][j][2 * h + 1]);
}

using CfgBm32 = GemmConfig<32, 1, 4>;
using CfgBm64 = GemmConfig<64, 2, 2>;
using CfgBm128 = GemmConfig<128, 4, 2>;
static_assert(CfgBm32::SMEM_BYTES == 35840, "launcher mirrors these sizes");
static_assert(CfgBm64::SMEM_BYTES == 45056, "launcher mirrors these sizes");
static_assert(CfgBm128::SMEM_BYTES == 63488, "launcher mirrors these sizes (needs the > 48 KB opt-in)");


// ---- sm_90a: the same pipeline with wgmma ---------------------------------------------------
// Two warpgroups; warpgroup g multiplies X rows [64g, 64g + 64) by the whole expanded 64x64 W
// tile with wgmma.m64n64k16 (A and B from shared memory through descriptors, both K-major, no
// swizzle, f32 accumulators in registers). Tiles are stored in the core-matrix layout above.
// Only sm_90a has wgmma: elsewhere the kernel is an empty stub the launcher never selects.
struct WgmmaConfig {
    static constexpr int BM = 128, BN = TILE_N, BK = TILE_K;
    static constexpr int WARPS = 8, THREADS = 256, LDS = BK;
    static constexpr int X_HALVES = 2 * BM * BK;  // two stages, core-matrix layout
    static constexpr int W_HALVES = BN * BK;
    static constexpr int V_HALVES = 2 * TILE_ELEMS;
    static constexpr int SMEM_BYTES = (X_HALVES + W_HALVES + V_HALVES) * 2 + 2 * TILE_N * 8;
    static_assert((BM * BK / 8) % THREADS == 0, "X tile loads split evenly over the threads");
    static_assert(BM == 64 * (THREADS / 128), "one 64-row wgmma per warpgroup");
};
static_assert(WgmmaConfig::SMEM_BYTES == 58368, "launcher mirrors this size (needs the > 48 KB opt-in)");

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Shared-memory matrix descriptor: start address, LBO (next core matrix along K) = 128 B,
// SBO (next 8 rows) = 1024 B, no swizzle; addresses and offsets are encoded >> 4.
__device__ __forceinline__ uint64_t smem_desc(const void* p) {
    return wgmma_desc(smem_u32(p), UNS_CORE_LBO, UNS_CORE_SBO);
}

// d[64 x 64] (+)= A[64 x 16] * B[16 x 64]^T, both K-major in shared memory.
__device__ __forceinline__ void wgmma_m64n64k16(float d[32], uint64_t desc_a, uint64_t desc_b) {
    asm volatile(
        "{\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "%32, %33, 1, 1, 1, 0, 0;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(desc_a), "l"(desc_b));
}
#endif

__device__ __forceinline__ void gemm_wgmma(const SdsUnstructuredGemmParams& p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using C = WgmmaConfig;
    extern __shared__ __align__(128) unsigned char sds_uns_smem[];
    __half* xs = reinterpret_cast<__half*>(sds_uns_smem);                // [2][BM x BK] core layout
    __half* ws = xs + C::X_HALVES;                               // [BN x BK] core layout
    __half* vs = ws + C::W_HALVES;                               // [2][TILE_ELEMS]
    uint64_t* bm = reinterpret_cast<uint64_t*>(vs + C::V_HALVES);  // [2][TILE_N]

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, wg = warp / 4;
    const int tn = blockIdx.x, m0 = blockIdx.y * C::BM, n0 = tn * C::BN;
    const int kt_begin = uns_split_begin(blockIdx.z, p.k_tiles_per_split);
    const int kt_end = uns_split_end(blockIdx.z, p.k_tiles_per_split, p.tiles_k);

    float d[32];
#pragma unroll
    for (int e = 0; e < 32; ++e) d[e] = 0.0f;

    if (kt_begin < kt_end) load_stage<C, true>(p, m0, tn, kt_begin, xs, bm, vs);
    cp_async_commit();
    for (int kt = kt_begin; kt < kt_end; ++kt) {
        const int s = (kt - kt_begin) & 1;
        if (kt + 1 < kt_end)
            load_stage<C, true>(p, m0, tn, kt + 1, xs + (s ^ 1) * C::BM * C::BK, bm + (s ^ 1) * TILE_N,
                                vs + (s ^ 1) * TILE_ELEMS);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        expand_tile<C, true>(bm + s * TILE_N, vs + s * TILE_ELEMS, ws);
        // Generic-proxy smem writes (cp.async, the expansion) must be made visible to the
        // async proxy that wgmma reads through, then every thread's writes must be done.
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();

        const __half* xa = xs + s * C::BM * C::BK + wg * 64 * C::BK;  // this warpgroup's 64 rows
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
        for (int ks = 0; ks < C::BK / 16; ++ks)  // k16 step = 2 core matrices along K = 128 halves
            wgmma_m64n64k16(d, smem_desc(xa + ks * 128), smem_desc(ws + ks * 128));
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
        // The accumulators are written asynchronously: pin every use of them after the wait.
#pragma unroll
        for (int e = 0; e < 32; ++e) asm volatile("" : "+f"(d[e])::"memory");
        __syncthreads();  // ws and stage s are rewritten next iteration
    }
    cp_async_wait<0>();

    // Accumulators: warp w of the warpgroup owns rows 16w..16w+15 like an m16n8 fragment, for
    // each of the 8 n8 column blocks j: d[4j], d[4j+1] at row lane/4, d[4j+2], d[4j+3] at row + 8.
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h)
            store_pair(p, m0 + wg * 64 + wgmma_d_row(warp % 4, lane, 2 * h), n0 + wgmma_d_col(lane, j, 0),
                       d[4 * j + 2 * h], d[4 * j + 2 * h + 1]);
#endif
}
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
    SDS_SM80_ONLY(sds_uns::gemm_tc<sds_uns::CfgBm32>(p));
}
extern "C" __global__ void __launch_bounds__(sds_uns::CfgBm64::THREADS)
    sdsparse_uns_gemm_bm64(const __grid_constant__ SdsUnstructuredGemmParams p) {
    SDS_SM80_ONLY(sds_uns::gemm_tc<sds_uns::CfgBm64>(p));
}
extern "C" __global__ void __launch_bounds__(sds_uns::CfgBm128::THREADS)
    sdsparse_uns_gemm_bm128(const __grid_constant__ SdsUnstructuredGemmParams p) {
    SDS_SM80_ONLY(sds_uns::gemm_tc<sds_uns::CfgBm128>(p));
}

// sm_90a wgmma variant: grid = (tiles_n, ceil(M / 128), splits), block = 256, dynamic smem
// = WgmmaConfig::SMEM_BYTES. A stub on other architectures (the launcher checks sm_90).
extern "C" __global__ void __launch_bounds__(sds_uns::WgmmaConfig::THREADS)
    sdsparse_uns_gemm_wgmma_bm128(const __grid_constant__ SdsUnstructuredGemmParams p) {
    sds_uns::gemm_wgmma(p);
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
