"""Default job: a small ResNet on scikit-learn's bundled handwritten digits. Runs offline.

    python -m jaxvision.main --config configs/default.py --workdir /tmp/jv_default

ResNet-18 layout with a 3x3 stride-1 stem and width 16 (0.7M parameters) on the 1,438 training
digits (8x8, upsampled to 16x16), evaluated on the 359 held-out ones: 15 epochs, about a minute on
2 CPU cores. Measured test top-1: see the README (experiments/default_accuracy.py).

`configs/default.py:vit` is the same job with a small ViT (ViT-Ti layout, 8x8 patches of the 16x16
image, 4 heads, AdamW), e.g. to try tensor parallelism: `--config.mesh.tensor=4`.
`configs/default.py:lenet5` trains LeNet-5 (LeCun et al. 1998) on the digits at 32x32.
"""

from jaxvision.config import base


def get_config(arg=None):
    c = base()
    c.model.name = "resnet18"
    c.model.kwargs = {"stem": "3x3", "width": 16}

    c.data.dataset = "digits"
    c.data.eval_split = "test"
    c.data.image_size = 16
    c.data.augment = "pad_crop"  # no flips: a mirrored digit is another symbol
    c.data.crop_pct = 1.0
    c.data.interpolation = "bilinear"
    c.data.threads = 2

    c.batch_size = 64
    c.eval_batch_size = 120
    c.num_epochs = 15.0

    c.optim.name = "sgd"
    c.optim.lr = 0.1
    c.optim.nesterov = True
    c.optim.weight_decay = 5e-4
    c.optim.warmup_steps = 50
    c.loss.label_smoothing = 0.1

    c.log_every = 20
    if arg == "vit":
        c.model.name = "vit_tiny_patch16_224"
        c.model.kwargs = {"img_size": 16, "patch_size": 8, "num_heads": 4}
        c.optim.name = "adamw"
        c.optim.lr = 1e-3
        c.optim.weight_decay = 0.05
    elif arg == "lenet5":  # LeNet-5 on the 32x32 grayscale input it was designed for
        c.model.name = "lenet5"
        c.model.kwargs = {}
        c.data.image_size = 32
        c.num_epochs = 20.0
        c.optim.name = "adamw"
        c.optim.lr = 3e-3
        c.optim.weight_decay = 1e-4
        c.optim.warmup_steps = 20
    elif arg:
        raise ValueError(f"configs/default.py takes no argument, 'vit' or 'lenet5', not {arg!r}")
    return c
