//! Launcher and CPU reference of the fused attention forward (`cuda/attention.cu`): head dim
//! 64, f16 Q/K/V/O, f32 online softmax, batch x heads in one launch.
//!
//! Q/K/V/O are addressed through [`HeadLayout`] strides, element `(b, h, s, d)` at
//! `b*stride_b + s*stride_s + h*stride_h + d`, so both `[B, H, S, 64]` and the projections'
//! natural `[B, S, H*64]` work without a permute. `upcast_attention` needs no special path:
//! the softmax is computed in f32 already (see the kernel's header comment).

use super::unstructured::{kernel_image, launch_with_params, FatbinModule};
use crate::error::{Error, Result};
use cudarc::driver::{sys, CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use std::sync::Arc;

/// The only head dimension the fused kernel supports (all of SD2's attentions).
pub const HEAD_DIM: usize = 64;
/// Query rows per CTA.
pub const BLOCK_Q: usize = 64;

/// Strides (in elements) of one attention operand; `d` is always contiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLayout {
    pub stride_b: usize,
    pub stride_s: usize,
    pub stride_h: usize,
}

impl HeadLayout {
    /// `[B, H, S, 64]` contiguous.
    pub fn bhsd(heads: usize, seq: usize) -> HeadLayout {
        HeadLayout { stride_b: heads * seq * HEAD_DIM, stride_s: HEAD_DIM, stride_h: seq * HEAD_DIM }
    }
    /// `[B, S, H*64]` contiguous (the output of a Linear projection).
    pub fn bshd(heads: usize, seq: usize) -> HeadLayout {
        HeadLayout { stride_b: seq * heads * HEAD_DIM, stride_s: heads * HEAD_DIM, stride_h: HEAD_DIM }
    }
    /// Offset of element `(b, h, s, 0)`.
    pub fn offset(&self, b: usize, h: usize, s: usize) -> usize {
        b * self.stride_b + s * self.stride_s + h * self.stride_h
    }
    /// Smallest buffer length that holds every element.
    pub fn min_len(&self, batch: usize, heads: usize, seq: usize) -> usize {
        self.offset(batch - 1, heads - 1, seq - 1) + HEAD_DIM
    }
}

/// Problem shape of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub batch: usize,
    pub heads: usize,
    pub seq_q: usize,
    pub seq_kv: usize,
    /// Usually `1 / sqrt(64)`.
    pub scale: f32,
    /// Causal mask (the CLIP text encoder): query `i` sees keys `j <= i + seq_kv - seq_q`
    /// (aligned at the end, as `cpu::attention::attention`); a query that sees no key (only when
    /// `seq_q > seq_kv`) gives zeros.
    pub causal: bool,
}

/// CPU reference: `o = softmax(scale q k^T [+ causal mask]) v` per (b, h) in f64, reading and writing through
/// the given layouts (values as f32; the caller rounds inputs to f16 where the GPU does).
#[allow(clippy::too_many_arguments)]
pub fn reference_attention(
    shape: &AttentionShape,
    q: &[f32],
    ql: &HeadLayout,
    k: &[f32],
    kl: &HeadLayout,
    v: &[f32],
    vl: &HeadLayout,
    o: &mut [f32],
    ol: &HeadLayout,
) {
    let mut scores = vec![0.0f64; shape.seq_kv];
    for b in 0..shape.batch {
        for h in 0..shape.heads {
            for i in 0..shape.seq_q {
                let qo = ql.offset(b, h, i);
                // Keys [0, visible) unmasked (cpu::attention's causal rule).
                let visible = if shape.causal {
                    (i + 1 + shape.seq_kv).saturating_sub(shape.seq_q)
                } else {
                    shape.seq_kv
                };
                let scores = &mut scores[..visible.min(shape.seq_kv)];
                let oo = ol.offset(b, h, i);
                if scores.is_empty() {
                    o[oo..oo + HEAD_DIM].fill(0.0);
                    continue;
                }
                let mut mx = f64::NEG_INFINITY;
                for (j, s) in scores.iter_mut().enumerate() {
                    let ko = kl.offset(b, h, j);
                    let dot: f64 = (0..HEAD_DIM).map(|d| q[qo + d] as f64 * k[ko + d] as f64).sum();
                    *s = dot * shape.scale as f64;
                    mx = mx.max(*s);
                }
                let mut sum = 0.0;
                for s in scores.iter_mut() {
                    *s = (*s - mx).exp();
                    sum += *s;
                }
                for d in 0..HEAD_DIM {
                    let acc: f64 =
                        scores.iter().enumerate().map(|(j, p)| p * v[vl.offset(b, h, j) + d] as f64).sum();
                    o[oo + d] = (acc / sum) as f32;
                }
            }
        }
    }
}

