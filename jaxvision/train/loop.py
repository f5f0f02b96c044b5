"""The training loop with periodic evaluation and checkpoints, eval-only, and the plan (how
parameters are laid out, what one step costs); the set-up they start from is `train/setup.py`.

The loop never waits on the device except to log every `log_every` steps and to evaluate.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm

from jaxvision import backends, checkpoint, models, trained
from jaxvision import config as config_lib, workdir as workdir_lib
from jaxvision.data import mix as mix_lib
from jaxvision.data import pipeline, sources
from jaxvision.errors import UserError
from jaxvision.parallel import mesh as mesh_lib
from jaxvision.parallel import preemption, sharding
from jaxvision.train import evaluate as eval_lib
from jaxvision.train import optim
from jaxvision.train import step as step_lib
from jaxvision.train import whiten
from jaxvision.train.setup import Setup, eval_transform, identity, initial_weights, setup, train_transform
from jaxvision.train.writer import MetricWriter, evaluations, table

def total_steps(config, train_size: int) -> int:
    if config.num_steps:
        return int(config.num_steps)
    return max(1, math.ceil(config.num_epochs * train_size / config.batch_size))


def class_weights(spec: str, source: sources.Source | None, num_classes: int):
    """None, inverse-frequency weights ("balanced": N / (C * count)), or an explicit list."""
    if not spec:
        return None
    if spec == "balanced":
        counts = np.bincount(sources.labels_of(source), minlength=num_classes).astype(np.float64)
        return (counts.sum() / (num_classes * np.maximum(counts, 1))).astype(np.float32)
    weights = np.asarray([float(w) for w in spec.split(",")], np.float32)
    if weights.shape != (num_classes,):
        raise UserError(f"config.loss.class_weights has {weights.size} weights for {num_classes} classes")
    return weights


def step_options(s: Setup, param_shapes, stats_shapes, steps: int = 0) -> step_lib.StepOptions:
    c = s.config
    distill = None
    if s.distilling:
        teacher_card = models.model_card(c.distill.teacher)
        distill = step_lib.Distill(s.teacher, teacher_card.mean, teacher_card.std, s.teacher_size,
                                   c.distill.kind, c.distill.temperature, c.distill.w_task, c.distill.w_kd)
    keep_stats = None
    if c.optim.trainable or c.optim.frozen:
        trains = optim.trainable_mask(stats_shapes, c.optim.trainable, c.optim.frozen)
        keep_stats = jax.tree_util.tree_map(lambda t: not t, trains)
    return step_lib.StepOptions(
        num_classes=s.num_classes, mean=s.card.mean, std=s.card.std, seed=c.seed, loss=c.loss.name,
        focal_gamma=c.loss.focal_gamma, label_smoothing=c.loss.label_smoothing,
        class_weights=class_weights(c.loss.class_weights, s.train_source, s.num_classes),
        mix=mix_lib.MixConfig.from_config(c.mix, c.loss.label_smoothing),
        ema_decay=c.ema.decay, ema_warmup=c.ema.warmup, ema_ramp=c.ema.ramp, ema_sync_every=c.ema.sync_every,
        total_steps=steps, keep_stats=keep_stats, distill=distill)


def jit_train_step(s: Setup, tx, shapes, shardings, steps: int = 0):
    """The compiled step `(state, batch, teacher_variables)` of a run of `steps` steps (for the EMA's
    ramp and lookahead's last sync); the state is donated, the teacher's variables (None without
    distillation) are laid out like the student's and never written."""
    step = step_lib.make_train_step(s.model, tx, step_options(s, shapes.params, shapes.batch_stats, steps), s.mesh)
    teacher_shardings = s.teacher_shapes()[1] if s.distilling else None
    return jax.jit(step, in_shardings=(shardings, s.batch_shardings(), teacher_shardings),
                   out_shardings=(shardings, mesh_lib.replicated(s.mesh)), donate_argnums=0)


def load_teacher(s: Setup):
    """The teacher's variables on the mesh, from `distill.teacher_init` (must fit exactly)."""
    if not s.distilling:
        return None
    if not s.config.distill.teacher_init:
        raise UserError("config.distill.teacher_init must name the teacher's weights: a jaxvision "
                        "workdir or the output of python -m jaxvision.models.convert")
    shapes, shardings = s.teacher_shapes()
    return checkpoint.load_exact(s.config.distill.teacher_init, s.config.distill.teacher, shapes, shardings)


def jit_eval_step(s: Setup, variable_shardings):
    step = step_lib.make_eval_step(s.model, num_classes=s.num_classes, mean=s.card.mean,
                                   std=s.card.std, confusion=s.config.per_class_metrics, tta=s.config.tta)
    return jax.jit(step, in_shardings=(variable_shardings, s.batch_shardings(with_mask=True)),
                   out_shardings=mesh_lib.replicated(s.mesh))


def run_eval(s: Setup, eval_step, variables, workdir: str | None = None, step: int = 0,
             prefix: str = "val_") -> dict:
    c = s.config
    metrics, confusion = eval_lib.run(eval_step, variables, s.eval_source, eval_transform(s), s.mesh,
                                      c.eval_batch_size or c.batch_size, c.data.threads, c.data.workers, prefix)
    if confusion is not None and workdir and jax.process_index() == 0:
        name = f"{prefix}confusion_{step:07d}"
        eval_lib.save_confusion(confusion, s.eval_source.class_names,
                                os.path.join(workdir, "confusion", name + ".png"),
                                f"{c.model.name} step {step}: top-1 {metrics[prefix + 'top1']:.2%}, "
                                f"balanced {metrics[prefix + 'balanced_top1']:.2%}")
        np.save(os.path.join(workdir, "confusion", name + ".npy"), confusion)
    return metrics


class Diverged(UserError):
    """The loss or the gradients became non-finite; nothing after the last good checkpoint is
    kept. Exit status 3, so a scheduler does not retry the same run."""

    exit_code = 3


def _finite_rows(pending: list, first_step: int, s: Setup, last_good: int | None) -> list[dict]:
    """The host values of the steps' metrics since the last check; raises `Diverged` naming the
    first step whose loss or gradient norm is not finite."""
    rows = jax.device_get(pending)
    for i, row in enumerate(rows):
        bad = {k: float(row[k]) for k in ("loss", "grad_norm") if not math.isfinite(float(row[k]))}
        if bad:
            kept = (f"the last good checkpoint, step {last_good}, is kept and the run resumes from it"
                    if last_good else "no checkpoint was written")
            o = s.config.optim
            raise Diverged(
                f"training diverged at step {first_step + i}: {', '.join(f'{k} {v}' for k, v in bad.items())}; "
                f"{kept}. Likely causes: a learning rate too high for this batch (optim.lr={o.lr}), no gradient "
                f"clipping (optim.grad_clip={o.grad_clip}), {s.config.model.dtype} overflow, or bad input data")
    return rows


def train(config, workdir: str) -> dict:
    """Train (or resume) to `config.num_steps` / `num_epochs`, evaluating and checkpointing."""
    wall_start = time.perf_counter()
    config_lib.check(config)
    workdir = workdir_lib.prepare(workdir)
    with workdir_lib.RunLock(workdir):
        return _train(config, workdir, wall_start)


def whiten_first_conv(s: Setup, state):
    """`state` with its first convolution's leading filters whitening the patches of
    `model.whiten` training images (train/whiten.py), set in place on the devices; EMA too."""
    path = whiten.first_conv(state.params)
    if not path:
        raise UserError(f"model.whiten: {s.config.model.name} has no convolution to whiten")
    kernel_shape = functools.reduce(lambda node, key: node[key], path, state.params).shape
    images = whiten.sample(s.train_source, eval_transform(s), s.config.model.whiten, s.card.mean, s.card.std,
                           s.config.seed)
    kernel = whiten.whitening_kernel(images, *kernel_shape[:2], kernel_shape[-1])
    lead = kernel.shape[-1]

    def set_leading(old):
        return jax.jit(lambda x: x.at[..., :lead].set(kernel.astype(x.dtype)), out_shardings=old.sharding)(old)

    def put(tree):
        return jax.tree_util.tree_map_with_path(
            lambda p, x: set_leading(x) if tuple(k.key for k in p) == path else x, tree)
    logging.info("whitened %s from %d images (%d of %d filters)", "/".join(path), len(images),
                 lead, kernel_shape[-1])
    ema = None if state.ema is None else {**state.ema, "params": put(state.ema["params"])}
    return state.replace(params=put(state.params), ema=ema)


def holds_out_nothing(config) -> bool:
    """An image folder's "val" split with `val_fraction` 0 is empty by choice: train on every
    image and skip evaluation (any other empty split is an error)."""
    return (config.data.eval_split == "val" and float(config.data.val_fraction) == 0
            and (config.data.eval_dataset or config.data.dataset).startswith("folder:"))


def _train(config, workdir: str, wall_start: float) -> dict:
    s = setup(config, evaluate=not holds_out_nothing(config))
    if s.eval_source is None:
        logging.info("data.val_fraction is 0: training on every image, without evaluation")
    local_batch = mesh_lib.check_batch(config.batch_size, s.mesh)
    steps = total_steps(config, len(s.train_source))
    tx = s.optimizer(steps)
    init, shapes, shardings = s.abstract_state(tx)
    ckpts = checkpoint.Checkpoints(workdir, keep=config.keep_checkpoints)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, trained.CLASSES_FILE), "w") as f:
            json.dump(list(s.train_source.class_names), f)
    restored = ckpts.restore_good(shapes, shardings, identity(s))
    if restored:
        state, _, start = restored
        logging.info("resuming from step %d in %s", start, ckpts.directory)
    else:
        state, start = jax.jit(init, out_shardings=shardings)(), 0
        source = initial_weights(config)
        if source:
            params, stats, heads = checkpoint.init_from(source, config.model.name, state.params, state.batch_stats)
            ema = None if state.ema is None else {"params": params, "batch_stats": stats}
            state = state.replace(params=params, batch_stats=stats, ema=ema)
            logging.info("initialised from %s (new head: %s)", source, heads or "none")
        if config.model.whiten:
            state = whiten_first_conv(s, state)
    train_step = jit_train_step(s, tx, shapes, shardings, steps)
    eval_step = jit_eval_step(s, shardings.variables())
    teacher = load_teacher(s)
    accumulate = config.optim.accumulate
    lr_at = optim.schedule(config.optim, steps // accumulate)  # per optimizer step
    eval_every = config.eval_every or max(len(s.train_source) // config.batch_size, 1)
    log_every = config.log_every or 50
    stop_at = min(steps, start + config.run_steps) if config.run_steps else steps

    host = pipeline.train_batches(s.train_source, train_transform(s), batch_size=local_batch,
                                  seed=config.seed, start_step=start, threads=config.data.threads,
                                  workers=config.data.workers,
                                  balanced=config.data.sampling == "balanced")
    batches = pipeline.on_mesh(host, s.mesh)
    writer = MetricWriter(workdir, start)
    bar = tqdm(total=steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
               disable=jax.process_index() != 0, mininterval=1.0)
    pending, logged_rows, t_mark = [], [], time.perf_counter()
    rates, evals = [], evaluations(workdir, start)
    step, preempted, last_good = start, False, start or None
    watch = preemption.PreemptionWatch()

    def save(step, metrics=None):
        nonlocal last_good
        ckpts.save(step, state, {**identity(s), "next_batch": step}, metrics=metrics)
        last_good = step

    try:
        for step in range(start + 1, stop_at + 1):
            state, metrics = train_step(state, next(batches), teacher)
            pending.append(metrics)
            bar.update(1)
            log_now = step % log_every == 0 or step == stop_at
            eval_now = s.eval_source is not None and (step % eval_every == 0 or step == steps)
            save_now = (config.checkpoint_every and step % config.checkpoint_every == 0) or step == stop_at
            stop_now = watch.reached(step) and step < stop_at
            if log_now or eval_now or save_now or stop_now:  # a sync point: nothing non-finite goes on
                logged_rows += _finite_rows(pending, step - len(pending) + 1, s, last_good)
                pending = []
            if log_now:
                n = len(logged_rows)
                logged = {k: float(np.mean([r[k] for r in logged_rows])) for k in logged_rows[0]}
                rate = n * config.batch_size / (time.perf_counter() - t_mark)
                if step - n > start:  # the first interval after a (re)start includes compiling
                    rates.append(rate)
                logged.update(images_per_sec=rate, lr=float(lr_at(step // accumulate)))
                writer.write(step, logged)
                bar.set_postfix(loss=f"{logged['loss']:.4f}", img_s=f"{rate:.0f}")
                logged_rows = []
            if eval_now:
                result = run_eval(s, eval_step, state.variables(), workdir, step)
                if state.ema is not None and not config.ema.sync_every:  # lookahead: weights are the average
                    result.update(run_eval(s, eval_step, state.ema, workdir, step, prefix="ema_val_"))
                evals[step] = result
                writer.write(step, result)
                if jax.process_index() == 0:
                    bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
                save(step, result)
            elif save_now:
                save(step)
            if stop_now:
                if last_good != step:
                    save(step)
                preempted = True
                if jax.process_index() == 0:
                    bar.write(f"preemption notice: saved step {step}; run the same command to resume")
                break
            if step % log_every == 0:
                t_mark = time.perf_counter()  # evaluation and checkpointing are not throughput
    finally:
        watch.close()
        bar.close()
        batches.close()
        ckpts.wait()
        ckpts.close()
        writer.close()
    return _summary(s, evals, rates, step, steps, time.perf_counter() - wall_start, workdir, preempted)


def _summary(s: Setup, evals: dict, rates: list, step: int, steps: int, wall: float, workdir: str,
             preempted: bool = False) -> dict:
    best_step = max(evals, key=lambda k: evals[k]["val_top1"]) if evals else None
    final = evals.get(step, {})
    summary = {
        "model": s.config.model.name, "steps": step, "of_steps": steps,
        "best_val_top1": evals[best_step]["val_top1"] if best_step else None, "best_step": best_step,
        "final_val_top1": final.get("val_top1"), "final_val_top5": final.get("val_top5"),
        **({"final_ema_val_top1": final["ema_val_top1"]} if "ema_val_top1" in final else {}),
        **({"unreadable_val_images": int(final["val_unreadable"])} if "val_unreadable" in final else {}),
        "images_per_sec": float(np.median(rates)) if rates else None, "wall_seconds": wall,
        "devices": jax.device_count(), "processes": jax.process_count(), "mesh": dict(s.mesh.shape),
        "ops": s.model.ops.describe(),
        "preempted": preempted}
    if jax.process_index() == 0:
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
    variables, variable_shardings, step = trained.variables(s, workdir)
    result = run_eval(s, jit_eval_step(s, variable_shardings), variables, workdir, step or 0)
    if jax.process_index() == 0:
        dataset = config.data.eval_dataset or config.data.dataset
        print(table([(k, f"{v:.4f}") for k, v in result.items()],
                    header=(f"{dataset}:{config.data.eval_split} ({len(s.eval_source)} images, step {step})", "")))
    return result


def plan(config, workdir: str | None = None, *, lower: bool = True) -> str:
    """How every parameter is sharded (bytes per device), and the train step lowered for
    `config.plan.platform` (default: this host's) on abstract inputs: its FLOPs, its StableHLO
    written to `config.plan.output` (default WORKDIR/plan_<platform>.stablehlo.mlir), and, when the
    target is this host's platform, its compile time and memory. With `config.plan.devices` the
    mesh is an abstract one of that many devices, so a CPU host can plan a TPU pod. Needs no data
    when `config.model.num_classes` is set."""
    host = backends.platform_of(jax.devices())
    platform = backends.check_platform(config.plan.platform or host, "config.plan.platform")
    devices = int(config.plan.devices) or len(jax.devices())
    if devices < 1:
        raise UserError(f"config.plan.devices must be at least 1 (0: this host's), not {config.plan.devices}")
    s = setup(config, train=not config.model.num_classes, evaluate=False, platform=platform,
              mesh=mesh_lib.abstract_mesh(config.mesh, config.mesh_dcn, devices) if config.plan.devices else None)
    local_batch = mesh_lib.check_batch(config.batch_size, s.mesh)
    tx = s.optimizer(1000)
    _, shapes, shardings = s.abstract_state(tx)
    lines = [f"plan for {platform} ({s.model.ops.describe()})",
             sharding.format_plan(sharding.plan_rows(shapes.params, shardings.params), s.mesh)]
    opt_rows = sharding.plan_rows(shapes.opt_state, shardings.opt_state)
    lines.append(f"optimizer state: {sum(r.mib for r in opt_rows):.2f} MiB, "
                 f"{sum(r.mib_per_device for r in opt_rows):.2f} MiB per device")
    if not lower:
        return "\n".join(lines)
    b = config.batch_size
    batch = {"image": jax.ShapeDtypeStruct((b, s.image_size, s.image_size, 3), jnp.uint8),
             "label": jax.ShapeDtypeStruct((b,), jnp.int32)}
    teacher = s.teacher_shapes()[0] if s.distilling else None
    t = time.perf_counter()
    lowered = jit_train_step(s, tx, shapes, shardings, 1000).trace(shapes, batch, teacher).lower(
        lowering_platforms=(platform,))
    seconds = time.perf_counter() - t
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    text = lowered.as_text()
    lines.append(f"train step: global batch {b} ({local_batch} per process) at {s.image_size}px, lowered "
                 f"for {platform} in {seconds:.1f}s: {flops / 1e9:.1f} GFLOP per step, "
                 f"{flops / 1e9 / s.mesh.size:.1f} per device (XLA's cost analysis of the lowered module"
                 + ("; it counts a loop's body once, so scanned blocks are undercounted by their depth)"
                    if "stablehlo.while" in text else ")"))
    output = config.plan.output or (workdir and os.path.join(workdir, f"plan_{platform}.stablehlo.mlir"))
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w") as f:
            f.write(text)
        lines.append(f"wrote its StableHLO to {output}")
    if platform == host and not config.plan.devices:
        t = time.perf_counter()
        compiled = lowered.compile()
        mem = compiled.memory_analysis()
        lines.append(f"compiled in {time.perf_counter() - t:.1f}s on this host: "
                     f"{mem.temp_size_in_bytes / 2**20:.0f} MiB of temporaries per device")
    else:
        lines.append(f"not compiled: the target is {platform} x {s.mesh.size}, this host has "
                     f"{host} x {len(jax.devices())}")
    return "\n".join(lines)
