"""The MBConv family as timm builds it: EfficientNet B0-B7 (PyTorch and `tf_` padding flavours),
EfficientNet-Lite, EfficientNetV2, MobileNetV2 and MobileNetV3 share one network (`MBConvNet`) described by timm's block strings
(``"ir_r2_k3_s2_e6_c24_se0.25"``), decoded and scaled here exactly as timm's builder does so that
channel counts, SE widths and depths (hence parameter counts and converted weights) agree.

Names mirror timm's: `conv_stem`, `bn1`, `blocks.<stage>.<block>.{conv_pw,bn1,conv_dw,bn2,se,
conv_pwl,bn3}`, `conv_head`, `bn2`, `classifier`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxvision.models import layers
from jaxvision.models.registry import HALF, ModelCard, register


def make_divisible(v: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """Nearest multiple of `divisor`, never more than 10% below `v` (timm/TF rounding)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < round_limit * v else new_v


@dataclasses.dataclass(frozen=True)
class BlockArgs:
    """One block, fully resolved: channel counts are final, `se` is the squeeze width (0 = none)."""

    kind: str  # "ds" depthwise-separable, "ir" inverted residual, "er" edge residual, "cn" conv-bn-act
    in_ch: int
    out_ch: int
    mid_ch: int
    kernel: int
    stride: int
    se: int
    act: str | None  # None: the network's default activation
    skip: bool


def _decode(block: str) -> tuple[dict, int]:
    """Parse a timm block string into (options, repeats)."""
    kind, *ops = block.split("_")
    opts: dict = {"kind": kind, "act": None, "noskip": False, "skip": False, "e": 1.0, "se": 0.0}
    acts = {"nre": "relu", "nr6": "relu6", "nhs": "hard_swish", "nsw": "swish"}
    for op in ops:
        if op in ("noskip", "skip"):
            opts[op] = True
        elif op in acts:
            opts["act"] = acts[op]
        else:
            key, value = re.match(r"([a-z]+)(\d.*)", op).groups()
            opts[key] = float(value)
    return opts, int(opts.pop("r"))


def _scale_depth(repeats: list[int], multiplier: float) -> list[int]:
    """Scale a stage's repeats by `multiplier` (ceil), spread over its block strings from the last."""
    remaining, target = sum(repeats), int(math.ceil(sum(repeats) * multiplier))
    scaled = []
    for r in reversed(repeats):
        s = max(1, round(r / remaining * target))
        scaled.append(s)
        remaining, target = remaining - r, target - s
    return scaled[::-1]


def build_blocks(arch: Sequence[Sequence[str]], *, stem: int, depth: float = 1.0,
                 width: float = 1.0, se_from_exp: bool = False) -> tuple[tuple[BlockArgs, ...], ...]:
    """Resolve block strings into stages of `BlockArgs` for the given width/depth multipliers.

    `se_from_exp` chooses the SE width rule: MobileNetV3 squeezes the expanded channels and rounds to
    a multiple of 8; EfficientNet squeezes relative to the block input and rounds to nearest."""
    in_ch, stages = stem, []
    for stage_strings in arch:
        decoded = [_decode(s) for s in stage_strings]
        repeats = _scale_depth([r for _, r in decoded], depth)
        stage = []
        for (opts, _), rep in zip(decoded, repeats):
            for i in range(rep):
                out_ch = make_divisible(opts["c"] * width)
                expands = opts["kind"] in ("ir", "er")
                exp = opts["e"] if expands else 1.0
                mid = make_divisible(in_ch * exp) if expands else in_ch
                ratio = opts["se"]
                if not ratio:
                    se = 0
                elif se_from_exp:
                    se = make_divisible(mid * ratio)
                else:
                    se = round(mid * (ratio / exp))
                stride = int(opts["s"]) if i == 0 else 1
                # conv-bn-act blocks add a skip only when asked ("skip"); the others unless "noskip"
                wants_skip = opts["skip"] if opts["kind"] == "cn" else not opts["noskip"]
                skip = wants_skip and stride == 1 and in_ch == out_ch
                stage.append(BlockArgs(opts["kind"], in_ch, out_ch, mid, int(opts["k"]), stride,
                                       se, opts["act"], skip))
                in_ch = out_ch
        stages.append(tuple(stage))
    return tuple(stages)


class SqueezeExcite(layers.ZooModule, kw_only=True):
    width: int
    act: str
    gate: str

    @nn.compact
    def __call__(self, x):
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = layers.ACTIVATIONS[self.act](self.conv(self.width, 1, bias=True, name="conv_reduce")(s))
        s = self.conv(x.shape[-1], 1, bias=True, name="conv_expand")(s)
        return x * layers.ACTIVATIONS[self.gate](s)


