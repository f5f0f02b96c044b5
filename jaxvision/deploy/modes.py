"""The deployment modes of `python -m jaxvision.main`: predict, calibrate, quantize, export and
explain, each on the workdir's best (else latest) checkpoint or `config.init_from`."""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import numpy as np
from tqdm import tqdm

from jaxvision import backends, trained
from jaxvision.data import pipeline
from jaxvision.deploy import calibration, export as export_lib, predict as predict_lib, quantize as quantize_lib
from jaxvision.errors import UserError
from jaxvision.models.ops import PORTABLE
from jaxvision.parallel import mesh as mesh_lib
from jaxvision.train import evaluate as eval_lib, step as step_lib
from jaxvision.train.setup import eval_transform, open_source
from jaxvision.train.writer import table

def _float_apply(s):
    return lambda variables, images: s.model.apply(variables, images, train=False)


def _portable(s):
    """The setup with its model on the portable ops, for the modes that intercept its layers."""
    return dataclasses.replace(s, model=s.model.clone(ops=PORTABLE))


def _logits_fn(s, variable_shardings, apply=None):
    """jit of (variables, batch) -> (logits, label, mask); `apply(variables, images)` defaults to
    the float model; with `config.tta`, averaged over its views."""
    apply = step_lib.test_time_augmented(apply or _float_apply(s), s.config.tta)

    def fn(variables, batch):
        images = step_lib.normalize(batch["image"], s.card.mean, s.card.std)
        return apply(variables, images), batch["label"], batch["mask"]
    return jax.jit(fn, in_shardings=(variable_shardings, s.batch_shardings(with_mask=True)),
                   out_shardings=mesh_lib.replicated(s.mesh))


def _split_logits(s, fn, variables, source, desc: str):
    c = s.config
    return eval_lib.collect_logits(fn, variables, source, eval_transform(s), s.mesh,
                                   c.eval_batch_size or c.batch_size, c.data.threads, c.data.workers, desc)


