#!/usr/bin/env python3
"""Scheduler-only references from diffusers (no model): for each case, a scheduler built
with `from_config(<SD2 scheduler config>, **overrides)`, a random initial sample and a
random "model output" per call; records the timesteps, init_noise_sigma, the scaled model
input of each call and the sample after each `step`.

Covers what the tiny-fixture pipeline runs do not: v_prediction, trailing/linspace
spacing, set_alpha_to_one, and each scheduler's own defaults.

Writes tests/fixtures/scheduler-cases/cases.safetensors (+ cases.json).
Usage: python3 tools/make_scheduler_reference.py
"""
import json
from pathlib import Path

import torch
import diffusers
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler
from safetensors.torch import save_file

root = Path(__file__).resolve().parent.parent
base = json.loads((root / "tests/fixtures/tiny-sd2-eps/scheduler/scheduler_config.json").read_text())
out_dir = root / "tests/fixtures/scheduler-cases"
out_dir.mkdir(parents=True, exist_ok=True)

classes = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm++2m": DPMSolverMultistepScheduler, "pndm": PNDMScheduler}
cases = [
    ("ddim", 5, {"prediction_type": "v_prediction"}),
    ("ddim", 5, {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
    ("ddim", 4, {"timestep_spacing": "linspace", "set_alpha_to_one": True}),
    ("euler", 5, {"prediction_type": "v_prediction"}),
    ("euler", 5, {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
    ("euler", 7, {"timestep_spacing": "linspace"}),
    ("dpm++2m", 5, {"prediction_type": "v_prediction"}),
    ("dpm++2m", 8, {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
    ("dpm++2m", 7, {"timestep_spacing": "linspace"}),
    ("pndm", 5, {"prediction_type": "v_prediction", "skip_prk_steps": True}),
    ("pndm", 5, {"prediction_type": "v_prediction"}),
    ("pndm", 6, {"timestep_spacing": "trailing", "skip_prk_steps": True}),
]

gen = torch.Generator().manual_seed(0)
tensors, meta = {}, []
for i, (name, steps, overrides) in enumerate(cases):
    extra = {"algorithm_type": "dpmsolver++", "solver_order": 2} if name == "dpm++2m" else {}
    sched = classes[name].from_config(base, **overrides, **extra)
    sched.set_timesteps(steps)
    sample = torch.randn([1, 4, 8, 8], generator=gen) * sched.init_noise_sigma
    init = sample.clone()
    outs, inputs, samples = [], [], []
    for t in sched.timesteps:
        inputs.append(sched.scale_model_input(sample, t))
        m = torch.randn([1, 4, 8, 8], generator=gen)
        outs.append(m)
        sample = sched.step(m, t, sample).prev_sample
        samples.append(sample)
    key = f"case{i}"
    tensors[f"{key}_init"] = init.contiguous()
    tensors[f"{key}_model_out"] = torch.stack(outs).contiguous()
    tensors[f"{key}_model_in"] = torch.stack(inputs).contiguous()
    tensors[f"{key}_samples"] = torch.stack(samples).contiguous()
    meta.append({
        "key": key,
        "scheduler": name,
        "steps": steps,
        "overrides": overrides,
        "timesteps": [float(t) for t in sched.timesteps],
        "init_noise_sigma": float(sched.init_noise_sigma),
    })

save_file(tensors, str(out_dir / "cases.safetensors"))
(out_dir / "cases.json").write_text(json.dumps({
    "made_by": "tools/make_scheduler_reference.py",
    "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    "base_config": "tests/fixtures/tiny-sd2-eps/scheduler/scheduler_config.json",
    "what": "{key}_init: initial sample (already x init_noise_sigma); {key}_model_out[i]: random model output fed at call i; "
            "{key}_model_in[i]: scale_model_input(sample, t_i); {key}_samples[i]: sample after step i",
    "cases": meta,
}, indent=1) + "\n")
print("wrote", len(meta), "cases")
