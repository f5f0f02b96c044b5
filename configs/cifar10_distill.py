"""Knowledge distillation on CIFAR-10: the engine-trained `cifar10_resnet` model (ResNet-18 layout,
width 16, 0.7M parameters) teaches a width-8 student (0.18M parameters) through temperature-scaled
logits (Hinton et al. 2015). The teacher runs frozen inside the student's jitted step on the same
augmented batch.

    python -m jaxvision.main --config configs/cifar10_resnet.py:/tmp/cifar10/train --workdir /tmp/jv_cifar
    python -m jaxvision.main --config configs/cifar10_distill.py:/tmp/cifar10/train,/tmp/jv_cifar \\
        --workdir /tmp/jv_student_kd

Argument: "<image folder>,<teacher workdir>". The same student without a teacher:
`--config.distill.teacher=''`. Both measured, with the teacher's accuracy, by
`python experiments/distill_cifar10.py` (results in the README).
"""

import os

from jaxvision.config import load

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
    folder, _, teacher_dir = (arg or "/tmp/cifar10/train,/tmp/jv_cifar").partition(",")
    teacher = load(os.path.join(HERE, "cifar10_resnet.py"), folder)
    c = load(os.path.join(HERE, "cifar10_resnet.py"), folder)
    c.model.kwargs = {"stem": "3x3", "width": 8}

    c.distill.teacher = teacher.model.name
    c.distill.teacher_kwargs = dict(teacher.model.kwargs)
    c.distill.teacher_init = teacher_dir or "/tmp/jv_cifar"
    c.distill.kind = "logits"
    c.distill.temperature = 4.0
    c.distill.w_task = 1.0
    c.distill.w_kd = 1.0
    return c
