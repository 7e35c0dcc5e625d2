// 2:4 semi-structured sparse GEMM on sparse tensor cores.
//
//   Y[m, n] = X[m, k] · W[n, k]^T (+ bias[n]) (gelu) (+ residual[m, n])
//
// X, Y, residual f16; W pruned 2:4 along k in the device layout of sparse24.cuh; f32
// accumulation; bias f32. The sparse operand of mma.sp / wgmma.sp is A, so every kernel
// computes Y^T = W · X^T: weight rows are the MMA's M dimension, tokens (rows of X) its
// N dimension, and X row-major is exactly the K-major B operand.
//
// Variants (SGEMM_CUDA style, one optimisation step each; variant 0 is cuBLAS dense,
// launched from Rust through cudarc):
//   1 sdsparse_sp24_v1_direct   mma.sp m16n8k32 with fragments loaded straight from global memory:
//                      the simplest correct use of the instruction (oracle for the others).
//   2 sdsparse_sp24_v2_pipe_bt{32,64,128}: 128 x BT block tile, cp.async 3-stage pipeline into swizzled shared
//                      memory, ldmatrix fragments, coalesced epilogue through shared memory.
//   3 sdsparse_sp24_v3_wgmma    sm_90a only: TMA (cp.async.bulk.tensor) into shared memory, mbarrier
//                      producer/consumer pipeline, wgmma.mma_async.sp m64n128k32.
// The host dispatcher (src/backend/cuda/sparse24.rs) picks variant and tile.
#include <cuda.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "sdsparse_arch.h"
#include "sdsparse_index.h"
#include "sparse24.cuh"

// The dynamic shared memory of every kernel in this file (one declaration: all uses must
// agree on the alignment). TMA destinations and wgmma descriptors want >= 128 B.
extern __shared__ __align__(1024) uint8_t sp24_smem[];

// Everything but the extern "C" kernels lives in a namespace: build.rs compiles all of
// cuda/*.cu as one translation unit.
namespace sp24 {
using namespace sds_idx; // index math shared with the emulator tests (sdsparse_index.h)

// ---------------------------------------------------------------------------------------
// Small PTX wrappers
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; src_bytes = 0 zero-fills the destination (used for
// rows / columns outside the matrix, the source address must still be valid).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
    const int src_bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// D = A(16x32, 2:4 sparse, given as its compressed 16x16) · B(32x8) + D. SEL (immediate)
// picks which lane pair of each quad supplies `meta` (sparse24.cuh).
template <int SEL>
__device__ __forceinline__ void mma_sp_16832(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                             uint32_t meta) {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, %13;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(meta),
          "n"(SEL));
}

// ---------------------------------------------------------------------------------------
// Epilogue: bias, GELU (erf form, as torch's default), residual, f16 store
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ float gelu_erf(float v) { return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)); }

// One output element (token row `t`, feature `n`), both in range.
__device__ __forceinline__ void epilogue_one(const Sp24GemmParams& p, int t, int n, float acc) {
    float v = acc + (p.bias ? p.bias[n] : 0.0f);
    if (p.flags & SP24_FLAG_GELU) v = gelu_erf(v);
    if (p.residual) v += __half2float(static_cast<const __half*>(p.residual)[(size_t)t * p.ldr + n]);
    static_cast<__half*>(p.y)[(size_t)t * p.ldy + n] = __float2half_rn(v);
}

