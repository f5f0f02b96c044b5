"""MobileNetV2 (Sandler et al. 2018) and MobileNetV3 (Howard et al. 2019) in timm's block-string
definitions, built by the shared MBConv network of `efficientnet.py`."""

from __future__ import annotations

from jaxvision.models.efficientnet import MBConvNet, build_blocks
from jaxvision.models.registry import ModelCard, register

MOBILENETV2_ARCH = (
    ("ds_r1_k3_s1_c16",),
    ("ir_r2_k3_s2_e6_c24",),
    ("ir_r3_k3_s2_e6_c32",),
    ("ir_r4_k3_s2_e6_c64",),
    ("ir_r3_k3_s1_e6_c96",),
    ("ir_r3_k3_s2_e6_c160",),
    ("ir_r1_k3_s1_e6_c320",),
)

MOBILENETV3_LARGE_ARCH = (
    ("ds_r1_k3_s1_e1_c16_nre",),
    ("ir_r1_k3_s2_e4_c24_nre", "ir_r1_k3_s1_e3_c24_nre"),
    ("ir_r3_k5_s2_e3_c40_se0.25_nre",),
    ("ir_r1_k3_s2_e6_c80", "ir_r1_k3_s1_e2.5_c80", "ir_r2_k3_s1_e2.3_c80"),
    ("ir_r2_k3_s1_e6_c112_se0.25",),
    ("ir_r3_k5_s2_e6_c160_se0.25",),
    ("cn_r1_k1_s1_c960",),
)

MOBILENETV3_SMALL_ARCH = (
    ("ds_r1_k3_s2_e1_c16_se0.25_nre",),
    ("ir_r1_k3_s2_e4.5_c24_nre", "ir_r1_k3_s1_e3.67_c24_nre"),
    ("ir_r1_k5_s2_e4_c40_se0.25", "ir_r2_k5_s1_e6_c40_se0.25"),
    ("ir_r2_k5_s1_e3_c48_se0.25",),
    ("ir_r3_k5_s2_e6_c96_se0.25",),
    ("cn_r1_k1_s1_c576",),
)

register(ModelCard("mobilenetv2_100", "mobilenet", top1="72.0 (paper)"), MBConvNet,
         blocks=build_blocks(MOBILENETV2_ARCH, stem=32), stem=32, head_features=1280, act="relu6")

for _size, _arch, _head, _top1 in (("small", MOBILENETV3_SMALL_ARCH, 1024, "67.4 (paper)"),
                                   ("large", MOBILENETV3_LARGE_ARCH, 1280, "75.2 (paper)")):
    register(ModelCard(f"mobilenetv3_{_size}_100", "mobilenet", top1=_top1), MBConvNet,
             blocks=build_blocks(_arch, stem=16, se_from_exp=True), stem=16, head_features=_head,
             head="pool_conv", act="hard_swish", se_act="relu", se_gate="hard_sigmoid")
