// The index math of every tensor-core kernel in cuda/, in one place: shared-memory chunk offsets
// and swizzles, fragment coordinates, metadata word positions, wgmma shared-memory descriptors,
// TMA box coordinates, the ragged-mask key index and split-K slices.
//
// Why a header of its own: the kernels (cuda/*.cu, compiled by nvcc) and the PTX-semantics
// emulator tests (tests/ptx_emulation.rs, which compile this header for the host with the `cc`
// crate through tests/kernel_index/) call the very same functions, so a layout error in a kernel
// is a layout error in the emulator test too, where the documented PTX semantics catch it.
// Everything here is pure integer arithmetic: no CUDA types, no intrinsics.
//
// Naming: lane = thread within a warp (0..31), g = lane / 4 (mma "groupID"), tq = lane % 4
// ("threadID_in_group"), as in the PTX ISA's fragment figures.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define SDS_IDX __host__ __device__ __forceinline__ constexpr
#else
#define SDS_IDX inline constexpr
#endif

namespace sds_idx {

// ---------------------------------------------------------------------------------------------
// mma.sync / mma.sp fragments as the kernels address them (PTX ISA 9.7.14.5.8, 9.7.14.6.2.2).
// ---------------------------------------------------------------------------------------------

// A fragment register i (0..3) of a 16x16 f16 tile (dense A of m16n8k16, compressed A of
// m16n8k32): row g (+8 for odd i), column 2tq (+8 for i >= 2); the register holds that column
// and the next.
SDS_IDX int frag_a_row(int lane, int i) { return lane / 4 + 8 * (i % 2); }
SDS_IDX int frag_a_col(int lane, int i) { return 2 * (lane % 4) + 8 * (i / 2); }
// B fragment register i (0..3) of m16n8k32 (k32 x n8, "col"): k = 2tq + 8i (and +1), column g.
SDS_IDX int frag_b_k32(int lane, int i) { return 2 * (lane % 4) + 8 * i; }
// C/D fragment element q (0..3) of m16n8: row g (+8 for q >= 2), column 2tq (+1 for odd q).
SDS_IDX int frag_c_row(int lane, int q) { return lane / 4 + 8 * (q / 2); }
SDS_IDX int frag_c_col(int lane, int q) { return 2 * (lane % 4) + q % 2; }

// ldmatrix.x4 addressing of a 16x16 A tile: lanes 0-15 give rows 0-15 at column 0, lanes 16-31
// rows 0-15 at column 8 (matrices a0..a3 = (rows 0-7|8-15) x (cols 0-7|8-15)).
SDS_IDX int ldm_a_row(int lane) { return lane % 16; }
SDS_IDX int ldm_a_col(int lane) { return (lane / 16) * 8; }
// ldmatrix.x4 addressing of B for two n8 tiles from n-major rows (W rows, K rows): matrices
// (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15) = b0, b1 of tile j and of j+1.
SDS_IDX int ldm_b_row(int lane) { return (lane & 7) + ((lane >> 4) << 3); }
SDS_IDX int ldm_b_col(int lane) { return ((lane >> 3) & 1) * 8; }
// ldmatrix.x4.trans addressing of B from k-major rows (V rows are keys): matrices (k 0-7, n 0-7),
// (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15).
SDS_IDX int ldm_bt_row(int lane) { return (lane & 7) + ((lane >> 3) & 1) * 8; }
SDS_IDX int ldm_bt_col(int lane) { return (lane >> 4) * 8; }

// ---------------------------------------------------------------------------------------------
// 2:4 sparse GEMM (cuda/sparse24_gemm.cu; packer src/backend/cuda/sparse24.rs)
// ---------------------------------------------------------------------------------------------

// Metadata of a (16-row, 64-column) block: one u32 per lane, for two k32 steps.
constexpr int SP24_META_WORDS = 32;
// A metadata word whose every nibble is 0b0100 (kept positions 0 and 1): the neutral value fed to
// mma.sp / wgmma.sp for rows past n_pad, because 0b0000 is undefined for ::ordered_metadata
// (PTX ISA 9.7.14.6.1). The values of those rows are zero.
constexpr uint32_t SP24_META_NEUTRAL = 0x44444444u;

// Index of the metadata word of `lane` in block (row_block, kb); kblocks = k_pad / 64.
SDS_IDX int64_t sp24_meta_word(int row_block, int kblocks, int kb, int lane) {
    return ((int64_t)row_block * kblocks + kb) * SP24_META_WORDS + lane;
}
// The lane whose metadata register holds group `gi` (0..15, 4 columns each) of row `r` (0..15)
// of a block: groupID r % 8, selector pair (k32 step gi / 8) and half (columns 16..31 of the
// step) -- lane 4g + 2 step + half.
SDS_IDX int sp24_meta_lane(int r, int gi) { return 4 * (r % 8) + 2 * (gi / 8) + (gi % 8) / 4; }
// Bit position of that nibble in the word: row g in bits [15:0], row g + 8 in [31:16].
SDS_IDX int sp24_meta_shift(int r, int gi) { return 16 * (r / 8) + 4 * (gi % 4); }

// v2: swizzled byte offsets of 16-byte chunks in shared memory. W rows are 64 B (4 chunks): XOR
// with bits 1..2 of the row so that the 8 rows one ldmatrix matrix reads hit 8 bank groups.
SDS_IDX int sp24_v2_w_chunk_off(int row, int chunk) { return row * 64 + ((chunk ^ ((row >> 1) & 3)) * 16); }
// X rows are 128 B (8 chunks): XOR with the row's low 3 bits.
SDS_IDX int sp24_v2_x_chunk_off(int row, int chunk) { return row * 128 + ((chunk ^ (row & 7)) * 16); }
// v2 ldmatrix of the compressed A (16x16) of m16 tile i of warp_n in k32 step `step`.
SDS_IDX int sp24_v2_a_row(int warp_n, int i, int lane) { return warp_n * 32 + i * 16 + ldm_a_row(lane); }
SDS_IDX int sp24_v2_a_chunk(int step, int lane) { return step * 2 + ldm_a_col(lane) / 8; }
// v2 ldmatrix of B (k32 x n8, tokens are X rows): lane l gives token row l % 8 and k chunk
// step * 4 + l / 8, so matrix q is b_q = X[token g][k = 32 step + 8q + 2tq, +1].
SDS_IDX int sp24_v2_b_row(int warp_t, int warp_tokens, int j, int lane) { return warp_t * warp_tokens + j * 8 + lane % 8; }
SDS_IDX int sp24_v2_b_chunk(int step, int lane) { return step * 4 + lane / 8; }
// Review S2: the grid covers ceil(n / 128) * 128 weight rows, so when n_pad % 128 == 64 (SD2's
// N = 320) the last block's rows past n_pad are zero padding. A v2 warp (32 rows) or a v3
// consumer warpgroup (64 rows) that holds only such rows skips its MMAs; n_pad is a multiple of
// 64, so a warp's or warpgroup's rows are all padding or none.
SDS_IDX bool sp24_v2_warp_live(int n0, int warp_n, int n_pad) { return n0 + warp_n * 32 < n_pad; }
SDS_IDX bool sp24_v3_wg_live(int n0, int cw, int n_pad) { return n0 + 64 * cw < n_pad; }
// v2 metadata in shared memory: [8 row blocks][32 lanes] words; tile i of warp_n is row block
// warp_n * 2 + i.
SDS_IDX int sp24_v2_meta_smem_word(int warp_n, int i, int lane) { return (warp_n * 2 + i) * 32 + lane; }

// v3 (wgmma.sp): shared-memory matrix descriptor, no swizzle (PTX ISA 9.7.15.5.1.2): start
// address >> 4 in bits 0..13, leading (K) byte offset >> 4 in 16..29, stride (M/N, next 8 rows)
// byte offset >> 4 in 32..45, layout type 0 in 62..63.
SDS_IDX uint64_t wgmma_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)((lbo >> 4) & 0x3FFF) << 16) |
           ((uint64_t)((sbo >> 4) & 0x3FFF) << 32);
}
// v3 stage layout: A is 4 chunks of 8 compressed k x 128 rows, B 8 chunks of 8 k x 128 tokens;
// each chunk is rows x 16 B = 8-row core matrices of 128 B (LBO = chunk bytes, SBO = 128).
constexpr int SP24_V3_ROWS = 128;
constexpr int SP24_V3_CHUNK = SP24_V3_ROWS * 16;
constexpr int SP24_V3_A_CHUNKS = 4;
constexpr int SP24_V3_B_CHUNKS = 8;
constexpr int SP24_V3_A_BYTES = SP24_V3_A_CHUNKS * SP24_V3_CHUNK;
constexpr int SP24_V3_STAGE = SP24_V3_A_BYTES + SP24_V3_B_CHUNKS * SP24_V3_CHUNK;
constexpr int SP24_V3_CORE_SBO = 128;
// TMA box c of k-tile kt (box 8 columns x 128 rows): column coordinate, and its stage offset.
SDS_IDX int sp24_v3_tma_a_col(int kt, int c) { return kt * 32 + 8 * c; }
SDS_IDX int sp24_v3_tma_b_col(int kt, int c) { return kt * 64 + 8 * c; }
SDS_IDX int sp24_v3_tma_a_dst(int stage, int c) { return stage * SP24_V3_STAGE + c * SP24_V3_CHUNK; }
SDS_IDX int sp24_v3_tma_b_dst(int stage, int c) {
    return stage * SP24_V3_STAGE + SP24_V3_A_BYTES + c * SP24_V3_CHUNK;
}
// Descriptor start offsets of consumer warpgroup cw (rows 64cw..) in k32 step `step`.
SDS_IDX int sp24_v3_a_start(int stage, int cw, int step) {
    return stage * SP24_V3_STAGE + cw * 64 * 16 + step * 2 * SP24_V3_CHUNK;
}
SDS_IDX int sp24_v3_b_start(int stage, int step) {
    return stage * SP24_V3_STAGE + SP24_V3_A_BYTES + step * 4 * SP24_V3_CHUNK;
}
// The 16-row metadata block of warp `warp` (0..3) of consumer warpgroup cw.
SDS_IDX int sp24_v3_meta_row_block(int n0, int cw, int warp) { return (n0 + 64 * cw + 16 * warp) / 16; }
// wgmma m64nN accumulator d[4i + q] of lane: weight row (within the warpgroup's 64, warp w)
// and token (CUTLASS CLayout_64xN).
SDS_IDX int wgmma_d_row(int warp, int lane, int q) { return 16 * warp + frag_c_row(lane, q); }
SDS_IDX int wgmma_d_col(int lane, int i, int q) { return 8 * i + frag_c_col(lane, q); }

