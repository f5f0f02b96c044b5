"""Set-up from the config, the training loop with periodic evaluation and checkpoints, eval-only,
and the plan (how parameters are laid out, what one step costs).

The loop never waits on the device except to log every `log_every` steps and to evaluate.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm

from jaxvision import backends, checkpoint, models
from jaxvision.data import mix as mix_lib
from jaxvision.data import pipeline, sources, transforms
from jaxvision.errors import UserError
from jaxvision.parallel import mesh as mesh_lib
from jaxvision.parallel import preemption, sharding
from jaxvision.train import evaluate as eval_lib
from jaxvision.train import optim
from jaxvision.train import state as state_lib
from jaxvision.train import step as step_lib
from jaxvision.train.writer import MetricWriter, evaluations, table

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
CLASSES_FILE = "classes.json"  # class names in the workdir, for modes that run without the data


@dataclasses.dataclass
class Setup:
    """Everything derived from the config before any array exists."""

    config: object
    mesh: jax.sharding.Mesh
    model: object
    card: models.ModelCard
    image_size: int
    num_classes: int
    train_source: sources.Source | None
    eval_source: sources.Source | None
    teacher: object = None  # the distillation teacher module, if any

    @property
    def distilling(self) -> bool:
        return self.teacher is not None

    def batch_shardings(self, with_mask: bool = False) -> dict:
        out = {"image": mesh_lib.batch_sharding(self.mesh, 4), "label": mesh_lib.batch_sharding(self.mesh, 1)}
        if with_mask:
            out["mask"] = mesh_lib.batch_sharding(self.mesh, 1)
        return out

    @property
    def teacher_size(self) -> int:
        return self.config.distill.teacher_image_size or self.image_size

    def extra_params(self) -> dict:
        """Feature distillation between different widths trains a projection beside the model."""
        if not self.distilling or self.config.distill.kind != "feature":
            return {}
        dims = [jax.eval_shape(lambda: m.apply(m.init(jax.random.key(0), jnp.zeros((1, size, size, 3))),
                                               jnp.zeros((1, size, size, 3)), pre_logits=True)).shape[-1]
                for m, size in ((self.model, self.image_size), (self.teacher, self.teacher_size))]
        if dims[0] == dims[1]:
            return {}
        return {"distill_proj": {"kernel": state_lib.extra_param(tuple(dims), ("features", "embed"))}}

    def param_shapes(self):
        return nn.meta.unbox(state_lib.boxed_variables(self.model, self.image_size, 0,
                                                       self.extra_params())["params"])

    def optimizer(self, steps: int):
        return optim.optimizer(self.config.optim, steps, self.config.model.name, self.param_shapes())

    def abstract_state(self, tx):
        return state_lib.abstract_state(self.model, tx, self.image_size, self.mesh,
                                        self.config.fsdp_min_size, self.config.seed,
                                        ema=self.config.ema.decay > 0, extra_params=self.extra_params())

    def teacher_shapes(self):
        """(abstract teacher variables, their shardings), by the same rules as the student's."""
        boxed = state_lib.boxed_variables(self.teacher, self.teacher_size)
        shardings = sharding.variable_shardings(boxed, self.mesh, self.config.fsdp_min_size)
        return nn.meta.unbox(boxed), shardings


def open_source(config, dataset: str, split: str) -> sources.Source:
    return sources.open_source(dataset, split, data_dir=config.data.data_dir or None,
                               val_fraction=config.data.val_fraction)


def setup(config, *, train: bool = True, evaluate: bool = True, platform: str = "", mesh=None) -> Setup:
    """Mesh, data sources and model from the config; fails early with a clear message. The model
    is traced with the ops for `platform` (default: the platform of the mesh's devices)."""
    mesh = mesh or mesh_lib.make_mesh(config.mesh, config.mesh_dcn)
    backends.check_backend(config.backend)
    train_src = open_source(config, config.data.dataset, config.data.train_split) if train else None
    eval_src = open_source(config, config.data.eval_dataset or config.data.dataset,
                     config.data.eval_split) if evaluate else None
    num_classes = config.model.num_classes or (train_src or eval_src).num_classes
    for src in (train_src, eval_src):
        if src is not None and src.num_classes != num_classes:
            raise sources.DataError(f"the dataset has {src.num_classes} classes but the model "
                                    f"{num_classes}; set config.model.num_classes={src.num_classes}")
    if config.model.dtype not in DTYPES:
        raise UserError(f"config.model.dtype must be one of {', '.join(DTYPES)}")
    card = models.model_card(config.model.name)
    kwargs = dict(config.model.kwargs)
    if platform:
        ops = backends.ops_for(platform, config.backend, mesh.size)
    else:
        ops = backends.for_mesh(mesh, config.backend)
    teacher = None
    if config.distill.teacher:
        d = config.distill
        if d.kind not in step_lib.DISTILL_KINDS:
            raise UserError(f"config.distill.kind must be one of {', '.join(step_lib.DISTILL_KINDS)}")
        if d.kind.startswith("deit"):
            if not models.architecture(config.model.name).get("distilled"):
                raise UserError(f"distill.kind={d.kind} needs a student with a distillation token "
                                f"(deit_*_distilled_*), not {config.model.name}")
            kwargs["distilled_training"] = True
        teacher = models.create(d.teacher, num_classes=num_classes, dtype=DTYPES[config.model.dtype],
                                ops=ops, **dict(d.teacher_kwargs))
    model = models.create(config.model.name, num_classes=num_classes, dtype=DTYPES[config.model.dtype],
                          ops=ops, **kwargs)
    return Setup(config, mesh, model, card, int(config.data.image_size) or card.input_size,
                 num_classes, train_src, eval_src, teacher)


