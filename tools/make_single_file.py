#!/usr/bin/env python3
"""Builds single-file (original Stability / LDM layout) versions of a diffusers SD2 folder,
checks them with diffusers' own loader, and writes the malformed / malicious inputs the
tests refuse.

Usage: python3 tools/make_single_file.py [--model tests/fixtures/tiny-sd2-eps]
                                         [--out tests/fixtures/single-file] [--dtype f16]

Writes into --out:
  tiny-sd2-eps.f16.safetensors  state dict in the original layout (model.diffusion_model.*,
                                first_stage_model.*, cond_stage_model.model.* with fused
                                in_proj), as diffusers' scripts/convert_diffusers_to_original_
                                stable_diffusion.py lays it out
  tiny-sd2-eps.f16.ckpt         the same tensors saved by torch.save({"state_dict": ...,
                                "global_step": ...}) (PyTorch zip + pickle)
  malicious-os-system.ckpt      a torch-style zip whose data.pkl calls os.system
  malicious-os-system.pkl       the bare pickle

The conversion is written here (not copied from diffusers) and differs from the script where
the script only fits full-size SD: SD2 is detected from the configs (the text encoder's
`gelu` activation and the UNet's linear projections), not from a 23rd text-encoder layer, and
block / level counts come from the configs instead of being fixed at 4. Every tensor of the
result is then loaded back with `StableDiffusionPipeline.from_single_file(..., config=MODEL)`
and compared with the folder's weights (cast to --dtype) exactly.
"""
import argparse
import io
import json
import os
import pickle
import sys
import zipfile

import torch
from safetensors.torch import load_file, save_file


def load_config(model, comp):
    with open(os.path.join(model, comp, "config.json")) as f:
        return json.load(f)


def weights(model, comp):
    d = os.path.join(model, comp)
    files = [f for f in sorted(os.listdir(d)) if f.endswith(".safetensors")]
    out = {}
    for f in files:
        out.update(load_file(os.path.join(d, f)))
    return out


RESNET = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."),
          ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."), ("conv_shortcut.", "skip_connection.")]