def calibrate(config, workdir: str) -> dict:
    """Fit the temperature and the OOD threshold on the validation split; report ECE (and AUROC
    on `calibrate.ood_dataset`); write calibration.json and reliability.png."""
    c = config.calibrate
    if not 0 < c.accept < 1:
        raise UserError(f"config.calibrate.accept must be a fraction in (0, 1), not {c.accept}")
    if c.score not in calibration.SCORES:
        raise UserError(f"config.calibrate.score must be one of {', '.join(calibration.SCORES)}")
    t = trained.load(config, workdir, evaluate=True)
    s, variables, shardings, step, _ = t.setup, t.variables, t.shardings, t.step, t.class_names
    fn = _logits_fn(s, shardings)
    logits, labels = _split_logits(s, fn, variables, s.eval_source, "validation logits")
    ood = None
    if c.ood_dataset:
        ood_source = open_source(s.config, c.ood_dataset, c.ood_split)
        ood, _ = _split_logits(s, fn, variables, ood_source, f"OOD logits ({c.ood_dataset})")
    result = calibration.calibrate(logits, labels, accept=c.accept, score=c.score, ood_logits=ood)
    result.update(model=s.config.model.name, step=step, ood_dataset=c.ood_dataset or None)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        calibration.save(result, workdir)
        png = calibration.save_reliability(
            calibration.softmax(logits), calibration.softmax(logits, result["temperature"]), labels,
            os.path.join(workdir, "reliability.png"),
            f"{s.config.model.name}, {len(labels)} validation images, T = {result['temperature']:.3f}")
        print(table([(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in result.items()],
                    header=("calibration", "")))
        print(f"wrote {os.path.join(workdir, calibration.FILE)} and {png}")
    return result


def _quantized(s, variables, qtype: str):
    """(apply, variables) of the int8 model, variables on the host."""
    qmodel, qvariables = quantize_lib.quantize(s.model, jax.device_get(variables),
                                               (s.image_size, s.image_size, 3), qtype)
    return (lambda v, x: quantize_lib.apply(qmodel, v, x)), qvariables


def quantize(config, workdir: str) -> dict:
    """Post-training int8 quantization: top-1 of float32 and int8 on the validation split, and the
    weights' size; writes WORKDIR/quantize.json. Export the int8 model with
    `--mode export --config.export.quantize=int8`."""
    c = config.quantize
    t = trained.load(config, workdir, evaluate=True)
    s, variables, shardings, step, _ = t.setup, t.variables, t.shardings, t.step, t.class_names
    apply, qvariables = _quantized(s, variables, c.qtype)
    logits, labels = _split_logits(s, _logits_fn(s, shardings), variables, s.eval_source, "float32")
    qfn = _logits_fn(s, mesh_lib.replicated(s.mesh), apply)
    qlogits, _ = _split_logits(s, qfn, jax.device_put(qvariables, mesh_lib.replicated(s.mesh)),
                               s.eval_source, c.qtype)
    top1, qtop1 = (float(np.mean(np.argmax(x, -1) == labels)) for x in (logits, qlogits))
    size, qsize = quantize_lib.nbytes(variables), quantize_lib.nbytes(qvariables)
    result = {"model": s.config.model.name, "step": step, "qtype": c.qtype, "images": len(labels),
              "top1_float32": top1, f"top1_{c.qtype}": qtop1, "top1_change_points": 100 * (qtop1 - top1),
              "agreement": float(np.mean(np.argmax(logits, -1) == np.argmax(qlogits, -1))),
              "weights_mib_float32": size / 2 ** 20, f"weights_mib_{c.qtype}": qsize / 2 ** 20,
              "size_ratio": qsize / size, "tolerance_points": c.tolerance,
              "within_tolerance": bool(100 * (top1 - qtop1) <= c.tolerance)}
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "quantize.json"), "w") as f:
            json.dump(result, f, indent=2)
        print(table([(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in result.items()],
                    header=("quantization", "")))
        print(f"wrote {os.path.join(workdir, 'quantize.json')}"
              + ("" if result["within_tolerance"] else
                 f"; WARNING: int8 loses more than {c.tolerance} points of top-1"))
    return result


def predict(config, workdir: str) -> list[dict]:
    """Top-k per input image: a table on stdout and a CSV (`predict.output`, default in WORKDIR)."""
    if jax.process_count() > 1:
        raise UserError("predict runs on one host; launch it without jax.distributed")
    paths = predict_lib.list_inputs(config.predict.inputs)
    t = trained.load(config, workdir)
    s, variables, shardings, names = t.setup, t.variables, t.shardings, t.class_names
    fn = _logits_fn(s, shardings)
    transform = eval_transform(s)
    batch_size = config.eval_batch_size or config.batch_size
    mesh_lib.check_batch(batch_size, s.mesh)
    logits = np.zeros((len(paths), s.num_classes), np.float32)
    readable = np.zeros(len(paths), bool)
    for start in tqdm(range(0, len(paths), batch_size), desc="predict", unit="batch", dynamic_ncols=True):
        chunk = paths[start:start + batch_size]
        images = [predict_lib.read(p) for p in chunk]
        ok = [i for i, im in enumerate(images) if im is not None]
        readable[[start + i for i in ok]] = True
        if not ok:
            continue
        batch = [transform({"image": images[i], "label": 0}) for i in ok]
        host = pipeline.pad_batch({"image": np.stack([b["image"] for b in batch]),
                                   "label": np.zeros(len(batch), np.int32)}, batch_size, len(batch))
        out, _, _ = jax.device_get(fn(variables, pipeline.to_global(host, s.mesh)))
        logits[[start + i for i in ok]] = np.asarray(out, np.float32)[:len(ok)]
    cal = calibration.load(workdir)
    top_k = max(1, min(config.predict.top_k, s.num_classes))
    result = predict_lib.rows(paths, logits, readable, names, top_k, cal)
    csv_path = predict_lib.write_csv(result, config.predict.output or os.path.join(workdir, "predictions.csv"))
    header = ("image", *[f"top-{k}" for k in range(1, top_k + 1)], "flag" if cal else "")
    print(table(predict_lib.format_rows(result, top_k), header=header))
    more = f" ({len(result) - 50} more rows in the CSV)" if len(result) > 50 else ""
    flagged = sum(bool(r.get("flag")) for r in result)
    print(f"{len(result)} images, {int((~readable).sum())} unreadable"
          + (f", {flagged} flagged out-of-distribution (calibration.json)" if cal else
             "; run --mode calibrate to flag out-of-distribution inputs")
          + f"{more}; wrote {csv_path}")
    return result


def export(config, workdir: str) -> str:
    """Write WORKDIR/export/model.<format> with preprocessing inside, for `export.platforms`,
    traced with the portable ops; where it can run here, reload it and check that it reproduces
    the in-process logits on random images of the input size."""
    fmt = config.export.format
    export_lib.check_format(fmt, config.export.quantize)
    platforms = export_lib.check_platforms(config.export.platforms, fmt, config.export.cpu_rewrites)
    t = trained.load(config, workdir)
    s, variables, _, step, names = t.setup, t.variables, t.shardings, t.step, t.class_names
    variables = jax.device_get(variables)
    model = s.model.clone(ops=export_lib.export_ops(fmt, config.export.cpu_rewrites))
    apply = lambda v, x: model.apply(v, x, train=False)  # noqa: E731
    if config.export.quantize:
        apply, variables = _quantized(s, variables, config.export.quantize)
    d = s.config.data
    crop_pct, interpolation = d.crop_pct or s.card.crop_pct, d.interpolation or s.card.interpolation
    side = config.export.input_size or int(np.floor(s.image_size / crop_pct))
    serve = export_lib.serving_fn(apply, variables, size=s.image_size, crop_pct=crop_pct,
                                  interpolation=interpolation, mean=s.card.mean, std=s.card.std)
    artifact = export_lib.export_artifact(fmt, serve, (side, side), platforms)
    meta = {"model": s.config.model.name, "step": step, "format": fmt,
            "platforms": list(platforms) if fmt == "stablehlo" else None,
            "ops": model.ops.describe(),
            "quantization": config.export.quantize or None, "input": [None, side, side, 3],
            "input_dtype": "uint8", "output": "logits", "class_names": names,
            "preprocessing": {"resize_short_side": int(np.floor(s.image_size / crop_pct)),
                              "crop": s.image_size, "interpolation": interpolation,
                              "mean": list(s.card.mean), "std": list(s.card.std)}}
    cal = calibration.load(workdir)
    if cal:
        meta["calibration"] = {k: cal[k] for k in ("temperature", "ood_score", "ood_threshold")}
    name = f"model_{config.export.quantize}" if config.export.quantize else "model"
    path = export_lib.write(os.path.join(workdir, "export"), name, fmt, artifact, meta)
    size = f"{os.path.getsize(path) / 2 ** 20:.1f} MiB; input uint8 (batch, {side}, {side}, 3), {len(names)} classes"
    where = f" for {', '.join(platforms)}" if fmt == "stablehlo" else ""
    host = backends.platform_of(jax.devices())
    if fmt == "stablehlo" and host not in platforms:
        print(f"wrote {path} ({size}){where} and {name}.json; not reloaded: this host is {host}")
        return path
    images = np.random.default_rng(0).integers(0, 256, (3, side, side, 3), dtype=np.uint8)
    want = np.asarray(jax.jit(serve)(images))
    got = np.asarray(export_lib.load(path)(images))
    rel = float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-12))
    print(f"wrote {path} ({size}){where} and {name}.json; reloaded: max |difference| / max |logit| = {rel:.1e}")
    return path


