#!/usr/bin/env python3
"""Makes the PNDM reference for the tiny fixture with diffusers (CPU, float32).

Runs the fixture's StableDiffusionPipeline with PNDMScheduler built from the fixture's
scheduler config (diffusers' `from_config`), with the same prompt, guidance and initial
latents as the other runs in reference/reference.json, twice:

  pndm      skip_prk_steps=True  (how SD2.1-base ships PNDM), 6 steps -> 7 UNet calls
  pndm_prk  skip_prk_steps=False (from_config default: Runge-Kutta warm-up), 4 steps -> 13 calls

and writes, next to the other references:

  reference/pndm_reference.safetensors  {run}_final_latents [1,4,32,32], {run}_step_latents
      [calls,1,4,32,32] (latents after each scheduler.step), {run}_step_unet_out
      [calls,2,4,32,32] (raw UNet output, batch [uncond, cond]), {run}_image [1,64,64,3]
  reference/pndm_reference.json         versions, call, timesteps, what each tensor holds
  reference/pndm.png                    image of the `pndm` run (round(clip(x,0,1)*255))

Usage: python3 tools/make_pndm_reference.py [fixture dir, default tests/fixtures/tiny-sd2-eps]
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
import diffusers
import transformers
from diffusers import PNDMScheduler, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file, save_file

fixture = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/tiny-sd2-eps")
ref_dir = fixture / "reference"
ref_meta = json.loads((ref_dir / "reference.json").read_text())
init_latents = load_file(str(ref_dir / "reference.safetensors"))["init_latents"]

torch.set_num_threads(2)
pipe = StableDiffusionPipeline.from_pretrained(
    str(fixture),
    dtype=torch.float32,
    safety_checker=None,
    feature_extractor=None,
    requires_safety_checker=False,
)
pipe.set_progress_bar_config(disable=True)
base_config = pipe.scheduler.config

prompt = ref_meta["prompt"]
negative = ref_meta["negative_prompt"]
guidance = ref_meta["guidance_scale"]
height, width = ref_meta["image_height"], ref_meta["image_width"]

tensors = {}
runs = {}
for run, steps, skip_prk in [("pndm", 6, True), ("pndm_prk", 4, False)]:
    pipe.scheduler = PNDMScheduler.from_config(base_config, skip_prk_steps=skip_prk)
    unet_outs, step_latents = [], []
    hook = pipe.unet.register_forward_hook(lambda m, i, o: unet_outs.append(o[0].detach().clone()))

    def on_step_end(p, i, t, kw):
        step_latents.append(kw["latents"].detach().clone())
        return kw

    call = dict(
        prompt=prompt,
        negative_prompt=negative,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=init_latents.clone(),
    )
    with torch.no_grad():
        final = pipe(**call, output_type="latent", callback_on_step_end=on_step_end).images
    hook.remove()
    with torch.no_grad():
        image = pipe(**call, output_type="np").images
    tensors[f"{run}_final_latents"] = final.contiguous()
    tensors[f"{run}_step_latents"] = torch.stack(step_latents).contiguous()
    tensors[f"{run}_step_unet_out"] = torch.stack(unet_outs).contiguous()
    tensors[f"{run}_image"] = torch.from_numpy(np.ascontiguousarray(image)).float()
    assert torch.equal(step_latents[-1], final), "last callback latents != output_type='latent'"
    runs[run] = {
        "scheduler_class": "PNDMScheduler",
        "scheduler_construction": f"PNDMScheduler.from_config(<fixture scheduler config>, skip_prk_steps={skip_prk})",
        "scheduler_config": dict(pipe.scheduler.config),
        "skip_prk_steps": skip_prk,
        "steps": steps,
        "model_calls": len(unet_outs),
        "timesteps": [int(t) for t in pipe.scheduler.timesteps],
        "init_noise_sigma": float(pipe.scheduler.init_noise_sigma),
        "call": "pipe(prompt, negative_prompt, height, width, num_inference_steps=steps, "
        "guidance_scale, latents=init_latents (reference.safetensors), output_type=...)",
    }
    if run == "pndm":
        png = np.round(np.clip(image[0], 0, 1) * 255).astype(np.uint8)
        Image.fromarray(png).save(ref_dir / "pndm.png")
        runs[run]["png"] = "pndm.png"

save_file(tensors, str(ref_dir / "pndm_reference.safetensors"))
meta = {
    "fixture": fixture.name,
    "made_by": "tools/make_pndm_reference.py",
    "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__},
    "device": "cpu",
    "dtype": "float32",
    "prompt": prompt,
    "negative_prompt": negative,
    "guidance_scale": guidance,
    "height": height,
    "width": width,
    "init_latents": "reference.safetensors: init_latents (unit noise; PNDM init_noise_sigma is 1)",
    "png": "PNG = round(clip(image,0,1)*255) as uint8",
    "runs": runs,
    "tensors": {
        "{run}_final_latents": "[1,4,H/2,W/2] final latents before VAE decode (output_type='latent')",
        "{run}_step_latents": "[calls,1,4,H/2,W/2] latents after each scheduler.step (callback_on_step_end)",
        "{run}_step_unet_out": "[calls,2,4,H/2,W/2] raw UNet output per call; batch = [uncond, cond]; guided = u + g*(c-u)",
        "{run}_image": "[1,H,W,3] float image in [0,1] (output_type='np')",
    },
}
(ref_dir / "pndm_reference.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
print("wrote", ref_dir / "pndm_reference.safetensors", {k: list(v.shape) for k, v in tensors.items()})