// Writes a block tile staged in shared memory as cs[token][feature] (f32, row stride
// CS_LD) to Y: each thread takes 8 consecutive features of one token, so global loads of
// the residual and stores of Y are 16-byte and coalesced along n.
template <int BN, int BT, int NTHREADS, int CS_LD>
__device__ __forceinline__ void epilogue_tile(const Sp24GemmParams& p, const float* cs, int n0, int t0) {
    static_assert(BN % 8 == 0, "8 features per thread");
    if (p.flags & SP24_FLAG_GEGLU) {
        static_assert(BN % (2 * SP24_GEGLU_GROUP) == 0, "a tile holds whole value/gate row groups");
        const int n_out = p.n / 2;
        // Each 128-row group of the tile: 64 value rows, then their 64 gate rows.
        for (int item = threadIdx.x; item < BT * (BN / 2); item += NTHREADS) {
            const int tr = item / (BN / 2);                      // token row inside the tile
            const int o = item % (BN / 2);                       // output column inside the tile
            const int grp = o / SP24_GEGLU_GROUP, j = o % SP24_GEGLU_GROUP;
            const int vr = grp * 2 * SP24_GEGLU_GROUP + j;       // value row inside the tile
            const int gr = vr + SP24_GEGLU_GROUP;                // its gate row
            const int t = t0 + tr, no = n0 / 2 + o;              // output token, column
            if (t >= p.m || no >= n_out) continue;
            const float a = cs[tr * CS_LD + vr] + (p.bias ? p.bias[n0 + vr] : 0.0f);
            const float gate = cs[tr * CS_LD + gr] + (p.bias ? p.bias[n0 + gr] : 0.0f);
            float v = a * gelu_erf(gate);
            if (p.residual) v += __half2float(static_cast<const __half*>(p.residual)[(size_t)t * p.ldr + no]);
            static_cast<__half*>(p.y)[(size_t)t * p.ldy + no] = __float2half_rn(v);
        }
        return;
    }
    const bool vec_ok = (p.ldy % 8 == 0) && (!p.residual || p.ldr % 8 == 0);
    for (int item = threadIdx.x; item < BT * (BN / 8); item += NTHREADS) {
        const int tr = item / (BN / 8);       // token row inside the tile
        const int nc = (item % (BN / 8)) * 8; // first of 8 features inside the tile
        const int t = t0 + tr, n = n0 + nc;
        if (t >= p.m || n >= p.n) continue;
        const float* src = cs + tr * CS_LD + nc;
        if (vec_ok && n + 8 <= p.n) {
            float v[8];
#pragma unroll
            for (int j = 0; j < 8; ++j) v[j] = src[j] + (p.bias ? p.bias[n + j] : 0.0f);
            if (p.flags & SP24_FLAG_GELU) {
#pragma unroll
                for (int j = 0; j < 8; ++j) v[j] = gelu_erf(v[j]);
            }
            if (p.residual) {
                const uint4 r = *reinterpret_cast<const uint4*>(static_cast<const __half*>(p.residual) +
                                                                (size_t)t * p.ldr + n);
                const __half* rh = reinterpret_cast<const __half*>(&r);
#pragma unroll
                for (int j = 0; j < 8; ++j) v[j] += __half2float(rh[j]);
            }
            uint4 out;
            __half2* oh = reinterpret_cast<__half2*>(&out);
#pragma unroll
            for (int j = 0; j < 4; ++j) oh[j] = __floats2half2_rn(v[2 * j], v[2 * j + 1]);
            *reinterpret_cast<uint4*>(static_cast<__half*>(p.y) + (size_t)t * p.ldy + n) = out;
        } else {
            for (int j = 0; j < 8 && n + j < p.n; ++j) epilogue_one(p, t, n + j, src[j]);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Variant 1: mma.sp with fragments straight from global memory
// ---------------------------------------------------------------------------------------
// Block: 4 warps stacked along weight rows; warp w computes weight rows n0 + 16w .. +16
// for 8 tokens t0 .. t0 + 8. Grid: (n_pad / 64, ceil(m / 8)).

constexpr int V1_WARPS = 4;

} // namespace sp24

extern "C" __global__ void __launch_bounds__(sp24::V1_WARPS * 32) sdsparse_sp24_v1_direct(const Sp24GemmParams p) {
#if SDS_TENSOR_CORE_ARCH // mma.sp is sm_80+ (sdsparse_arch.h)
    using namespace sp24;
    static_assert(V1_WARPS * 16 == SP24_ROW_PAD, "a block covers one row pad unit");
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int row0 = blockIdx.x * 64 + warp * 16;   // first weight row of this warp
    const int t0 = blockIdx.y * 8;                  // first token of this block
    const __half* x = static_cast<const __half*>(p.x);
    const __half* wv = static_cast<const __half*>(p.w_values);
    const int kc_row = p.k_pad / 2;                 // compressed values per weight row
    const int kblocks = p.k_pad / SP24_META_BLOCK_K;
    const int tok = t0 + lane / 4;                  // token this lane feeds into B (column g)
    float acc[4] = {0.f, 0.f, 0.f, 0.f};

    for (int kb = 0; kb < kblocks; ++kb) {
        // This lane's metadata word of the (16-row, 64-column) block, used by both steps.
        const uint32_t meta = p.w_meta[sp24_meta_word(row0 / 16, kblocks, kb, lane)];
#pragma unroll
        for (int step = 0; step < 2; ++step) {
            const int kc = kb * 32 + step * 16;     // first compressed column of the step
            const int kl = kb * 64 + step * 32;     // first logical column of the step
            uint32_t a[4], b[4];
            // A (compressed 16x16): a0 row g cols 2tq..+1, a1 row g+8, a2/a3 cols + 8.
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int r = row0 + frag_a_row(lane, i);
                const int c = kc + frag_a_col(lane, i);
                a[i] = *reinterpret_cast<const uint32_t*>(wv + (size_t)r * kc_row + c);
            }
            // B (32x8, K-major = X rows): b_i holds k = kl + 2tq + 8i, +1 of token g.
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int k = kl + frag_b_k32(lane, i);
                b[i] = (tok < p.m && k < p.k) ? *reinterpret_cast<const uint32_t*>(x + (size_t)tok * p.ldx + k) : 0u;
            }
            if (step == 0) mma_sp_16832<0>(acc, a, b, meta);
            else mma_sp_16832<1>(acc, a, b, meta);
        }
    }
    // acc: c0/c1 row g tokens 2tq, 2tq+1; c2/c3 row g+8.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int n = row0 + frag_c_row(lane, i);
        const int t = t0 + frag_c_col(lane, i);
        if (n < p.n && t < p.m) epilogue_one(p, t, n, acc[i]);
    }
