"""Host memory in transparent huge pages (`jaxvision/hostmem.py`) against 4 KiB pages.

    python experiments/huge_pages.py [--models resnet50 efficientnet_b0] [--pairs 3]

Runs `experiments/bench.py --jax-only` in fresh processes, alternately with JAXVISION_HUGEPAGES=0
(glibc's default: 4 KiB pages) and without it (the entry point's default: glibc.malloc.hugetlb=1),
`--pairs` times, and prints the median training and inference images/s of each setting with
their ratio. Separate processes, because glibc reads the tunable only at start.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py")


def run(models, rounds: int, huge: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXVISION_HUGEPAGES")}
    if not huge:
        env["JAXVISION_HUGEPAGES"] = "0"
    out = subprocess.run([sys.executable, BENCH, "--jax-only", "--rounds", str(rounds), "--models", *models],
                         env=env, capture_output=True, text=True, check=True).stdout
    return {r["model"]: r for r in map(json.loads, (line for line in out.splitlines() if line.startswith("{")))}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["resnet50", "efficientnet_b0"])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    runs = {False: [], True: []}
    for i in range(args.pairs):
        for huge in (False, True):
            runs[huge].append(run(args.models, args.rounds, huge))
            print(f"pair {i + 1}/{args.pairs}, huge pages {'on' if huge else 'off'}: "
                  + ", ".join(f"{m} train {r['train']:.2f} infer {r['infer']:.2f}" for m, r in runs[huge][-1].items()),
                  flush=True)
    print(f"\n# Huge pages (`python experiments/huge_pages.py --models {' '.join(args.models)} --pairs {args.pairs}`), "
          "batch 16, 224 px, float32, medians of fresh processes\n")
    print("| model | train img/s 4 KiB | train img/s huge | ratio | infer img/s 4 KiB | infer img/s huge | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for m in args.models:
        med = {(h, k): statistics.median(r[m][k] for r in runs[h]) for h in (False, True) for k in ("train", "infer")}
        print(f"| {m} | {med[False, 'train']:.2f} | {med[True, 'train']:.2f} | {med[True, 'train'] / med[False, 'train']:.2f} "
              f"| {med[False, 'infer']:.2f} | {med[True, 'infer']:.2f} | {med[True, 'infer'] / med[False, 'infer']:.2f} |")


if __name__ == "__main__":
    main()
