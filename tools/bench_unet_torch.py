#!/usr/bin/env python3
"""PyTorch CPU baseline for `benches/unet_step.rs`: one SD2.1-base UNet step.

diffusers' UNet2DConditionModel built from the real SD2.1-base config
(tests/fixtures/sd2.1-configs/stable-diffusion-2-1-base/unet/config.json), random init,
fp32, no grad; latents [2, 4, 64, 64], timestep 500, context [2, 77, 1024] — the same
shapes as the Rust bench. Prints each timed step and the mean.

    python3 tools/bench_unet_torch.py [--threads 2] [--iters 5] [--warmup 1]
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests/fixtures/sd2.1-configs/stable-diffusion-2-1-base/unet/config.json")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--iters", type=int, default=5, help="timed steps (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    ap.add_argument("--sdpa", choices=["default", "classic"], default="default",
                    help="attention processor: diffusers' default (SDPA) or the classic AttnProcessor")
    args = ap.parse_args()

    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with open(CONFIG) as f:
        config = json.load(f)
    unet = UNet2DConditionModel.from_config(config).eval()  # fp32 parameters by default
    if args.sdpa == "classic":
        from diffusers.models.attention_processor import AttnProcessor
        unet.set_attn_processor(AttnProcessor())

    g = torch.Generator("cpu").manual_seed(1)
    latents = torch.randn(2, 4, 64, 64, generator=g)
    context = torch.randn(2, 77, 1024, generator=g)
    timestep = torch.tensor(500.0)

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"MKL {torch.backends.mkl.is_available()}, mkldnn {torch.backends.mkldnn.is_available()}, "
          f"cpu {platform.processor() or platform.machine()}, attention {args.sdpa}", flush=True)
    times = []
    with torch.inference_mode():
        for i in range(args.warmup + args.iters):
            t0, c0 = time.perf_counter(), time.process_time()
            out = unet(latents, timestep, encoder_hidden_states=context).sample
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            label = "warmup" if i < args.warmup else "step"
            # CPU time (all threads) is the fairer figure on a shared, overloaded machine.
            print(f"{label} {i}: {dt:.3f} s wall, {cpu:.3f} s cpu", flush=True)
            if i >= args.warmup:
                times.append(dt)
    assert torch.isfinite(out).all()
    mean = statistics.mean(times)
    spread = statistics.stdev(times) if len(times) > 1 else 0.0
    print(f"mean {mean:.3f} s over {len(times)} steps (stdev {spread:.3f} s, min {min(times):.3f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
