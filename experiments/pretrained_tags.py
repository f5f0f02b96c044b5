"""Write `jaxvision/models/pretrained_tags.json`: timm's pretrained configs (Hub repository, input
size, crop, interpolation, normalisation, classes) for every weight tag of a zoo architecture, so
that jaxvision knows each tag's preprocessing without timm. Needs the parity extra; rerun when
timm adds tags:

    python experiments/pretrained_tags.py
"""

from __future__ import annotations

import json
import pathlib

import timm

from jaxvision import models

OUT = pathlib.Path(__file__).resolve().parents[1] / "jaxvision" / "models" / "pretrained_tags.json"
FIELDS = ("hf_hub_id", "num_classes", "crop_pct", "interpolation", "mean", "std", "license")


def main():
    archs = {}
    for arch in models.list_models():
        tags = {}
        for name in timm.list_pretrained(f"{arch}.*"):
            cfg = timm.models.get_pretrained_cfg(name).to_dict()
            if not (cfg.get("hf_hub_id") or "").startswith("timm/") or cfg.get("custom_load") == "hf":
                continue  # weights outside timm's own Hub repositories, or needing timm's own loader
            tags[name.split(".", 1)[1]] = {"input_size": cfg["input_size"][-1],
                                           **{k: cfg.get(k) for k in FIELDS}}
        if tags:
            default = timm.models.get_pretrained_cfg(arch).tag
            archs[arch] = {"default": default if default in tags else next(iter(tags)), "tags": tags}
    OUT.write_text(json.dumps(archs, indent=1, sort_keys=True) + "\n")
    print(f"wrote {sum(len(a['tags']) for a in archs.values())} tags of {len(archs)} architectures to {OUT}")


if __name__ == "__main__":
    main()
