"""ViT-S/16 on ImageNet-1k in the big_vision 90-epoch style (AdamW, warm-up + cosine, clipping).

    python -m jaxvision.main --config configs/imagenet_vit_s16.py --workdir gs://BUCKET/vit_s16 \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets

Batch 1024, lr 1e-3, weight decay 1e-4 (decoupled; not on biases, norms, position embedding or the
class token), global-norm clipping at 1.0, 10k warm-up steps, bfloat16 compute. FSDP is one line:
`--config.mesh.fsdp=-1 --config.mesh.data=1` (or tensor parallel: `--config.mesh.tensor=4`).
Expected: 76.5% top-1 with big_vision's MixUp 0.2 + RandAugment in 6-7 h on a TPU v3-8 (about
80% at 300 epochs). Not run on this project's CPU machines; CI compiles one step on tiny shapes and
prints the plan (`--mode plan`).
"""

from jaxvision.config import base


def get_config(arg=None):
    del arg
    c = base()
    c.model.name = "vit_small_patch16_224"
    c.model.num_classes = 1000
    c.model.dtype = "bfloat16"

    c.data.dataset = "tfds:imagenet2012"
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.augment = "rrc_flip"
    c.data.rrc_scale = (0.05, 1.0)
    c.data.threads = 2  # per worker process
    c.data.workers = -1  # one per host core

    c.batch_size = 1024
    c.num_epochs = 90.0

    c.optim.name = "adamw"
    c.optim.lr = 1e-3
    c.optim.weight_decay = 1e-4
    c.optim.grad_clip = 1.0
    c.optim.warmup_steps = 10_000

    c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
    c.log_every = 100
    c.eval_every = 6_000
    c.checkpoint_every = 1000
    return c
