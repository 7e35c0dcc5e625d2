#!/usr/bin/env python3
"""diffusers reference for tiled VAE decoding (`AutoencoderKL.enable_tiling()` / `tiled_decode`)
on the tiny SD2 fixture's VAE (VAE factor 2).

The tile size is set small, as users do through the attributes, so that a 20x26 latent is
decoded in 4 x 5 overlapping tiles: `tile_sample_min_size = 16` pixels, `tile_latent_min_size
= 8` latents, diffusers' `tile_overlap_factor` 0.25 (so tiles start every 6 latents, and 4
pixel rows / columns are blended linearly into the tile above / to the left, which then keep
12x12 pixels each). The untiled decode of the same latents is stored too: the two differ,
so a test that ignores tiling fails.

Writes tests/fixtures/vae-tiling/reference.safetensors (latents as the pipeline hands them to the
VAE, i.e. before `/ scaling_factor`). Usage: python3 tools/make_vae_tiling_reference.py
"""
import json
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

root = Path(__file__).resolve().parent.parent
vae = AutoencoderKL.from_pretrained(root / "tests/fixtures/tiny-sd2-eps/vae", torch_dtype=torch.float32).eval()
g = torch.Generator().manual_seed(7)
latents = torch.randn(1, 4, 20, 26, generator=g)
z = latents / vae.config.scaling_factor
with torch.no_grad():
    untiled = vae.decode(z).sample
    vae.enable_tiling()
    vae.tile_sample_min_size = 16
    vae.tile_latent_min_size = 8
    tiled = vae.decode(z).sample
out_dir = root / "tests/fixtures/vae-tiling"
out_dir.mkdir(exist_ok=True)
save_file({"latents": latents.contiguous(), "tiled": tiled.contiguous(), "untiled": untiled.contiguous()},
          str(out_dir / "reference.safetensors"))
info = {
    "source": "tools/make_vae_tiling_reference.py",
    "vae": "tests/fixtures/tiny-sd2-eps/vae",
    "diffusers": diffusers.__version__,
    "torch": torch.__version__,
    "latents_seed": 7,
    "tile_sample_min_size": 16,
    "tile_latent_min_size": 8,
    "tile_overlap_factor": vae.tile_overlap_factor,
    "max_abs_tiled_minus_untiled": float((tiled - untiled).abs().max()),
}
(out_dir / "reference.json").write_text(json.dumps(info, indent=1) + "\n")
print(json.dumps(info, indent=1), tuple(tiled.shape))
