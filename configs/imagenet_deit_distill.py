"""DeiT-S with a distillation token, taught by a frozen convnet teacher (Touvron et al. 2021).

    python -m jaxvision.models.convert --model resnet50 --checkpoint resnet50_a1.pth --out weights/r50
    python -m jaxvision.main --config configs/imagenet_deit_distill.py:weights/r50 --workdir DIR \\
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets

The student's second head learns from the teacher's argmax ("hard" distillation, the DeiT paper's
best; `--config.distill.kind=deit_soft` uses the KL with temperature); inference averages both
heads. The teacher (any zoo model; DeiT used RegNetY-16GF, here ResNet-50 converted from timm) sees
the student's augmented, mixed batch resized to its own resolution and normalised with its own
statistics. AdamW lr 5e-4 x batch/512, weight decay 0.05, 300 epochs, MixUp 0.8 / CutMix 1.0,
RandAugment m9, Random Erasing 0.25, label smoothing 0.1, drop path 0.1, EMA.
Expected: about 81% top-1 for DeiT-S distilled with a strong teacher (DeiT paper: 81.2% with
RegNetY-16GF). Not run here; CI compiles one step on tiny shapes and prints the plan.
"""

from jaxvision.config import base

TRAIN_IMAGES = 1_281_167


def get_config(arg=None):
    c = base()
    c.model.name = "deit_small_distilled_patch16_224"
    c.model.num_classes = 1000
    c.model.dtype = "bfloat16"
    c.model.kwargs = {"drop_path_rate": 0.1}

    c.data.dataset = "tfds:imagenet2012"
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.augment = "rrc_flip"
    c.data.randaugment = "rand-m9-mstd0.5"
    c.data.reprob = 0.25
    c.data.threads = 2  # per worker process
    c.data.workers = -1  # one per host core

    c.batch_size = 1024
    c.num_epochs = 300.0
    c.optim.name = "adamw"
    c.optim.lr = 5e-4 * c.batch_size / 512
    c.optim.weight_decay = 0.05
    c.optim.warmup_steps = 5 * TRAIN_IMAGES // c.batch_size
    c.optim.min_lr_ratio = 0.01
    c.loss.label_smoothing = 0.1
    c.mix.mixup_alpha = 0.8
    c.mix.cutmix_alpha = 1.0
    c.ema.decay = 0.99996

    c.distill.teacher = "resnet50"
    c.distill.teacher_init = arg or "weights/r50"
    c.distill.kind = "deit_hard"
    c.distill.w_task = 0.5
    c.distill.w_kd = 0.5
    c.distill.teacher_image_size = 224

    c.log_every = 100
    c.eval_every = 5 * TRAIN_IMAGES // c.batch_size
    c.checkpoint_every = 1000
    return c