#else
    __trap();
#endif
}

namespace sp24 {

// ---------------------------------------------------------------------------------------
// Variant 2: cp.async pipeline + ldmatrix + mma.sp, block tile 128 weight rows x BT tokens
// ---------------------------------------------------------------------------------------

constexpr int V2_BN = 128;          // weight rows per block
constexpr int V2_BK = 64;           // logical k per stage (one metadata block)
constexpr int V2_BKC = V2_BK / 2;   // compressed k per stage
constexpr int V2_STAGES = 3;
constexpr int V2_THREADS = 256;     // 8 warps: 4 along weight rows x 2 along tokens
constexpr int V2_CS_LD = SP24_CS_LD; // f32 staging row stride (breaks bank alignment)
static_assert(V2_CS_LD == V2_BN + 4, "sdsparse_index.h");

template <int BT>
struct V2Smem {
    static constexpr int W_BYTES = V2_BN * V2_BKC * 2;           // [128][32] f16
    static constexpr int X_BYTES = BT * V2_BK * 2;               // [BT][64] f16
    static constexpr int M_BYTES = (V2_BN / 16) * 32 * 4;        // [8][32] u32
    static constexpr int STAGE = W_BYTES + X_BYTES + M_BYTES;
    static constexpr int PIPE = V2_STAGES * STAGE;
    static constexpr int EPI = BT * V2_CS_LD * 4;
    static constexpr int TOTAL = PIPE > EPI ? PIPE : EPI;
};

// Swizzled 16-byte chunks of W (64 B rows) and X (128 B rows): sp24_v2_{w,x}_chunk_off in
// sdsparse_index.h.

template <int BT>
__device__ __forceinline__ void v2_load_stage(const Sp24GemmParams& p, uint8_t* stage, int n0, int t0, int kt) {
    using S = V2Smem<BT>;
    const __half* wv = static_cast<const __half*>(p.w_values);
    const __half* x = static_cast<const __half*>(p.x);
    const uint32_t w_s = smem_u32(stage), x_s = w_s + S::W_BYTES, m_s = x_s + S::X_BYTES;
    // W: 128 rows x 4 chunks of 8 compressed values.
    for (int c = threadIdx.x; c < V2_BN * 4; c += V2_THREADS) {
        const int row = c / 4, ch = c % 4;
        const int gr = n0 + row;
        const bool ok = gr < p.n_pad;
        const __half* src = ok ? wv + (size_t)gr * (p.k_pad / 2) + kt * V2_BKC + ch * 8 : wv;
        cp_async_16(w_s + sp24_v2_w_chunk_off(row, ch), src, ok);
    }
    // X: BT token rows x 8 chunks of 8 logical k (k % 8 == 0, so chunks are all in or out).
    for (int c = threadIdx.x; c < BT * 8; c += V2_THREADS) {
        const int row = c / 8, ch = c % 8;
        const int gt = t0 + row, gk = kt * V2_BK + ch * 8;
        const bool ok = gt < p.m && gk < p.k;
        const __half* src = ok ? x + (size_t)gt * p.ldx + gk : x;
        cp_async_16(x_s + sp24_v2_x_chunk_off(row, ch), src, ok);
    }
    // Metadata: 8 row blocks x 32 words = 64 chunks of 4 words, no swizzle (read as words).
    // Row blocks past n_pad (the grid covers ceil(n / 128) * 128 rows, so n_pad % 128 == 64
    // leaves 4 of them, e.g. SD2's N = 320) get the neutral word, not zeros: 0b0000 nibbles are
    // undefined for mma.sp::ordered_metadata (review S1). Plain stores, ordered before the MMAs
    // by the same barrier that publishes the cp.async data.
    for (int c = threadIdx.x; c < (V2_BN / 16) * 8; c += V2_THREADS) {
        const int rb = c / 8, q = c % 8;
        const int grb = n0 / 16 + rb;
        if (grb < p.n_pad / 16) {
            cp_async_16(m_s + c * 16, p.w_meta + sp24_meta_word(grb, p.k_pad / V2_BK, kt, q * 4), true);
        } else {
            *reinterpret_cast<uint4*>(stage + S::W_BYTES + S::X_BYTES + c * 16) =
                make_uint4(SP24_META_NEUTRAL, SP24_META_NEUTRAL, SP24_META_NEUTRAL, SP24_META_NEUTRAL);
        }
    }
}

template <int BT>
__device__ __forceinline__ void sp24_v2_body(const Sp24GemmParams& p) {
    using S = V2Smem<BT>;
    constexpr int WARP_T = BT / 2;      // tokens per warp
    constexpr int NJ = WARP_T / 8;      // n8 mma tiles per warp along tokens
    constexpr int MI = 2;               // m16 mma tiles per warp along weight rows (32 rows)
    static_assert(BT == 32 || BT == 64 || BT == 128, "token tile");
    static_assert(V2_THREADS == 32 * 4 * 2, "4 x 2 warps");
    static_assert(V2_BK == SP24_META_BLOCK_K, "one metadata word per stage and row block");
    static_assert(S::STAGE % 128 == 0, "stages stay 128-byte aligned");
    uint8_t* smem = sp24_smem;

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int warp_n = warp % 4, warp_t = warp / 4;
    const int n0 = blockIdx.x * V2_BN, t0 = blockIdx.y * BT;
    const int ktiles = p.k_pad / V2_BK;
    const bool rows_live = sp24_v2_warp_live(n0, warp_n, p.n_pad); // review S2 (sdsparse_index.h)

    float acc[MI][NJ][4];
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NJ; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.f;

    // Prologue: STAGES - 1 tiles in flight (always commit so group counting is uniform).
#pragma unroll
    for (int s = 0; s < V2_STAGES - 1; ++s) {
        if (s < ktiles) v2_load_stage<BT>(p, smem + s * S::STAGE, n0, t0, s);
        cp_async_commit();
    }

    for (int kt = 0; kt < ktiles; ++kt) {
        cp_async_wait<V2_STAGES - 2>(); // tile kt has landed (for this thread's copies)
        __syncthreads();                // ... for everyone's; stage (kt - 1) is free
        const int pf = kt + V2_STAGES - 1;
        if (pf < ktiles) v2_load_stage<BT>(p, smem + (pf % V2_STAGES) * S::STAGE, n0, t0, pf);
        cp_async_commit();

        if (!rows_live) continue; // only padding rows: no MMA (the barriers above still run)

        uint8_t* st = smem + (kt % V2_STAGES) * S::STAGE;
        const uint32_t w_s = smem_u32(st), x_s = w_s + S::W_BYTES;
        const uint32_t* m_s = reinterpret_cast<const uint32_t*>(st + S::W_BYTES + S::X_BYTES);
        uint32_t meta[MI];
#pragma unroll
        for (int i = 0; i < MI; ++i) meta[i] = m_s[sp24_v2_meta_smem_word(warp_n, i, lane)]; // row block of tile i

#pragma unroll
        for (int step = 0; step < 2; ++step) {
            uint32_t a[MI][4], b[NJ][4];
#pragma unroll
            for (int i = 0; i < MI; ++i) {
                // ldmatrix.x4: lane l addresses row l % 16 of the m16 tile, compressed chunk
                // (step * 2 + l / 16): matrices (rows 0-7|8-15) x (cols 0-7|8-15) = a0..a3.
                ldmatrix_x4(a[i], w_s + sp24_v2_w_chunk_off(sp24_v2_a_row(warp_n, i, lane), sp24_v2_a_chunk(step, lane)));
            }
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                // ldmatrix.x4: lane l addresses token row l % 8, k chunk (step * 4 + l / 8):
                // matrix q gives b_q = X[token g][k = 32 step + 8q + 2tq, +1].
                const int row = sp24_v2_b_row(warp_t, WARP_T, j, lane);
                ldmatrix_x4(b[j], x_s + sp24_v2_x_chunk_off(row, sp24_v2_b_chunk(step, lane)));
            }
#pragma unroll
            for (int i = 0; i < MI; ++i)
#pragma unroll
                for (int j = 0; j < NJ; ++j) {
                    if (step == 0) mma_sp_16832<0>(acc[i][j], a[i], b[j], meta[i]);
                    else mma_sp_16832<1>(acc[i][j], a[i], b[j], meta[i]);
                }
        }
    }