class MBConvBlock(layers.ZooModule, kw_only=True):
    """Depthwise-separable (`ds`), inverted-residual (`ir`), edge-residual (`er`: a full k x k
    expansion conv instead of 1x1 + depthwise, EfficientNetV2) or conv-bn-act (`cn`) block."""

    args: BlockArgs
    act: str
    se_act: str | None  # None: the block's activation
    se_gate: str
    padding: str
    bn_eps: float
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        a = self.args
        act = layers.ACTIVATIONS[a.act or self.act]
        conv = functools.partial(self.conv, padding=self.padding)
        bn = functools.partial(self.batch_norm, train, eps=self.bn_eps)
        y = x
        if a.kind == "cn":
            y = act(bn(name="bn1")(conv(a.out_ch, a.kernel, stride=a.stride, name="conv")(y)))
        elif a.kind == "er":
            y = act(bn(name="bn1")(conv(a.mid_ch, a.kernel, stride=a.stride, name="conv_exp")(y)))
            if a.se:
                y = SqueezeExcite(width=a.se, act=self.se_act or a.act or self.act, gate=self.se_gate,
                                  **self.shared, name="se")(y)
            y = bn(name="bn2")(conv(a.out_ch, 1, name="conv_pwl")(y))
        else:
            norms = iter(("bn1", "bn2", "bn3"))
            if a.kind == "ir":
                y = act(bn(name=next(norms))(conv(a.mid_ch, 1, name="conv_pw")(y)))
            y = conv(a.mid_ch, a.kernel, stride=a.stride, groups=a.mid_ch, name="conv_dw")(y)
            y = act(bn(name=next(norms))(y))
            if a.se:
                y = SqueezeExcite(width=a.se, act=self.se_act or a.act or self.act, gate=self.se_gate,
                                  **self.shared, name="se")(y)
            y = conv(a.out_ch, 1, name="conv_pwl" if a.kind == "ir" else "conv_pw")(y)
            y = bn(name=next(norms))(y)
        if a.skip:
            y = layers.drop_path(y, self.drop_path_rate, train) + x
        return y


class MBConvNet(layers.ZooModule, kw_only=True):
    """Stem conv, MBConv stages, head. `head="conv_bn"` (EfficientNet, MobileNetV2): 1x1 conv + BN
    before pooling; `head="pool_conv"` (MobileNetV3): pooling, then a 1x1 conv with bias."""

    blocks: tuple[tuple[BlockArgs, ...], ...]
    stem: int
    head_features: int
    head: str = "conv_bn"
    act: str = "swish"
    se_act: str | None = None
    se_gate: str = "sigmoid"
    padding: str = "torch"
    bn_eps: float = 1e-5
    num_classes: int = 1000
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    features_only: bool = False
    out_indices: Sequence[int] = (0, 1, 2, 3, 4)

    def group_matcher(self) -> dict:
        """Layer groups (timm's): stem, each block; the head conv before pooling joins the last
        block, MobileNetV3's head conv (after pooling) goes with the classifier."""
        blocks = [(r"^blocks\.(\d+)\.(\d+)", None)]
        if self.head == "conv_bn":
            blocks.append((r"conv_head|bn2", (99999,)))
        return {"stem": r"^conv_stem|bn1", "blocks": blocks}

    @nn.compact
    def __call__(self, x, train: bool = False, pre_logits: bool = False):
        """Logits; or pooled features (`pre_logits`); or, with `features_only`, the feature maps
        timm's `features_only` returns: the last block of each resolution (strides 2-32)."""
        act = layers.ACTIVATIONS[self.act]
        x, features = self.forward_features(x, train)
        if self.features_only:
            return [features[i] for i in self.out_indices]
        if self.head == "conv_bn":
            x = jnp.mean(x, axis=(1, 2))
        else:
            x = jnp.mean(x, axis=(1, 2), keepdims=True)
            x = act(self.conv(self.head_features, 1, bias=True, name="conv_head")(x))
            x = x.reshape(x.shape[0], -1)
        self.sow("intermediates", "pre_logits", x)  # for feature distillation
        if pre_logits:
            return x
        return self.classifier(x, self.num_classes, drop_rate=self.drop_rate, train=train,
                               name="classifier")

    def forward_features(self, x, train: bool):
        act = layers.ACTIVATIONS[self.act]
        bn = functools.partial(self.batch_norm, train, eps=self.bn_eps)
        x = self.conv(self.stem, 3, stride=2, padding=self.padding, name="conv_stem")(x.astype(self.dtype))
        x = act(bn(name="bn1")(x))
        features = [] if self.blocks[0][0].stride == 1 else [x]
        total, index = sum(len(s) for s in self.blocks), 0
        container = layers.Stages(name="blocks")  # scope `blocks/<stage>/<block>` like timm's
        for i, stage in enumerate(self.blocks):
            made = []
            for args in stage:
                made.append(functools.partial(
                    MBConvBlock, args=args, act=self.act, se_act=self.se_act, se_gate=self.se_gate,
                    padding=self.padding, bn_eps=self.bn_eps,
                    drop_path_rate=self.drop_path_rate * index / total,
                    **self.shared))
                index += 1
            x = container(i, functools.partial(layers.Sequential, made), x, train)
            last = i + 1 == len(self.blocks)
            if last or self.blocks[i + 1][0].stride > 1:
                features.append(x)
        if self.head == "conv_bn":
            x = act(bn(name="bn2")(self.conv(self.head_features, 1, name="conv_head")(x)))
        return x, features


