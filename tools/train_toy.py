#!/usr/bin/env python3
"""Train the toy SD2 ("toy-shapes") from scratch on CPU: the model `sdsparse demo` and `sdsparse sweep` use.

What it makes: a tiny Stable Diffusion 2 family pipeline in diffusers layout (f16 safetensors):
  - CLIPTextModel (real SD2 tokenizer and its 49408-token vocabulary, hidden 64, 2 layers),
  - UNet2DConditionModel of the SD2 family (linear projection, cross-attention, attention_head_dim as heads),
  - AutoencoderKL (downsample factor 4: 64x64 images <-> 4x16x16 latents),
  - SD2.1-base's DDIM scheduler config (epsilon prediction, scaled_linear betas),
  - task.json: the caption grammar and the palette the task score decodes against.

Data: synthetic 64x64 images made here (no downloads): one filled circle, square or triangle of one colour on a
uniform background of another colour (red, green, blue, yellow, white, black; plain sRGB values, no anti-aliasing),
random size (20..44 px) and position; caption `a {colour} {shape} on a {colour} background`.

Training: (1) the VAE alone (reconstruction + a tiny KL term); (2) the latents of a fixed image set are
precomputed; (3) UNet and text encoder jointly (epsilon MSE, 10% empty captions for classifier-free guidance),
exported from an EMA of the weights. Steps are fixed by flags, so the same seed gives the same weights on the
same machine (torch CPU kernels with a fixed thread count); `--max-minutes` is a safety stop whose actual step
counts are recorded in train_info.json (rerun with those counts to reproduce such a run).

The output folder is written every `--save-every-min` minutes (to OUT.tmp, then renamed), so a partial run is usable.

Usage (from scratch; the committed model is a chain of runs, recorded in its train_info.json):
  nice -n 19 python3 tools/train_toy.py --out assets/toy-shapes --offset-noise 0.25 --high-t-fraction 0.5 --threads 1
The committed UNet is the wider one (channels 32/64, 1.0 M parameters; the 16/32 one, 0.26 M, had too little
redundancy to keep its quality at the study's 35%), trained fresh on the VAE and text encoder of a 16/32 run:
  python3 tools/train_toy.py --out OUT --init-from PREVIOUS --unet-channels 32,64 --offset-noise 0.25 \
      --high-t-fraction 0.5 --threads 1 --lr 1e-3 --unet-steps 16000
Offset noise matters most: without it the model reads the background colour off the noisy latent's mean
instead of the caption (dense task score 0.25 without, 0.92 with; docs/STUDY.md).
Needs: pip install torch diffusers transformers safetensors numpy pillow
"""
import argparse
import copy
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_DIR = os.path.join(ROOT, "tests", "fixtures", "sd2-tokenizer")
SCHEDULER_CONFIG = os.path.join(
    ROOT, "tests", "fixtures", "sd2.1-configs", "stable-diffusion-2-1-base", "scheduler", "scheduler_config.json"
)

COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
COLOUR_NAMES = list(COLOURS)
SHAPES = ["circle", "square", "triangle"]
IMAGE_SIZE = 64
SIZE_RANGE = (20.0, 44.0)  # circle diameter, square side, triangle base (= height), in pixels
MARGIN = 2.0  # the shape stays this many pixels inside the border
TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")
GRAMMAR = "a {shape_colour} {shape} on a {background_colour} background"


def caption(fg, shape, bg):
    return GRAMMAR.format(shape_colour=COLOUR_NAMES[fg], shape=SHAPES[shape], background_colour=COLOUR_NAMES[bg])


def render(fg, shape, bg, size, cx, cy):
    """One 64x64 RGB uint8 image: a filled shape of extent `size` centred at (cx, cy) (pixel units)."""
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5  # pixel centres
    h = size / 2
    if shape == 0:  # circle of diameter `size`
        inside = (xs - cx) ** 2 + (ys - cy) ** 2 <= h * h
    elif shape == 1:  # axis-aligned square of side `size`
        inside = (np.abs(xs - cx) <= h) & (np.abs(ys - cy) <= h)
    else:  # upright isosceles triangle, base `size` at the bottom, height `size`
        top = cy - h
        inside = (ys >= top) & (ys <= cy + h) & (np.abs(xs - cx) <= (ys - top) / 2)
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    img[:] = COLOURS[COLOUR_NAMES[bg]]
    img[inside] = COLOURS[COLOUR_NAMES[fg]]
    return img


