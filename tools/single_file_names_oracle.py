#!/usr/bin/env python3
"""The full-size SD2.1 single-file name table, checked against diffusers' own loader.

Usage: python3 tools/single_file_names_oracle.py [--out tests/fixtures/single-file/sd21-names.json]

For every tensor of the SD2.1 UNet, VAE and text encoder (the manifests in
tests/fixtures/sd2.1-configs/manifests) it computes the original (LDM) name with
tools/make_single_file.py's conversion, builds a tagged state dict under those names (one
small tensor per name, holding its index; a fused in_proj holds row numbers), and runs it
through diffusers' `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint` and
`convert_open_clip_checkpoint` (what `from_single_file` does). Every diffusers name must
come back holding its own tag (and q/k/v their own thirds). The table
{component: {diffusers name: [original name, third or null]}} is what
tests/single_file.rs checks the Rust name map against, so the full-size mapping is verified
without a 5 GB checkpoint.
"""
import argparse
import json
import os
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(__file__))
import make_single_file as msf  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)

CFG = "tests/fixtures/sd2.1-configs"


def names(comp):
    with open(f"{CFG}/manifests/{comp}.json") as f:
        return [t["name"] for t in json.load(f)["tensors"]]


def config(comp):
    with open(f"{CFG}/stable-diffusion-2-1/{comp}/config.json") as f:
        return json.load(f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/single-file/sd21-names.json")
    a = ap.parse_args()
    table = {}

    ucfg = config("unet")
    un = names("unet")
    ldm = {"model.diffusion_model." + msf.unet_name(n, ucfg): torch.tensor([float(i)]) for i, n in enumerate(un)}
    back = convert_ldm_unet_checkpoint(ldm, ucfg)
    rev = {"model.diffusion_model." + msf.unet_name(n, ucfg): n for n in un}
    for i, n in enumerate(un):
        if n not in back or back[n].item() != i:
            sys.exit(f"unet {n}: diffusers maps {[k for k, v in rev.items() if v == n]} elsewhere")
    table["unet"] = {n: ["model.diffusion_model." + msf.unet_name(n, ucfg), None] for n in un}

    vcfg = config("vae")
    vn = names("vae")
    ldm = {"first_stage_model." + msf.vae_name(n, vcfg): torch.tensor([float(i)]) for i, n in enumerate(vn)}
    back = convert_ldm_vae_checkpoint(ldm, vcfg)
    for i, n in enumerate(vn):
        if n not in back or back[n].flatten()[0].item() != i:
            sys.exit(f"vae {n}: not mapped back by diffusers")
    table["vae"] = {n: ["first_stage_model." + msf.vae_name(n, vcfg), None] for n in vn}

    tcfg = config("text_encoder")
    h = tcfg["hidden_size"]
    tn = names("text_encoder")
    # The HF -> OpenCLIP renaming of make_single_file, on tagged tensors.
    tagged = {}
    for i, n in enumerate(tn):
        rows = 1 if "layer_norm" in n or "final" in n or "embedding" in n else h
        tagged[n] = torch.full((rows, 1), float(i) * 1e4) + torch.arange(rows, dtype=torch.float32).reshape(rows, 1)
    ldm = {"cond_stage_model.model." + k: v for k, v in msf.text_names(tagged).items()}
    model = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=h))
    back = {k.removeprefix("text_model."): v for k, v in convert_open_clip_checkpoint(model, ldm).items()}
    te = {}
    for i, n in enumerate(tn):
        if n not in back or not torch.equal(back[n], tagged[n]):
            sys.exit(f"text_encoder {n}: not mapped back by diffusers")
    # Which original tensor (and third) each name came from: found by its tag.
    for k, v in ldm.items():
        first = v.flatten()
        for third in range(3 if "in_proj" in k else 1):
            tag = first[third * h].item() if "in_proj" in k else first[0].item()
            n = tn[int(tag // 1e4)]
            te[n] = [k, third if "in_proj" in k else None]
    table["text_encoder"] = te
    with open(a.out, "w") as f:
        json.dump(table, f, indent=0, sort_keys=True)
    print(f"{a.out}: {sum(len(v) for v in table.values())} names, all mapped back by diffusers' loader")


if __name__ == "__main__":
    main()
