"""The config schema: every field a recipe can set, with neutral defaults.

Recipes (`configs/*.py`) start from `base()` and change what they need, so a field exists in every
config and `--config.<field>=value` overrides work uniformly (ml_collections rejects unknown fields).
"""

import ml_collections


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = "resnet50"
    c.model.kwargs = ml_collections.ConfigDict()  # passed to models.create (e.g. drop_path_rate)
    c.model.num_classes = 0  # 0: from the dataset
    c.model.dtype = "float32"  # compute dtype: float32 or bfloat16 (parameters stay float32)
    # Start from pretrained weights: a timm tag (resnet50.a1_in1k), "true" (the tag in model.name,
    # else the architecture's default), or a local .safetensors/.pth file or folder; the weights'
    # own preprocessing then applies. See jaxvision.models.pretrained; the alternative to init_from.
    c.model.pretrained = ""
    # > 0: start the first convolution as filters that whiten the patches of this many training
    # images (the CIFAR speed recipes' first layer; jaxvision.train.whiten)
    c.model.whiten = 0
    # The ops the model is traced with (jaxvision.backends): auto (the CPU backend for CPU meshes
    # when jaxvision[cpu] is installed, cuDNN attention on GPU, else portable) | portable | cpu
    c.backend = "auto"

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "digits"  # digits | folder:/path | tfds:NAME
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.eval_dataset = ""  # "": the training dataset
    c.data.data_dir = ""  # TFDS data_dir
    c.data.val_fraction = 0.1  # image folders: share held out as split "val"
    c.data.image_size = 0  # 0: the model card's input size
    c.data.augment = "rrc_flip"  # rrc_flip | pad_crop_flip | pad_crop | none
    c.data.rrc_scale = (0.08, 1.0)
    c.data.flip = "random"  # *_flip augments: random | alternate (each image mirrored every other epoch)
    c.data.translate = 0  # pad_crop*: the largest shift in pixels; 0: image_size / 8
    c.data.pad_mode = "constant"  # pad_crop*: constant (zeros) | reflect
    c.data.crop_pct = 0.0  # 0: the model card's
    c.data.interpolation = ""  # "": the model card's
    c.data.randaugment = ""  # timm-style, e.g. "rand-m9-mstd0.5" ("" = off)
    c.data.reprob = 0.0  # random erasing probability
    c.data.remode = "pixel"  # random erasing fill: pixel | const | rand
    c.data.sampling = "uniform"  # uniform | balanced (each class equally often)
    c.data.threads = 4  # grain read threads per process
    # grain worker processes (training and evaluation); 0 = read threads only (enough for small or
    # in-memory data: a process takes seconds to start), -1 = one per host core (image datasets)
    c.data.workers = 0

    c.batch_size = 128  # global
    c.eval_batch_size = 0  # 0: batch_size
    c.num_epochs = 10.0
    c.num_steps = 0  # > 0 overrides num_epochs
    c.run_steps = 0  # > 0: stop with a checkpoint after this many steps of this invocation

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "sgd"  # any optax optimizer: sgd | adamw | lamb | lars | adafactor | lion | ...
    c.optim.kwargs = ml_collections.ConfigDict()  # further arguments of that optax optimizer
    c.optim.lr = 0.1
    c.optim.schedule = "cosine"  # cosine | linear | step | constant
    c.optim.warmup_steps = 0
    c.optim.min_lr_ratio = 0.0
    c.optim.step_boundaries = (0.3, 0.6, 0.9)  # fractions of training, for schedule=step
    c.optim.step_factor = 0.1
    c.optim.momentum = 0.9
    c.optim.nesterov = False
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 0.0  # global-norm clipping; 0 = off
    c.optim.accumulate = 1  # gradient accumulation steps (optax.MultiSteps)
    c.optim.layer_decay = 0.0  # layer-wise lr decay factor in (0, 1); 0 = off
    # ((regex, factor), ...): updates of parameters whose path (groups_0/norm1/bias) a regex matches
    # first are scaled by its factor, e.g. (("bias", 64.0),) for the CIFAR speed recipes' biases
    c.optim.lr_mults = ()
    # ((regex, factor), ...): weight decay times the factor of the first regex matching the path,
    # none where no regex matches; () decays kernels and matrices only (not biases, norms, embeddings).
    # lr_mults scale the decay with the update: (("norm", 1 / 64), (".", 1.0)) beside a 64x norm rate
    # decays everything at the same rate (the CIFAR speed recipes)
    c.optim.wd_mults = ()
    c.optim.trainable = ""  # regex over parameter paths (layer1/0/conv1/kernel): only these train
    c.optim.frozen = ""  # regex: these get no updates and no optimizer state

    c.ema = ml_collections.ConfigDict()
    c.ema.decay = 0.0  # e.g. 0.9998; 0 = off. Evaluated alongside the raw weights (ema_val_*)
    c.ema.warmup = True
    c.ema.ramp = 0.0  # > 0: decay * (step / total steps) ** ramp instead of the warm-up (airbench: 3)
    c.ema.sync_every = 0  # > 0: lookahead, the weights restart from the average every N steps

    c.mix = ml_collections.ConfigDict()  # MixUp / CutMix, timm's options (see jaxvision.data.mix)
    c.mix.mixup_alpha = 0.0
    c.mix.cutmix_alpha = 0.0
    c.mix.cutmix_minmax = ()  # (min, max) fractions of the side; () = off
    c.mix.prob = 1.0
    c.mix.switch_prob = 0.5
    c.mix.mode = "batch"  # batch | pair | elem
    c.mix.correct_lam = True

    c.loss = ml_collections.ConfigDict()
    c.loss.name = "ce"  # ce | bce | focal
    c.loss.label_smoothing = 0.0
    c.loss.focal_gamma = 2.0
    c.loss.class_weights = ""  # "" | balanced | comma-separated weights per class
    # test-time augmentation in eval, predict and calibrate (not in the exported model): "" none,
    # "flip" (averages the logits of each image and its mirror image), "flip_translate" (6 views)
    c.tta = ""
    c.per_class_metrics = False  # per-class and balanced accuracy, confusion matrix PNG per eval

    c.distill = ml_collections.ConfigDict()  # knowledge distillation from a frozen teacher
    c.distill.teacher = ""  # zoo name; "" = off
    c.distill.teacher_kwargs = ml_collections.ConfigDict()  # passed to models.create for the teacher
    c.distill.teacher_init = ""  # the teacher's weights: a jaxvision workdir or converter output
    c.distill.teacher_image_size = 0  # 0: the student's input size
    c.distill.kind = "logits"  # logits | deit_soft | deit_hard | feature
    c.distill.temperature = 4.0
    c.distill.w_task = 1.0  # weight of the task loss
    c.distill.w_kd = 1.0  # weight of the distillation loss

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.mesh_dcn = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})  # across slices/hosts
    c.fsdp_min_size = 2 ** 18  # parameters smaller than this (elements) stay replicated
    c.distributed = "auto"  # auto | true | false: jax.distributed.initialize()

    c.log_every = 50
    c.eval_every = 0  # steps; 0 = once per epoch
    c.checkpoint_every = 0  # steps; 0 = at evaluations and at the end
    c.keep_checkpoints = 2  # latest kept, plus the best by val_top1
    c.init_from = ""  # converted weights (python -m jaxvision.models.convert) or a workdir

    c.predict = ml_collections.ConfigDict()  # --mode predict
    c.predict.inputs = ""  # an image file, a folder (recursive) or a glob
    c.predict.top_k = 5
    c.predict.output = ""  # CSV path; "": WORKDIR/predictions.csv
    c.calibrate = ml_collections.ConfigDict()  # --mode calibrate (on the eval split)
    c.calibrate.accept = 0.95  # share of in-distribution validation images the OOD threshold keeps
    c.calibrate.score = "msp"  # OOD score: msp (maximum softmax) | energy
    c.calibrate.ood_dataset = ""  # e.g. digits: report AUROC against it
    c.calibrate.ood_split = "test"
    c.export = ml_collections.ConfigDict()  # --mode export
    c.export.format = "stablehlo"
    c.export.input_size = 0  # raw image side the artifact takes; 0: the eval resize size
    c.export.quantize = ""  # "": float weights; int8: the --mode quantize model
    c.export.platforms = "cpu,cuda,tpu"  # where the StableHLO artifact may run (comma-separated)
    c.export.cpu_rewrites = False  # True: the CPU backend's XLA rewrites (platforms=cpu only)
    c.plan = ml_collections.ConfigDict()  # --mode plan
    c.plan.platform = ""  # cpu | cuda | rocm | tpu; "": this host's. Lowered for it from any host
    c.plan.devices = 0  # 0: this host's devices; N: an abstract mesh of N devices (lowered, not compiled)
    c.plan.output = ""  # the lowered StableHLO text; "": WORKDIR/plan_<platform>.stablehlo.mlir
    c.quantize = ml_collections.ConfigDict()  # --mode quantize (post-training, on the eval split)
    c.quantize.qtype = "int8"
    c.quantize.tolerance = 1.0  # top-1 points int8 may lose before a warning
    return c