/// Launch parameters, mirror of `SdsAttentionParams` (sdsparse_unstructured_params.h).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct AttentionParams {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub o: u64,
    pub q_stride: [i64; 3],
    pub k_stride: [i64; 3],
    pub v_stride: [i64; 3],
    pub o_stride: [i64; 3],
    pub batch: i32,
    pub heads: i32,
    pub seq_q: i32,
    pub seq_kv: i32,
    pub scale: f32,
    /// Nonzero: the causal mask.
    pub causal: i32,
}
const _: () = assert!(std::mem::size_of::<AttentionParams>() == 152);
const _: () = assert!(std::mem::offset_of!(AttentionParams, q) == 0);
const _: () = assert!(std::mem::offset_of!(AttentionParams, k) == 8);
const _: () = assert!(std::mem::offset_of!(AttentionParams, v) == 16);
const _: () = assert!(std::mem::offset_of!(AttentionParams, o) == 24);
const _: () = assert!(std::mem::offset_of!(AttentionParams, q_stride) == 32);
const _: () = assert!(std::mem::offset_of!(AttentionParams, k_stride) == 56);
const _: () = assert!(std::mem::offset_of!(AttentionParams, v_stride) == 80);
const _: () = assert!(std::mem::offset_of!(AttentionParams, o_stride) == 104);
const _: () = assert!(std::mem::offset_of!(AttentionParams, batch) == 128);
const _: () = assert!(std::mem::offset_of!(AttentionParams, heads) == 132);
const _: () = assert!(std::mem::offset_of!(AttentionParams, seq_q) == 136);
const _: () = assert!(std::mem::offset_of!(AttentionParams, seq_kv) == 140);
const _: () = assert!(std::mem::offset_of!(AttentionParams, scale) == 144);
const _: () = assert!(std::mem::offset_of!(AttentionParams, causal) == 148);

// SAFETY: AttentionParams is the #[repr(C)] mirror of SdsAttentionParams (layout asserted
// above): plain integers and device addresses.
unsafe impl cudarc::driver::DeviceRepr for AttentionParams {}

/// Threads per CTA of the flash kernel (`sds_attn::THREADS`: 4 warps of 16 query rows).
pub const FLASH_THREADS: u32 = 128;

/// The parameters and grid of one attention launch.
pub type AttentionLaunch = (AttentionParams, (u32, u32, u32));

