#!/usr/bin/env python3
"""diffusers reference for an image size that is a multiple of the VAE factor but not of the
UNet's 2^(levels-1): the tiny SD2 fixture (2-level UNet, VAE factor 2) at 34x30 pixels, i.e.
17x15 latents, odd on both sides, where diffusers forwards the skip connection's size to the
upsampler. 3 DDIM steps, guidance 7.5, from fixed initial latents.

Also records torch's `interpolate(size=..., mode="nearest")` on a small input for the op test.
Writes tests/fixtures/odd-size/reference.safetensors. Usage: python3 tools/make_odd_size_reference.py
"""
from pathlib import Path
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

root = Path(__file__).resolve().parent.parent
pipe = StableDiffusionPipeline.from_pretrained(root / "tests/fixtures/tiny-sd2-eps", torch_dtype=torch.float32,
                                               safety_checker=None, feature_extractor=None,
                                               requires_safety_checker=False)
g = torch.Generator().manual_seed(11)
init = torch.randn(1, 4, 15, 17, generator=g)
f = pipe.vae_scale_factor
pipe.check_inputs = (lambda check: lambda prompt, h, w, *r, **k: check(prompt, 64, 64, *r, **k))(pipe.check_inputs)
out = pipe(prompt="a photograph of an astronaut riding a horse", height=15 * f, width=17 * f,
           num_inference_steps=3, guidance_scale=7.5, latents=init.clone(), output_type="latent").images
x = torch.randn(1, 2, 3, 5, generator=g)
up = F.interpolate(x, size=(5, 9), mode="nearest")
out_dir = root / "tests/fixtures/odd-size"
out_dir.mkdir(exist_ok=True)
save_file({"init_latents": init.contiguous(), "final_latents": out.contiguous(),
           "upsample_in": x.contiguous(), "upsample_out_5x9": up.contiguous()}, str(out_dir / "reference.safetensors"))
print("final latents", tuple(out.shape), "finite", bool(torch.isfinite(out).all()))
