"""Model registry: names (timm's), model cards, and `create`.

A model card carries what a user needs to feed the model correctly (input size, normalisation,
crop fraction, interpolation) and to cite it (published top-1), so configs and the data pipeline
read preprocessing from one place instead of repeating it.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import math

import flax.linen as nn

from jaxvision.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# Top-level module names of classifier heads across the zoo (timm's names).
HEAD_NAMES = ("fc", "classifier", "head", "head_dist")


@dataclasses.dataclass(frozen=True)
class ModelCard:
    name: str
    family: str
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    num_classes: int = 1000
    top1: str = ""  # ImageNet top-1 of the published reference weights, with its recipe
    # (channels, stride) of each `features_only` map at the input size; filled by `model_card`.
    feature_info: tuple = ()


@dataclasses.dataclass(frozen=True)
class _Entry:
    card: ModelCard
    module: type[nn.Module]
    arch: dict  # fixed architecture fields; users may override the others

    def fields(self) -> set[str]:
        return {f.name for f in dataclasses.fields(self.module) if f.init} - {"parent", "name"}


_REGISTRY: dict[str, _Entry] = {}


def register(card: ModelCard, module: type[nn.Module], **arch) -> None:
    """Register `module(**arch)` under `card.name`."""
    if card.name in _REGISTRY:
        raise ValueError(f"model {card.name!r} is registered twice")
    _REGISTRY[card.name] = _Entry(card, module, arch)


def _entry(name: str) -> _Entry:
    """The architecture's entry; a weight tag ("resnet50.a1_in1k") names its architecture."""
    name = name.partition(".")[0]
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"Unknown model {name!r}.{hint} "
                         f"See jaxvision.models.list_models() for the {len(_REGISTRY)} names.") from None


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style wildcard, e.g. ``list_models("vit_*")``."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


@functools.lru_cache(maxsize=None)
def model_card(name: str, feature_info: bool = True) -> ModelCard:
    """The card of `name`; for models with `features_only`, `feature_info` lists every feature
    map's (channels, stride) at the card's input size, derived from the model (shapes only:
    `feature_info=False` skips that tracing). A weight tag ("resnet50.a1_in1k") gives the card
    with that tag's preprocessing and classes."""
    from jaxvision.models import pretrained, util

    entry = _entry(name)
    card = entry.card
    if pretrained.split(name)[1]:
        _, _, cfg = pretrained.resolve(name)
        card = dataclasses.replace(pretrained.with_preprocessing(card, cfg), num_classes=cfg["num_classes"])
    if "features_only" not in entry.fields() or not feature_info:
        return card
    maps = util.output_shapes(create(name, features_only=True), card.input_size)  # every map
    # nominal strides (powers of two), as timm reports them, also for Inception's valid convs
    info = tuple((m.shape[-1], 2 ** round(math.log2(card.input_size / m.shape[1]))) for m in maps)
    return dataclasses.replace(card, feature_info=info)


def architecture(name: str) -> dict:
    """The fixed architecture fields a name is registered with (e.g. depths, head style)."""
    return dict(_entry(name).arch)


def create(name: str, pretrained: bool | str = False, api: str = "linen", **overrides):
    """Build the Flax module registered as `name` (timm's name, optionally with a weight tag:
    "resnet50.a1_in1k"); `overrides` set its fields (num_classes, dtype, param_dtype, drop_rate,
    drop_path_rate, features_only, img_size for ViT, ops: see `jaxvision.models.ops`).

    With `pretrained` (True: the tag in `name`, else the architecture's default; or a tag, a
    local file or folder; see `jaxvision.models.pretrained`) returns (module, variables): the
    weights converted and cached on first use, the head initialised afresh when `num_classes`
    differs from the weights' (as timm's `reset_classifier`), none with `features_only`.

    `api="nnx"` returns a Flax NNX module instead (`jaxvision.nnx.Model`), initialised, or
    holding the pretrained weights."""
    if api not in ("linen", "nnx"):
        raise UserError(f"api must be linen or nnx, not {api!r}")
    entry = _entry(name)
    bad = sorted(set(overrides) - entry.fields())
    if bad:
        raise UserError(f"{name} does not take {', '.join(bad)}; "
                         f"it takes: {', '.join(sorted(entry.fields() - set(entry.arch)))}")
    card = model_card(name, feature_info=False)
    module = entry.module(**{**entry.arch, "num_classes": card.num_classes, **overrides})
    variables, size = None, overrides.get("img_size") or card.input_size
    if pretrained:
        from jaxvision.models import pretrained as weights

        variables = weights.load(module, name, pretrained, size)
    if api == "nnx":
        from jaxvision import nnx

        return nnx.Model(module, image_size=size, variables=variables)
    return (module, variables) if pretrained else module