/// Checks an attention launch on the host and builds its parameters (device addresses left 0
/// for the caller) and grid (`ceil(seq_q / 64)` x `batch · heads`): every operand buffer
/// (`lens`: Q, K, V, O elements) holds what its [`HeadLayout`] addresses, strides are
/// multiples of 8 elements (16-byte `cp.async` rows), sizes fit `i32`, batch x heads fits
/// grid.y, and there is at least one key. With `causal`, each query block's CTA visits only the
/// K/V tiles up to its last row's diagonal (the grid is the same). `None`: nothing to compute (an empty batch).
pub fn plan_attention(
    s: &AttentionShape,
    lens: [usize; 4],
    layouts: [HeadLayout; 4],
) -> Result<Option<AttentionLaunch>> {
    if s.batch == 0 || s.heads == 0 || s.seq_q == 0 {
        return Ok(None);
    }
    if s.seq_kv == 0 {
        return Err(Error::Invalid("attention over zero keys".into()));
    }
    if !s.scale.is_finite() {
        return Err(Error::Invalid(format!("attention scale {} is not finite", s.scale)));
    }
    let seqs = [s.seq_q, s.seq_kv, s.seq_kv, s.seq_q];
    for (i, name) in ["q", "k", "v", "o"].iter().enumerate() {
        let need = layouts[i].min_len(s.batch, s.heads, seqs[i]);
        if lens[i] < need {
            return Err(Error::Shape(format!(
                "attention operand {name} holds {} elements, {s:?} with {:?} needs {need}",
                lens[i], layouts[i]
            )));
        }
    }
    let to_i32 =
        |v: usize| i32::try_from(v).map_err(|_| Error::Invalid(format!("attention size {v} exceeds i32")));
    if s.batch * s.heads > 65535 {
        return Err(Error::Invalid(format!("batch x heads = {} exceeds 65535", s.batch * s.heads)));
    }
    let params = AttentionParams {
        q: 0,
        k: 0,
        v: 0,
        o: 0,
        q_stride: strides(&layouts[0])?,
        k_stride: strides(&layouts[1])?,
        v_stride: strides(&layouts[2])?,
        o_stride: strides(&layouts[3])?,
        batch: to_i32(s.batch)?,
        heads: to_i32(s.heads)?,
        seq_q: to_i32(s.seq_q)?,
        seq_kv: to_i32(s.seq_kv)?,
        scale: s.scale,
        causal: i32::from(s.causal),
    };
    let grid = (s.seq_q.div_ceil(BLOCK_Q) as u32, (s.batch * s.heads) as u32, 1);
    Ok(Some((params, grid)))
}

/// Kernel variants of `cuda/attention.cu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionVariant {
    /// One thread per query row, f32, two passes: the oracle.
    Naive,
    /// Tensor-core flash forward.
    Flash,
}

/// The loaded attention kernels.
pub struct FusedAttention {
    module: FatbinModule,
    flash: sys::CUfunction,
    naive: sys::CUfunction,
    /// The flash kernel needs sm_80 (mma.sync m16n8k16, cp.async); below, it is a trap.
    flash_runs: bool,
}

// SAFETY: function handles are immutable after loading.
unsafe impl Send for FusedAttention {}
unsafe impl Sync for FusedAttention {}

fn strides(l: &HeadLayout) -> Result<[i64; 3]> {
    if !(l.stride_b.is_multiple_of(8) && l.stride_s.is_multiple_of(8) && l.stride_h.is_multiple_of(8)) {
        return Err(Error::Invalid(format!("attention strides must be multiples of 8 elements, got {l:?}")));
    }
    Ok([l.stride_b as i64, l.stride_s as i64, l.stride_h as i64])
}

impl FusedAttention {
    pub fn load(ctx: &Arc<CudaContext>) -> Result<FusedAttention> {
        Self::from_image(ctx, &kernel_image("attention")?)
    }

    pub fn from_image(ctx: &Arc<CudaContext>, image: &[u8]) -> Result<FusedAttention> {
        let module = FatbinModule::load(ctx, image)?;
        let flash = module.function("sdsparse_attn_fwd_d64")?;
        let naive = module.function("sdsparse_attn_naive")?;
        let cc = ctx.compute_capability().map_err(|e| Error::Cuda(format!("compute capability: {e}")))?;
        Ok(FusedAttention { module, flash, naive, flash_runs: cc >= (8, 0) })
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        self.module.context()
    }

    /// Whether this GPU runs the flash kernel (sm_80 or newer; below, it is a trap and
    /// [`FusedAttention::forward`] refuses [`AttentionVariant::Flash`]). The hardware's answer,
    /// not the pipeline's routing (`ArchMode`, which a forced dense-only mode also turns off).
    pub fn flash_runs(&self) -> bool {
        self.flash_runs
    }

