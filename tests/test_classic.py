"""LeNet-5, AlexNet and GoogLeNet: logits equal torchvision's (AlexNet, GoogLeNet) and a PyTorch
LeNet-5's on the same weights, and the LeNet-5 recipe learns the digits."""

import jax
import numpy as np
import pytest

from jaxvision import models
from jaxvision.models import convert
from jaxvision.train import loop
from tests.test_engine import load_config

torch = pytest.importorskip("torch", reason="parity tests need the `parity` extra (torch, torchvision)")
torchvision = pytest.importorskip("torchvision", reason="parity tests need the `parity` extra")
from tests.test_convert import _assert_parity  # noqa: E402


def torch_lenet5():
    """LeNet-5 as the module docstring reads it, in PyTorch (torchvision has none)."""
    nn = torch.nn
    model = nn.Module()
    model.features = nn.Sequential(nn.Conv2d(1, 6, 5), nn.Tanh(), nn.AvgPool2d(2), nn.Conv2d(6, 16, 5), nn.Tanh(),
                                   nn.AvgPool2d(2))
    model.classifier = nn.Sequential(nn.Linear(400, 120), nn.Tanh(), nn.Linear(120, 84), nn.Tanh(), nn.Linear(84, 10))
    model.forward = lambda x: model.classifier(model.features(x).flatten(1))
    return model


def randomised(model):
    """Eval mode with BatchNorm statistics and affine parameters away from their defaults."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(1.0, 2.0)
            m.weight.data.uniform_(0.5, 1.0)
            m.bias.data.normal_(0.0, 0.1)
    return model.eval()


@pytest.mark.parity
@pytest.mark.parametrize("name, size, channels", [("lenet5", 32, 1), ("alexnet", 96, 3), ("googlenet", 75, 3)])
def test_logits_match_torchvision(name, size, channels):
    torch.manual_seed(0)
    ref_model = randomised({"lenet5": torch_lenet5, "alexnet": torchvision.models.alexnet,
                            "googlenet": lambda: torchvision.models.GoogLeNet(aux_logits=False, init_weights=True)}[name]())
    x = np.random.RandomState(0).randn(2, channels, size, size).astype(np.float32)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(x)).numpy()
    variables = convert.from_torch(name, ref_model.state_dict())
    ours = jax.jit(models.create(name).apply)(variables, x.transpose(0, 2, 3, 1))
    _assert_parity(np.asarray(ours), ref)


def test_the_lenet5_recipe_learns_the_digits(tmp_path):
    summary = loop.train(load_config("default", "lenet5"), str(tmp_path))
    assert summary["final_val_top1"] > 0.9
