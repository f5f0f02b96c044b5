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
    `feature_info=False` skips that tracing)."""
    entry = _entry(name)
    if "features_only" not in entry.fields() or not feature_info:
        return entry.card
    from jaxvision.models import util

    maps = util.output_shapes(create(name, features_only=True), entry.card.input_size)  # every map
    # nominal strides (powers of two), as timm reports them, also for Inception's valid convs
    info = tuple((m.shape[-1], 2 ** round(math.log2(entry.card.input_size / m.shape[1]))) for m in maps)
    return dataclasses.replace(entry.card, feature_info=info)


def architecture(name: str) -> dict:
    """The fixed architecture fields a name is registered with (e.g. depths, head style)."""
    return dict(_entry(name).arch)


def create(name: str, **overrides) -> nn.Module:
    """Build the Flax module registered as `name`; `overrides` set its fields (num_classes, dtype,
    param_dtype, drop_rate, drop_path_rate, img_size for ViT, ops: see `jaxvision.models.ops`)."""
    entry = _entry(name)
    bad = sorted(set(overrides) - entry.fields())
    if bad:
        raise UserError(f"{name} does not take {', '.join(bad)}; "
                         f"it takes: {', '.join(sorted(entry.fields() - set(entry.arch)))}")
    return entry.module(**{**entry.arch, "num_classes": entry.card.num_classes, **overrides})
