"""XLA CPU flags, one at a time, against the defaults, each in a fresh process.

    python experiments/xla_flags.py [--models resnet50] [--rounds 3]

XLA reads its flags once per process, so every setting runs `bench.py --jax-only` in a subprocess
with that XLA_FLAGS; the default setting runs first and last to show the drift of this noisy
machine. Prints a markdown table of train/inference images/s and the ratio to the mean default.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

SETTINGS = {
    "default": "",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "onednn": "--xla_cpu_use_onednn=true",
    "xnn fusion: convolutions": "--xla_cpu_experimental_xnn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
    "xnn fusion: dots+eltwise": "--xla_cpu_experimental_xnn_fusion_type=LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE",
    "ynn fusion: convolutions": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
    "ynn fusion: dots": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    "concurrency scheduler": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    "fast math": "--xla_cpu_enable_fast_math=true",
}


def run(flags: str, args) -> list[dict]:
    env = dict(os.environ, XLA_FLAGS=flags)
    cmd = [sys.executable, os.path.join(HERE, "bench.py"), "--jax-only", "--rounds", str(args.rounds),
           "--batch", str(args.batch), "--models", *args.models]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if not rows:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"  {flags or 'default'}: failed: {tail}", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["resnet50"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None, help="names of SETTINGS to run")
    args = parser.parse_args()
    names = [n for n in SETTINGS if n != "default" and (not args.only or n in args.only)]
    results = {"default": run("", args)}
    for name in names:
        results[name] = run(SETTINGS[name], args)
        print(name, results[name], flush=True)
    results["default (again)"] = run("", args)
    print(f"\n# XLA CPU flags (`python experiments/xla_flags.py --models {' '.join(args.models)} "
          f"--rounds {args.rounds}`), batch {args.batch}\n")
    print("| setting | model | train img/s | x default | infer img/s | x default | compile s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    base = {}
    for row in results["default"] + results["default (again)"]:
        base.setdefault(row["model"], []).append(row)
    base = {m: {k: sum(r[k] for r in rs) / len(rs) for k in ("train", "infer")} for m, rs in base.items()}
    for name, rows in results.items():
        for r in rows:
            b = base[r["model"]]
            print(f"| {name} | {r['model']} | {r['train']:.2f} | {r['train'] / b['train']:.2f} | "
                  f"{r['infer']:.2f} | {r['infer'] / b['infer']:.2f} | {r['compile']:.0f} |")
        if not rows:
            print(f"| {name} | (failed to run: see the log above) | | | | | |")


if __name__ == "__main__":
    main()
