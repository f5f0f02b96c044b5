"""Does distillation help? The same width-8 student, same 5-epoch budget, on CIFAR-10 (45k train /
5k held-out validation from the training set), trained with and without the engine-trained teacher.

    python experiments/distill_cifar10.py /tmp/cifar10/train /tmp/jv_cifar

Trains the teacher first (configs/cifar10_resnet.py, about 20 minutes here) when the teacher
workdir has no checkpoint. Prints a table of the three validation accuracies and wall times.
"""

import contextlib
import json
import os
import sys
import time

from jaxvision.config import load
from jaxvision.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg=None):
    return load(os.path.join(ROOT, "configs", f"{name}.py"), arg)


def run(config, workdir):
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        summary = loop.train(config, workdir)
    return summary, time.perf_counter() - start


def main():
    folder = sys.argv[1] if len(sys.argv) > 1 else "/tmp/cifar10/train"
    teacher_dir = sys.argv[2] if len(sys.argv) > 2 else "/tmp/jv_cifar"
    out_dir = sys.argv[3] if len(sys.argv) > 3 else "/tmp/jv_distill"
    summary_file = os.path.join(teacher_dir, "summary.json")
    if not os.path.exists(summary_file):
        run(load_config("cifar10_resnet", folder), teacher_dir)
    with open(summary_file) as f:
        teacher = json.load(f)
    rows = [("teacher: ResNet-18 layout, width 16 (0.70M params)", teacher["final_val_top1"],
             teacher["wall_seconds"])]
    for name, overrides in (("student alone: width 8 (0.18M params)", {"distill.teacher": ""}),
                            ("student + teacher (logits KD, T=4)", {})):
        config = load_config("cifar10_distill", f"{folder},{teacher_dir}")
        for key, value in overrides.items():
            section, field = key.split(".")
            config[section][field] = value
        workdir = os.path.join(out_dir, "kd" if not overrides else "alone")
        summary, wall = run(config, workdir)
        rows.append((name, summary["final_val_top1"], wall))
    print(f"# Distillation on CIFAR-10 (`python experiments/distill_cifar10.py {folder} {teacher_dir}`)\n")
    print(f"{os.cpu_count()} CPU cores; students: 5 epochs, batch 128, same seed and data order.\n")
    print("| model | val top-1 (5,000 held out) | wall time (s) |\n|---|---:|---:|")
    for name, acc, wall in rows:
        print(f"| {name} | {acc:.2%} | {wall:.0f} |")
    gain = rows[2][1] - rows[1][1]
    print(f"\nDistillation {'helped' if gain > 0 else 'did not help'}: {gain * 100:+.2f} points.")


if __name__ == "__main__":
    main()
