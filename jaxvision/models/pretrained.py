"""Pretrained weights by timm's names: ``"resnet50.a1_in1k"`` is the architecture `resnet50` with
the weights tagged `a1_in1k`.

Weights come from timm's Hugging Face Hub repositories (`model.safetensors`, through
`huggingface_hub` and its cache, so `HF_HUB_OFFLINE`, `HF_HOME` and `HF_HUB_CACHE` apply) or from a
local file or folder. They are converted once into a jaxvision weights folder (an orbax checkpoint
plus `model.json`, what `config.init_from` reads) under `$JAXVISION_CACHE` (default
`~/.cache/jaxvision`). Each tag carries the preprocessing its weights were trained with (timm's
pretrained configs, in `pretrained_tags.json`), and every mode uses it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib

from jaxvision.errors import UserError
from jaxvision.models.registry import ModelCard

TAGS_FILE = pathlib.Path(__file__).with_name("pretrained_tags.json")
PREPROCESSING = ("input_size", "mean", "std", "crop_pct", "interpolation")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class PretrainedError(UserError):
    """Unknown tag, weights that cannot be found, or weights that do not fit."""


@functools.cache
def _archs() -> dict:
    return json.loads(TAGS_FILE.read_text())


def split(name: str) -> tuple[str, str]:
    """("resnet50", "a1_in1k") for "resnet50.a1_in1k"; the tag is "" for a bare architecture."""
    arch, _, tag = name.partition(".")
    return arch, tag


def tags(arch: str) -> list[str]:
    """The weight tags known for `arch` (timm's, with a Hub repository)."""
    return sorted(_archs().get(arch, {}).get("tags", {}))


def resolve(name: str) -> tuple[str, str, dict]:
    """(architecture, tag, its pretrained config) of "arch.tag", or of a bare architecture's
    default tag (timm's)."""
    arch, tag = split(name)
    known = _archs().get(arch)
    if not known:
        raise PretrainedError(f"no pretrained weights are known for {arch}; pass a local file or "
                              "folder as pretrained=, or convert weights with python -m jaxvision.models.convert")
    tag = tag or known["default"]
    if tag not in known["tags"]:
        raise PretrainedError(f"unknown weights {arch}.{tag}; the tags for {arch} are: {', '.join(tags(arch))}")
    return arch, tag, known["tags"][tag]


def with_preprocessing(card: ModelCard, source: dict) -> ModelCard:
    """`card` with the input size, normalisation, crop and interpolation `source` names."""
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in source.items() if k in PREPROCESSING and v}
    return dataclasses.replace(card, **given)


def _named(name: str, weights: str | bool) -> str:
    """`weights` as a tag, path or "": True (or "true", from the command line) means `name`."""
    if weights is True or str(weights).lower() == "true":
        return name
    return os.path.expanduser(str(weights or ""))


def card_for(card: ModelCard, name: str, weights: str | bool = "") -> ModelCard:
    """The card of model `name` fed with `weights` (as `weights_dir` takes them, or a workdir;
    "" for none): a tag's or a folder's preprocessing wins over the architecture's."""
    weights = _named(name, weights)
    if os.path.isdir(weights):
        return with_preprocessing(card, _folder_preprocessing(weights))
    if weights and not os.path.exists(weights) and split(weights)[0] == split(name)[0]:
        return with_preprocessing(card, resolve(weights)[2])  # a tag, or the architecture's default
    return card


def _folder_preprocessing(folder: str) -> dict:
    """A converted folder's `model.json` "preprocessing", or a timm Hub snapshot's config.json
    "pretrained_cfg"."""
    for file, key in (("model.json", "preprocessing"), ("config.json", "pretrained_cfg")):
        path = os.path.join(folder, file)
        if os.path.exists(path):
            with open(path) as f:
                cfg = json.load(f).get(key) or {}
            if isinstance(cfg.get("input_size"), list):
                cfg = {**cfg, "input_size": cfg["input_size"][-1]}
            return cfg
    return {}


def cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("JAXVISION_CACHE") or "~/.cache/jaxvision").expanduser() / "pretrained"


