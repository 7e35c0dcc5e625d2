#!/usr/bin/env python3
"""PyTorch peers for the unstructured GEMM and fused attention benches, same shapes, same GPU.

- Dense f16 matmul `x @ w.T` (cuBLAS via PyTorch) for every shape of benches/gemm_unstructured.rs.
- `scaled_dot_product_attention` for every shape of benches/attention.rs, with each SDPA backend
  (flash, efficient, cudnn, math) tried separately; the fastest one is the peer.

Timing: CUDA events around `iters` back-to-back calls after warm-up; the median of `repeats`.
Prints a table and writes JSON lines to --out (default: stdout only).

    python3 tools/bench_peers_unstructured.py --out target/gpu-run-unstructured/peers.jsonl
"""
import argparse
import json
import statistics
import sys

GEMM_SHAPES = [  # (label, M, N, K): keep in sync with benches/gemm_unstructured.rs
    ("clip_qkv", 154, 1024, 1024),
    ("clip_fc1", 154, 4096, 1024),
    ("clip_fc2", 154, 1024, 4096),
    ("xattn_kv_320", 154, 320, 1024),
    ("xattn_kv_1280", 154, 1280, 1024),
    ("unet8x8_proj", 128, 1280, 1280),
    ("unet8x8_ff", 128, 10240, 1280),
    ("unet16x16_proj", 256, 1280, 1280),
    ("unet16x16_cfg_proj", 512, 1280, 1280),
    ("unet32x32_proj", 2048, 640, 640),
    ("unet32x32_ff", 2048, 5120, 640),
    ("unet64x64_proj", 8192, 320, 320),
    ("unet64x64_ff", 8192, 2560, 320),
]

ATTN_SHAPES = [  # (label, batch, heads, seq_q, seq_kv): keep in sync with benches/attention.rs
    ("self_64x64", 2, 5, 4096, 4096),
    ("cross_64x64", 2, 5, 4096, 77),
    ("self_32x32", 2, 10, 1024, 1024),
    ("cross_32x32", 2, 10, 1024, 77),
    ("self_16x16", 2, 20, 256, 256),
    ("cross_16x16", 2, 20, 256, 77),
    ("self_8x8", 2, 20, 64, 64),
    ("cross_8x8", 2, 20, 64, 77),
    ("self_96x96_768px", 2, 5, 9216, 9216),
]


def time_ms(torch, fn, iters, repeats):
    """Median milliseconds per call."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / iters)
    return statistics.median(samples)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write JSON lines here")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        print("bench_peers_unstructured: no GPU, skipped")
        return 0
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    header = {
        "kind": "env",
        "gpu": props.name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }
    rows = [header]
    print(f"# {header}")
    torch.manual_seed(0)

    print(f"{'gemm shape':<22} {'M':>6} {'N':>6} {'K':>6} {'ms':>9} {'TFLOP/s':>8}")
    for label, m, n, k in GEMM_SHAPES:
        x = torch.randn(m, k, device=dev, dtype=torch.float16)
        w = torch.randn(n, k, device=dev, dtype=torch.float16)
        ms = time_ms(torch, lambda: torch.matmul(x, w.t()), args.iters, args.repeats)
        tflops = 2 * m * n * k / (ms * 1e-3) / 1e12
        print(f"{label:<22} {m:>6} {n:>6} {k:>6} {ms:>9.4f} {tflops:>8.2f}")
        rows.append({"kind": "gemm", "label": label, "m": m, "n": n, "k": k, "peer": "torch.matmul f16",
                     "ms": ms, "tflops": tflops})

    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)]
    print(f"{'attention shape':<22} {'B':>3} {'H':>3} {'Sq':>6} {'Skv':>6} {'best':>10} {'ms':>9} {'TFLOP/s':>8}")
    for label, b, h, sq, skv in ATTN_SHAPES:
        q = torch.randn(b, h, sq, 64, device=dev, dtype=torch.float16)
        kk = torch.randn(b, h, skv, 64, device=dev, dtype=torch.float16)
        v = torch.randn(b, h, skv, 64, device=dev, dtype=torch.float16)
        flops = 4 * b * h * sq * skv * 64
        per_backend = {}
        for name, backend in backends:
            if name == "math" and sq * skv * b * h > 2 ** 31:
                continue  # the math path materialises [seq, seq]; skip where it cannot win anyway
            try:
                with sdpa_kernel(backend):
                    ms = time_ms(torch, lambda: F.scaled_dot_product_attention(q, kk, v), args.iters, args.repeats)
                per_backend[name] = ms
            except RuntimeError as e:  # backend not available for this shape / GPU
                per_backend[name] = None
                print(f"  {label}: {name} unavailable ({str(e).splitlines()[0][:80]})", file=sys.stderr)
        ok = {k2: v2 for k2, v2 in per_backend.items() if v2 is not None}
        best = min(ok, key=ok.get)
        ms = ok[best]
        tflops = flops / (ms * 1e-3) / 1e12
        print(f"{label:<22} {b:>3} {h:>3} {sq:>6} {skv:>6} {best:>10} {ms:>9.4f} {tflops:>8.2f}")
        rows.append({"kind": "attention", "label": label, "batch": b, "heads": h, "seq_q": sq, "seq_kv": skv,
                     "peer": f"sdpa/{best}", "ms": ms, "tflops": tflops, "per_backend_ms": per_backend})

    if args.out:
        with open(args.out, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