def _train_transform(s: Setup) -> transforms.TrainTransform:
    d = s.config.data
    return transforms.TrainTransform(s.image_size, d.augment, tuple(d.rrc_scale),
                                     d.interpolation or s.card.interpolation, d.randaugment,
                                     d.reprob, d.remode)


def eval_transform(s: Setup) -> transforms.EvalTransform:
    d = s.config.data
    return transforms.EvalTransform(s.image_size, d.crop_pct or s.card.crop_pct,
                                    d.interpolation or s.card.interpolation)


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


def step_options(s: Setup, param_shapes, stats_shapes) -> step_lib.StepOptions:
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
        ema_decay=c.ema.decay, ema_warmup=c.ema.warmup, keep_stats=keep_stats, distill=distill)


def jit_train_step(s: Setup, tx, shapes, shardings):
    """The compiled step `(state, batch, teacher_variables)`; the state is donated, the teacher's
    variables (None without distillation) are laid out like the student's and never written."""
    step = step_lib.make_train_step(s.model, tx, step_options(s, shapes.params, shapes.batch_stats), s.mesh)
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
                                   std=s.card.std, confusion=s.config.per_class_metrics)
    return jax.jit(step, in_shardings=(variable_shardings, s.batch_shardings(with_mask=True)),
                   out_shardings=mesh_lib.replicated(s.mesh))


def run_eval(s: Setup, eval_step, variables, workdir: str | None = None, step: int = 0,
             prefix: str = "val_") -> dict:
    c = s.config
    metrics, confusion = eval_lib.run(eval_step, variables, s.eval_source, eval_transform(s), s.mesh,
                                      c.eval_batch_size or c.batch_size, c.data.threads, prefix)
    if confusion is not None and workdir and jax.process_index() == 0:
        name = f"{prefix}confusion_{step:07d}"
        eval_lib.save_confusion(confusion, s.eval_source.class_names,
                                os.path.join(workdir, "confusion", name + ".png"),
                                f"{c.model.name} step {step}: top-1 {metrics[prefix + 'top1']:.2%}, "
                                f"balanced {metrics[prefix + 'balanced_top1']:.2%}")
        np.save(os.path.join(workdir, "confusion", name + ".npy"), confusion)
    return metrics


def _identity(s: Setup) -> dict:
    """What a checkpoint must match to be resumed by this config."""
    return {"model": s.config.model.name, "num_classes": s.num_classes}