def _download(hub_id: str) -> str:
    """The Hub repository's weights file, through huggingface_hub's cache."""
    import huggingface_hub
    from huggingface_hub import errors

    try:
        try:
            return huggingface_hub.hf_hub_download(hub_id, WEIGHT_FILES[0])
        except errors.EntryNotFoundError:  # older repositories hold only the pickle
            return huggingface_hub.hf_hub_download(hub_id, WEIGHT_FILES[1])
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled) as e:
        cache = huggingface_hub.constants.HF_HUB_CACHE
        raise PretrainedError(f"weights {hub_id} are not in the Hugging Face cache {cache} and cannot be "
                              f"downloaded ({type(e).__name__}); connect, or set HF_HUB_CACHE to a cache "
                              "that has them, or pass a local file as pretrained=") from None
    except errors.RepositoryNotFoundError:
        raise PretrainedError(f"no Hub repository {hub_id}") from None


def weights_dir(name: str, pretrained: str | bool = True) -> str:
    """A jaxvision weights folder (for `config.init_from`) holding the weights `pretrained`
    names for model `name`: True (the tag in `name`, else the architecture's default), a tag, a
    local .safetensors/.pth file, a folder holding one, or an already converted folder."""
    arch = split(name)[0]
    pretrained = _named(name, pretrained)
    if os.path.isdir(pretrained):
        if os.path.exists(os.path.join(pretrained, "model.json")):
            return pretrained
        files = [os.path.join(pretrained, f) for f in WEIGHT_FILES if os.path.exists(os.path.join(pretrained, f))]
        if not files:
            raise PretrainedError(f"{pretrained} holds no model.json, {' nor '.join(WEIGHT_FILES)}")
        return _converted(arch, files[0], _folder_preprocessing(pretrained), label=pretrained)
    if os.path.isfile(pretrained):
        return _converted(arch, pretrained, {}, label=pretrained)
    if split(pretrained)[0] != arch:
        raise PretrainedError(f"pretrained={pretrained!r} is neither a file, a folder, nor weights of {arch}")
    _, tag, cfg = resolve(pretrained)
    return _converted(arch, _download(cfg["hf_hub_id"]), cfg, label=f"{arch}.{tag}")


def _converted(arch: str, file: str, preprocessing: dict, label: str) -> str:
    """The cached conversion of weights `file` for `arch`, made on first use. The cache key is the
    file's resolved path, size and modification time, so new weights are converted again."""
    from jaxvision.models import convert

    real = os.path.realpath(file)
    stat = os.stat(real)
    key = hashlib.sha256(f"{arch}|{real}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_root() / f"{label.strip('/').replace('/', '_')}-{key}"
    if (out / "model.json").exists():
        return str(out)
    state_dict = convert.load_state_dict(real)
    try:
        variables = convert.from_torch(arch, state_dict)
    except convert.ConversionError as e:
        raise PretrainedError(f"{label}: {e}") from None
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")  # a complete folder or none: rename at the end
    convert.save_converted(str(tmp), arch, variables, convert.infer_num_classes(state_dict),
                           preprocessing={k: preprocessing[k] for k in PREPROCESSING if preprocessing.get(k)},
                           source=label)
    os.replace(tmp, out)
    return str(out)


def load(module, name: str, pretrained: str | bool, image_size: int) -> dict:
    """`{"params", "batch_stats"}` of `module` (model `name`) with the weights `pretrained` names
    (see `weights_dir`); parameters the weights lack or shape otherwise (a head for other classes)
    keep their fresh initialisation, as in fine-tuning with `config.init_from`."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jaxvision import checkpoint

    folder = weights_dir(name, pretrained)
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)

    def init():
        return nn.meta.unbox(module.init(jax.random.key(0), images, train=False))

    # Shapes first: a random initialisation is only needed for what the weights lack (a new head).
    targets = jax.eval_shape(init)
    params, stats, fresh = checkpoint.init_from(folder, split(name)[0], targets["params"], targets.get("batch_stats", {}))
    if fresh:
        targets = jax.jit(init)()
        params, stats, _ = checkpoint.init_from(folder, split(name)[0], targets["params"], targets.get("batch_stats", {}))
    return {"params": params, "batch_stats": stats}
