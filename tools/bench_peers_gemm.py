#!/usr/bin/env python3
"""Peers for the 2:4 sparse GEMM benchmark, on the same GPU and the same shapes as
benches/gemm_sparse24.rs: PyTorch fp16 dense matmul (cuBLAS) and
torch.sparse.to_sparse_semi_structured with its cuSPARSELt and CUTLASS backends.

Y = X W^T with X [M, K] and W [N, K] pruned 2:4 along K (two largest magnitudes of every
group of four), computed as F.linear(X, W). Times are CUDA-event means over 20 launches
after 3 warm-ups; TFLOP/s counts dense-equivalent work 2*M*N*K, as the Rust bench does.
Prints a table and writes JSON to --json (default: stdout only). Needs a CUDA GPU.
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F


def shapes():
    out = []
    for m, c in [(8192, 320), (2048, 640), (512, 1280), (128, 1280)]:
        out.append((f"unet_attn_proj_m{m}_c{c}", m, c, c))
        out.append((f"unet_geglu_m{m}_c{c}", m, 8 * c, c))
        out.append((f"unet_ff_out_m{m}_c{c}", m, c, 4 * c))
    for c in [320, 640, 1280]:
        out.append((f"cross_kv_m154_c{c}", 154, c, 1024))
    out += [("text_qkvo_m154", 154, 1024, 1024), ("text_fc1_m154", 154, 4096, 1024),
            ("text_fc2_m154", 154, 1024, 4096), ("square_4096", 4096, 4096, 4096),
            ("square_8192", 8192, 8192, 8192)]
    return out


def prune_24(w):
    """Keeps the two largest magnitudes of every group of 4 along the last dimension."""
    n, k = w.shape
    g = w.reshape(n, k // 4, 4)
    idx = g.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return (g * mask).reshape(n, k)


def time_it(fn, iters=20, warm=3):
    for _ in range(warm):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_peers_gemm: no CUDA GPU, skipped")
        return 0
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    props = torch.cuda.get_device_properties(0)
    info = {"gpu": props.name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cusparselt": getattr(torch.backends.cusparselt, "version", lambda: None)()}
    print(json.dumps(info))
    torch.manual_seed(0)
    results = []
    for label, m, n, k in shapes():
        flop = 2.0 * m * n * k
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        w = prune_24(torch.randn(n, k, device="cuda", dtype=torch.float16))
        row = {"label": label, "m": m, "n": n, "k": k}
        row["torch_dense_cublas"] = flop / time_it(lambda: F.linear(x, w)) / 1e12
        ref = F.linear(x, w).float()
        for backend in ["cusparselt", "cutlass"]:
            try:
                SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
                ws = to_sparse_semi_structured(w)
                out = F.linear(x, ws).float()
                err = ((out - ref).norm() / ref.norm()).item()
                if not err < 1e-2:
                    raise RuntimeError(f"rel err {err:.2e}")
                row[f"torch_24_{backend}"] = flop / time_it(lambda: F.linear(x, ws)) / 1e12
            except Exception as e:  # report, keep going: shapes a backend refuses are data too
                row[f"torch_24_{backend}"] = f"n/a ({type(e).__name__}: {str(e)[:80]})"
        results.append(row)
        cells = " | ".join(f"{key} {v:.1f}" if isinstance(v, float) else f"{key} {v}"
                           for key, v in row.items() if key.startswith("torch"))
        print(f"{label:28} M {m:5} N {n:5} K {k:5} | {cells}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "tflops_dense_equivalent": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