// Epilogue staging row stride of the f32 tile (v2, v3).
constexpr int SP24_CS_LD = 128 + 4;

// ---------------------------------------------------------------------------------------------
// Unstructured GEMM (cuda/unstructured_gemm.cu; tile builder src/backend/cuda/unstructured.rs)
// ---------------------------------------------------------------------------------------------

// The no-swizzle "core matrix" layout wgmma reads: a [R x 64] f16 tile as 8x8 core matrices of
// 128 contiguous bytes; along K every 64 halves (LBO = 128 B), along rows every 512 halves
// (SBO = 1024 B). Offset in halves.
SDS_IDX int uns_core_offset(int r, int k) { return (r >> 3) * 512 + (k >> 3) * 64 + (r & 7) * 8 + (k & 7); }
constexpr uint32_t UNS_CORE_LBO = 128;
constexpr uint32_t UNS_CORE_SBO = 1024;
// Review U1: the wgmma variant fills the core layout without bank conflicts. X copies: 8
// consecutive chunks (16 B each) walk the 8 rows of one core matrix (128 contiguous bytes), a
// warp covering 8 rows x 4 chunks (64 B per row of global memory); the mma.sync variants keep
// row-major chunks (their padded rows are conflict-free already).
SDS_IDX int uns_x_chunk_row(int chunk, bool core) { return core ? (chunk % 8) + 8 * (chunk / 64) : chunk / 8; }
SDS_IDX int uns_x_chunk_col8(int chunk, bool core) { return core ? (chunk / 8) % 8 : chunk % 8; }
// Expansion into the core layout: lane l of the warp on 8-row block rb takes row 8 rb + l / 4
// and, in step c (0..7), column pair 4c + l % 4, so one half2 store of the warp covers the 8 x 4
// pairs of core matrix c: 32 distinct banks.
SDS_IDX int uns_core_fill_row(int rb, int lane) { return 8 * rb + lane / 4; }
SDS_IDX int uns_core_fill_pair(int c, int lane) { return 4 * c + lane % 4; }
// Split-K: k-tiles [begin, end) of slice z.
SDS_IDX int uns_split_begin(int z, int k_tiles_per_split) { return z * k_tiles_per_split; }
SDS_IDX int uns_split_end(int z, int k_tiles_per_split, int tiles_k) {
    return (z * k_tiles_per_split + k_tiles_per_split) < tiles_k ? z * k_tiles_per_split + k_tiles_per_split
                                                                 : tiles_k;
}
// Workspace element of slice z, output (row, col): [splits][m][n] f32.
SDS_IDX int64_t uns_workspace_index(int z, int m, int n, int row, int col) {
    return (int64_t)z * m * n + (int64_t)row * n + col;
}
// expand_tile: lane l writes columns 2l, 2l+1; the mask of the columns left of them.
SDS_IDX uint64_t uns_below_mask(int lane) { return (1ull << (2 * lane)) - 1; }

