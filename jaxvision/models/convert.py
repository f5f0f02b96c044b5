"""Bring PyTorch/timm weights into the zoo.

`from_torch(name, state_dict)` maps a timm state dict onto our model of the same name. Because our
module names mirror timm's, the mapping is generic: a Flax path ``layer1/0/conv1/kernel`` is the
timm key ``layer1.0.conv1.weight``; conv kernels go OIHW -> HWIO, linear weights are transposed, and
a tensor is reshaped where our layout splits an axis (ViT's fused qkv into (3, heads, head_dim)).

Command line (no torch needed; .pth files are read by a small pickle reader below):

    python -m jaxvision.models.convert --model resnet50 --checkpoint resnet50.pth --out /tmp/r50
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import sys
import zipfile
from typing import Any, Mapping

import flax
import numpy as np

from jaxvision.errors import UserError
from jaxvision.models import pretrained, vit
from jaxvision.models.registry import HEAD_NAMES, create, model_card
from jaxvision.models.util import count_params, init_shapes

_PREFIX_TOKENS = ("cls_token", "dist_token")


# Buffers some checkpoints carry that we recompute rather than load (BatchNorm's step counter,
# Swin's relative position index and shifted-window mask).
_DERIVED_BUFFERS = ("num_batches_tracked", "relative_position_index", "attn_mask")


class ConversionError(UserError):
    """The state dict does not fit the model: lists what is missing, unexpected or mis-shaped."""


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (duck-typed, so torch is never imported here) or array-like as float32."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def infer_num_classes(state_dict: Mapping[str, Any]) -> int:
    """Classes of the checkpoint's classifier (0 if it was saved without one): its `head.weight`,
    `head.fc.weight`, or the last linear layer of a torchvision `classifier.<i>` Sequential."""
    for head in HEAD_NAMES:
        keys = [k for k in state_dict if re.fullmatch(rf"{head}(\.fc|\.\d+)?\.weight", k)
                and len(state_dict[k].shape) == 2]
        if keys:
            return int(state_dict[keys[-1]].shape[0])
    return 0


def _torch_key(collection: str, path: tuple[str, ...]) -> str:
    leaf = path[-1]
    if collection == "batch_stats":
        leaf = {"mean": "running_mean", "var": "running_var"}[leaf]
    else:
        leaf = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
    return ".".join(path[:-1] + (leaf,))


def _fit(value: np.ndarray, target_shape: tuple, leaf: str, num_prefix: int) -> np.ndarray | None:
    """Lay a torch tensor out as our parameter, or None if it cannot fit."""
    if leaf == "kernel":
        value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
    if leaf == "pos_embed" and value.shape != target_shape and value.shape[-1] == target_shape[-1]:
        grid = int(round((target_shape[1] - num_prefix) ** 0.5))
        value = np.asarray(vit.resample_pos_embed(value, num_prefix, (grid, grid)))
    if value.shape != target_shape and value.size == int(np.prod(target_shape)):
        value = value.reshape(target_shape)
    return value if value.shape == target_shape else None


def from_torch(name: str, state_dict: Mapping[str, Any], **overrides) -> dict:
    """Map a timm state dict (torch tensors or numpy arrays) to ``{"params", "batch_stats"}`` for
    ``create(name, **overrides)`` (ViT's `scan_blocks=True` included: its blocks stacked). The
    number of classes is read from the checkpoint's head unless given, and a ViT's image size from
    its position embedding. Raises `ConversionError` naming every missing, unexpected and
    mis-shaped key."""
    overrides.setdefault("num_classes", infer_num_classes(state_dict))
    if "pos_embed" in state_dict and "patch_embed.proj.weight" in state_dict:  # ViT: the size it was saved at
        tokens = state_dict["pos_embed"].shape[1] - sum(t in state_dict for t in _PREFIX_TOKENS)
        overrides.setdefault("img_size", int(round(tokens ** 0.5)) * state_dict["patch_embed.proj.weight"].shape[-1])
    scan = overrides.pop("scan_blocks", False)  # converted in timm's layout, then stacked
    model = create(name, **overrides)
    shapes = init_shapes(model, image_size=32)
    flat = flax.traverse_util.flatten_dict(shapes)
    num_prefix = sum(any(p[-1] == t for p in flat) for t in _PREFIX_TOKENS)
    out, used, missing, mismatched = {}, set(), [], []
    for (collection, *path), target in flat.items():
        key = _torch_key(collection, tuple(path))
        if key not in state_dict:
            missing.append(f"{key} {tuple(target.shape)}")
            continue
        used.add(key)
        source = to_numpy(state_dict[key])
        value = _fit(source, tuple(target.shape), path[-1], num_prefix)
        if value is None:
            mismatched.append(f"{key}: checkpoint {tuple(source.shape)}, {name} wants {tuple(target.shape)}")
            continue
        out[(collection, *path)] = value
    unexpected = sorted(k for k in state_dict if k not in used and not k.endswith(_DERIVED_BUFFERS))
    if missing or unexpected or mismatched:
        parts = [f"{title} ({len(keys)}):\n  " + "\n  ".join(keys[:20]) + ("\n  ..." if len(keys) > 20 else "")
                 for title, keys in (("missing", missing), ("unexpected", unexpected),
                                     ("wrong shape", mismatched)) if keys]
        raise ConversionError(f"The checkpoint does not fit {name} "
                              f"(num_classes={overrides['num_classes']}); is it a {name} checkpoint?\n"
                              + "\n".join(parts))
    variables = flax.traverse_util.unflatten_dict(out)
    variables.setdefault("batch_stats", {})
    if scan:
        variables["params"] = vit.stack_blocks(variables["params"])
    return variables


# --- reading checkpoints from disk ---------------------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _TorchUnpickler(pickle.Unpickler):
    """Reads the tensors of a zip-format ``torch.save`` file as numpy arrays, without torch.
    Only tensor rebuilding and containers are allowed, so a .pth cannot run arbitrary code."""

    def __init__(self, file, archive: zipfile.ZipFile, root: str):
        super().__init__(file)
        self.archive, self.root = archive, root

    def find_class(self, module, name):
        if module == "torch" and name.endswith("Storage"):
            if name == "BFloat16Storage":
                import ml_dtypes
                return ml_dtypes.bfloat16
            return _STORAGE_DTYPES[name]
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, requires_grad, hooks, *rest: data
        if (module, name) == ("collections", "OrderedDict"):
            import collections
            return collections.OrderedDict
        if module == "torch" and name == "dtype":
            return str
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint")

    def persistent_load(self, pid):
        _, dtype, key, _location, _numel = pid
        raw = self.archive.read(f"{self.root}/data/{key}")
        return np.frombuffer(raw, dtype=dtype)


def _rebuild_tensor(storage, offset, size, stride, *rest):
    item = storage.itemsize
    if not size:
        return storage[offset:offset + 1].reshape(()).copy()
    return np.lib.stride_tricks.as_strided(storage[offset:], tuple(size),
                                           tuple(s * item for s in stride)).copy()


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Tensors of a ``.safetensors`` or zip-format ``.pth``/``.pt``/``.bin`` file by name;
    a training checkpoint's nested ``state_dict`` / ``model`` entry is unwrapped."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError:
            raise ImportError("reading .safetensors needs the safetensors package: "
                              "pip install safetensors") from None
        return load_file(path)
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not a zip-format torch checkpoint (torch.save since PyTorch 1.6) "
                         "nor .safetensors; re-save it with torch.save(model.state_dict(), path)")
    with zipfile.ZipFile(path) as archive:
        pkl = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        with archive.open(pkl) as f:
            obj = _TorchUnpickler(f, archive, pkl.rsplit("/", 1)[0]).load()
    for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    return dict(obj)


def save_converted(out_dir: str, name: str, variables: dict, num_classes: int, *,
                   preprocessing: dict | None = None, source: str = "") -> None:
    """Write converted weights as an orbax checkpoint plus `model.json` (with the weights'
    `preprocessing` when known: every mode then feeds them as they were trained); the trainer's
    `config.init_from` reads this directory."""
    import orbax.checkpoint as ocp

    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, "variables")
    if os.path.exists(target):
        raise FileExistsError(f"{target} exists; choose another --out or remove it")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(target, variables)
    checkpointer.wait_until_finished()
    meta = {"model": name, "num_classes": num_classes, "params": count_params(variables["params"]),
            "source": source, "preprocessing": preprocessing or {}}
    with open(os.path.join(out_dir, "model.json"), "w") as f:
        json.dump(meta, f, indent=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="zoo name, e.g. resnet50, or the weights' tag, e.g. "
                        "resnet50.a1_in1k, whose preprocessing then goes into model.json")
    parser.add_argument("--checkpoint", required=True, help="timm weights: .pth/.pt/.bin or .safetensors")
    parser.add_argument("--out", required=True, help="directory to write (orbax checkpoint + model.json)")
    args = parser.parse_args(argv)
    try:
        arch = pretrained.split(args.model)[0]
        card = model_card(args.model, feature_info=False)  # a tag's preprocessing, else the architecture's
        state_dict = load_state_dict(args.checkpoint)
        variables = from_torch(arch, state_dict)
        save_converted(args.out, arch, variables, infer_num_classes(state_dict), source=args.checkpoint,
                       preprocessing={k: getattr(card, k) for k in pretrained.PREPROCESSING})
    except (UserError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.model} ({count_params(variables['params']):,} parameters) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