    /// `o = softmax(scale q k^T [+ causal mask]) v` for every (batch, head) in one launch; all operands f16
    /// bit patterns in their layouts.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        stream: &Arc<CudaStream>,
        variant: AttentionVariant,
        shape: &AttentionShape,
        q: (&CudaSlice<u16>, HeadLayout),
        k: (&CudaSlice<u16>, HeadLayout),
        v: (&CudaSlice<u16>, HeadLayout),
        o: (&mut CudaSlice<u16>, HeadLayout),
    ) -> Result<()> {
        if variant == AttentionVariant::Flash && !self.flash_runs {
            return Err(Error::Cuda("the flash attention kernel needs sm_80 or newer".into()));
        }
        let lens = [q.0.len(), k.0.len(), v.0.len(), o.0.len()];
        let Some((mut params, grid)) = plan_attention(shape, lens, [q.1, k.1, v.1, o.1])? else {
            return Ok(());
        };
        let (q_ptr, _gq) = q.0.device_ptr(stream);
        let (k_ptr, _gk) = k.0.device_ptr(stream);
        let (v_ptr, _gv) = v.0.device_ptr(stream);
        let (o_ptr, _go) = o.0.device_ptr_mut(stream);
        (params.q, params.k, params.v, params.o) = (q_ptr, k_ptr, v_ptr, o_ptr);
        let (f, block) = match variant {
            AttentionVariant::Flash => (self.flash, (FLASH_THREADS, 1, 1)),
            AttentionVariant::Naive => (self.naive, (64, 1, 1)),
        };
        // SAFETY: params mirrors the kernel's struct; buffer extents were checked above and the
        // buffers stay borrowed until after the launch.
        unsafe { launch_with_params(stream, f, grid, block, 0, &params) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_plans_check_their_arguments() {
        let s = AttentionShape { batch: 2, heads: 5, seq_q: 70, seq_kv: 77, scale: 0.125, causal: false };
        let l = |seq| HeadLayout::bshd(5, seq);
        let layouts = [l(70), l(77), l(77), l(70)];
        let lens = [2 * 70 * 320, 2 * 77 * 320, 2 * 77 * 320, 2 * 70 * 320];
        let (p, grid) = plan_attention(&s, lens, layouts).unwrap().unwrap();
        // ceil(70 / 64) query tiles x (batch x heads).
        assert_eq!(grid, (2, 10, 1));
        assert_eq!((p.q_stride, p.k_stride), ([70 * 320, 320, 64], [77 * 320, 320, 64]));
        assert_eq!((p.batch, p.heads, p.seq_q, p.seq_kv, p.scale, p.causal), (2, 5, 70, 77, 0.125, 0));
        // The causal flag reaches the kernel; same grid (the CTAs skip tiles, not the grid).
        let (pc, gc) = plan_attention(&AttentionShape { causal: true, ..s }, lens, layouts).unwrap().unwrap();
        assert_eq!((pc.causal, gc), (1, grid));
        // [B, H, S, D] strides.
        let bhsd = [
            HeadLayout::bhsd(5, 70),
            HeadLayout::bhsd(5, 77),
            HeadLayout::bhsd(5, 77),
            HeadLayout::bhsd(5, 70),
        ];
        let (p, _) = plan_attention(&s, lens, bhsd).unwrap().unwrap();
        assert_eq!(p.o_stride, [5 * 70 * 64, 64, 70 * 64]);
        // Each operand one element short.
        for i in 0..4 {
            let mut short = lens;
            short[i] -= 1;
            let e = plan_attention(&s, short, layouts).unwrap_err().to_string();
            assert!(e.contains(["q", "k", "v", "o"][i]) && e.contains("needs"), "{e}");
        }
        // Strides that break the 16-byte rows, zero keys, too many (batch, head) pairs, a
        // non-finite scale; an empty batch is nothing to do.
        let odd = HeadLayout { stride_b: 77 * 324, stride_s: 324, stride_h: 68 };
        assert!(plan_attention(&s, [1 << 20; 4], [odd, l(77), l(77), l(70)]).is_err());
        assert!(plan_attention(&AttentionShape { seq_kv: 0, ..s }, lens, layouts).is_err());
        let many = AttentionShape { batch: 65536, heads: 1, ..s };
        assert!(plan_attention(&many, [usize::MAX; 4], [HeadLayout::bshd(1, 77); 4]).is_err());
        assert!(plan_attention(&AttentionShape { scale: f32::NAN, ..s }, lens, layouts).is_err());
        assert!(plan_attention(&AttentionShape { batch: 0, ..s }, lens, layouts).unwrap().is_none());
    }
}