EFFICIENTNET_ARCH = (
    ("ds_r1_k3_s1_e1_c16_se0.25",),
    ("ir_r2_k3_s2_e6_c24_se0.25",),
    ("ir_r2_k5_s2_e6_c40_se0.25",),
    ("ir_r3_k3_s2_e6_c80_se0.25",),
    ("ir_r3_k5_s1_e6_c112_se0.25",),
    ("ir_r4_k5_s2_e6_c192_se0.25",),
    ("ir_r1_k3_s1_e6_c320_se0.25",),
)

# name: (width, depth, resolution, published top-1)
_EFFICIENTNETS = {
    "b0": (1.0, 1.0, 224, "77.1 (paper)"),
    "b1": (1.0, 1.1, 240, "79.1 (paper)"),
    "b2": (1.1, 1.2, 260, "80.1 (paper)"),
    "b3": (1.2, 1.4, 300, "81.6 (paper)"),
    "b4": (1.4, 1.8, 380, "82.9 (paper)"),
    "b5": (1.6, 2.2, 456, "83.6 (paper)"),
    "b6": (1.8, 2.6, 528, "84.0 (paper)"),
    "b7": (2.0, 3.1, 600, "84.3 (paper)"),
}


def _register_efficientnets():
    for variant, (width, depth, res, top1) in _EFFICIENTNETS.items():
        stem = make_divisible(32 * width)
        arch = dict(blocks=build_blocks(EFFICIENTNET_ARCH, stem=stem, depth=depth, width=width),
                    stem=stem, head_features=make_divisible(1280 * width), act="swish")
        crop = round(res / (res + 32), 3)  # the reference's crop fraction rule for B0-B7
        for prefix, flavour in (("", dict(padding="torch", bn_eps=1e-5)),
                                ("tf_", dict(padding="same", bn_eps=1e-3))):
            register(ModelCard(f"{prefix}efficientnet_{variant}", "efficientnet", input_size=res,
                               crop_pct=crop, top1=top1), MBConvNet, **arch, **flavour)


_register_efficientnets()


EFFICIENTNET_LITE_ARCH = tuple(tuple(s.replace("_se0.25", "") for s in stage) for stage in EFFICIENTNET_ARCH)

# EfficientNet-Lite (no SE, ReLU6, stem and head not scaled), as ported from TensorFlow.
register(ModelCard("tf_efficientnet_lite0", "efficientnet", mean=HALF, std=HALF, top1="75.1 (TF reference)"),
         MBConvNet, blocks=build_blocks(EFFICIENTNET_LITE_ARCH, stem=32), stem=32, head_features=1280,
         act="relu6", padding="same", bn_eps=1e-3)

EFFICIENTNETV2_S_ARCH = (
    ("cn_r2_k3_s1_e1_c24_skip",),
    ("er_r4_k3_s2_e4_c48",),
    ("er_r4_k3_s2_e4_c64",),
    ("ir_r6_k3_s2_e4_c128_se0.25",),
    ("ir_r9_k3_s1_e6_c160_se0.25",),
    ("ir_r15_k3_s2_e6_c256_se0.25",),
)
EFFICIENTNETV2_M_ARCH = (
    ("cn_r3_k3_s1_e1_c24_skip",),
    ("er_r5_k3_s2_e4_c48",),
    ("er_r5_k3_s2_e4_c80",),
    ("ir_r7_k3_s2_e4_c160_se0.25",),
    ("ir_r14_k3_s1_e6_c176_se0.25",),
    ("ir_r18_k3_s2_e6_c304_se0.25",),
    ("ir_r5_k3_s1_e6_c512_se0.25",),
)
for _size, _arch, _res, _top1 in (("s", EFFICIENTNETV2_S_ARCH, 300, "83.9 (paper, ImageNet-1k)"),
                                  ("m", EFFICIENTNETV2_M_ARCH, 384, "85.1 (paper, ImageNet-1k)")):
    register(ModelCard(f"tf_efficientnetv2_{_size}", "efficientnet", input_size=_res, crop_pct=1.0,
                       mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), top1=_top1),
             MBConvNet, blocks=build_blocks(_arch, stem=24), stem=24, head_features=1280, act="swish",
             padding="same", bn_eps=1e-3)