    // Epilogue: stage the f32 tile as cs[token][row] (reusing the pipeline buffers), then
    // write it coalesced along n with bias / GELU / residual.
    cp_async_wait<0>();
    __syncthreads();
    float* cs = reinterpret_cast<float*>(smem);
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NJ; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int nr = warp_n * 32 + i * 16 + frag_c_row(lane, q);     // c2, c3: row g + 8
                const int tr = warp_t * WARP_T + j * 8 + frag_c_col(lane, q);  // c1, c3: token + 1
                cs[tr * V2_CS_LD + nr] = acc[i][j][q];
            }
    __syncthreads();
    epilogue_tile<V2_BN, BT, V2_THREADS, V2_CS_LD>(p, cs, n0, t0);
}

} // namespace sp24

// The token tiles the host dispatcher can pick, under unmangled names.
extern "C" __global__ void __launch_bounds__(sp24::V2_THREADS) sdsparse_sp24_v2_pipe_bt128(const Sp24GemmParams p) { SDS_SM80_ONLY(sp24::sp24_v2_body<128>(p)); }
extern "C" __global__ void __launch_bounds__(sp24::V2_THREADS) sdsparse_sp24_v2_pipe_bt64(const Sp24GemmParams p) { SDS_SM80_ONLY(sp24::sp24_v2_body<64>(p)); }
extern "C" __global__ void __launch_bounds__(sp24::V2_THREADS) sdsparse_sp24_v2_pipe_bt32(const Sp24GemmParams p) { SDS_SM80_ONLY(sp24::sp24_v2_body<32>(p)); }

