"""The host-memory modes of `jaxvision/backends/cpu/hostmem.py` (`JAXVISION_MALLOC`) against each other, on
whole train steps and inference batches.

    python experiments/host_memory.py [--models resnet50 vit_small_patch16_224] [--pairs 3]
                                      [--settings system huge tbbmalloc tcmalloc]

The allocator's environment is read only at process start, so each setting runs
`experiments/bench.py --jax-only` (which calls `hostmem.relaunch()` as `jaxvision.main` does) in
fresh processes, taking turns, `--pairs` times. Prints the medians of images/s, and of the page
faults and kernel seconds per training step, which show whether the memory of one step was
given back to the system and faulted in again by the next.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from jaxvision.backends.cpu import hostmem

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py")


def run(models, rounds: int, setting: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", "JAXVISION_MALLOC", hostmem.MARK, hostmem.SAVED)}
    env["JAXVISION_MALLOC"] = setting
    out = subprocess.run([sys.executable, BENCH, "--jax-only", "--rounds", str(rounds), "--models", *models],
                         env=env, capture_output=True, text=True, check=True).stdout
    return {r["model"]: r for r in map(json.loads, (line for line in out.splitlines() if line.startswith("{")))}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["resnet50", "efficientnet_b0"])
    parser.add_argument("--settings", nargs="+", choices=hostmem.MODES[1:],
                        default=["system", "huge", "tbbmalloc", "tcmalloc"])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    runs = {s: [] for s in args.settings}
    for i in range(args.pairs):
        for s in (args.settings if i % 2 == 0 else args.settings[::-1]):
            runs[s].append(run(args.models, args.rounds, s))
            print(f"turn {i + 1}/{args.pairs}, {s}: " + ", ".join(
                f"{m} train {r['train']:.2f} infer {r['infer']:.2f} faults/step {r['faults_per_step']:.0f}"
                for m, r in runs[s][-1].items()), flush=True)
    base = args.settings[0]
    print(f"\n# Host memory (`python experiments/host_memory.py --models {' '.join(args.models)} "
          f"--pairs {args.pairs} --settings {' '.join(args.settings)}`), batch 16, 224 px, float32, "
          f"medians of fresh processes; ratios of images/s to `{base}`\n")
    print("| model | measure | " + " | ".join(args.settings) + " |")
    print("|---|---|" + "---:|" * len(args.settings))
    for m in args.models:
        for k in ("train", "infer", "faults_per_step", "sys_seconds_per_step"):
            med = {s: statistics.median(r[m][k] for r in runs[s]) for s in args.settings}
            ratio = k in ("train", "infer")
            print(f"| {m} | {k.replace('_', ' ')} | " + " | ".join(
                (f"{med[s]:.2f}" if k != "faults_per_step" else f"{med[s]:,.0f}")
                + ("" if s == base or not ratio else f" ({med[s] / med[base]:.2f}x)") for s in args.settings) + " |")


if __name__ == "__main__":
    main()
