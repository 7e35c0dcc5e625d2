#!/usr/bin/env python3
"""diffusers fp16 (SDPA attention) on the GPU on a full-size SD2.1-base checkpoint: the peer of
`sdsparse generate --device cuda` in the device check's full-size stage.

Loads the diffusers folder `sdsparse synth --preset sd2.1-base --dtype f16` wrote (random weights,
the same folder sdsparse runs) with torch_dtype=float16 and the folder's DDIM scheduler, and
generates one 512x512 image, 50 steps, CFG 7.5, after one short warm-up call (cuDNN / cuBLAS
heuristics, allocator), timing the stages as `sdsparse generate` reports them (CUDA-synchronised):

  text encoder  encode_prompt (prompt + negative prompt)
  UNet          every UNet call (the CFG pair is one batch-2 call)
  VAE decode    vae.decode of the final latents
  generate      prompt to image, without load
  GPU weights   torch.cuda.memory_allocated() after load (fp16 weights)

Without transformers (the text encoder's library) it runs the same loop from the UNet, the VAE
and the DDIM scheduler with random prompt embeddings and says so. On a machine without torch,
CUDA or diffusers it prints "peer skipped: <why>" and exits 0 (the device check reports that).

    python3 tools/bench_gpu_peer_sd.py MODEL_DIR [--steps 50] [--size 512] [--json OUT.json]
"""

import argparse
import json
import sys
import time


def skip(why: str) -> int:
    print(f"peer skipped: {why}", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="diffusers folder (SD2.1-base layout)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()

    try:
        import torch
    except ImportError:
        return skip("torch missing")
    if not torch.cuda.is_available():
        return skip("torch has no CUDA device")
    try:
        import diffusers
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    except Exception as e:  # noqa: BLE001 (any import failure means no peer)
        return skip(f"diffusers cannot be imported ({type(e).__name__}: {e})")

    dev = torch.device("cuda")
    sync = torch.cuda.synchronize
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), diffusers {diffusers.__version__}, "
          f"{torch.cuda.get_device_name(0)}", flush=True)

    full = True
    t0 = time.perf_counter()
    try:
        from diffusers import StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.float16,
                                                       safety_checker=None, requires_safety_checker=False)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        pipe = pipe.to(dev)
        unet, vae, scheduler = pipe.unet, pipe.vae, pipe.scheduler
    except Exception as e:  # noqa: BLE001 (no transformers: components only)
        print(f"note: full pipeline unavailable ({type(e).__name__}: {e}); UNet + VAE + DDIM with random "
              "prompt embeddings (no text encoder)", flush=True)
        full = False
        unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet", torch_dtype=torch.float16).to(dev)
        vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae", torch_dtype=torch.float16).to(dev)
        scheduler = DDIMScheduler.from_pretrained(args.model, subfolder="scheduler")
    sync()
    t_load = time.perf_counter() - t0
    weight_bytes = torch.cuda.memory_allocated()
    # diffusers' default attention processor on torch 2 is SDPA (AttnProcessor2_0).
    procs = {type(p).__name__ for p in unet.attn_processors.values()}

    unet_times, vae_times, te_times = [], [], []

    def timed(fn, sink):
        def wrapper(*a, **k):
            sync()
            s = time.perf_counter()
            r = fn(*a, **k)
            sync()
            sink.append(time.perf_counter() - s)
            return r
        return wrapper

    def run(steps: int):
        g = torch.Generator("cuda").manual_seed(0)
        if full:
            return pipe("a photograph of an astronaut riding a horse", negative_prompt="",
                        num_inference_steps=steps, guidance_scale=args.guidance,
                        width=args.size, height=args.size, generator=g, output_type="pil").images[0]
        # The pipeline's loop without the text encoder (StableDiffusionPipeline.__call__).
        ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g, device=dev, dtype=torch.float16)
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        lat = torch.randn(1, unet.config.in_channels, args.size // f, args.size // f, generator=g, device=dev,
                          dtype=torch.float16) * scheduler.init_noise_sigma
        scheduler.set_timesteps(steps, device=dev)
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(torch.cat([lat, lat]), t)
            e = unet(x, t, encoder_hidden_states=ctx).sample
            u, c = e.chunk(2)
            lat = scheduler.step(u + args.guidance * (c - u), t, lat).prev_sample
        img = vae.decode(lat / vae.config.scaling_factor).sample
        return (img / 2 + 0.5).clamp(0, 1).float().cpu()

    with torch.inference_mode():
        run(2)  # warm-up, untimed
        unet.forward = timed(unet.forward, unet_times)
        vae.decode = timed(vae.decode, vae_times)
        if full:
            pipe.encode_prompt = timed(pipe.encode_prompt, te_times)
        sync()
        t1 = time.perf_counter()
        run(args.steps)
        sync()
        t_gen = time.perf_counter() - t1

    ms = lambda s: s * 1e3  # noqa: E731
    n = max(len(unet_times), 1)
    print(f"diffusers fp16 ({', '.join(sorted(procs))}), ddim, {len(unet_times)} UNet calls, "
          f"{args.size}x{args.size}, CFG {args.guidance}{'' if full else ', no text encoder'}")
    print(f"  load          {ms(t_load):10.1f} ms")
    print(f"  text encoder  {ms(sum(te_times)):10.1f} ms")
    print(f"  UNet          {ms(sum(unet_times)):10.1f} ms total, {ms(sum(unet_times)) / n:.1f} ms per step")
    print(f"  VAE decode    {ms(sum(vae_times)):10.1f} ms")
    print(f"  generate      {ms(t_gen):10.1f} ms (prompt to image, without load)")
    print(f"  GPU weights   {weight_bytes / 2**20:10.1f} MiB (torch.cuda.memory_allocated after load)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"peer": "diffusers-fp16-sdpa", "full_pipeline": full, "attn_processors": sorted(procs),
                       "steps": args.steps, "size": args.size, "load_ms": ms(t_load),
                       "text_encoder_ms": ms(sum(te_times)), "unet_ms": ms(sum(unet_times)),
                       "unet_ms_per_step": ms(sum(unet_times)) / n, "vae_ms": ms(sum(vae_times)),
                       "generate_ms": ms(t_gen), "gpu_weight_mib": weight_bytes / 2**20,
                       "gpu": torch.cuda.get_device_name(0)}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
