"""A CIFAR-10 speed recipe (configs/cifar10_94.py, configs/cifar10_90.py) in plain PyTorch on the
CPU: the reference for jaxvision's time to accuracy, run on the same machine.

    python experiments/cifar10_speed_torch.py configs/cifar10_94.py /tmp/cifar10/train \\
        [--val-fraction 0.1] [--seed 0] [--threads 2]

The recipe's numbers come from the jaxvision config file itself, so both sides train the same
recipe; a config field this port does not implement stops it with a message. PyTorch's own way:
the images are decoded once into one uint8 tensor (as the speed records keep them on the GPU) and
augmented per batch as tensors. The split is jaxvision's (the same files held out by path).
Prints one JSON line: validation top-1 and the wall time of each phase.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.io import ImageReadMode, decode_image

from jaxvision import config as config_lib, models
from jaxvision.data import sources
from jaxvision.train import step as step_lib, whiten

PORTED = {  # the config fields this port implements, with their supported values (None: any)
    "model.name": ("speednet",), "data.augment": ("pad_crop_flip",), "optim.name": ("sgd",),
    "optim.schedule": ("linear",), "tta": ("", "flip", "flip_translate"), "mix.mixup_alpha": (0.0,),
    "mix.cutmix_alpha": (0.0,), "model.dtype": ("float32",), "optim.accumulate": (1,),
    "data.randaugment": ("",), "data.reprob": (0.0,), "optim.layer_decay": (0.0,), "optim.grad_clip": (0.0,),
}


def check_ported(c):
    for path, allowed in PORTED.items():
        value = c
        for key in path.split("."):
            value = value[key]
        if value not in allowed:
            raise SystemExit(f"this port does not implement {path}={value!r} (only {allowed})")
    if c.ema.decay and not c.ema.sync_every:
        raise SystemExit("this port implements the EMA only as lookahead (ema.sync_every > 0)")


def lookahead_decay(c, step: int, steps: int) -> float:
    """The slow weights' decay at `step`: jaxvision's own ema_decay_at."""
    opts = step_lib.StepOptions(num_classes=0, mean=(), std=(), ema_decay=c.ema.decay, ema_warmup=c.ema.warmup,
                                ema_ramp=c.ema.ramp, total_steps=steps)
    return float(step_lib.ema_decay_at(np.asarray(step), opts))


# --- the network: jaxvision/models/speednet.py, in torch -----------------------------------------

def identity_init_(conv: nn.Conv2d):
    """The first min(in, out) filters pass their input channel through (as speednet's)."""
    with torch.no_grad():
        n = min(conv.in_channels, conv.out_channels)
        nn.init.dirac_(conv.weight[:n])


class ConvGroup(nn.Module):
    def __init__(self, cin, cout, momentum, eps):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(cout, momentum=momentum, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(cout, momentum=momentum, eps=eps)
        for conv in (self.conv1, self.conv2):
            identity_init_(conv)
        for norm in (self.norm1, self.norm2):
            norm.weight.requires_grad_(False)  # no scale, as speednet's

    def forward(self, x):
        x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.norm2(self.conv2(x)))


class SpeedNet(nn.Module):
    def __init__(self, widths=(64, 256, 256), stem_width=24, bn_momentum=0.4, bn_eps=1e-12,
                 logit_scale=1 / 9, num_classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, stem_width, 2, padding=0, bias=True)
        nn.init.zeros_(self.stem.bias)
        cin = stem_width
        for i, width in enumerate(widths):  # torch's momentum is the weight of the new batch
            setattr(self, f"groups_{i}", ConvGroup(cin, width, 1 - bn_momentum, bn_eps))
            cin = width
        self.depth, self.logit_scale = len(widths), logit_scale
        self.head = nn.Linear(cin, num_classes, bias=False)

    def forward(self, x):
        x = F.gelu(self.stem(x))
        for i in range(self.depth):
            x = getattr(self, f"groups_{i}")(x)
        return self.head(torch.amax(x, dim=(2, 3))) * self.logit_scale


def jaxvision_path(name: str) -> str:
    """torch's parameter name as jaxvision's path (groups_0.norm1.bias -> groups_0/norm1/bias), for
    the config's regexes."""
    parts = name.split(".")
    if parts[-1] == "weight":
        parts[-1] = "scale" if "norm" in parts[-2] else "kernel"
    return "/".join(parts)


# --- data ----------------------------------------------------------------------------------------

def load(root, split, val_fraction):
    """(uint8 N x 3 x 32 x 32, int64 labels): every file of jaxvision's split, decoded once."""
    src = sources.FolderSource(root, split, val_fraction)
    images = torch.stack([decode_image(f"{root}/{f}", ImageReadMode.RGB) for f in src.files])
    return images, torch.as_tensor(src.labels)


def standardize(images, mean, std):
    """uint8 (or float in [0, 255]) NCHW -> standardised float32."""
    x = images.float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def augment(images, generator, translate, pad_mode, flip):
    """Per image, a random shift by up to `translate` px (`pad_mode` edges), then the flips."""
    n, _, h, w = images.shape
    mode = "reflect" if pad_mode == "reflect" else "constant"
    padded = F.pad(images.float(), (translate,) * 4, mode=mode)
    dy, dx = (torch.randint(0, 2 * translate + 1, (2, n), generator=generator))
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, 3, h, w + 2 * translate)
    out = torch.gather(padded, 2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, 3, h, w)
    out = torch.gather(out, 3, cols)
    return torch.where(flip.view(-1, 1, 1, 1), out.flip(3), out)