def train(config, workdir: str) -> dict:
    """Train (or resume) to `config.num_steps` / `num_epochs`, evaluating and checkpointing."""
    wall_start = time.perf_counter()
    s = setup(config)
    local_batch = mesh_lib.check_batch(config.batch_size, s.mesh)
    steps = total_steps(config, len(s.train_source))
    tx = s.optimizer(steps)
    init, shapes, shardings = s.abstract_state(tx)
    ckpts = checkpoint.Checkpoints(workdir, keep=config.keep_checkpoints)
    start = ckpts.latest_step() or 0
    if jax.process_index() == 0:
        with open(os.path.join(workdir, CLASSES_FILE), "w") as f:
            json.dump(list(s.train_source.class_names), f)
    if start:
        state, _ = ckpts.restore(start, shapes, shardings, _identity(s))
        logging.info("resuming from step %d in %s", start, ckpts.directory)
    else:
        state = jax.jit(init, out_shardings=shardings)()
        if config.init_from:
            params, stats, heads = checkpoint.init_from(config.init_from, config.model.name,
                                                        state.params, state.batch_stats)
            ema = None if state.ema is None else {"params": params, "batch_stats": stats}
            state = state.replace(params=params, batch_stats=stats, ema=ema)
            logging.info("initialised from %s (new head: %s)", config.init_from, heads or "none")
    train_step = jit_train_step(s, tx, shapes, shardings)
    eval_step = jit_eval_step(s, shardings.variables())
    teacher = load_teacher(s)
    lr_at = optim.schedule(config.optim, steps // config.optim.accumulate)
    eval_every = config.eval_every or max(len(s.train_source) // config.batch_size, 1)
    log_every = config.log_every or 50
    stop_at = min(steps, start + config.run_steps) if config.run_steps else steps

    host = pipeline.train_batches(s.train_source, _train_transform(s), batch_size=local_batch,
                                  seed=config.seed, start_step=start, threads=config.data.threads,
                                  workers=config.data.workers,
                                  balanced=config.data.sampling == "balanced")
    batches = pipeline.prefetch_to_mesh(host, s.mesh)
    writer = MetricWriter(workdir)
    bar = tqdm(total=steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
               disable=jax.process_index() != 0, mininterval=1.0)
    acc, n_acc, t_mark = None, 0, time.perf_counter()
    rates, evals = [], evaluations(workdir, start)
    step, preempted = start, False
    watch = preemption.PreemptionWatch()
    try:
        for step in range(start + 1, stop_at + 1):
            state, metrics = train_step(state, next(batches), teacher)
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
                result = run_eval(s, eval_step, state.variables(), workdir, step)
                if state.ema is not None:
                    result.update(run_eval(s, eval_step, state.ema, workdir, step, prefix="ema_val_"))
                evals[step] = result
                writer.write(step, result)
                if jax.process_index() == 0:
                    bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
                ckpts.save(step, state, {**_identity(s), "next_batch": step}, metrics=result)
            elif (config.checkpoint_every and step % config.checkpoint_every == 0) or step == stop_at:
                ckpts.save(step, state, {**_identity(s), "next_batch": step})
            if watch.reached(step) and step < stop_at:
                if ckpts.latest_step() != step:
                    ckpts.save(step, state, {**_identity(s), "next_batch": step})
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


def trained_variables(s: Setup, workdir: str):
    """(variables, their shardings, step) of the workdir's best (else latest) checkpoint, or of
    `init_from` (step None), for every mode that uses a trained model."""
    config = s.config
    init, shapes, shardings = s.abstract_state(s.optimizer(1))
    ckpts = checkpoint.Checkpoints(workdir, keep=config.keep_checkpoints)
    try:
        step = ckpts.best_step() or ckpts.latest_step()
        if step is not None:
            state, _ = ckpts.restore(step, shapes, shardings, _identity(s))
            return state.variables(), shardings.variables(), step
    finally:
        ckpts.close()
    if not config.init_from:
        raise checkpoint.CheckpointError(f"no trained model: no checkpoint in {ckpts.directory} "
                                         "and no config.init_from")
    state = jax.jit(init, out_shardings=shardings)()
    params, stats, heads = checkpoint.init_from(config.init_from, config.model.name,
                                                state.params, state.batch_stats)
    if heads:
        raise checkpoint.CheckpointError(f"init_from {config.init_from} has no head for "
                                         f"{s.num_classes} classes; this mode needs a trained head")
    return {"params": params, "batch_stats": stats}, shardings.variables(), None


def evaluate(config, workdir: str) -> dict:
    """Evaluate the workdir's best (else latest) checkpoint, or `init_from`, on the eval split."""
    s = setup(config, train=False)
    variables, variable_shardings, step = trained_variables(s, workdir)
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
    lines.append(f"optimizer state: {sum(r[3] for r in opt_rows) / 2**20:.2f} MiB, "
                 f"{sum(r[4] for r in opt_rows) / 2**20:.2f} MiB per device")
    if not lower:
        return "\n".join(lines)
    b = config.batch_size
    batch = {"image": jax.ShapeDtypeStruct((b, s.image_size, s.image_size, 3), jnp.uint8),
             "label": jax.ShapeDtypeStruct((b,), jnp.int32)}
    teacher = s.teacher_shapes()[0] if s.distilling else None
    t = time.perf_counter()
    lowered = jit_train_step(s, tx, shapes, shardings).trace(shapes, batch, teacher).lower(
        lowering_platforms=(platform,))
    seconds = time.perf_counter() - t
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    lines.append(f"train step: global batch {b} ({local_batch} per process) at {s.image_size}px, lowered "
                 f"for {platform} in {seconds:.1f}s: {flops / 1e9:.1f} GFLOP per step, "
                 f"{flops / 1e9 / s.mesh.size:.1f} per device (XLA's cost analysis of the lowered module)")
    output = config.plan.output or (workdir and os.path.join(workdir, f"plan_{platform}.stablehlo.mlir"))
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w") as f:
            f.write(lowered.as_text())
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
