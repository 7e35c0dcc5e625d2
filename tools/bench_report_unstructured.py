#!/usr/bin/env python3
"""Side-by-side markdown for docs/BENCHMARKS.md from the logs of one GPU check (tools/gpu_check.sh).

Reads, from the check's OUT folder (the argument of .device/check.sh):
  env.txt                 GPU, driver, CUDA (written by the runner)
  criterion/**/new/       benchmark.json + estimates.json of benches/gemm_unstructured.rs and
                          benches/attention.rs (median time per call)
  peers.jsonl             PyTorch matmul / SDPA on the same shapes (tools/bench_peers_unstructured.py)
and prints markdown tables with the issue's goals: sparse GEMM >= 1.2x cuBLAS for M <= 256 and
>= 0.95x for M >= 2048 (35% and 50% sparsity); attention >= 1.0x SDPA's fastest backend.

    python3 tools/bench_report_unstructured.py [LOG_DIR] >> docs/BENCHMARKS.md
"""
import json
import os
import re
import sys


def criterion_medians(root):
    """{(group_id, function_id): median ns} for every benchmark under root."""
    out = {}
    for dirpath, _, files in os.walk(root):
        if os.path.basename(dirpath) != "new" or "benchmark.json" not in files:
            continue
        with open(os.path.join(dirpath, "benchmark.json")) as f:
            bench = json.load(f)
        with open(os.path.join(dirpath, "estimates.json")) as f:
            est = json.load(f)
        out[(bench["group_id"], bench["function_id"])] = est["median"]["point_estimate"]
    return out


def main():
    log = sys.argv[1] if len(sys.argv) > 1 else ".device/out"
    med = criterion_medians(os.path.join(log, "criterion"))
    peers = []
    if os.path.exists(os.path.join(log, "peers.jsonl")):
        with open(os.path.join(log, "peers.jsonl")) as f:
            peers = [json.loads(line) for line in f if line.strip()]
    env = open(os.path.join(log, "env.txt")).read() if os.path.exists(os.path.join(log, "env.txt")) else ""

    print("## Unstructured sparse GEMM and fused attention\n")
    print("Environment (raw, from env.txt):\n\n```\n" + env.strip() + "\n```\n")

    gemm_peer = {(r["m"], r["n"], r["k"]): r for r in peers if r.get("kind") == "gemm"}
    print("### Sparse GEMM vs cuBLAS dense f16 (same process) and torch.matmul\n")
    print("| shape | M | N | K | cuBLAS us | torch us | 35% us | 35% vs cuBLAS | 50% us | 50% vs cuBLAS | goal | met |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (group, fn), ns in sorted(med.items()):
        mt = re.match(r"gemm/(.+)_M(\d+)_N(\d+)_K(\d+)$", group)
        if not mt or fn != "cublas_dense_f16":
            continue
        label, m, n, k = mt.group(1), int(mt.group(2)), int(mt.group(3)), int(mt.group(4))
        dense = ns / 1e3
        s35 = med.get((group, "sparse35"))
        s50 = med.get((group, "sparse50"))
        torch_us = gemm_peer.get((m, n, k), {}).get("ms")
        goal = 1.2 if m <= 256 else (0.95 if m >= 2048 else None)
        sp = [ns / s for s in (s35, s50) if s]
        met = "" if goal is None or len(sp) < 2 else ("yes" if min(sp) >= goal else "no")

        def fmt(v, scale=1.0):
            return "-" if v is None else f"{v * scale:.1f}"

        print(f"| {label} | {m} | {n} | {k} | {dense:.1f} | {fmt(torch_us, 1e3)} | {fmt(s35, 1e-3)} | "
              f"{'-' if not s35 else f'{ns / s35:.2f}x'} | {fmt(s50, 1e-3)} | {'-' if not s50 else f'{ns / s50:.2f}x'} | "
              f"{'-' if goal is None else f'>= {goal}x'} | {met} |")

    print("\n### Split-K / variant sweep (35%, skinny shapes)\n")
    print("| shape | variant | us |")
    print("|---|---|---|")
    for (group, fn), ns in sorted(med.items()):
        if group.startswith("gemm/") and "_split" in fn:
            print(f"| {group[5:]} | {fn} | {ns / 1e3:.1f} |")

    attn_peer = {(r["batch"], r["heads"], r["seq_q"], r["seq_kv"]): r for r in peers if r.get("kind") == "attention"}
    print("\n### Fused attention (head dim 64) vs PyTorch SDPA (fastest backend)\n")
    print("| shape | B | H | Sq | Skv | ours us | ours TFLOP/s | SDPA backend | SDPA us | SDPA TFLOP/s | ours/SDPA | goal met |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (group, fn), ns in sorted(med.items()):
        mt = re.match(r"attention/(.+)_B(\d+)_H(\d+)_Sq(\d+)_Skv(\d+)$", group)
        if not mt or fn != "flash_d64":
            continue
        label, b, h, sq, skv = mt.group(1), *map(int, mt.groups()[1:])
        flops = 4 * b * h * sq * skv * 64
        ours_tf = flops / (ns * 1e-9) / 1e12
        p = attn_peer.get((b, h, sq, skv))
        if p:
            ratio = p["ms"] * 1e6 / ns
            print(f"| {label} | {b} | {h} | {sq} | {skv} | {ns / 1e3:.1f} | {ours_tf:.1f} | {p['peer']} | "
                  f"{p['ms'] * 1e3:.1f} | {p['tflops']:.1f} | {ratio:.2f}x | {'yes' if ratio >= 1.0 else 'no'} |")
        else:
            print(f"| {label} | {b} | {h} | {sq} | {skv} | {ns / 1e3:.1f} | {ours_tf:.1f} | - | - | - | - | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
