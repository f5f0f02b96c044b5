"""CIFAR-10 from an image folder: a ResNet-18 layout for 32x32 images, sized for a CPU budget.

    mkdir -p /tmp/cifar10 && tar xzf ../shared/data/cifar10-train.tar.gz -C /tmp/cifar10
    python -m jaxvision.main --config configs/cifar10_resnet.py:/tmp/cifar10/train --workdir /tmp/jv_cifar

The argument is the folder (`<class>/<image>.jpg`); 10% of it (by file path) is held out as the
validation split. ResNet-18 with a 3x3 stride-1 stem at width 16 (0.7M parameters), pad-crop and
flip, SGD + Nesterov, cosine schedule, label smoothing 0.1, 5 epochs.
Measured on 2 CPU cores (README): see experiments/results/cifar10_resnet.md for time and accuracy.
On an accelerator, raise the width (kwargs.width=64 is the usual CIFAR ResNet-18) and epochs.
"""

from jaxvision.config import base


def get_config(arg=None):
    c = base()
    c.model.name = "resnet18"
    c.model.kwargs = {"stem": "3x3", "width": 16}

    c.data.dataset = f"folder:{arg or '/tmp/cifar10/train'}"
    c.data.train_split = "train"
    c.data.eval_split = "val"
    c.data.val_fraction = 0.1
    c.data.image_size = 32
    c.data.augment = "pad_crop_flip"
    c.data.crop_pct = 1.0
    c.data.interpolation = "bilinear"
    c.data.threads = 2

    c.batch_size = 128
    c.eval_batch_size = 500
    c.num_epochs = 5.0

    c.optim.name = "sgd"
    c.optim.lr = 0.2
    c.optim.nesterov = True
    c.optim.weight_decay = 5e-4
    c.optim.warmup_steps = 200
    c.loss.label_smoothing = 0.1

    c.log_every = 50
    return c
