"""ViT train steps with and without `scan_blocks`, under each remat policy: how long the step
takes to compile and how much memory the compiled step needs (XLA's `memory_analysis`), on the
portable ops (what TPU and GPU users get), compiled for this host's CPU. Nothing runs: the step
is lowered and compiled on abstract inputs, so ViT-L fits on a laptop.

    python experiments/vit_scan.py [--models vit_base_patch16_224 vit_large_patch16_224] [--batch 32]
                                   [--policies none full dots_saveable]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import ml_collections

from jaxvision import models
from jaxvision.parallel import mesh as mesh_lib
from jaxvision.train import optim
from jaxvision.train import state as state_lib
from jaxvision.train import step as step_lib


def measure(name: str, scan: bool, policy: str, batch: int, size: int = 224) -> dict:
    model = models.create(name, scan_blocks=scan, remat_policy=policy)
    mesh = mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
    tx = optim.optimizer(ml_collections.ConfigDict({"name": "adamw", "lr": 1e-3, "weight_decay": 0.05,
                                                    "schedule": "constant"}), 1000)
    _, shapes, shardings = state_lib.abstract_state(model, tx, size, mesh, 2 ** 62)
    card = models.model_card(name, feature_info=False)
    step = step_lib.make_train_step(model, tx, step_lib.StepOptions(num_classes=1000, mean=card.mean, std=card.std), mesh)
    batch_shapes = {"image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8),
                    "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
    t = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=0).trace(shapes, batch_shapes).lower()
    lower_s = time.perf_counter() - t
    t = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    return {"lower": lower_s, "compile": compile_s, "temp": mem.temp_size_in_bytes / 2 ** 30,
            "arguments": mem.argument_size_in_bytes / 2 ** 30}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vit_base_patch16_224", "vit_large_patch16_224"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--policies", nargs="+", default=["none", "full", "dots_saveable"])
    args = parser.parse_args()
    print(f"# ViT train steps, scanned or not, per remat policy (`python experiments/vit_scan.py "
          f"--models {' '.join(args.models)} --batch {args.batch}`): portable ops, AdamW, batch "
          f"{args.batch} at 224 px, compiled for CPU (jax {jax.__version__})\n")
    print("| model | blocks | remat | lower s | compile s | temporaries GiB | arguments GiB |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name in args.models:
        for scan in (False, True):
            for policy in args.policies:
                r = measure(name, scan, policy, args.batch)
                print(f"| {name} | {'scanned' if scan else 'unrolled'} | {policy} | {r['lower']:.1f} | "
                      f"{r['compile']:.1f} | {r['temp']:.2f} | {r['arguments']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