def load(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of a recipe file (`get_config(arg)`), as `--config path[:arg]` would build it;
    for notebooks, tests, experiments and recipes that extend another recipe."""
    import importlib.util
    import os

    path = os.path.abspath(path)
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _num(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def check(c) -> None:
    """Every field's range and choices, before anything is built: the first bad value raises a
    UserError of one line that names the field and what it may be. Batches against the mesh are
    `mesh.check_batch`'s, which `train` runs next, before any data is read."""
    import math
    import os
    import re

    from jaxvision import backends
    from jaxvision.data import augment, mix, transforms
    from jaxvision.errors import UserError
    from jaxvision.train import losses, optim, step

    def get(path):
        value = c
        for key in path.split("."):
            value = value[key]
        return value

    def fail(path, allowed):
        raise UserError(f"config.{path} must be {allowed}, not {get(path)!r}")

    def number(path, low=None, high=None, *, low_open=False, high_open=False, integer=False):
        value = get(path)
        x = _num(value)
        bad = (x is None or not math.isfinite(x) or isinstance(value, bool)
               or (integer and x != int(x))
               or (low is not None and (x < low or (low_open and x == low)))
               or (high is not None and (x > high or (high_open and x == high))))
        if bad:
            kind = "an integer" if integer else "a finite number"
            lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
            hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
            fail(path, f"{kind} {' and '.join(filter(None, (lo, hi)))}".strip())

    def choice(path, options):
        if get(path) not in options:
            fail(path, "one of " + ", ".join(map(str, options)))

    number("data.workers", -1, integer=True)
    for path in ("seed", "model.num_classes", "model.whiten", "data.image_size", "eval_batch_size",
                 "num_steps", "run_steps", "optim.warmup_steps", "eval_every", "checkpoint_every",
                 "fsdp_min_size", "log_every"):
        number(path, 0, integer=True)
    for path in ("batch_size", "keep_checkpoints", "optim.accumulate", "data.threads", "predict.top_k"):
        number(path, 1, integer=True)
    choice("model.dtype", ("float32", "bfloat16"))
    backends.check_backend(c.backend)
    choice("data.augment", transforms.AUGMENTATIONS)
    choice("tta", step.TTA_MODES)
    if get("data.interpolation"):  # "": the model card's
        choice("data.interpolation", transforms.INTERPOLATIONS)
    choice("data.remode", augment.ERASE_MODES)
    choice("data.flip", transforms.FLIPS)
    choice("data.pad_mode", transforms.PAD_MODES)
    number("data.translate", 0, integer=True)
    choice("data.sampling", ("uniform", "balanced"))
    number("data.val_fraction", 0, 1, high_open=True)
    number("data.crop_pct", 0, 1)
    number("data.reprob", 0, 1)
    scale = tuple(c.data.rrc_scale)
    if len(scale) != 2 or not all(_num(s) is not None for s in scale) or not 0 < scale[0] <= scale[1] <= 1:
        fail("data.rrc_scale", "(min, max) with 0 < min <= max <= 1")
    if c.data.randaugment:
        augment.RandAugment.parse(c.data.randaugment)
    if not c.num_steps:
        number("num_epochs", 0, low_open=True)
    o = "optim"
    optim.by_name(c.optim, 0.1)  # an optax optimizer that takes these arguments
    choice(f"{o}.schedule", optim.SCHEDULES)
    number(f"{o}.lr", 0)
    number(f"{o}.min_lr_ratio", 0, 1)
    number(f"{o}.step_factor", 0)
    number(f"{o}.momentum", 0, 1, high_open=True)
    number(f"{o}.b1", 0, 1, high_open=True)
    number(f"{o}.b2", 0, 1, high_open=True)
    number(f"{o}.weight_decay", 0)
    number(f"{o}.grad_clip", 0)
    number(f"{o}.layer_decay", 0, 1)
    for path in (f"{o}.trainable", f"{o}.frozen"):
        try:
            re.compile(get(path))
        except re.error as e:
            fail(path, f"a regular expression ({e})")
    for field, example in (("lr_mults", "(('bias', 64.0),)"), ("wd_mults", "(('kernel', 1.0),)")):
        for rule in c.optim[field]:
            if not isinstance(rule, (tuple, list)) or len(rule) != 2 or _num(rule[1]) is None:
                fail(f"{o}.{field}", f"((regex, factor), ...), e.g. {example}")
            try:
                re.compile(rule[0])
            except (re.error, TypeError) as e:
                fail(f"{o}.{field}", f"((regex, factor), ...) with regular expressions ({e})")
    number("ema.decay", 0, 1, high_open=True)
    number("ema.ramp", 0)
    number("ema.sync_every", 0, integer=True)
    if c.ema.sync_every and not c.ema.decay:
        fail("ema.sync_every", "lookahead with ema.decay > 0 (how much of the slow weights stays per sync)")
    for path in ("mix.mixup_alpha", "mix.cutmix_alpha"):
        number(path, 0)
    number("mix.prob", 0, 1)
    number("mix.switch_prob", 0, 1)
    choice("mix.mode", mix.MODES)
    choice("loss.name", losses.LOSSES)
    number("loss.label_smoothing", 0, 1, high_open=True)
    number("loss.focal_gamma", 0)
    number("distill.temperature", 0, low_open=True)
    number("distill.w_task", 0)
    number("distill.w_kd", 0)
    for axes in ("mesh", "mesh_dcn"):
        for axis, size in get(axes).items():
            if _num(size) is None or (int(size) != -1 and int(size) < 1):
                fail(f"{axes}.{axis}", "a positive size or -1 (the devices left)")
    choice("distributed", ("auto", "true", "false"))
    from jaxvision import models

    models.create(c.model.name, **dict(c.model.kwargs))  # an unknown model or keyword, in one line
    if c.distill.teacher:
        models.create(c.distill.teacher, **dict(c.distill.teacher_kwargs))
    if c.model.pretrained and c.init_from:
        raise UserError("set one of config.model.pretrained and config.init_from, not both")
    if c.model.pretrained and str(c.model.pretrained).lower() != "true" and not os.path.exists(
            os.path.expanduser(str(c.model.pretrained))):
        from jaxvision.models import pretrained

        if pretrained.split(c.model.pretrained)[0] != pretrained.split(c.model.name)[0]:
            fail("model.pretrained", f"weights of {c.model.name} (a tag such as {c.model.name}."
                 f"{(pretrained.tags(c.model.name) or ['...'])[0]}), true, or a local file or folder")
        pretrained.resolve(c.model.pretrained)  # a known tag, else a one-line error listing them
    number("calibrate.accept", 0, 1, low_open=True, high_open=True)
