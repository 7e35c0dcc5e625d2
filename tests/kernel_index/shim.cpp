// extern "C" wrappers over the kernels' index math (cuda/include/sdsparse_index.h) for the Rust
// emulator tests: nothing here but forwarding, so the tests run exactly the kernels' formulas.
#include "sdsparse_index.h"

using namespace sds_idx;

extern "C" {
int sds_frag_a_row(int lane, int i) { return frag_a_row(lane, i); }
int sds_frag_a_col(int lane, int i) { return frag_a_col(lane, i); }
int sds_frag_b_k32(int lane, int i) { return frag_b_k32(lane, i); }
int sds_frag_c_row(int lane, int q) { return frag_c_row(lane, q); }
int sds_frag_c_col(int lane, int q) { return frag_c_col(lane, q); }
int sds_ldm_a_row(int lane) { return ldm_a_row(lane); }
int sds_ldm_a_col(int lane) { return ldm_a_col(lane); }
int sds_ldm_b_row(int lane) { return ldm_b_row(lane); }
int sds_ldm_b_col(int lane) { return ldm_b_col(lane); }
int sds_ldm_bt_row(int lane) { return ldm_bt_row(lane); }
int sds_ldm_bt_col(int lane) { return ldm_bt_col(lane); }

uint32_t sds_sp24_meta_neutral(void) { return SP24_META_NEUTRAL; }
int64_t sds_sp24_meta_word(int row_block, int kblocks, int kb, int lane) {
    return sp24_meta_word(row_block, kblocks, kb, lane);
}
int sds_sp24_meta_lane(int r, int gi) { return sp24_meta_lane(r, gi); }
int sds_sp24_meta_shift(int r, int gi) { return sp24_meta_shift(r, gi); }
int sds_sp24_v2_w_chunk_off(int row, int chunk) { return sp24_v2_w_chunk_off(row, chunk); }
int sds_sp24_v2_x_chunk_off(int row, int chunk) { return sp24_v2_x_chunk_off(row, chunk); }
int sds_sp24_v2_a_row(int warp_n, int i, int lane) { return sp24_v2_a_row(warp_n, i, lane); }
int sds_sp24_v2_a_chunk(int step, int lane) { return sp24_v2_a_chunk(step, lane); }
int sds_sp24_v2_b_row(int warp_t, int warp_tokens, int j, int lane) {
    return sp24_v2_b_row(warp_t, warp_tokens, j, lane);
}
int sds_sp24_v2_b_chunk(int step, int lane) { return sp24_v2_b_chunk(step, lane); }
int sds_sp24_v2_warp_live(int n0, int warp_n, int n_pad) { return sp24_v2_warp_live(n0, warp_n, n_pad); }
int sds_sp24_v3_wg_live(int n0, int cw, int n_pad) { return sp24_v3_wg_live(n0, cw, n_pad); }
int sds_sp24_v2_meta_smem_word(int warp_n, int i, int lane) { return sp24_v2_meta_smem_word(warp_n, i, lane); }
uint64_t sds_wgmma_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) { return wgmma_desc(addr, lbo, sbo); }
int sds_sp24_v3_stage_bytes(void) { return SP24_V3_STAGE; }
int sds_sp24_v3_chunk_bytes(void) { return SP24_V3_CHUNK; }
int sds_sp24_v3_core_sbo(void) { return SP24_V3_CORE_SBO; }
int sds_sp24_v3_tma_a_col(int kt, int c) { return sp24_v3_tma_a_col(kt, c); }
int sds_sp24_v3_tma_b_col(int kt, int c) { return sp24_v3_tma_b_col(kt, c); }
int sds_sp24_v3_tma_a_dst(int stage, int c) { return sp24_v3_tma_a_dst(stage, c); }
int sds_sp24_v3_tma_b_dst(int stage, int c) { return sp24_v3_tma_b_dst(stage, c); }
int sds_sp24_v3_a_start(int stage, int cw, int step) { return sp24_v3_a_start(stage, cw, step); }
int sds_sp24_v3_b_start(int stage, int step) { return sp24_v3_b_start(stage, step); }
int sds_sp24_v3_meta_row_block(int n0, int cw, int warp) { return sp24_v3_meta_row_block(n0, cw, warp); }
int sds_wgmma_d_row(int warp, int lane, int q) { return wgmma_d_row(warp, lane, q); }
int sds_wgmma_d_col(int lane, int i, int q) { return wgmma_d_col(lane, i, q); }
int sds_sp24_cs_ld(void) { return SP24_CS_LD; }

int sds_uns_core_offset(int r, int k) { return uns_core_offset(r, k); }
uint32_t sds_uns_core_lbo(void) { return UNS_CORE_LBO; }
uint32_t sds_uns_core_sbo(void) { return UNS_CORE_SBO; }
int sds_uns_split_begin(int z, int per) { return uns_split_begin(z, per); }
int sds_uns_split_end(int z, int per, int tiles_k) { return uns_split_end(z, per, tiles_k); }
int64_t sds_uns_workspace_index(int z, int m, int n, int row, int col) {
    return uns_workspace_index(z, m, n, row, col);
}
int sds_uns_x_chunk_row(int chunk, int core) { return uns_x_chunk_row(chunk, core != 0); }
int sds_uns_x_chunk_col8(int chunk, int core) { return uns_x_chunk_col8(chunk, core != 0); }
int sds_uns_core_fill_row(int rb, int lane) { return uns_core_fill_row(rb, lane); }
int sds_uns_core_fill_pair(int c, int lane) { return uns_core_fill_pair(c, lane); }
uint64_t sds_uns_below_mask(int lane) { return uns_below_mask(lane); }

int sds_attn_key_index(int t, int j, int lane, int e) { return attn_key_index(t, j, lane, e); }
int sds_attn_p_reg(int j, int r) { return attn_p_reg(j, r); }
int sds_attn_key_end(int row, int seq_q, int seq_kv, int causal) { return attn_key_end(row, seq_q, seq_kv, causal != 0); }
int sds_attn_n_tiles(int q0, int seq_q, int seq_kv, int causal) { return attn_n_tiles(q0, seq_q, seq_kv, causal != 0); }
}
