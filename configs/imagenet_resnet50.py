"""ResNet-50 on ImageNet-1k, the classic 90-epoch recipe (SGD + Nesterov, cosine, label smoothing).

    python -m jaxvision.main --config configs/imagenet_resnet50.py --workdir gs://BUCKET/r50 \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Data: TFDS imagenet2012 prepared as ArrayRecord (`tfds build imagenet2012
--file_format=array_record`, with the manual download in place). Batch 1024, lr 0.4 (0.1 per 256),
5 warm-up epochs, weight decay 5e-5 off 1-D parameters, bfloat16 compute.
Expected: 76.3-76.7% top-1 (the Flax ImageNet example with this recipe: 2.1 h on a TPU v3-32,
4.4 h on a v3-8, 13.2 h on 8 V100). Not run on this project's CPU machines; CI compiles one step
on tiny shapes and prints the plan (`--mode plan`).
"""

from jaxvision.config import base

TRAIN_IMAGES = 1_281_167


def get_config(arg=None):
    del arg
    c = base()
    c.model.name = "resnet50"
    c.model.num_classes = 1000
    c.model.dtype = "bfloat16"

    c.data.dataset = "tfds:imagenet2012"
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.augment = "rrc_flip"
    c.data.threads = 2  # per worker process
    c.data.workers = -1  # one per host core

    c.batch_size = 1024
    c.num_epochs = 90.0

    steps_per_epoch = TRAIN_IMAGES // c.batch_size
    c.optim.name = "sgd"
    c.optim.lr = 0.4
    c.optim.nesterov = True
    c.optim.weight_decay = 5e-5
    c.optim.warmup_steps = 5 * steps_per_epoch
    c.loss.label_smoothing = 0.1

    c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
    c.log_every = 100
    c.eval_every = 5 * steps_per_epoch
    c.checkpoint_every = 1000
    return c
