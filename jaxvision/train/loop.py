"""Set-up from the config, the training loop with periodic evaluation and checkpoints, eval-only,
and the plan (how parameters are laid out, what one step costs).

The loop never waits on the device except to log every `log_every` steps and to evaluate.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm

from jaxvision import checkpoint, models
from jaxvision.errors import UserError
from jaxvision.data import pipeline, sources, transforms
from jaxvision.parallel import mesh as mesh_lib, sharding
from jaxvision.train import optim, state as state_lib, step as step_lib
from jaxvision.train.writer import MetricWriter, table

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Setup:
    config: object
    mesh: jax.sharding.Mesh
    model: object
    card: models.ModelCard
    image_size: int
    num_classes: int
    train_source: sources.Source | None
    eval_source: sources.Source | None

    @property
    def mean_std(self):
        return dict(mean=self.card.mean, std=self.card.std)

    def batch_shardings(self, with_mask: bool = False) -> dict:
        out = {"image": mesh_lib.batch_sharding(self.mesh, 4), "label": mesh_lib.batch_sharding(self.mesh, 1)}
        if with_mask:
            out["mask"] = mesh_lib.batch_sharding(self.mesh, 1)
        return out


def _open(config, dataset: str, split: str) -> sources.Source:
    return sources.open_source(dataset, split, data_dir=config.data.data_dir or None,
                               val_fraction=config.data.val_fraction)


def setup(config, *, train: bool = True, evaluate: bool = True) -> Setup:
    """Mesh, data sources and model from the config; fails early with a clear message."""
    mesh = mesh_lib.make_mesh(config.mesh, config.mesh_dcn)
    train_src = _open(config, config.data.dataset, config.data.train_split) if train else None
    eval_src = _open(config, config.data.eval_dataset or config.data.dataset,
                     config.data.eval_split) if evaluate else None
    num_classes = config.model.num_classes or (train_src or eval_src).num_classes
    for src in (train_src, eval_src):
        if src is not None and src.num_classes != num_classes:
            raise sources.DataError(f"the dataset has {src.num_classes} classes but the model "
                                    f"{num_classes}; set config.model.num_classes={src.num_classes}")
    if config.model.dtype not in DTYPES:
        raise UserError(f"config.model.dtype must be one of {', '.join(DTYPES)}")
    card = models.model_card(config.model.name)
    model = models.create(config.model.name, num_classes=num_classes, dtype=DTYPES[config.model.dtype],
                          **dict(config.model.kwargs))
    return Setup(config, mesh, model, card, int(config.data.image_size) or card.input_size,
                 num_classes, train_src, eval_src)


def _train_transform(s: Setup) -> transforms.TrainTransform:
    d = s.config.data
    return transforms.TrainTransform(s.image_size, d.augment, tuple(d.rrc_scale),
                                     d.interpolation or s.card.interpolation)


def _eval_transform(s: Setup) -> transforms.EvalTransform:
    d = s.config.data
    return transforms.EvalTransform(s.image_size, d.crop_pct or s.card.crop_pct,
                                    d.interpolation or s.card.interpolation)


def total_steps(config, train_size: int) -> int:
    if config.num_steps:
        return int(config.num_steps)
    return max(1, math.ceil(config.num_epochs * train_size / config.batch_size))


def _jit_steps(s: Setup, tx, shardings, steps: int):
    replicated = mesh_lib.replicated(s.mesh)
    train_step = jax.jit(
        step_lib.make_train_step(s.model, tx, num_classes=s.num_classes,
                                 label_smoothing=s.config.loss.label_smoothing, seed=s.config.seed,
                                 **s.mean_std),
        in_shardings=(shardings, s.batch_shardings()), out_shardings=(shardings, replicated),
        donate_argnums=0)
    return train_step, make_eval(s, shardings.variables())


def make_eval(s: Setup, variable_shardings):
    return jax.jit(step_lib.make_eval_step(s.model, num_classes=s.num_classes, **s.mean_std),
                   in_shardings=(variable_shardings, s.batch_shardings(with_mask=True)),
                   out_shardings=mesh_lib.replicated(s.mesh))


def run_eval(s: Setup, eval_step, variables, prefix: str = "val_") -> dict:
    """Loss, top-1 and top-5 over the whole evaluation split (each example exactly once)."""
    batch = s.config.eval_batch_size or s.config.batch_size
    local = mesh_lib.check_batch(batch, s.mesh)
    host = pipeline.eval_batches(s.eval_source, _eval_transform(s), batch_size=local,
                                 threads=s.config.data.threads)
    sums = None
    bar = tqdm(pipeline.prefetch_to_mesh(host, s.mesh), desc="eval", unit="batch", leave=False,
               total=pipeline.num_eval_batches(len(s.eval_source), local),
               disable=jax.process_index() != 0, dynamic_ncols=True)
    for b in bar:
        out = eval_step(variables, b)
        sums = out if sums is None else jax.tree_util.tree_map(jnp.add, sums, out)
    sums = jax.device_get(sums)
    n = max(float(sums["count"]), 1.0)
    return {f"{prefix}loss": float(sums["loss"]) / n, f"{prefix}top1": float(sums["top1"]) / n,
            f"{prefix}top5": float(sums["top5"]) / n}


def _identity(s: Setup) -> dict:
    """What a checkpoint must match to be resumed by this config."""
    return {"model": s.config.model.name, "num_classes": s.num_classes}


def train(config, workdir: str) -> dict:
    """Train (or resume) to `config.num_steps` / `num_epochs`, evaluating and checkpointing."""
    wall_start = time.perf_counter()
    s = setup(config)
    local_batch = mesh_lib.check_batch(config.batch_size, s.mesh)
    steps = total_steps(config, len(s.train_source))
    tx = optim.optimizer(config.optim, steps)
    init, shapes, shardings = state_lib.abstract_state(s.model, tx, s.image_size, s.mesh,
                                                       config.fsdp_min_size, config.seed)
    ckpts = checkpoint.Checkpoints(workdir, keep=config.keep_checkpoints)
    start = ckpts.latest_step() or 0
    if start:
        state, data = ckpts.restore(start, shapes, shardings, _identity(s))
        logging.info("resuming from step %d in %s", start, ckpts.directory)
    else:
        state = jax.jit(init, out_shardings=shardings)()
        if config.init_from:
            params, stats, heads = checkpoint.init_from(config.init_from, config.model.name,
                                                        state.params, state.batch_stats)
            state = state.replace(params=params, batch_stats=stats)
            logging.info("initialised from %s (new head: %s)", config.init_from, heads or "none")
    train_step, eval_step = _jit_steps(s, tx, shardings, steps)
    lr_at = optim.schedule(config.optim, steps // config.optim.accumulate)
    eval_every = config.eval_every or max(len(s.train_source) // config.batch_size, 1)
    log_every = config.log_every or 50
    stop_at = min(steps, start + config.run_steps) if config.run_steps else steps

    host = pipeline.train_batches(s.train_source, _train_transform(s), batch_size=local_batch,
                                  seed=config.seed, start_step=start, threads=config.data.threads,
                                  workers=config.data.workers)
    batches = pipeline.prefetch_to_mesh(host, s.mesh)
    writer = MetricWriter(workdir)
    bar = tqdm(total=steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
               disable=jax.process_index() != 0, mininterval=1.0)
    acc, n_acc, t_mark = None, 0, time.perf_counter()
    rates, evals = [], {}
    step = start
    try:
        for step in range(start + 1, stop_at + 1):
            state, metrics = train_step(state, next(batches))
            acc = metrics if acc is None else jax.tree_util.tree_map(jnp.add, acc, metrics)
            n_acc += 1
            bar.update(1)
            if step % log_every == 0 or step == stop_at:
                logged = {k: float(v) / n_acc for k, v in jax.device_get(acc).items()}  # the sync point
                rate = n_acc * config.batch_size / (time.perf_counter() - t_mark)
                if step - n_acc > start:  # the first interval after a (re)start includes compiling
                    rates.append(rate)
                logged.update(images_per_sec=rate, lr=float(lr_at(step)))
                writer.write(step, logged)
                bar.set_postfix(loss=f"{logged['loss']:.4f}", img_s=f"{rate:.0f}")
                acc, n_acc = None, 0
            if step % eval_every == 0 or step == steps:
                result = run_eval(s, eval_step, state.variables())
                evals[step] = result
                writer.write(step, result)
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
                ckpts.save(step, state, {**_identity(s), "next_batch": step}, metrics=result)
            elif (config.checkpoint_every and step % config.checkpoint_every == 0) or step == stop_at:
                ckpts.save(step, state, {**_identity(s), "next_batch": step})
            if step % log_every == 0:
                t_mark = time.perf_counter()  # evaluation and checkpointing are not throughput
    finally:
        bar.close()
        batches.close()
        ckpts.wait()
        ckpts.close()
        writer.close()
    summary = _summary(s, evals, rates, step, steps, time.perf_counter() - wall_start, workdir)
    return summary


def _summary(s: Setup, evals: dict, rates: list, step: int, steps: int, wall: float, workdir: str) -> dict:
    best_step = max(evals, key=lambda k: evals[k]["val_top1"]) if evals else None
    final = evals.get(step, {})
    summary = {
        "model": s.config.model.name, "steps": step, "of_steps": steps,
        "best_val_top1": evals[best_step]["val_top1"] if best_step else None, "best_step": best_step,
        "final_val_top1": final.get("val_top1"), "final_val_top5": final.get("val_top5"),
        "images_per_sec": float(np.median(rates)) if rates else None, "wall_seconds": wall,
        "devices": jax.device_count(), "mesh": dict(s.mesh.shape)}
    if jax.process_index() == 0:
        import json
        import os
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        fmt = lambda v: "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
        print(table([(k, fmt(v)) for k, v in summary.items()], header=("summary", "")))
        if step < steps:
            print(f"stopped at step {step} of {steps}; run the same command again to continue")
    return summary


def evaluate(config, workdir: str) -> dict:
    """Evaluate the workdir's best (else latest) checkpoint, or `init_from`, on the eval split."""
    s = setup(config, train=False)
    tx = optim.optimizer(config.optim, 1)
    init, shapes, shardings = state_lib.abstract_state(s.model, tx, s.image_size, s.mesh,
                                                       config.fsdp_min_size, config.seed)
    ckpts = checkpoint.Checkpoints(workdir, keep=config.keep_checkpoints)
    step = ckpts.best_step() or ckpts.latest_step()
    if step is not None:
        state, _ = ckpts.restore(step, shapes, shardings, _identity(s))
        variables = state.variables()
    elif config.init_from:
        state = jax.jit(init, out_shardings=shardings)()
        params, stats, heads = checkpoint.init_from(config.init_from, config.model.name,
                                                    state.params, state.batch_stats)
        if heads:
            raise checkpoint.CheckpointError(f"init_from {config.init_from} has no head for "
                                             f"{s.num_classes} classes; evaluation needs a trained head")
        variables = {"params": params, "batch_stats": stats}
    else:
        raise checkpoint.CheckpointError(f"nothing to evaluate: no checkpoint in {ckpts.directory} "
                                         "and no config.init_from")
    result = run_eval(s, make_eval(s, shardings.variables()), variables)
    if jax.process_index() == 0:
        dataset = config.data.eval_dataset or config.data.dataset
        print(table([(k, f"{v:.4f}") for k, v in result.items()],
                    header=(f"{dataset}:{config.data.eval_split} ({len(s.eval_source)} images, step {step})", "")))
    ckpts.close()
    return result


