#!/usr/bin/env python3
"""Predicts the GPU weight memory of an sdsparse checkpoint folder without a GPU.

Usage: tools/predict_gpu_weight_bytes.py MODEL_FOLDER

What `generate --device cuda` uploads at load, from the layouts alone: dense tensors in f16 (the
CUDA default activation dtype), unstructured (bitmap) weights in the tiled layout of
`TiledBitmapWeight` (src/backend/cuda/unstructured.rs: 64x64 tiles, values padded to a multiple
of VALUE_ALIGN = 8 per tile, one u64 bitmap word per tile row, u32 tile offsets), 2:4 weights as
stored (f16 values + metadata bytes); the VAE's decoder half only (what the pipeline loads). Not
counted: f32 biases of sparse layers (an f16 byte count instead), CUDA context and kernel images.
The measured figure is `generate --profile`'s "on the GPU: ... taken at load" (device check stage 6).
"""
import json, struct, sys, os, numpy as np
def header(p):
    f = open(p, 'rb'); n = struct.unpack('<Q', f.read(8))[0]; return f, 8 + n, json.loads(f.read(n))
POP = np.array([bin(i).count('1') for i in range(256)], dtype=np.int64)
def component(folder, keep=lambda n: True):
    files = [os.path.join(folder, x) for x in os.listdir(folder) if x.endswith('.safetensors')]
    total = 0
    for p in files:
        f, base, h = header(p)
        h.pop('__metadata__', None)
        for name, t in h.items():
            if not keep(name): continue
            numel = int(np.prod(t['shape'])) if t['shape'] else 1
            if name.endswith('.bitmap.values'): continue  # counted with the mask
            if name.endswith('.bitmap.mask'):
                rows, rb = t['shape']; cols = rb * 8
                s, e = t['data_offsets']; f.seek(base + s)
                mask = np.frombuffer(f.read(e - s), dtype=np.uint8).reshape(rows, rb)
                tn, tk = -(-rows // 64), -(-cols // 64)
                pad = np.zeros((tn * 64, tk * 8), dtype=np.uint8); pad[:rows, :rb] = mask
                per_tile = POP[pad].reshape(tn, 64, tk, 8).sum(axis=(1, 3))
                values = int((-(-per_tile // 8) * 8).sum()) * 2
                total += values + tn * tk * 64 * 8 + (tn * tk + 1) * 4
            else:
                total += numel * 2  # dense (and 2:4 parts) as f16 / bytes on the GPU
                if t['dtype'] == 'U8': total -= numel  # metadata bytes are bytes
    return total
if len(sys.argv) != 2:
    sys.exit(__doc__)
m = sys.argv[1]
dec = lambda n: n.startswith('decoder.') or n.startswith('post_quant_conv.')
parts = {'text_encoder': component(f'{m}/text_encoder'), 'unet': component(f'{m}/unet'), 'vae (decoder)': component(f'{m}/vae', dec)}
for k, v in parts.items(): print(f'{k:14} {v/2**20:10.1f} MiB')
print(f'{"total":14} {sum(parts.values())/2**20:10.1f} MiB')
