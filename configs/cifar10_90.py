"""CIFAR-10 speed recipe aimed at 90% in under 15 minutes on two CPU cores, set-up and compilation
included: configs/cifar10_94.py's recipe on a narrower speednet (widths 64/192/192, 1.16M parameters,
1.4x the images per second) for 9.5 epochs in batches of 256.

    python -m jaxvision.main --config configs/cifar10_90.py:/tmp/cifar10/train --workdir /tmp/jv_c90

The argument is the training folder; val_fraction 0 trains on all of it, 0.1 holds out a tenth for
tuning (see cifar10_94.py). Results on the JPEG copy of CIFAR-10 used here, with the command that
produced them: experiments/results/cifar10_speed.md; single tuning runs: cifar10_speed_tuning.md.
"""

import os

from jaxvision.config import load


def get_config(arg=None):
    c = load(os.path.join(os.path.dirname(__file__), "cifar10_94.py"), arg)
    c.model.kwargs.widths = (64, 192, 192)
    c.batch_size = 256  # four times the updates for the same compute (the rate scales with the batch)
    c.optim.lr = 0.375
    c.num_epochs = 9.5
    c.optim.warmup_steps = 334  # a fifth of the steps on 45,000 images
    return c
