#!/usr/bin/env python3
"""Degenerate-schedule references from diffusers (no model): every scheduler x every
timestep_spacing x step counts at the edges (1, 2, 3, 4, half, all-but-one and all of the
training timesteps), on a 20-timestep copy of the SD2 config (cheap) and on the real
1000-timestep one. Each case records what diffusers does: "ok" with the timesteps and the
final sample, "error" (set_timesteps or step raised), or "nan" (the sample went non-finite).
sdsparse must give the same sample where diffusers gives one, and refuse otherwise.

The sample and the "model outputs" are closed-form (no RNG), so the Rust test rebuilds them:
  init[j]      = cos(0.37 * j) * init_noise_sigma        (j over 16 elements, shape [1,4,2,2])
  model_out[i] = sin(1.3 * i + 0.7 * j + 0.1)            (call i, as float32)

Writes tests/fixtures/scheduler-edges.json. Usage: python3 tools/make_scheduler_edges.py
"""
import json, math, warnings
from pathlib import Path

import torch
import diffusers
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

warnings.filterwarnings("ignore")
diffusers.utils.logging.set_verbosity_error()
root = Path(__file__).resolve().parent.parent
base = json.loads((root / "tests/fixtures/tiny-sd2-eps/scheduler/scheduler_config.json").read_text())
classes = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm++2m": DPMSolverMultistepScheduler,
           "pndm": PNDMScheduler}
N_ELEMS = 16

def init(sigma):
    return torch.tensor([math.cos(0.37 * j) for j in range(N_ELEMS)], dtype=torch.float32).reshape(1, 4, 2, 2) * sigma

def model_out(i):
    return torch.tensor([math.sin(1.3 * i + 0.7 * j + 0.1) for j in range(N_ELEMS)],
                        dtype=torch.float32).reshape(1, 4, 2, 2)

cases = []
for n_train, step_counts in [(20, [1, 2, 3, 4, 10, 19, 20]), (1000, [1, 999, 1000])]:
    for name, cls in classes.items():
        for spacing in ["leading", "trailing", "linspace"]:
            for prk in ([True, False] if name == "pndm" else [None]):
                for steps in step_counts:
                    overrides = {"num_train_timesteps": n_train, "timestep_spacing": spacing}
                    if prk is not None:
                        overrides["skip_prk_steps"] = prk
                    extra = {"algorithm_type": "dpmsolver++", "solver_order": 2} if name == "dpm++2m" else {}
                    case = {"scheduler": name, "steps": steps, "overrides": overrides}
                    try:
                        s = cls.from_config(base, **overrides, **extra)
                        s.set_timesteps(steps)
                        x = init(float(s.init_noise_sigma))
                        for i, t in enumerate(s.timesteps):
                            x = s.step(model_out(i), t, x).prev_sample
                        if not torch.isfinite(x).all():
                            case["outcome"] = "nan"
                        else:
                            case["outcome"] = "ok"
                            ts = [float(t) for t in s.timesteps]
                            case["calls"] = len(ts)
                            case["timesteps_head"] = ts[:12]  # the whole list for short schedules
                            case["final"] = [float(v) for v in x.flatten()]
                    except Exception as e:  # diffusers refuses (IndexError, ValueError, ...)
                        case["outcome"] = "error"
                        case["error"] = f"{type(e).__name__}: {e}"[:120]
                    cases.append(case)

out = root / "tests/fixtures/scheduler-edges.json"
out.write_text(json.dumps({
    "made_by": "tools/make_scheduler_edges.py",
    "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    "base_config": "tests/fixtures/tiny-sd2-eps/scheduler/scheduler_config.json",
    "cases": cases,
}, indent=None, separators=(",", ":")) + "\n")
print("wrote", len(cases), "cases:", {o: sum(c["outcome"] == o for c in cases) for o in ["ok", "error", "nan"]})