def explain(config, workdir: str) -> list[str]:
    """Heatmap overlays of the predicted class for `config.predict.inputs`, in WORKDIR/explain:
    attention rollout for ViT/DeiT, Grad-CAM for the other families."""
    from jaxvision.deploy import explain as explain_lib
    from jaxvision.models import vit

    paths = predict_lib.list_inputs(config.predict.inputs)
    t = trained.load(config, workdir)
    s, variables, _, _, names = t.setup, t.variables, t.shardings, t.step, t.class_names
    s = _portable(s)  # Grad-CAM and rollout intercept flax's own Conv, Dense and attention inputs
    variables = jax.device_get(variables)
    if isinstance(s.model, vit.VisionTransformer):
        method, heatmap = "attention rollout", explain_lib.attention_rollout
    else:
        index, path, shape = explain_lib.target_layer(s.model, variables, (s.image_size, s.image_size, 3))
        method = f"Grad-CAM on {'/'.join(path)} {tuple(shape[1:])}"
        heatmap = functools.partial(explain_lib.gradcam, index=index)
    fn = jax.jit(lambda v, x: heatmap(s.model, v, step_lib.normalize(x, s.card.mean, s.card.std)))
    transform = eval_transform(s)
    out_dir = os.path.join(workdir, "explain")
    written = []
    for p in tqdm(paths, desc="explain", unit="image", dynamic_ncols=True):
        image = predict_lib.read(p)
        if image is None:
            print(f"skipped unreadable image {p}")
            continue
        x = transform({"image": image, "label": 0})["image"]
        heat, cls, logits = jax.device_get(fn(variables, x[None]))
        prob = float(np.max(np.asarray(jax.nn.softmax(logits[0]))))
        name = os.path.splitext(os.path.basename(p))[0]
        written.append(explain_lib.save_overlay(
            x, heat[0], os.path.join(out_dir, f"{name}.png"),
            f"{os.path.basename(p)}: {names[int(cls[0])]} ({prob:.2f}); {method}"))
    print(f"wrote {len(written)} heatmap overlays to {out_dir} ({method})")
    return written
