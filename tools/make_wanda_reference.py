#!/usr/bin/env python3
"""Makes the Wanda / OWL reference for the tiny fixture with transformers / diffusers hooks (CPU, float32).

Independent of sdsparse's Rust code: calibration runs in PyTorch with forward pre-hooks on every
nn.Linear, the scores, masks and OWL allocation are computed here with torch / numpy, following
docs/PRUNING.md (Wanda: Sun et al. 2023; OWL: Yin et al. 2024, official lib/prune.py semantics).

Calibration (what `sdsparse convert --method wanda|owl` does, see src/calibrate.rs):
  captions   the first N lines of assets/calibration_prompts.txt
  text       text_encoder(tokenizer(caption, padding=max_length 77)) for every caption
  unet       per caption i: StableDiffusionPipeline with DDIMScheduler (fixture config), STEPS steps,
             guidance 7.5, negative prompt "", latents = sdsparse's GaussianNoise(seed=SEED+i)
             (xoshiro256** + Box-Muller, ported below), output_type="latent"
  stats      per Linear: sum over all tokens of x_j^2 (float64) and the token count T

Scores and masks, per component (text_encoder: every Linear of the encoder layers; unet: every Linear):
  score      |W_ij| * sqrt(sum_sq_j / T) in float32
  wanda      per output row the floor(S*cols) lowest scores pruned (stable order: ties to lower index)
  wanda24    in each group of 4 along a row the 2 lowest pruned (ties to lower index)
  wanda_global  one cut over all layers' scores of the component (floor(S*total) lowest)
  owl        groups = transformer blocks (name up to layers.N / transformer_blocks.N, else the layer);
             ratio = share of group scores > M * mean(group scores); D' = (D-min)/(max-min)*2*lambda;
             S_g = S + weighted_mean(D') - D'_g (weights = group params), clamped to [0, 0.99];
             then wanda per row at S_g
Masks are keep bitmaps [rows, ceil(cols/8)], LSB first (sdsparse's layout).

Writes tests/fixtures/wanda-reference/{reference.safetensors, reference.json}.
Usage: python3 tools/make_wanda_reference.py [N captions, default 16] [steps, default 4]
"""
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import diffusers
import transformers
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors.numpy import save_file

N = int(sys.argv[1]) if len(sys.argv) > 1 else 16
STEPS = int(sys.argv[2]) if len(sys.argv) > 2 else 4
SEED = 0
GUIDANCE = 7.5
S = 0.5
OWL_M, OWL_LAMBDA = 5.0, 0.08
fixture = Path("tests/fixtures/tiny-sd2-eps")
out_dir = Path("tests/fixtures/wanda-reference")
captions = [l.strip() for l in Path("assets/calibration_prompts.txt").read_text().splitlines() if l.strip()][:N]

M64 = (1 << 64) - 1


class GaussianNoise:
    """sdsparse::pipeline::GaussianNoise: xoshiro256** seeded by SplitMix64, Box-Muller pairs."""

    def __init__(self, seed):
        z = seed
        self.s = []
        for _ in range(4):
            z = (z + 0x9E3779B97F4A7C15) & M64
            x = z
            x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
            x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
            self.s.append(x ^ (x >> 31))
        self.spare = None

    @staticmethod
    def rotl(x, k):
        return ((x << k) | (x >> (64 - k))) & M64

    def next_u64(self):
        s = self.s
        result = (self.rotl((s[1] * 5) & M64, 7) * 9) & M64
        t = (s[1] << 17) & M64
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = self.rotl(s[3], 45)
        return result

    def uniform(self):
        return ((self.next_u64() >> 11) + 1.0) / float(1 << 53)

    def next_normal(self):
        if self.spare is not None:
            v, self.spare = self.spare, None
            return v
        u1, u2 = self.uniform(), self.uniform()
        r = math.sqrt(-2.0 * math.log(u1))
        theta = 2.0 * math.pi * u2
        self.spare = np.float32(r * math.sin(theta))
        return np.float32(r * math.cos(theta))

    def take(self, n):
        return np.array([self.next_normal() for _ in range(n)], dtype=np.float32)


torch.set_num_threads(2)
pipe = StableDiffusionPipeline.from_pretrained(
    str(fixture), dtype=torch.float32, safety_checker=None, feature_extractor=None, requires_safety_checker=False
)
pipe.set_progress_bar_config(disable=True)
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)


def linears(module, strip=""):
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear):
            n = name[len(strip):] if strip and name.startswith(strip) else name
            out[n + ".weight"] = m
    return out


def record(mods):
    stats, handles = {}, []
    for name, m in mods.items():
        def hook(mod, args, name=name):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            s = stats.setdefault(name, [torch.zeros(x.shape[1], dtype=torch.float64), 0])
            s[0] += (x * x).sum(0)
            s[1] += x.shape[0]
        handles.append(m.register_forward_pre_hook(hook))
    return stats, handles


comps = {
    "text_encoder": linears(pipe.text_encoder, "text_model."),
    "unet": linears(pipe.unet),
}
comps["text_encoder"] = {k: v for k, v in comps["text_encoder"].items() if k.startswith("encoder.layers.")}