def sample_scene(rng):
    shape = int(rng.integers(3))
    fg, bg = (int(v) for v in rng.choice(len(COLOUR_NAMES), 2, replace=False))
    size = float(rng.uniform(*SIZE_RANGE))
    lo, hi = size / 2 + MARGIN, IMAGE_SIZE - size / 2 - MARGIN
    cx, cy = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
    return fg, shape, bg, size, cx, cy


def scene_id(fg, shape, bg):
    return (fg * len(COLOUR_NAMES) + bg) * len(SHAPES) + shape


def make_dataset(rng, n):
    """n random scenes: images [n, 3, 64, 64] in [-1, 1] and scene ids (see scene_id)."""
    imgs = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    ids = []
    for i in range(n):
        fg, shape, bg, size, cx, cy = sample_scene(rng)
        imgs[i] = render(fg, shape, bg, size, cx, cy)
        ids.append(scene_id(fg, shape, bg))
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, np.array(ids)


def build_models(unet_channels=(16, 32)):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=64,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    text_encoder = CLIPTextModel(text_config)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=tuple(unet_channels),
        # Attention at the 8x8 level and in the mid block only (the 16x16 level is convolutions): the CPU budget.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=(1, 2),  # SD2's config names the head count attention_head_dim
        use_linear_projection=True,
        norm_num_groups=8,
        flip_sin_to_cos=True,
        freq_shift=0,
        act_fn="silu",
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    return text_encoder, unet, vae