namespace sp24 {

// ---------------------------------------------------------------------------------------
// Variant 3 (sm_90a): TMA + mbarrier pipeline + wgmma.mma_async.sp
// ---------------------------------------------------------------------------------------
// Block: 3 warpgroups. Warpgroup 0 is the producer (one thread issues TMA copies);
// warpgroups 1 and 2 each own 64 weight rows x 128 tokens (one m64n128 accumulator).
// Shared memory per stage, no swizzle, in wgmma "core matrix" order (8 rows x 16 bytes,
// 128 contiguous bytes each), written by TMA boxes of 8 columns x R rows:
//   A: [4 chunks of 8 compressed k][128 rows][8]  -> core (row block rb, chunk c) at
//      c * 2048 + rb * 128: leading (k) byte offset 2048, stride (m) byte offset 128;
//   B: [8 chunks of 8 k][128 tokens][8]           -> same offsets along tokens.

constexpr int V3_BN = 128;        // weight rows per block (2 consumer warpgroups x 64)
constexpr int V3_BT = 128;        // tokens per block (wgmma N)
constexpr int V3_BK = 64;         // logical k per stage (one metadata block, two k32 steps)
constexpr int V3_STAGES = 4;
constexpr int V3_THREADS = 384;
constexpr int V3_CHUNK_A = V3_BN * 16;                 // bytes of one 8-column chunk of A
constexpr int V3_CHUNK_B = V3_BT * 16;                 // bytes of one 8-column chunk of B
constexpr int V3_A_BYTES = (V3_BK / 2 / 8) * V3_CHUNK_A; // 4 chunks = 8 KiB
constexpr int V3_B_BYTES = (V3_BK / 8) * V3_CHUNK_B;     // 8 chunks = 16 KiB
constexpr int V3_STAGE = V3_A_BYTES + V3_B_BYTES;
constexpr int V3_PIPE = V3_STAGES * V3_STAGE;
constexpr int V3_EPI = V3_BT * V2_CS_LD * 4;
constexpr int V3_BAR_OFF = V3_PIPE > V3_EPI ? V3_PIPE : V3_EPI;
constexpr int V3_SMEM = V3_BAR_OFF + 2 * V3_STAGES * 8; // + full and empty barriers
// Dynamic shared memory sizes the Rust launcher passes (mirrored there as constants).
static_assert(V3_SMEM == 98368, "mirrored in sparse24.rs");
static_assert(V2Smem<128>::TOTAL == 76800 && V2Smem<64>::TOTAL == 52224 && V2Smem<32>::TOTAL == 39936,
              "mirrored in sparse24.rs");
static_assert(V3_STAGE % 1024 == 0, "stages keep TMA / descriptor alignment");
static_assert(V3_BK == SP24_META_BLOCK_K, "one metadata word per stage and row block");
static_assert(V3_BN == 2 * 64 && V3_THREADS == 3 * 128, "producer + 2 consumer warpgroups");
static_assert(V3_STAGE == SP24_V3_STAGE && V3_A_BYTES == SP24_V3_A_BYTES && V3_CHUNK_A == SP24_V3_CHUNK &&
                  V3_CHUNK_B == SP24_V3_CHUNK && V3_BN == SP24_V3_ROWS,
              "sdsparse_index.h describes this stage layout");

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SP24_HOPPER 1

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Spins until the barrier's phase with the given parity has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    asm volatile(
        "{\n"
        ".reg .pred P1;\n"
        "WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
        "@P1 bra DONE;\n"
        "bra WAIT;\n"
        "DONE:\n"
        "}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}
// 2-D TMA box (c0 = column, c1 = row) into shared memory, completing on `bar`.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
        : "memory");
}
// wgmma shared-memory descriptors: wgmma_desc in sdsparse_index.h.
__device__ __forceinline__ void fence_acc(float (&d)[64]) {
#pragma unroll
    for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// One m64n128k32 sparse wgmma on shared-memory descriptors; selector SEL picks the lane
// pair of each quad that supplies `meta` (0: k 0..32, 1: k 32..64 of a metadata block).
// The 64 accumulators of a thread: d[4i + {0,1}] row g, tokens 8i + 2t + {0,1};
// d[4i + {2,3}] row g + 8 (rows relative to the warp's 16 rows of the 64).
template <int SEL>
__device__ __forceinline__ void wgmma_sp_m64n128k32(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                                     uint32_t meta) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sp.sync.aligned.m64n128k32.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, %66, %67, p, 1, 1, 0, 0;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(meta), "n"(SEL));
}

