"""What MixUp/CutMix cost inside the jitted train step, on real CIFAR-10 batches.

    python experiments/mix_overhead.py /tmp/cifar10/train

1. Step time, alternating: the CIFAR-10 recipe's train step compiled with mixing off and with
   MixUp 0.8 + CutMix 1.0 (switch 0.5, per-sample "elem" mode, the most work), timed on the same
   real batches in alternating rounds after warm-up, so machine noise hits both alike.
2. Two short training runs (mixing off / on) through `loop.train`, each reporting its
   steady-state images/s and final validation accuracy.
Prints both ratios (on / off).
"""

import contextlib
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np

from jaxvision.config import load
from jaxvision.data import pipeline
from jaxvision.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIX = {"mix.mixup_alpha": 0.8, "mix.cutmix_alpha": 1.0, "mix.mode": "elem"}


def recipe(folder, **overrides):
    c = load(os.path.join(ROOT, "configs", "cifar10_resnet.py"), folder)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        target = c
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


def step_times(folder, rounds=5, steps=10):
    fns, states = {}, {}
    for name, overrides in (("off", {}), ("on", MIX)):
        s = loop.setup(recipe(folder, **overrides), evaluate=False)
        tx = s.optimizer(1000)
        init, shapes, shardings = s.abstract_state(tx)
        states[name] = jax.jit(init, out_shardings=shardings)()
        fns[name] = loop.jit_train_step(s, tx, shapes, shardings)
    host = iter(pipeline.train_batches(s.train_source, loop.train_transform(s), batch_size=128, seed=0))
    batches = [pipeline.to_global(next(host), s.mesh) for _ in range(steps)]
    times = {"off": [], "on": []}
    for r in range(rounds + 1):  # round 0 warms up (compiles)
        for name in ("off", "on") if r % 2 else ("on", "off"):
            start = time.perf_counter()
            for b in batches:
                states[name], m = fns[name](states[name], b)
            jax.block_until_ready(m)
            if r:
                times[name].append((time.perf_counter() - start) / steps)
    return {k: float(np.median(v)) for k, v in times.items()}


def short_runs(folder, steps):
    out = {}
    for name, overrides in (("off", {}), ("on", MIX)):
        with tempfile.TemporaryDirectory() as workdir:
            config = recipe(folder, num_steps=steps, eval_every=steps, log_every=25, **overrides)
            with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the results table
                out[name] = loop.train(config, workdir)
    return out


def main():
    folder = sys.argv[1] if len(sys.argv) > 1 else "/tmp/cifar10/train"
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    t = step_times(folder)
    runs = short_runs(folder, steps)
    lines = [
        f"# MixUp/CutMix overhead (`python experiments/mix_overhead.py {folder} {steps}`)",
        f"machine: {os.cpu_count()} CPU cores, jax {jax.__version__}, {jax.device_count()} device(s)",
        "",
        "| measurement | mixing off | mixing on | on / off |",
        "|---|---:|---:|---:|",
        f"| train step, batch 128 at 32 px, median of 5 alternating rounds (ms) | {t['off'] * 1e3:.1f} | "
        f"{t['on'] * 1e3:.1f} | {t['on'] / t['off']:.3f} |",
        f"| {steps}-step CIFAR-10 run, steady-state images/s | {runs['off']['images_per_sec']:.1f} | "
        f"{runs['on']['images_per_sec']:.1f} | {runs['on']['images_per_sec'] / runs['off']['images_per_sec']:.3f} |",
        f"| same runs, validation top-1 after {steps} steps | {runs['off']['final_val_top1']:.4f} | "
        f"{runs['on']['final_val_top1']:.4f} | |",
    ]
    print("\n".join(lines))
    print(json.dumps({"step_seconds": t, "runs": runs}, indent=1, default=str), file=sys.stderr)


if __name__ == "__main__":
    main()