// ---------------------------------------------------------------------------------------------
// Flash attention (cuda/attention.cu)
// ---------------------------------------------------------------------------------------------

// Key index of S accumulator element e (0..3) of n8 tile j in K/V tile t (64 keys per tile):
// what the ragged-mask test compares with seq_kv.
SDS_IDX int attn_key_index(int t, int j, int lane, int e) { return t * 64 + j * 8 + frag_c_col(lane, e); }
// P V: the S accumulator of n8 tiles j (even) and j+1 is the A fragment of k16 slice j / 2;
// register (j & 1) * 2 + r of that slice holds row g (r = 0) or g + 8 (r = 1).
SDS_IDX int attn_p_reg(int j, int r) { return (j & 1) * 2 + r; }
// Causal mask, aligned at the end like the scores path's (`j > i + seq_kv - seq_q` hidden):
// query row `row` sees keys [0, attn_key_end). Without the mask, and for the zero-filled rows
// past seq_q, every key < seq_kv. Nondecreasing in `row`, so a query block's first row has the
// fewest visible keys and its last real row the most.
SDS_IDX int attn_key_end(int row, int seq_q, int seq_kv, bool causal) {
    if (!causal) return seq_kv;
    const int end = row + 1 + seq_kv - seq_q;
    return end < 0 ? 0 : (end < seq_kv ? end : seq_kv);
}
// K/V tiles (64 keys each) a query block starting at row q0 visits: those holding a key its last
// real row sees. Tiles past them are masked for every row of the block (exp2(-inf) = 0 adds
// nothing to P V or the row sums, and the running max ignores -inf), so skipping them changes
// no result. At least one tile: a block that sees no key at all (causal with seq_q > seq_kv)
// runs one all-masked tile and the all-masked-row guard writes zeros.
SDS_IDX int attn_n_tiles(int q0, int seq_q, int seq_kv, bool causal) {
    const int last = (q0 + 63 < seq_q ? q0 + 63 : seq_q - 1);
    const int tiles = (attn_key_end(last, seq_q, seq_kv, causal) + 63) / 64;
    return tiles > 1 ? tiles : 1;
}

}  // namespace sds_idx