#endif // SP24_HOPPER

} // namespace sp24

// tmap_w: 2-D map over values [n_pad rows][k_pad / 2], box 8 x 128; tmap_x: 2-D map over X
// [m rows][k] (row stride ldx), box 8 x 128; out-of-range boxes are zero filled by TMA.
// Grid: (n_pad / 128 rounded up, ceil(m / 128)).
extern "C" __global__ void __launch_bounds__(sp24::V3_THREADS, 1)
    sdsparse_sp24_v3_wgmma(const __grid_constant__ CUtensorMap tmap_w, const __grid_constant__ CUtensorMap tmap_x,
                  const Sp24GemmParams p) {
#ifdef SP24_HOPPER
    using namespace sp24;
    uint8_t* smem = sp24_smem;
    const int wg = threadIdx.x / 128;           // 0 producer, 1..2 consumers
    const int n0 = blockIdx.x * V3_BN, t0 = blockIdx.y * V3_BT;
    const int ktiles = p.k_pad / V3_BK;
    const uint32_t base = smem_u32(smem);
    const uint32_t full0 = base + V3_BAR_OFF;   // stage s: TMA bytes landed
    const uint32_t empty0 = full0 + V3_STAGES * 8; // stage s: both consumers done with it

    // Consumer state (unused by the producer warpgroup).
    const int cw = wg - 1;                      // consumer warpgroup: rows 64cw .. 64cw + 64
    const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const int row_block = sp24_v3_meta_row_block(n0, cw, warp); // this warp's 16-row meta block
    const bool wg_live = sp24_v3_wg_live(n0, cw, p.n_pad);
    float d[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) d[i] = 0.f;

    if (threadIdx.x == 0) {
        for (int s = 0; s < V3_STAGES; ++s) {
            mbar_init(full0 + 8 * s, 1);        // the producer's expect_tx arrival
            mbar_init(empty0 + 8 * s, 256);     // every consumer thread arrives
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {
        if (threadIdx.x == 0) {
            for (int kt = 0; kt < ktiles; ++kt) {
                const int s = kt % V3_STAGES, round = kt / V3_STAGES;
                // Round 0 waits on parity 1, which a fresh barrier reports as complete.
                mbar_wait(empty0 + 8 * s, (round & 1) ^ 1);
                const uint32_t full = full0 + 8 * s;
                mbar_expect_tx(full, V3_STAGE);
#pragma unroll
                for (int c = 0; c < V3_BK / 2 / 8; ++c) // compressed columns kt*32 + 8c
                    tma_load_2d(base + sp24_v3_tma_a_dst(s, c), &tmap_w, full, sp24_v3_tma_a_col(kt, c), n0);
#pragma unroll
                for (int c = 0; c < V3_BK / 8; ++c)     // logical columns kt*64 + 8c
                    tma_load_2d(base + sp24_v3_tma_b_dst(s, c), &tmap_x, full, sp24_v3_tma_b_col(kt, c), t0);
            }
        }
    } else {
        for (int kt = 0; kt < ktiles; ++kt) {
            const int s = kt % V3_STAGES, round = kt / V3_STAGES;
            // Row blocks past n_pad: the neutral word (0b0000 is undefined, review S1).
            const uint32_t meta =
                row_block < p.n_pad / 16 ? p.w_meta[sp24_meta_word(row_block, ktiles, kt, lane)] : SP24_META_NEUTRAL;
            // Waits even when idle: arriving on `empty` ahead of the stage's phase would
            // complete that phase early for the other warpgroup.
            mbar_wait(full0 + 8 * s, round & 1);
            if (!wg_live) { // only padding rows (review S2): no wgmma
                mbar_arrive(empty0 + 8 * s);
                continue;
            }
            fence_acc(d);
            asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
            // k32 step 0: compressed chunks 0-1, logical chunks 0-3; step 1: the next ones. Rows
            // 64cw.. start at 8-row cores of 128 B (SBO), chunks are LBO apart.
            wgmma_sp_m64n128k32<0>(d, wgmma_desc(base + sp24_v3_a_start(s, cw, 0), V3_CHUNK_A, SP24_V3_CORE_SBO),
                                   wgmma_desc(base + sp24_v3_b_start(s, 0), V3_CHUNK_B, SP24_V3_CORE_SBO), meta);
            wgmma_sp_m64n128k32<1>(d, wgmma_desc(base + sp24_v3_a_start(s, cw, 1), V3_CHUNK_A, SP24_V3_CORE_SBO),
                                   wgmma_desc(base + sp24_v3_b_start(s, 1), V3_CHUNK_B, SP24_V3_CORE_SBO), meta);
            asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
            asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
            fence_acc(d);
            mbar_arrive(empty0 + 8 * s);
        }
    }
    __syncthreads(); // every stage consumed: the pipeline buffers become the f32 staging tile
    float* cs = reinterpret_cast<float*>(smem);
    if (wg > 0) {
#pragma unroll
        for (int i = 0; i < 16; ++i)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int nr = 64 * cw + wgmma_d_row(warp, lane, q); // d[4i+2], d[4i+3]: row + 8
                const int tr = wgmma_d_col(lane, i, q);              // odd q: token + 1
                cs[tr * V2_CS_LD + nr] = d[4 * i + q];
            }
    }
    __syncthreads();
    epilogue_tile<V3_BN, V3_BT, V3_THREADS, V2_CS_LD>(p, cs, n0, t0);
#else
    __trap(); // the dispatcher only launches this on sm_90a
#endif
}
