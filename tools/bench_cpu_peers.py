#!/usr/bin/env python3
"""diffusers on the CPU (f32) on a full-size SD2.1-base checkpoint: the peer of `sdsparse generate`.

Loads a diffusers folder (e.g. the random-f16-weight one `sdsparse synth --preset sd2.1-base --dtype f16
--out /tmp/sd21b` writes) with StableDiffusionPipeline.from_pretrained(torch_dtype=float32), the DDIM
scheduler of the folder, and generates one 512x512 image with CFG, timing each stage the way
`sdsparse generate` reports it:

  load          from_pretrained (weights widened to f32)
  text encoder  encode_prompt (prompt + negative prompt)
  UNet          every UNet call (one per step: the CFG pair is one batch-2 call), per call
  VAE decode    vae.decode of the final latents
  wall          the whole process, as /usr/bin/time measures it (printed by the caller); the script
                also prints its own start-to-end time and peak RSS (ru_maxrss)

    /usr/bin/time -v python3 tools/bench_cpu_peers.py /tmp/sd21b [--steps 2] [--size 512] [--threads 2]
"""

import argparse
import os
import platform
import resource
import sys
import time

T_START = time.perf_counter()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="diffusers folder (SD2.1-base layout)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--size", type=int, default=512, help="width = height (multiple of 8)")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="optional PNG path")
    args = ap.parse_args()
    if not os.path.isdir(args.model):
        print(f"error: {args.model} is not a diffusers folder", file=sys.stderr)
        return 2

    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, mkldnn "
          f"{torch.backends.mkldnn.is_available()}, cpu {platform.machine()}", flush=True)

    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.float32,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    t_load = time.perf_counter() - t0

    # Time the stages by wrapping the modules' forward calls.
    unet_times, vae_times, te_times = [], [], []

    def timed(fn, sink):
        def wrapper(*a, **k):
            s = time.perf_counter()
            r = fn(*a, **k)
            sink.append(time.perf_counter() - s)
            return r
        return wrapper

    pipe.unet.forward = timed(pipe.unet.forward, unet_times)
    pipe.vae.decode = timed(pipe.vae.decode, vae_times)
    pipe.encode_prompt = timed(pipe.encode_prompt, te_times)

    g = torch.Generator("cpu").manual_seed(args.seed)
    t1 = time.perf_counter()
    with torch.inference_mode():
        image = pipe("a photograph of an astronaut riding a horse", negative_prompt="",
                     num_inference_steps=args.steps, guidance_scale=args.guidance,
                     width=args.size, height=args.size, generator=g).images[0]
    t_gen = time.perf_counter() - t1
    if args.out:
        image.save(args.out)

    ms = lambda s: s * 1e3
    print(f"diffusers, scheduler ddim, {len(unet_times)} UNet calls, {args.size}x{args.size}, CFG {args.guidance}")
    print(f"  load          {ms(t_load):10.1f} ms")
    print(f"  text encoder  {ms(sum(te_times)):10.1f} ms")
    n = max(len(unet_times), 1)
    print(f"  UNet          {ms(sum(unet_times)):10.1f} ms total, {ms(sum(unet_times)) / n:.1f} ms per step "
          f"(min {ms(min(unet_times)):.1f}, max {ms(max(unet_times)):.1f})")
    print(f"  VAE decode    {ms(sum(vae_times)):10.1f} ms")
    print(f"  generate      {ms(t_gen):10.1f} ms (prompt to image, without load)")
    print(f"  script wall   {ms(time.perf_counter() - T_START):10.1f} ms (imports included)")
    print(f"  peak RSS      {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