def tokenize(tokenizer, caps):
    return tokenizer(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def ema_update(ema, model, decay):
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.mul_(decay).add_(p.detach(), alpha=1 - decay)


def save_folder(out, text_encoder, unet, vae, info):
    """Writes the diffusers folder (f16) to OUT.tmp and renames it over OUT."""
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    copy.deepcopy(text_encoder).half().save_pretrained(os.path.join(tmp, "text_encoder"))
    copy.deepcopy(unet).half().save_pretrained(os.path.join(tmp, "unet"))
    copy.deepcopy(vae).half().save_pretrained(os.path.join(tmp, "vae"))
    os.makedirs(os.path.join(tmp, "tokenizer"))
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(TOKENIZER_DIR, name), os.path.join(tmp, "tokenizer", name))
    os.makedirs(os.path.join(tmp, "scheduler"))
    shutil.copy(SCHEDULER_CONFIG, os.path.join(tmp, "scheduler", "scheduler_config.json"))
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": __import__("diffusers").__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    with open(os.path.join(tmp, "model_index.json"), "w") as f:
        json.dump(model_index, f, indent=1)
    task = {
        "task": "shapes",
        "grammar": GRAMMAR,
        "colours": {k: list(v) for k, v in COLOURS.items()},
        "shapes": SHAPES,
        "image_size": IMAGE_SIZE,
        "shape_size_px": list(SIZE_RANGE),
        "rules": "shape colour differs from background colour; one filled shape, upright triangle, axis-aligned square",
        "made_by": "tools/train_toy.py",
    }
    with open(os.path.join(tmp, "task.json"), "w") as f:
        json.dump(task, f, indent=1)
    with open(os.path.join(tmp, "train_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.rename(tmp, out)


@torch.no_grad()
def sample_grid(path, text_encoder, unet, vae, tokenizer, scaling, prompts, steps=20, guidance=7.5, seed=0):
    """A quick DDIM sample of each prompt (monitoring only), saved as one PNG row."""
    from diffusers import DDIMScheduler
    from PIL import Image

    sched = DDIMScheduler.from_pretrained(os.path.dirname(SCHEDULER_CONFIG))
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    n = len(prompts)
    cond = text_encoder(tokenize(tokenizer, prompts))[0]
    uncond = text_encoder(tokenize(tokenizer, [""] * n))[0]
    lat = torch.randn((n, 4, 16, 16), generator=g)
    for t in sched.timesteps:
        eps = unet(torch.cat([lat, lat]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
        eu, ec = eps.chunk(2)
        lat = sched.step(eu + guidance * (ec - eu), t, lat).prev_sample
    img = vae.decode(lat / scaling).sample.clamp(-1, 1)
    img = ((img + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    Image.fromarray(np.concatenate(list(img), axis=1)).save(path)


def finetune_decoder(args):
    """Phase 4: the VAE decoder alone, the encoder frozen (so the latent space, and with it the
    UNet, stays valid). Shape pixels weigh more in the loss than background pixels: they are
    fewer, and a wrong shape colour is what the task score sees."""
    from diffusers import AutoencoderKL

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed + 1)
    rng = np.random.default_rng(args.seed + 1)
    vae_dir = os.path.join(args.finetune_decoder, "vae")
    vae = AutoencoderKL.from_pretrained(vae_dir).float()
    t0 = time.time()
    for p in vae.parameters():
        p.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr / 2, weight_decay=0.0)
    last_save = time.time()

    def save():
        tmp = vae_dir.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        copy.deepcopy(vae).half().save_pretrained(tmp)
        shutil.rmtree(vae_dir)
        os.rename(tmp, vae_dir)

    for step in range(args.decoder_steps):
        if (time.time() - t0) / 60 > args.max_minutes:
            break
        x, _ = make_dataset(rng, args.vae_batch)
        with torch.no_grad():
            post = vae.encode(x).latent_dist
            z = post.sample()
        rec = vae.decode(z).sample
        bg = x[:, :, :1, :1]  # the corner pixel is background (shapes keep a margin)
        weight = 1.0 + 4.0 * ((x - bg).abs().sum(1, keepdim=True) > 0.1).float()
        loss = (weight * ((rec - x) ** 2 + 0.5 * (rec - x).abs())).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"[{(time.time() - t0) / 60:6.1f} min] decoder step {step}: loss {loss.item():.4f}", flush=True)
        if time.time() - last_save > args.save_every_min * 60:
            save()
            last_save = time.time()
    save()
    info_path = os.path.join(args.finetune_decoder, "train_info.json")
    if os.path.exists(info_path):
        with open(info_path) as f:
            info = json.load(f)
        info["decoder_finetune_steps_done"] = step + 1
        with open(info_path, "w") as f:
            json.dump(info, f, indent=1)
    print(f"decoder fine-tuned for {step + 1} steps: {vae_dir}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default=None, help="monitoring samples and logs (default: OUT.work)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vae-steps", type=int, default=600)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--images", type=int, default=10000, help="size of the fixed UNet training set")
    ap.add_argument("--unet-steps", type=int, default=6000)
    ap.add_argument("--unet-batch", type=int, default=32)
    ap.add_argument("--caption-groups", type=int, default=8, help="distinct captions per UNet batch")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--max-minutes", type=float, default=1e9, help="safety stop for the whole run (wall clock)")
    ap.add_argument("--vae-max-minutes", type=float, default=1e9, help="safety stop for the VAE phase")
    ap.add_argument("--save-every-min", type=float, default=5.0)
    ap.add_argument("--resume", metavar="DIR", default=None,
                    help="continue UNet + text encoder training from a saved folder (VAE phase skipped)")
    ap.add_argument("--init-from", metavar="DIR", default=None,
                    help="take the VAE and text encoder of a trained folder and train a NEW UNet (--unet-channels) "
                         "with the text encoder (VAE phase skipped; the latent space is kept)")
    ap.add_argument("--unet-channels", default="16,32",
                    help="the UNet's block_out_channels (two levels), e.g. 32,64 (more redundancy to prune)")
    ap.add_argument("--high-t-fraction", type=float, default=0.0,
                    help="fraction of each UNet batch with timesteps drawn from [600, 1000)")
    ap.add_argument("--offset-noise", type=float, default=0.0,
                    help="std of a per-sample, per-channel constant added to the UNet's training noise (offset noise)")
    ap.add_argument("--finetune-decoder", metavar="DIR", default=None,
                    help="phase 4 only: fine-tune the VAE decoder of the folder DIR in place (encoder frozen)")
    ap.add_argument("--decoder-steps", type=int, default=2000)
    args = ap.parse_args()
    if args.init_from and args.resume:
        ap.error("--init-from (a new UNet) and --resume (the saved UNet) exclude each other")
    if args.finetune_decoder:
        return finetune_decoder(args)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    work = args.work or args.out.rstrip("/") + ".work"
    os.makedirs(work, exist_ok=True)
    t0 = time.time()
    elapsed_min = lambda: (time.time() - t0) / 60  # noqa: E731

    def log(msg):
        line = f"[{elapsed_min():6.1f} min] {msg}"
        print(line, flush=True)
        with open(os.path.join(work, "train.log"), "a") as f:
            f.write(line + "\n")

    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    unet_channels = tuple(int(c) for c in args.unet_channels.split(","))
    text_encoder, unet, vae = build_models(unet_channels)
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in
                (("text_encoder", text_encoder), ("unet", unet), ("vae", vae))}
    log(f"parameters: {n_params}")
    info = {"seed": args.seed, "threads": args.threads, "params": n_params, "args": vars(args),
            "torch": torch.__version__, "diffusers": __import__("diffusers").__version__}

    if args.init_from or args.resume:
        # --init-from: a fresh UNet on a trained folder's VAE (so its latent space and scaling factor) and text
        # encoder. --resume: continue from a saved folder's text encoder, UNet and VAE (the VAE is kept).
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        src = args.init_from or args.resume
        text_encoder = CLIPTextModel.from_pretrained(os.path.join(src, "text_encoder")).float()
        vae = AutoencoderKL.from_pretrained(os.path.join(src, "vae")).float()
        if args.resume:
            unet = UNet2DConditionModel.from_pretrained(os.path.join(src, "unet")).float()
        with open(os.path.join(src, "train_info.json")) as f:
            info["vae_and_text_encoder_from" if args.init_from else "resumed_from"] = json.load(f)
        vae_done = 0
        log(f"VAE and text encoder from {src}; new UNet {unet_channels}" if args.init_from else f"resumed from {src}")
    else:
        # ---- 1. VAE --------------------------------------------------------------------------------------------
        opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
        vae.train()
        vae_done = 0
        for step in range(args.vae_steps):
            if elapsed_min() > min(args.vae_max_minutes, args.max_minutes):
                log(f"VAE: time budget reached after {step} steps")
                break
            # 32x32 crops of the 64x64 images (the VAE is convolutional; a quarter of the cost per sample).
            x, _ = make_dataset(rng, args.vae_batch)
            oy, ox = (int(v) for v in rng.integers(0, 33, size=2))
            x = x[:, :, oy:oy + 32, ox:ox + 32]
            post = vae.encode(x).latent_dist
            z = post.sample(generator=None)
            rec = vae.decode(z).sample
            kl = post.kl().mean() / z[0].numel()
            loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-5 * kl
            opt.zero_grad()
            loss.backward()
            opt.step()
            vae_done = step + 1
            if step % 50 == 0:
                log(f"VAE step {step}: loss {loss.item():.4f} (kl {kl.item():.2f})")
    vae.eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    info["vae_steps_done"] = vae_done
    # The models actually trained (a resumed UNet keeps its own size, whatever --unet-channels says).
    info["params"] = {k: sum(p.numel() for p in m.parameters()) for k, m in
                      (("text_encoder", text_encoder), ("unet", unet), ("vae", vae))}

    # ---- 2. latents of a fixed image set ------------------------------------------------------------------
    xs, caps = make_dataset(rng, args.images)
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, args.images, 256):
            post = vae.encode(xs[i:i + 256]).latent_dist
            means.append(post.mean)
            stds.append(post.std)
        rec = vae.decode(means[0][:8]).sample
    mean, std = torch.cat(means), torch.cat(stds)
    if args.resume or args.init_from:
        scaling = float(vae.config.scaling_factor)
    else:
        scaling = float(1.0 / mean.std())
        vae.register_to_config(scaling_factor=scaling)
    rec_err = float((rec - xs[:8]).abs().mean())
    log(f"latents: {tuple(mean.shape)}, std {mean.std():.3f} -> scaling_factor {scaling:.4f}; "
        f"VAE mean abs reconstruction error {rec_err:.4f} (of 2)")
    info["scaling_factor"] = scaling
    info["vae_reconstruction_mae"] = rec_err
    # Token ids of every scene's caption (row = scene id) plus the empty caption (last row).
    n_scenes = len(COLOUR_NAMES) ** 2 * len(SHAPES)
    texts = [""] * (n_scenes + 1)
    for fg in range(len(COLOUR_NAMES)):
        for bg in range(len(COLOUR_NAMES)):
            for shape in range(len(SHAPES)):
                texts[scene_id(fg, shape, bg)] = caption(fg, shape, bg)
    token_ids = tokenize(tokenizer, texts)
    by_scene = {}
    for i, c in enumerate(caps):
        by_scene.setdefault(int(c), []).append(i)
    scenes = sorted(by_scene)

    # ---- 3. UNet + text encoder ---------------------------------------------------------------------------
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_pretrained(os.path.dirname(SCHEDULER_CONFIG))
    alphas = sched.alphas_cumprod.float()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ema_unet, ema_text = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    prompts = [caption(0, 0, 2), caption(1, 1, 4), caption(2, 2, 3), caption(3, 0, 5), caption(4, 1, 0)]
    last_save = time.time()
    losses = []
    unet.train()
    text_encoder.train()
    step = 0
    for step in range(args.unet_steps):
        if elapsed_min() > args.max_minutes:
            log(f"UNet: time budget reached after {step} steps")
            break
        # A batch is `groups` captions x (batch / groups) images each: the text encoder runs once per
        # caption (its cost is per sequence of 77 tokens, the same for every image of a caption).
        groups = args.caption_groups
        per = args.unet_batch // groups
        chosen = [scenes[int(j)] for j in rng.integers(len(scenes), size=groups)]
        idx = torch.tensor([by_scene[c][int(rng.integers(len(by_scene[c])))] for c in chosen for _ in range(per)])
        z0 = (mean[idx] + std[idx] * torch.randn_like(mean[idx])) * scaling
        text_rows = [n_scenes if rng.random() < 0.1 else c for c in chosen]  # 10% empty: guidance
        ids = token_ids[torch.tensor(text_rows)]
        t = torch.from_numpy(rng.integers(0, 1000, size=len(idx)))
        # The caption decides the image only at high noise (below it the noisy latents already show the
        # background colour), so the text is learnt from few timesteps: oversample them on request.
        high = torch.from_numpy(rng.random(len(idx)) < args.high_t_fraction)
        t = torch.where(high, torch.from_numpy(rng.integers(600, 1000, size=len(idx))), t)
        noise = torch.randn_like(z0)
        # Offset noise: SD2.1's schedule leaves sqrt(alpha_bar) ~ 0.07 of the image at t = 999, and the mean of a
        # 16x16 latent averages the noise down to 1/16, so a model can read the background colour off the noisy
        # latent instead of the caption; at inference (pure noise) that colour is then random. A constant offset
        # per channel hides the mean and makes the caption the only source of it.
        if args.offset_noise > 0:
            noise = noise + args.offset_noise * torch.randn(z0.shape[0], z0.shape[1], 1, 1)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        cond = text_encoder(ids)[0].repeat_interleave(per, dim=0)
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        lr = args.lr * min(1.0, (step + 1) / 50)
        for gparam in opt.param_groups:
            gparam["lr"] = lr
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.995, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text_encoder, decay)
        losses.append(loss.item())
        if step % 25 == 0:
            log(f"UNet step {step}: loss {np.mean(losses[-25:]):.4f}")
        if time.time() - last_save > args.save_every_min * 60:
            info["unet_steps_done"] = step + 1
            info["minutes"] = elapsed_min()
            save_folder(args.out, ema_text, ema_unet, vae, info)
            sample_grid(os.path.join(work, f"sample_{step + 1:05d}.png"), ema_text.eval(), ema_unet.eval(), vae,
                        tokenizer, scaling, prompts)
            log(f"saved {args.out} at step {step + 1}; sample in {work}")
            last_save = time.time()
    info["unet_steps_done"] = len(losses)
    info["final_loss"] = float(np.mean(losses[-100:])) if losses else None
    info["minutes"] = elapsed_min()
    save_folder(args.out, ema_text, ema_unet, vae, info)
    sample_grid(os.path.join(work, "sample_final.png"), ema_text.eval(), ema_unet.eval(), vae, tokenizer, scaling,
                prompts)
    log(f"done: {info}")


if __name__ == "__main__":
    sys.exit(main())