def unet_name(name, cfg):
    lpb = cfg["layers_per_block"]
    step = lpb + 1
    up_attn = [t.startswith("CrossAttn") for t in cfg["up_block_types"]]
    fixed = {"conv_in.": "input_blocks.0.0.", "time_embedding.linear_1.": "time_embed.0.",
             "time_embedding.linear_2.": "time_embed.2.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
    for d, o in fixed.items():
        if name.startswith(d):
            return o + name[len(d):]

    def res(rest):
        for d, o in RESNET:
            if rest.startswith(d):
                return o + rest[len(d):]
        return rest

    parts = name.split(".")
    if parts[0] == "down_blocks":
        i = int(parts[1])
        if parts[2] == "resnets":
            return f"input_blocks.{i * step + int(parts[3]) + 1}.0." + res(".".join(parts[4:]))
        if parts[2] == "attentions":
            return f"input_blocks.{i * step + int(parts[3]) + 1}.1." + ".".join(parts[4:])
        if parts[2] == "downsamplers":
            return f"input_blocks.{(i + 1) * step}.0.op." + ".".join(parts[5:])
    if parts[0] == "mid_block":
        if parts[1] == "resnets":
            return f"middle_block.{2 * int(parts[2])}." + res(".".join(parts[3:]))
        if parts[1] == "attentions":
            return "middle_block.1." + ".".join(parts[3:])
    if parts[0] == "up_blocks":
        i = int(parts[1])
        if parts[2] == "resnets":
            return f"output_blocks.{i * step + int(parts[3])}.0." + res(".".join(parts[4:]))
        if parts[2] == "attentions":
            return f"output_blocks.{i * step + int(parts[3])}.1." + ".".join(parts[4:])
        if parts[2] == "upsamplers":
            return f"output_blocks.{i * step + lpb}.{2 if up_attn[i] else 1}.conv." + ".".join(parts[5:])
    raise ValueError(f"unet tensor {name} has no original name")


def vae_name(name, cfg):
    n = len(cfg["block_out_channels"])
    parts = name.split(".")
    res = lambda rest: rest.replace("conv_shortcut.", "nin_shortcut.")
    if parts[0] in ("quant_conv", "post_quant_conv") or parts[1] in ("conv_in", "conv_out"):
        return name
    side = parts[0]
    if parts[1] == "conv_norm_out":
        return f"{side}.norm_out." + ".".join(parts[2:])
    if parts[1] == "mid_block":
        if parts[2] == "resnets":
            return f"{side}.mid.block_{int(parts[3]) + 1}." + res(".".join(parts[4:]))
        attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v"}
        rest = parts[4:]
        if rest[0] == "to_out":
            rest = ["proj_out"] + rest[2:]
        else:
            rest = [attn[rest[0]]] + rest[1:]
        return f"{side}.mid.attn_1." + ".".join(rest)
    i = int(parts[2])
    if side == "encoder":
        if parts[3] == "resnets":
            return f"encoder.down.{i}.block.{parts[4]}." + res(".".join(parts[5:]))
        return f"encoder.down.{i}.downsample.conv." + ".".join(parts[6:])
    level = n - 1 - i
    if parts[3] == "resnets":
        return f"decoder.up.{level}.block.{parts[4]}." + res(".".join(parts[5:]))
    return f"decoder.up.{level}.upsample.conv." + ".".join(parts[6:])


def text_names(sd):
    """transformers CLIPTextModel names -> OpenCLIP names, q/k/v fused into in_proj."""
    out, qkv = {}, {}
    for k, v in sd.items():
        k = k.removeprefix("text_model.")
        if k == "embeddings.position_ids":
            continue
        if k == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = v
        elif k == "embeddings.position_embedding.weight":
            out["positional_embedding"] = v
        elif k.startswith("final_layer_norm."):
            out["ln_final." + k.split(".", 1)[1]] = v
        else:
            p = k.split(".")
            assert p[0] == "encoder" and p[1] == "layers", k
            base = f"transformer.resblocks.{p[2]}."
            rest = ".".join(p[3:])
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                which, wb = rest.split(".")[1][0], rest.split(".")[2]
                qkv.setdefault((base, wb), {})[which] = v
                continue
            for d, o in [("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."),
                         ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj.")]:
                if rest.startswith(d):
                    out[base + o + rest[len(d):]] = v
                    break
            else:
                raise ValueError(f"text encoder tensor {k} has no original name")
    for (base, wb), t in qkv.items():
        out[base + "attn.in_proj_" + wb] = torch.cat([t["q"], t["k"], t["v"]])
    return out


def convert(model, dtype):
    unet_cfg, vae_cfg, te_cfg = (load_config(model, c) for c in ("unet", "vae", "text_encoder"))
    is_sd2 = te_cfg.get("hidden_act") == "gelu" and unet_cfg.get("use_linear_projection", False)
    if not is_sd2:
        sys.exit("not an SD2 model (text encoder hidden_act != gelu or no linear projections)")
    sd = {}
    for k, v in weights(model, "unet").items():
        sd["model.diffusion_model." + unet_name(k, unet_cfg)] = v
    for k, v in weights(model, "vae").items():
        o = vae_name(k, vae_cfg)
        if ".mid.attn_1." in o and o.endswith(".weight") and v.ndim == 2:
            v = v.reshape(*v.shape, 1, 1)  # Linear -> 1x1 conv, as in the original VAE
        sd["first_stage_model." + o] = v
    for k, v in text_names(weights(model, "text_encoder")).items():
        sd["cond_stage_model.model." + k] = v
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def check_with_diffusers(path, model, dtype):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(path, config=model, local_files_only=True,
                                                    torch_dtype=dtype, safety_checker=None)
    n = 0
    for comp in ("unet", "vae", "text_encoder"):
        ref = {k.removeprefix("text_model."): v for k, v in weights(model, comp).items()}
        got = {k.removeprefix("text_model."): v for k, v in getattr(pipe, comp).state_dict().items()}
        for k, v in ref.items():
            if k.endswith("position_ids"):
                continue
            if k not in got:
                sys.exit(f"{path}: diffusers did not load {comp}.{k}")
            if not torch.equal(got[k], v.to(dtype)):
                sys.exit(f"{path}: {comp}.{k} differs after from_single_file")
            n += 1
    print(f"{path}: diffusers from_single_file loads all {n} tensors bit for bit")


class Evil:
    def __reduce__(self):
        return (os.system, ("echo sdsparse-pwned > /tmp/sdsparse-pwned",))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tests/fixtures/tiny-sd2-eps")
    ap.add_argument("--out", default="tests/fixtures/single-file")
    ap.add_argument("--dtype", default="f16", choices=["f16", "f32"])
    a = ap.parse_args()
    dtype = torch.float16 if a.dtype == "f16" else torch.float32
    os.makedirs(a.out, exist_ok=True)
    name = os.path.basename(os.path.normpath(a.model))
    sd = convert(a.model, dtype)
    st = os.path.join(a.out, f"{name}.{a.dtype}.safetensors")
    save_file(sd, st)
    check_with_diffusers(st, a.model, dtype)
    ck = os.path.join(a.out, f"{name}.{a.dtype}.ckpt")
    torch.save({"state_dict": sd, "global_step": 1234}, ck)
    check_with_diffusers(ck, a.model, dtype)

    evil = pickle.dumps({"state_dict": {"x": Evil()}}, protocol=2)
    with open(os.path.join(a.out, "malicious-os-system.pkl"), "wb") as f:
        f.write(evil)
    with zipfile.ZipFile(os.path.join(a.out, "malicious-os-system.ckpt"), "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", evil)
        z.writestr("archive/version", "3\n")
    for f in sorted(os.listdir(a.out)):
        print(f"{os.path.join(a.out, f)}: {os.path.getsize(os.path.join(a.out, f))} bytes")


if __name__ == "__main__":
    main()
