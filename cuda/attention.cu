// Fused attention forward for head dim 64 (every attention in SD2): O = softmax(scale Q K^T) V.
//
// Flash-attention style: a CTA owns 64 query rows of one (batch, head); it streams K/V in
// tiles of 64 keys through shared memory (cp.async double buffer), computes S = Q K^T on
// tensor cores (mma.sync m16n8k16, f32 accumulators), keeps a running row max and row sum
// in f32 (online softmax), and accumulates O += P V with P re-packed to f16 straight from
// the S accumulator registers. No [seq, seq] matrix ever touches global memory; batch x
// heads go in one launch (grid.y).
//
// diffusers' `upcast_attention` (SD2.1's UNet sets it) asks for the softmax in f32 to avoid
// f16 overflow in Q K^T; it needs no special path here because S, the max, the exponentials
// and the sums are f32 already. Only P (values in [0, 1]) is rounded to f16 for the P V mma.
//
// Layout: Q/K/V/O addressed by (b, h, s, d) -> ptr[b*stride_b + s*stride_s + h*stride_h + d]
// (sdsparse_unstructured_params.h), so the [B, S, H*64] projection output is read in place.
//
// CPU reference and checker: `reference_attention` in src/backend/cuda/attention.rs and
// tests/attention_gpu.rs. Variants, side by side:
//   sdsparse_attn_naive    one thread per (query row, head); two passes over the keys (oracle)
//   sdsparse_attn_fwd_d64  the tensor-core flash kernel
//
// Causal mask (p.causal, the CLIP text encoder): query i sees keys j <= i + seq_kv - seq_q, the
// scores path's rule (attn_key_end, sdsparse_index.h); hidden keys get -inf before the running
// max, and key tiles past a query block's last real row are not loaded at all (attn_n_tiles).
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

#include "sdsparse_index.h"
#include "sdsparse_uns_ptx.h"
#include "sdsparse_unstructured_params.h"

