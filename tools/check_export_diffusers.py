#!/usr/bin/env python3
"""Proves that a folder written by `sdsparse export` loads in diffusers.

Usage: python3 tools/check_export_diffusers.py EXPORTED_DIR [--sparse SPARSE_DIR] [--forward]

Loads EXPORTED_DIR with `StableDiffusionPipeline.from_pretrained`, checks that every
parameter of the UNet and text encoder equals the exported safetensors bit for bit (so
diffusers did not re-initialise or drop anything), prints the zero fraction of the Linear
weights per component and, with --sparse, checks it against the sparse folder's
`sdsparse.json`. --forward runs one UNet and text-encoder forward pass on random inputs
and checks the outputs are finite. Exits non-zero on any mismatch.
"""
import argparse
import json
import os
import sys

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file


def weight_file(root, component):
    name = "model.safetensors" if component == "text_encoder" else "diffusion_pytorch_model.safetensors"
    return os.path.join(root, component, name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("exported")
    ap.add_argument("--sparse")
    ap.add_argument("--forward", action="store_true")
    args = ap.parse_args()

    pipe = StableDiffusionPipeline.from_pretrained(args.exported, safety_checker=None)
    summary = None
    if args.sparse:
        with open(os.path.join(args.sparse, "sdsparse.json")) as f:
            summary = {c["name"]: c for c in json.load(f)["components"]}
    ok = True
    for component, module in [("text_encoder", pipe.text_encoder), ("unet", pipe.unet), ("vae", pipe.vae)]:
        stored = load_file(weight_file(args.exported, component))
        params = dict(module.state_dict())
        # transformers 4.x files carry a `text_model.` prefix that the module does not.
        mismatched = 0
        for name, tensor in stored.items():
            key = name if name in params else name.removeprefix("text_model.")
            if key not in params:
                continue
            if not torch.equal(params[key].to(tensor.dtype), tensor):
                mismatched += 1
        linear_zero, linear_total = 0, 0
        for mod_name, mod in module.named_modules():
            if isinstance(mod, torch.nn.Linear):
                if component == "text_encoder" and ".layers." not in f".{mod_name}":
                    continue
                linear_zero += int((mod.weight == 0).sum())
                linear_total += mod.weight.numel()
        frac = linear_zero / max(linear_total, 1)
        print(f"{component:13s} loaded {len(params)} tensors, {mismatched} differ from the file, "
              f"Linear zeros {linear_zero}/{linear_total} = {frac:.4%}")
        ok &= mismatched == 0
        if summary and component in summary and summary[component]["prunable_params"]:
            want = summary[component]["pruned"]
            print(f"{'':13s} sdsparse.json says {want} pruned")
            # Weights that were already zero before pruning can only add to the count.
            ok &= linear_zero >= want
    if args.forward:
        with torch.no_grad():
            ids = torch.randint(0, pipe.tokenizer.vocab_size, (1, 77))
            ctx = pipe.text_encoder(ids)[0]
            size = pipe.unet.config.sample_size
            lat = torch.randn(1, pipe.unet.config.in_channels, size, size)
            out = pipe.unet(lat, 10, encoder_hidden_states=ctx.to(pipe.unet.dtype)).sample
            finite = bool(torch.isfinite(out).all())
            print(f"forward: text {tuple(ctx.shape)}, unet {tuple(out.shape)}, finite {finite}")
            ok &= finite
    print("OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