def shift(x, pixels):
    """Moved `pixels` down and right (negative: up and left), edges repeated (jaxvision's TTA)."""
    h, w = x.shape[2:]
    if pixels > 0:
        return F.pad(x, (pixels, 0, pixels, 0), mode="replicate")[:, :, :h, :w]
    return F.pad(x, (0, -pixels, 0, -pixels), mode="replicate")[:, :, -pixels:, -pixels:]


@torch.no_grad()
def evaluate(model, images, labels, mean, std, tta, batch=1000):
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        x = standardize(images[i:i + batch], mean, std).contiguous(memory_format=torch.channels_last)
        views = [x] + ([x.flip(3)] if tta else [])
        if tta == "flip_translate":
            step = max(1, x.shape[2] // 16)
            views += [shift(v, d) for v in views for d in (step, -step)]
        logits = torch.stack([model(v) for v in views]).mean(0)
        correct += (logits.argmax(1) == labels[i:i + batch]).sum().item()
    return correct / len(images)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("folder")
    parser.add_argument("--val-fraction", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    c = config_lib.load(args.config, args.folder)
    if args.val_fraction is not None:
        c.data.val_fraction = args.val_fraction
    check_ported(c)
    root = c.data.dataset.removeprefix("folder:")
    card = models.model_card(c.model.name, feature_info=False)
    mean, std = card.mean, card.std
    generator = torch.Generator().manual_seed(args.seed)

    images, labels = load(root, "train", c.data.val_fraction)
    val = load(root, "val", c.data.val_fraction) if c.data.val_fraction > 0 else None
    t_load = time.perf_counter()

    kwargs = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in dict(c.model.kwargs).items()}
    model = SpeedNet(**kwargs).to(memory_format=torch.channels_last)
    if c.model.whiten:
        picks = torch.randperm(len(images), generator=generator)[:c.model.whiten]
        nhwc = standardize(images[picks], mean, std).permute(0, 2, 3, 1).numpy()
        kernel = whiten.whitening_kernel(nhwc, 2, 2, model.stem.out_channels)  # jaxvision's, in numpy
        with torch.no_grad():
            model.stem.weight[:kernel.shape[-1]] = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
    t_whiten = time.perf_counter()

    o = c.optim
    frozen = re.compile(o.frozen) if o.frozen else None
    groups = {}
    for name, p in model.named_parameters():
        path = jaxvision_path(name)
        if not p.requires_grad or (frozen and frozen.search(path)):
            p.requires_grad_(False)
            continue
        mult = next((float(f) for regex, f in o.lr_mults if re.search(regex, path)), 1.0)
        if o.wd_mults:  # jaxvision's optim.wd_multipliers
            decay = o.weight_decay * next((float(f) for regex, f in o.wd_mults if re.search(regex, path)), 0.0)
        else:
            decay = o.weight_decay if p.ndim > 1 else 0.0
        groups.setdefault((mult, decay), []).append(p)
    param_groups = [dict(params=ps, mult=m, weight_decay=d) for (m, d), ps in groups.items()]
    opt = torch.optim.SGD(param_groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
    n = len(images)
    steps = c.num_steps or int(c.num_epochs * n) // c.batch_size
    warmup = o.warmup_steps

    def lr_at(step):  # jaxvision's "linear" schedule: up from 0 over warmup, then down to 0
        if step < warmup:
            return o.lr * step / warmup
        return o.lr * max(0.0, 1 - (step - warmup) / max(steps - warmup, 1))

    loss_fn = nn.CrossEntropyLoss(label_smoothing=c.loss.label_smoothing)
    first_flip = torch.rand(n, generator=generator) < 0.5
    order, epoch_of = [], []
    for epoch in range(math.ceil(steps * c.batch_size / n) + 1):
        order.append(torch.randperm(n, generator=generator))
        epoch_of.append(torch.full((n,), epoch))
    order, epoch_of = torch.cat(order), torch.cat(epoch_of)
    slow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    model.train()
    for step in range(steps):
        idx = order[step * c.batch_size:(step + 1) * c.batch_size]
        ep = epoch_of[step * c.batch_size:(step + 1) * c.batch_size]
        if c.data.flip == "alternate":
            flip = first_flip[idx] ^ (ep % 2 == 1)
        else:
            flip = torch.rand(len(idx), generator=generator) < 0.5
        x = augment(images[idx], generator, c.data.translate or 4, c.data.pad_mode, flip)
        x = standardize(x, mean, std).contiguous(memory_format=torch.channels_last)
        for g in opt.param_groups:
            g["lr"] = lr_at(step) * g["mult"]
        loss = loss_fn(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if c.ema.decay and ((step + 1) % c.ema.sync_every == 0 or step + 1 == steps):  # lookahead
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    if k in slow:
                        slow[k].lerp_(v, 1 - lookahead_decay(c, step, steps))
                        v.copy_(slow[k])
        if step % 20 == 0:
            print(f"step {step}/{steps} loss {loss.item():.4f} {time.perf_counter() - t_whiten:.0f}s", flush=True)
    t_train = time.perf_counter()
    top1 = evaluate(model, *val, mean, std, c.tta) if val else None
    t_end = time.perf_counter()
    print(json.dumps({"framework": "pytorch", "config": args.config, "seed": args.seed,
                      "val_fraction": c.data.val_fraction, "steps": steps, "val_top1": top1,
                      "load_s": round(t_load - t0, 1), "whiten_s": round(t_whiten - t_load, 1),
                      "train_s": round(t_train - t_whiten, 1), "eval_s": round(t_end - t_train, 1),
                      "wall_s": round(t_end - t0, 1), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