namespace sds_attn {
using namespace sds_uns;
using namespace sds_idx; // index math shared with the emulator tests (sdsparse_index.h)

constexpr int D = SDS_ATTN_HEAD_DIM;
constexpr int BQ = 64;    // query rows per CTA
constexpr int BKV = 64;   // keys per K/V tile
constexpr int WARPS = 4;  // each warp owns 16 query rows
constexpr int THREADS = WARPS * 32;
constexpr int LDS = D + 8;  // smem row stride (halves); +16 B keeps ldmatrix conflict-free
constexpr float LOG2E = 1.4426950408889634f;
static_assert(BQ == 16 * WARPS, "one m16 row block per warp");
static_assert(D == 64 && BKV == 64, "fragment loops below are unrolled for 64");
static_assert((BQ * D / 8) % THREADS == 0 && (BKV * D / 8) % THREADS == 0, "even cp.async split");
static_assert((BQ + 4 * BKV) * LDS * 2 <= 48 * 1024, "static shared memory limit");

// Copies rows [s0, s0 + ROWS) of one head (d 0..63) into smem; rows past `seq` are zero-filled
// so that padded keys contribute exactly 0 to P V (0 * garbage could be NaN).
template <int ROWS>
__device__ __forceinline__ void load_rows(__half* dst, const __half* base, int64_t stride_s, int s0, int seq) {
#pragma unroll
    for (int i = 0; i < ROWS * D / 8 / THREADS; ++i) {
        const int chunk = threadIdx.x + i * THREADS;
        const int r = chunk / (D / 8), c8 = chunk % (D / 8);
        const bool valid = s0 + r < seq;
        const __half* src = valid ? base + (int64_t)(s0 + r) * stride_s + c8 * 8 : base;
        cp_async16(dst + r * LDS + c8 * 8, src, valid);
    }
}

__device__ __forceinline__ void attn_fwd(const SdsAttentionParams& p) {
    __shared__ __align__(16) __half qs[BQ * LDS];
    __shared__ __align__(16) __half ks[2][BKV * LDS];
    __shared__ __align__(16) __half vs[2][BKV * LDS];

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
    const int q0 = blockIdx.x * BQ;
    const __half* qb = static_cast<const __half*>(p.q) + b * p.q_stride_b + h * p.q_stride_h;
    const __half* kb = static_cast<const __half*>(p.k) + b * p.k_stride_b + h * p.k_stride_h;
    const __half* vb = static_cast<const __half*>(p.v) + b * p.v_stride_b + h * p.v_stride_h;
    const bool causal = p.causal != 0;
    // Tiles past the last row's last visible key are all -inf for every row of this block:
    // they would add exp2(-inf) = 0 to P V and the row sums and leave the max alone, so they are
    // skipped (no loads, no mma). Without the mask: ceil(seq_kv / 64).
    const int n_tiles = attn_n_tiles(q0, p.seq_q, p.seq_kv, causal);
    // Keys [0, key_end) visible to this thread's rows g and g + 8; the block's first row sees
    // the fewest (first_end), so tiles wholly below it need no mask test.
    const int rows = q0 + warp * 16;  // frag_c_row(lane, 0) = g, frag_c_row(lane, 2) = g + 8
    const int key_end[2] = {attn_key_end(rows + frag_c_row(lane, 0), p.seq_q, p.seq_kv, causal),
                            attn_key_end(rows + frag_c_row(lane, 2), p.seq_q, p.seq_kv, causal)};
    const int first_end = attn_key_end(q0, p.seq_q, p.seq_kv, causal);
    const float scale_log2 = p.scale * LOG2E;  // exp(x*scale) == exp2(x*scale*log2 e)

    load_rows<BQ>(qs, qb, p.q_stride_s, q0, p.seq_q);
    load_rows<BKV>(ks[0], kb, p.k_stride_s, 0, p.seq_kv);
    load_rows<BKV>(vs[0], vb, p.v_stride_s, 0, p.seq_kv);
    cp_async_commit();

    // Per thread: rows g = lane/4 and g+8 of the warp's 16; m = running max (scaled, log2
    // domain), l = this thread's partial row sum (the quad's 4 partials are added at the end).
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};
    float o[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[j][e] = 0.0f;
    uint32_t qa[D / 16][4];  // Q fragments, loaded once

    for (int t = 0; t < n_tiles; ++t) {
        const int s = t & 1;
        if (t + 1 < n_tiles) {  // prefetch the next K/V tile into the other buffer
            load_rows<BKV>(ks[s ^ 1], kb, p.k_stride_s, (t + 1) * BKV, p.seq_kv);
            load_rows<BKV>(vs[s ^ 1], vb, p.v_stride_s, (t + 1) * BKV, p.seq_kv);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        if (t == 0) {
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk)
                ldmatrix_x4(qa[kk], qs + (warp * 16 + ldm_a_row(lane)) * LDS + kk * 16 + ldm_a_col(lane));
        }

        // S[16 x 64] = Q K^T: K rows are d-contiguous = mma's "col" B operand, no transpose.
        float sc[BKV / 8][4];
#pragma unroll
        for (int j = 0; j < BKV / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) sc[j][e] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
            for (int j = 0; j < BKV / 8; j += 2) {
                uint32_t bf[4];
                const int key = j * 8 + ldm_b_row(lane);
                ldmatrix_x4(bf, ks[s] + key * LDS + kk * 16 + ldm_b_col(lane));
                mma_16816(sc[j], qa[kk], bf[0], bf[1]);
                mma_16816(sc[j + 1], qa[kk], bf[2], bf[3]);
            }

        // Scale, mask keys past seq_kv (only the last tile has any) and, with the causal mask,
        // past the row's diagonal (the tiles the block's rows straddle), new running max.
        const bool masked = (t + 1) * BKV > first_end;
        float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
        for (int j = 0; j < BKV / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = attn_key_index(t, j, lane, e);
                float v = sc[j][e] * scale_log2;
                if (masked && key >= key_end[e / 2]) v = -INFINITY;
                sc[j][e] = v;
                mx[e / 2] = fmaxf(mx[e / 2], v);
            }
#pragma unroll
        for (int r = 0; r < 2; ++r) {  // the 4 lanes of a quad share a row
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        }
        // A row that has seen only masked keys has mx = -inf; exp2f(-inf - -inf) would be NaN
        // and poison o and l for good (review A1). Tile 0 holds key 0, which every row sees
        // (also with the causal mask when seq_q <= seq_kv), but with causal and seq_q > seq_kv
        // the first seq_q - seq_kv rows see no key: such a row subtracts 0 instead, so
        // alpha = exp2(-inf) = 0 and P = exp2(-inf) = 0, while m_run keeps the true max (-inf)
        // for the next tile; l stays 0 and the store writes zeros (the scores path's rule).
        float alpha[2], m_use[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            m_use[r] = mx[r] == -INFINITY ? 0.0f : mx[r];
            alpha[r] = exp2f(m_run[r] - m_use[r]);  // 0 on the first tile (m_run = -inf)
            m_run[r] = mx[r];
            l_run[r] *= alpha[r];
        }
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
            o[j][0] *= alpha[0];
            o[j][1] *= alpha[0];
            o[j][2] *= alpha[1];
            o[j][3] *= alpha[1];
        }

        // P = exp2(S - m); its C-fragment layout is the A-fragment layout of the P V mma
        // (two n8 tiles of S = one k16 slice of P), so it is re-packed in registers.
        uint32_t pa[BKV / 16][4];
#pragma unroll
        for (int j = 0; j < BKV / 8; ++j) {
            float pe[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                pe[e] = exp2f(sc[j][e] - m_use[e / 2]);
                l_run[e / 2] += pe[e];
            }
            pa[j / 2][attn_p_reg(j, 0)] = pack_half2(pe[0], pe[1]);  // a0 / a2: row g
            pa[j / 2][attn_p_reg(j, 1)] = pack_half2(pe[2], pe[3]);  // a1 / a3: row g+8
        }

        // O[16 x 64] += P V: V rows are keys (k) with d contiguous, so B needs ldmatrix.trans.
#pragma unroll
        for (int kk = 0; kk < BKV / 16; ++kk)
#pragma unroll
            for (int j = 0; j < D / 8; j += 2) {
                uint32_t bf[4];
                const int key = kk * 16 + ldm_bt_row(lane);
                ldmatrix_x4_trans(bf, vs[s] + key * LDS + j * 8 + ldm_bt_col(lane));
                mma_16816(o[j], pa[kk], bf[0], bf[1]);
                mma_16816(o[j + 1], pa[kk], bf[2], bf[3]);
            }
        __syncthreads();  // buffer s is refilled by the prefetch of iteration t+1
    }
    cp_async_wait<0>();

