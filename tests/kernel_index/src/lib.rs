//! The CUDA kernels' index math for host-side tests: `cuda/include/sdsparse_index.h` (which
//! cuda/*.cu include) compiled by the host C++ compiler, exposed as safe functions.
//!
//! Used by the PTX-semantics emulator tests (`tests/ptx_emulation.rs`): they run the kernels'
//! own address and fragment formulas on an emulator of the documented PTX instructions, so a
//! layout error in a kernel fails `cargo test` without a GPU. Every function is pure integer
//! arithmetic with the header's names (prefixed `sds_`); see the header for what each computes.

unsafe extern "C" {
    pub safe fn sds_frag_a_row(lane: i32, i: i32) -> i32;
    pub safe fn sds_frag_a_col(lane: i32, i: i32) -> i32;
    pub safe fn sds_frag_b_k32(lane: i32, i: i32) -> i32;
    pub safe fn sds_frag_c_row(lane: i32, q: i32) -> i32;
    pub safe fn sds_frag_c_col(lane: i32, q: i32) -> i32;
    pub safe fn sds_ldm_a_row(lane: i32) -> i32;
    pub safe fn sds_ldm_a_col(lane: i32) -> i32;
    pub safe fn sds_ldm_b_row(lane: i32) -> i32;
    pub safe fn sds_ldm_b_col(lane: i32) -> i32;
    pub safe fn sds_ldm_bt_row(lane: i32) -> i32;
    pub safe fn sds_ldm_bt_col(lane: i32) -> i32;
    pub safe fn sds_sp24_meta_neutral() -> u32;
    pub safe fn sds_sp24_meta_word(row_block: i32, kblocks: i32, kb: i32, lane: i32) -> i64;
    pub safe fn sds_sp24_meta_lane(r: i32, gi: i32) -> i32;
    pub safe fn sds_sp24_meta_shift(r: i32, gi: i32) -> i32;
    pub safe fn sds_sp24_v2_w_chunk_off(row: i32, chunk: i32) -> i32;
    pub safe fn sds_sp24_v2_x_chunk_off(row: i32, chunk: i32) -> i32;
    pub safe fn sds_sp24_v2_a_row(warp_n: i32, i: i32, lane: i32) -> i32;
    pub safe fn sds_sp24_v2_a_chunk(step: i32, lane: i32) -> i32;
    pub safe fn sds_sp24_v2_b_row(warp_t: i32, warp_tokens: i32, j: i32, lane: i32) -> i32;
    pub safe fn sds_sp24_v2_b_chunk(step: i32, lane: i32) -> i32;
    pub safe fn sds_sp24_v2_warp_live(n0: i32, warp_n: i32, n_pad: i32) -> i32;
    pub safe fn sds_sp24_v3_wg_live(n0: i32, cw: i32, n_pad: i32) -> i32;
    pub safe fn sds_sp24_v2_meta_smem_word(warp_n: i32, i: i32, lane: i32) -> i32;
    pub safe fn sds_wgmma_desc(addr: u32, lbo: u32, sbo: u32) -> u64;
    pub safe fn sds_sp24_v3_stage_bytes() -> i32;
    pub safe fn sds_sp24_v3_chunk_bytes() -> i32;
    pub safe fn sds_sp24_v3_core_sbo() -> i32;
    pub safe fn sds_sp24_v3_tma_a_col(kt: i32, c: i32) -> i32;
    pub safe fn sds_sp24_v3_tma_b_col(kt: i32, c: i32) -> i32;
    pub safe fn sds_sp24_v3_tma_a_dst(stage: i32, c: i32) -> i32;
    pub safe fn sds_sp24_v3_tma_b_dst(stage: i32, c: i32) -> i32;
    pub safe fn sds_sp24_v3_a_start(stage: i32, cw: i32, step: i32) -> i32;
    pub safe fn sds_sp24_v3_b_start(stage: i32, step: i32) -> i32;
    pub safe fn sds_sp24_v3_meta_row_block(n0: i32, cw: i32, warp: i32) -> i32;
    pub safe fn sds_wgmma_d_row(warp: i32, lane: i32, q: i32) -> i32;
    pub safe fn sds_wgmma_d_col(lane: i32, i: i32, q: i32) -> i32;
    pub safe fn sds_sp24_cs_ld() -> i32;
    pub safe fn sds_uns_core_offset(r: i32, k: i32) -> i32;
    pub safe fn sds_uns_core_lbo() -> u32;
    pub safe fn sds_uns_core_sbo() -> u32;
    pub safe fn sds_uns_split_begin(z: i32, per: i32) -> i32;
    pub safe fn sds_uns_split_end(z: i32, per: i32, tiles_k: i32) -> i32;
    pub safe fn sds_uns_workspace_index(z: i32, m: i32, n: i32, row: i32, col: i32) -> i64;
    pub safe fn sds_uns_x_chunk_row(chunk: i32, core: i32) -> i32;
    pub safe fn sds_uns_x_chunk_col8(chunk: i32, core: i32) -> i32;
    pub safe fn sds_uns_core_fill_row(rb: i32, lane: i32) -> i32;
    pub safe fn sds_uns_core_fill_pair(c: i32, lane: i32) -> i32;
    pub safe fn sds_uns_below_mask(lane: i32) -> u64;
    pub safe fn sds_attn_key_index(t: i32, j: i32, lane: i32, e: i32) -> i32;
    pub safe fn sds_attn_p_reg(j: i32, r: i32) -> i32;
    pub safe fn sds_attn_key_end(row: i32, seq_q: i32, seq_kv: i32, causal: i32) -> i32;
    pub safe fn sds_attn_n_tiles(q0: i32, seq_q: i32, seq_kv: i32, causal: i32) -> i32;
}

unsafe extern "C" {
    /// Runs the activation kernel `name` (NUL-terminated, its name in the fatbin, e.g.
    /// `sdsparse_layernorm_f16`) from `cuda/norm.cu` / `cuda/pointwise.cu`, compiled for the host
    /// on the CUDA stand-in of `cuda_shim/sds_cuda_host.h`, over grid `(gx, gy)` of `bx` threads.
    /// Returns 0, or -1 for an unknown kernel.
    ///
    /// # Safety
    /// `params` must point to the kernel's parameter struct, whose pointers address host buffers
    /// large enough for what the kernel reads and writes with those sizes.
    pub fn sds_host_launch(name: *const std::ffi::c_char, params: *const std::ffi::c_void, gx: u32, gy: u32, bx: u32) -> i32;
}
