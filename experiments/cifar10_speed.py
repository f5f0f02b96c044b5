"""Time to accuracy of the CIFAR-10 speed recipes: jaxvision's command against the plain PyTorch
port of the same recipe (experiments/cifar10_speed_torch.py), alternating in one run, seed by seed.

    python experiments/cifar10_speed.py /tmp/cifar10/train --recipes 90 94 --seeds 0 1 2 \\
        [--val-fraction 0.1] [--torch-seeds 0] [--full] [--out experiments/results/cifar10_speed.md]

Each run is a fresh process timed from start to exit: reading the data, whitening, compiling,
training and the final evaluation with test-time augmentation are all in it. --val-fraction 0.1
trains on 45,000 images and reports top-1 on the 5,000 held out; --full adds the wall time of the
50,000-image command (no evaluation). The table is printed and written to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_name() -> str:
    info = open("/proc/cpuinfo").read()
    model = re.search(r"^model name\s*:\s*(.*)$", info, re.M)
    return (model.group(1) if model else platform.processor()) + (" (AMX)" if " amx" in info else "")


def run_jaxvision(recipe: str, folder: str, seed: int, val_fraction: float) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        cmd = [sys.executable, "-m", "jaxvision.main", "--config", f"configs/cifar10_{recipe}.py:{folder}",
               "--workdir", workdir, f"--config.seed={seed}", f"--config.data.val_fraction={val_fraction}"]
        t = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t
        summary = json.load(open(os.path.join(workdir, "summary.json")))
    return {"val_top1": summary["final_val_top1"], "wall_s": wall}


def run_torch(recipe: str, folder: str, seed: int, val_fraction: float) -> dict:
    cmd = [sys.executable, "experiments/cifar10_speed_torch.py", f"configs/cifar10_{recipe}.py", folder,
           "--seed", str(seed), "--val-fraction", str(val_fraction)]
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - t
    return {**json.loads(out.strip().splitlines()[-1]), "wall_s": wall}


def describe(rows: list[dict]) -> tuple[str, str]:
    if not rows:
        return "-", "-"
    tops = [100 * r["val_top1"] for r in rows if r["val_top1"] is not None]
    walls = [r["wall_s"] / 60 for r in rows]
    top = (f"{statistics.mean(tops):.2f}% ({min(tops):.2f}-{max(tops):.2f}, n={len(tops)})" if tops else "-")
    wall = f"{statistics.mean(walls):.1f} min ({min(walls):.1f}-{max(walls):.1f})"
    return top, wall


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--recipes", nargs="+", default=["90", "94"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--torch-seeds", nargs="*", type=int, default=None, help="default: --seeds")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--full", action="store_true", help="also time the 50,000-image command")
    p.add_argument("--out", default=os.path.join(ROOT, "experiments", "results", "cifar10_speed.md"))
    args = p.parse_args()
    torch_seeds = args.seeds if args.torch_seeds is None else args.torch_seeds
    lines = [f"# CIFAR-10 speed recipes: jaxvision against the PyTorch port, {time.strftime('%Y-%m-%d')}", "",
             f"Machine: {cpu_name()}, {os.cpu_count()} cores. Command:", "",
             "    python " + " ".join(["experiments/cifar10_speed.py"] + sys.argv[1:]), "",
             f"Validation: {args.val_fraction:.0%} of the folder held out by file path. Wall time: the whole "
             "process (data, whitening, compilation, training, evaluation with TTA).", "",
             "| recipe | framework | val top-1, mean (range) | wall time, mean (range) | PyTorch / jaxvision time |",
             "|---|---|---:|---:|---:|"]
    for recipe in args.recipes:
        jax_runs, torch_runs = {}, {}
        for seed in args.seeds:
            jax_runs[seed] = run_jaxvision(recipe, args.folder, seed, args.val_fraction)
            print(f"cifar10_{recipe} seed {seed} jaxvision: {jax_runs[seed]}", flush=True)
            if seed in torch_seeds:
                torch_runs[seed] = run_torch(recipe, args.folder, seed, args.val_fraction)
                print(f"cifar10_{recipe} seed {seed} pytorch: {torch_runs[seed]}", flush=True)
        (jt, jw), (tt, tw) = describe(list(jax_runs.values())), describe(list(torch_runs.values()))
        ratios = [torch_runs[s]["wall_s"] / jax_runs[s]["wall_s"] for s in torch_runs]
        ratio = f"**{statistics.mean(ratios):.2f}x**" if ratios else "-"
        lines += [f"| `cifar10_{recipe}.py` | jaxvision | {jt} | {jw} | {ratio} |",
                  f"| | PyTorch port | {tt} | {tw} | |"]
        if args.full:
            full = run_jaxvision(recipe, args.folder, args.seeds[0], 0.0)
            print(f"cifar10_{recipe} 50k jaxvision: {full}", flush=True)
            lines.append(f"| | jaxvision, all 50,000 images (no evaluation) | - | {full['wall_s'] / 60:.1f} min | |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