    // Normalise by the full row sums and store rows < seq_q.
    __half* ob = static_cast<__half*>(p.o) + b * p.o_stride_b + h * p.o_stride_h;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = l_run[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;  // a row without any key: 0, not NaN
        const int row = q0 + warp * 16 + frag_c_row(lane, 2 * r);
        if (row >= p.seq_q) continue;
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
            const int d = j * 8 + frag_c_col(lane, 0);
            *reinterpret_cast<__half2*>(ob + (int64_t)row * p.o_stride_s + d) =
                __floats2half2_rn(o[j][2 * r] * inv, o[j][2 * r + 1] * inv);
        }
    }
}

}  // namespace sds_attn

// grid = (ceil(seq_q / 64), batch * heads), block = 128 threads, static smem 46 KB.
extern "C" __global__ void __launch_bounds__(sds_attn::THREADS) sdsparse_attn_fwd_d64(const __grid_constant__ SdsAttentionParams p) {
    SDS_SM80_ONLY(sds_attn::attn_fwd(p));
}

// Oracle: one thread per (query row, b*h), f32 throughout, two passes (max, then sum and P V).
// grid = (ceil(seq_q / 64), batch * heads), block = 64.
extern "C" __global__ void sdsparse_attn_naive(const __grid_constant__ SdsAttentionParams p) {
    const int row = blockIdx.x * 64 + threadIdx.x;
    if (row >= p.seq_q) return;
    const int b = blockIdx.y / p.heads, h = blockIdx.y % p.heads;
    const __half* q = static_cast<const __half*>(p.q) + b * p.q_stride_b + h * p.q_stride_h + row * p.q_stride_s;
    const __half* kb = static_cast<const __half*>(p.k) + b * p.k_stride_b + h * p.k_stride_h;
    const __half* vb = static_cast<const __half*>(p.v) + b * p.v_stride_b + h * p.v_stride_h;
    const int key_end = sds_idx::attn_key_end(row, p.seq_q, p.seq_kv, p.causal != 0);
    float mx = -INFINITY;
    for (int j = 0; j < key_end; ++j) {
        float dot = 0.0f;
        for (int d = 0; d < sds_attn::D; ++d) dot += __half2float(q[d]) * __half2float(kb[j * p.k_stride_s + d]);
        mx = fmaxf(mx, dot * p.scale);
    }
    float acc[sds_attn::D];
    for (int d = 0; d < sds_attn::D; ++d) acc[d] = 0.0f;
    float sum = 0.0f;
    for (int j = 0; j < key_end; ++j) {
        float dot = 0.0f;
        for (int d = 0; d < sds_attn::D; ++d) dot += __half2float(q[d]) * __half2float(kb[j * p.k_stride_s + d]);
        const float e = expf(dot * p.scale - mx);
        sum += e;
        for (int d = 0; d < sds_attn::D; ++d) acc[d] += e * __half2float(vb[j * p.v_stride_s + d]);
    }
    __half* o = static_cast<__half*>(p.o) + b * p.o_stride_b + h * p.o_stride_h + row * p.o_stride_s;
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;  // no visible key: zeros, as the flash kernel
    for (int d = 0; d < sds_attn::D; ++d) o[d] = __float2half(acc[d] * inv);
}