with torch.no_grad():
    stats_te, hs = record(comps["text_encoder"])
    for i in range(0, len(captions), 8):
        ids = pipe.tokenizer(
            captions[i : i + 8], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        pipe.text_encoder(ids)
    [h.remove() for h in hs]

    stats_unet, hs = record(comps["unet"])
    size = pipe.unet.config.sample_size
    timesteps = None
    for i, c in enumerate(captions):
        lat = torch.from_numpy(GaussianNoise(SEED + i).take(4 * size * size)).reshape(1, 4, size, size)
        pipe(prompt=c, negative_prompt="", num_inference_steps=STEPS, guidance_scale=GUIDANCE,
             latents=lat, output_type="latent")
        timesteps = [int(t) for t in pipe.scheduler.timesteps]
    [h.remove() for h in hs]


def owl_group(name):
    p = name.split(".")
    for i in range(len(p) - 1):
        if p[i] in ("layers", "transformer_blocks") and p[i + 1].isdigit():
            return ".".join(p[: i + 2])
    return name[: -len(".weight")] if name.endswith(".weight") else name


def pack(prune):
    """bool [rows, cols] pruned -> keep bitmap [rows, ceil(cols/8)], LSB first."""
    keep = ~prune
    rows, cols = keep.shape
    pad = (-cols) % 8
    keep = np.concatenate([keep, np.zeros((rows, pad), bool)], axis=1)
    return np.packbits(keep.reshape(rows, -1, 8), axis=2, bitorder="little").reshape(rows, -1)


def rowwise(score, per_row):
    order = np.argsort(score, axis=1, kind="stable")[:, :per_row]
    prune = np.zeros(score.shape, bool)
    np.put_along_axis(prune, order, True, axis=1)
    return prune


def sparse24(score):
    rows, cols = score.shape
    g = score.reshape(rows, cols // 4, 4)
    order = np.argsort(g, axis=2, kind="stable")[:, :, :2]
    prune = np.zeros(g.shape, bool)
    np.put_along_axis(prune, order, True, axis=2)
    return prune.reshape(rows, cols)


tensors, meta_comps = {}, {}
for comp, stats in [("text_encoder", stats_te), ("unet", stats_unet)]:
    names = list(comps[comp].keys())
    scores, layer_meta = {}, {}
    for n in names:
        W = comps[comp][n].weight.detach().float()
        ss, T = stats[n]
        rms = torch.sqrt(ss / T).float()
        sc = (W.abs() * rms.reshape(1, -1)).numpy().astype(np.float32)
        scores[n] = sc
        tensors[f"{comp}/{n}/sum_sq"] = ss.numpy()
        tensors[f"{comp}/{n}/score"] = sc
        rows, cols = sc.shape
        tensors[f"{comp}/{n}/mask_wanda"] = pack(rowwise(sc, int(math.floor(S * cols))))
        if cols % 4 == 0:
            tensors[f"{comp}/{n}/mask_wanda24"] = pack(sparse24(sc))
        layer_meta[n] = {"shape": [rows, cols], "tokens": int(T), "owl_group": owl_group(n)}
    # global: one stable order over the concatenated scores (layer order = `names`, then index)
    flat = np.concatenate([scores[n].ravel() for n in names])
    k = int(math.floor(S * flat.size))
    cut = np.zeros(flat.size, bool)
    cut[np.argsort(flat, kind="stable")[:k]] = True
    off = 0
    for n in names:
        sz = scores[n].size
        tensors[f"{comp}/{n}/mask_wanda_global"] = pack(cut[off : off + sz].reshape(scores[n].shape))
        off += sz
    # OWL
    groups = []
    for n in names:
        g = owl_group(n)
        if g not in groups:
            groups.append(g)
    ratios, params = [], []
    for g in groups:
        allsc = np.concatenate([scores[n].ravel() for n in names if owl_group(n) == g]).astype(np.float64)
        thr = allsc.mean() * OWL_M
        ratios.append(float((allsc > thr).sum()) / allsc.size)
        params.append(allsc.size)
    ratios_a, params_a = np.array(ratios), np.array(params, dtype=np.float64)
    if ratios_a.max() > ratios_a.min():
        d = (ratios_a - ratios_a.min()) / (ratios_a.max() - ratios_a.min()) * 2 * OWL_LAMBDA
    else:
        d = np.zeros_like(ratios_a)
    sp = np.clip(S + (d * params_a).sum() / params_a.sum() - d, 0.0, 0.99)
    for n in names:
        s_g = sp[groups.index(owl_group(n))]
        cols = scores[n].shape[1]
        tensors[f"{comp}/{n}/mask_owl"] = pack(rowwise(scores[n], int(math.floor(s_g * cols))))
    meta_comps[comp] = {
        "layers": layer_meta,
        "owl_groups": [
            {"name": g, "params": int(p), "outlier_ratio": r, "sparsity": float(s)}
            for g, p, r, s in zip(groups, params, ratios, sp)
        ],
    }

out_dir.mkdir(parents=True, exist_ok=True)
save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out_dir / "reference.safetensors"))
meta = {
    "made_by": "tools/make_wanda_reference.py",
    "fixture": str(fixture),
    "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__},
    "captions": N,
    "caption_file": "assets/calibration_prompts.txt (first N lines)",
    "unet_steps": STEPS,
    "unet_timesteps": timesteps,
    "seed": SEED,
    "guidance": GUIDANCE,
    "sparsity": S,
    "owl_m": OWL_M,
    "owl_lambda": OWL_LAMBDA,
    "components": meta_comps,
}
(out_dir / "reference.json").write_text(json.dumps(meta, indent=1) + "\n")
print("wrote", out_dir, len(tensors), "tensors")
for comp in meta_comps:
    print(comp, [(g["name"], round(g["outlier_ratio"], 5), round(g["sparsity"], 4)) for g in meta_comps[comp]["owl_groups"]])