def plan(config, *, compile_step: bool = True) -> str:
    """How every parameter is sharded (bytes per device) and, compiled on abstract inputs, what
    one train step costs; needs no data when `config.model.num_classes` is set."""
    needs_data = not config.model.num_classes
    s = setup(config, train=needs_data, evaluate=False)
    local_batch = mesh_lib.check_batch(config.batch_size, s.mesh)
    tx = optim.optimizer(config.optim, 1000)
    _, shapes, shardings = state_lib.abstract_state(s.model, tx, s.image_size, s.mesh,
                                                    config.fsdp_min_size, config.seed)
    text = sharding.format_plan(sharding.plan_rows(shapes.params, shardings.params), s.mesh)
    if compile_step:
        train_step, _ = _jit_steps(s, tx, shardings, 1000)
        b = config.batch_size
        batch = {"image": jax.ShapeDtypeStruct((b, s.image_size, s.image_size, 3), jnp.uint8),
                 "label": jax.ShapeDtypeStruct((b,), jnp.int32)}
        t = time.perf_counter()
        compiled = train_step.lower(shapes, batch).compile()
        seconds = time.perf_counter() - t
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops = float(cost.get("flops", 0.0)) if cost else 0.0
        text += (f"\ntrain step: global batch {b} ({local_batch} per process) at {s.image_size}px, "
                 f"compiled in {seconds:.1f}s, {flops / 1e9:.1f} GFLOP per step per device (XLA cost analysis)")
    return text
