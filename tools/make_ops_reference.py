#!/usr/bin/env python3
"""Small PyTorch reference outputs for the CPU ops (tests/ops_torch.rs).

Writes tests/fixtures/ops/ops_reference.safetensors: random f32 inputs (seeded) and what
PyTorch / diffusers compute from them for group norm (+SiLU), layer norm, conv2d (3x3 with
padding 1 at stride 1 and 2, 1x1), scaled-dot-product attention (cross and causal), exact
GELU, GEGLU, SiLU, softmax, nearest 2x upsampling and diffusers' get_timestep_embedding.
Run from the repository root: python3 tools/make_ops_reference.py
"""
import os

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from safetensors.torch import save_file

torch.manual_seed(20240601)
torch.set_num_threads(1)


def rand(*shape, scale=1.0):
    # Uniform in [-scale, scale]: never exactly zero in practice.
    return (torch.rand(*shape, dtype=torch.float32) * 2 - 1) * scale


t = {}

# Group norm (SD2 ResNet: 32 groups, eps 1e-5; here 4 groups of 2 channels) with an offset.
t["gn_x"] = rand(2, 8, 6, 6, scale=2.0) + 3.0
t["gn_gamma"] = rand(8)
t["gn_beta"] = rand(8)
gn = F.group_norm(t["gn_x"], 4, t["gn_gamma"], t["gn_beta"], eps=1e-5)
t["gn_out"] = gn
t["gn_silu_out"] = F.silu(gn)

t["ln_x"] = rand(3, 7, 32, scale=3.0)
t["ln_gamma"] = rand(32)
t["ln_beta"] = rand(32)
t["ln_out"] = F.layer_norm(t["ln_x"], (32,), t["ln_gamma"], t["ln_beta"], eps=1e-5)

t["conv_x"] = rand(2, 4, 9, 9)
t["conv_w"] = rand(6, 4, 3, 3, scale=0.5)
t["conv_b"] = rand(6)
t["conv_s1p1_out"] = F.conv2d(t["conv_x"], t["conv_w"], t["conv_b"], stride=1, padding=1)
t["conv_s2p1_out"] = F.conv2d(t["conv_x"], t["conv_w"], t["conv_b"], stride=2, padding=1)
t["conv1x1_w"] = rand(5, 4, 1, 1)
t["conv1x1_b"] = rand(5)
t["conv1x1_out"] = F.conv2d(t["conv_x"], t["conv1x1_w"], t["conv1x1_b"])

# Cross-attention [B, H, Sq, D] x [B, H, Sk, D] and causal self-attention.
t["attn_q"] = rand(2, 3, 33, 16)
t["attn_k"] = rand(2, 3, 20, 16)
t["attn_v"] = rand(2, 3, 20, 16)
t["attn_out"] = F.scaled_dot_product_attention(t["attn_q"], t["attn_k"], t["attn_v"])
t["causal_q"] = rand(1, 2, 17, 16)
t["causal_k"] = rand(1, 2, 17, 16)
t["causal_v"] = rand(1, 2, 17, 16)
t["causal_out"] = F.scaled_dot_product_attention(
    t["causal_q"], t["causal_k"], t["causal_v"], is_causal=True
)

t["act_x"] = rand(4, 250, scale=8.0)
t["gelu_out"] = F.gelu(t["act_x"])
t["silu_out"] = F.silu(t["act_x"])
h, g = t["act_x"].chunk(2, dim=-1)
t["geglu_out"] = h * F.gelu(g)
t["softmax_out"] = torch.softmax(t["act_x"] * 3.0, dim=-1)

t["up_x"] = rand(1, 2, 3, 5)
t["up_out"] = F.interpolate(t["up_x"], scale_factor=2.0, mode="nearest")

# SD2's UNet: flip_sin_to_cos=True, freq_shift=0; the other variant for coverage.
t["ts"] = torch.tensor([999.0, 500.0, 261.0, 1.0, 0.0])
t["ts_320_flip_shift0"] = get_timestep_embedding(t["ts"], 320, flip_sin_to_cos=True, downscale_freq_shift=0)
t["ts_64_noflip_shift1"] = get_timestep_embedding(t["ts"], 64, flip_sin_to_cos=False, downscale_freq_shift=1)

out = os.path.join("tests", "fixtures", "ops", "ops_reference.safetensors")
os.makedirs(os.path.dirname(out), exist_ok=True)
save_file({k: v.contiguous() for k, v in t.items()}, out)
print(f"wrote {out}: {len(t)} tensors")
