"""The training engine end to end on 8 virtual CPU devices: sharded steps agree with one device,
resume is exact, the command line works, bad input gets a clear message."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxvision import checkpoint, config as config_lib
from jaxvision.data.sources import DataError
from jaxvision.errors import UserError
from jaxvision.parallel.mesh import MeshError
from jaxvision.train import loop, state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The default recipe shrunk: width-8 ResNet-18 on 8x8 digits, a few steps, no mid-run evaluation.
TINY = {"model.kwargs.width": 8, "data.image_size": 8, "batch_size": 32, "eval_batch_size": 120,
        "num_steps": 4, "log_every": 1, "eval_every": 1000, "optim.warmup_steps": 1,
        "fsdp_min_size": 256}


def load_config(name: str, arg=None):
    return config_lib.load(os.path.join(ROOT, "configs", f"{name}.py"), arg)


def configure(config, overrides: dict):
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        target = config
        for p in parents:
            target = target[p]
        target[leaf] = value
    return config


def tiny(**overrides):
    return configure(load_config("default"), {**TINY, **overrides})


def cli(*args, devices: int = 8, check: bool = True):
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    out = subprocess.run([sys.executable, "-m", "jaxvision.main", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def flags(overrides: dict):
    return [f"--config.{k}={v}" for k, v in overrides.items()]


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [row["loss"] for row in map(json.loads, f) if "loss" in row]


def final_params(workdir):
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "data"))
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return restored["state"]["params"]


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
    """The reference: the same job in a process that has a single CPU device."""
    workdir = str(tmp_path_factory.mktemp("one_device"))
    cli("--config", "configs/default.py", "--workdir", workdir, *flags(TINY), devices=1)
    return workdir


@pytest.mark.parametrize("mesh", [{"data": 8}, {"data": 1, "fsdp": 8}, {"data": 2, "fsdp": 4}],
                         ids=["8x1", "1x8-fsdp", "2x4"])
def test_sharded_training_matches_one_device(mesh, one_device_run, tmp_path):
    assert jax.device_count() == 8
    config = tiny(mesh={"data": 1, "fsdp": 1, "tensor": 1, **mesh})
    summary = loop.train(config, str(tmp_path))
    assert summary["devices"] == 8 and summary["mesh"]["fsdp"] == mesh.get("fsdp", 1)
    got, want = losses(tmp_path), losses(one_device_run)
    assert len(got) == len(want) == 4 and len(set(got)) > 1  # training moved the model
    np.testing.assert_allclose(got, want, rtol=2e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                           final_params(tmp_path), final_params(one_device_run))


def test_fsdp_shards_large_parameters_and_plan_shows_it():
    text = loop.plan(tiny(mesh={"data": 2, "fsdp": 4, "tensor": 1}), lower=False)
    assert "'fsdp'" in text and "Mib_per_device" in text and "MiB per device" in text


def test_resume_is_exact(tmp_path):
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    loop.train(tiny(num_steps=8), straight)
    first = loop.train(tiny(num_steps=8, run_steps=4), stopped)
    assert first["steps"] == 4
    second = loop.train(tiny(num_steps=8, run_steps=4), stopped)
    assert second["steps"] == 8
    assert losses(stopped) == losses(straight)
    jax.tree_util.tree_map(np.testing.assert_array_equal, final_params(stopped), final_params(straight))
    again = loop.train(tiny(num_steps=8, run_steps=4), stopped)  # a finished run, rerun: nothing to do
    assert again["steps"] == 8 and again["final_val_top1"] == second["final_val_top1"] is not None
    assert json.load(open(os.path.join(stopped, "summary.json")))["best_val_top1"] == second["best_val_top1"]


def test_command_line_trains_evaluates_and_writes_metrics(tmp_path):
    workdir = str(tmp_path / "run")
    out = cli("--config", "configs/default.py", "--workdir", workdir, *flags({**TINY, "num_steps": 6}))
    assert "summary" in out.stdout and "final_val_top1" in out.stdout
    summary = json.loads(open(os.path.join(workdir, "summary.json")).read())
    assert summary["steps"] == 6 and 0.0 <= summary["final_val_top1"] <= 1.0
    assert len(losses(workdir)) == 6
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(workdir, "tensorboard"))
    events.Reload()
    assert {"loss", "val_top1", "images_per_sec"} <= set(events.Tags()["scalars"])
    out = cli("--config", "configs/default.py", "--workdir", workdir, "--mode", "eval", *flags(TINY))
    assert "val_top1" in out.stdout and f"{summary['final_val_top1']:.4f}" in out.stdout


def test_unknown_config_field_is_named(tmp_path):
    out = cli("--config", "configs/default.py", "--workdir", str(tmp_path), "--config.optim.lr_typo=1",
              check=False)
    assert out.returncode == 2 and "--config.optim.lr_typo: the config has no field 'lr_typo'" in out.stderr
    assert "Traceback" not in out.stderr


def test_user_errors_exit_with_a_message_not_a_traceback(tmp_path):
    out = cli("--config", "configs/default.py", "--workdir", str(tmp_path),
              "--config.data.dataset=folder:/no/such/dir", check=False)
    assert out.returncode == 2 and "/no/such/dir does not exist" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("overrides, error, message", [
    ({"data.dataset": "folder:/no/such/dir"}, DataError, "does not exist"),
    ({"data.dataset": "mnist"}, DataError, "unknown dataset"),
    ({"model.name": "resnet51"}, UserError, "Did you mean resnet50"),
    ({"batch_size": 60}, MeshError, "batch_size 60 does not split over the data-parallel size 8"),
    ({"mesh": {"data": 3, "fsdp": 1, "tensor": 1}}, MeshError, "needs 3 devices but there are 8"),
    ({"optim.name": "adam_typo"}, UserError, "must be an optax optimizer"),
])
def test_bad_input_is_rejected_before_anything_is_written(tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        loop.train(tiny(**overrides), str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints") or not os.listdir(tmp_path / "checkpoints")


def test_checkpoint_of_another_model_is_refused_and_kept(tmp_path):
    loop.train(tiny(num_steps=2), str(tmp_path))
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    with pytest.raises(checkpoint.CheckpointError, match="holds checkpoints of another model"):
        loop.train(tiny(**{"model.name": "resnet34"}), str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before


def test_init_from_a_workdir_keeps_the_backbone_and_makes_a_new_head(tmp_path):
    from tests.images import image_folder as make_folder

    loop.train(tiny(num_steps=2), str(tmp_path / "pretrain"))
    pretrained = final_params(tmp_path / "pretrain")
    folder = make_folder(tmp_path / "three", per_class=8, size=(8, 8))
    config = tiny(**{"data.dataset": f"folder:{folder}", "data.train_split": "all",
                     "data.eval_split": "all", "init_from": str(tmp_path / "pretrain")})
    s = loop.setup(config)
    tx = loop.optim.optimizer(config.optim, 10)
    state, _ = state_lib.create_state(s.model, tx, 8, s.mesh, 256)
    params, _, heads = checkpoint.init_from(config.init_from, "resnet18", state.params, state.batch_stats)
    assert heads == ["fc/bias", "fc/kernel"] and params["fc"]["kernel"].shape == (64, 3)
    np.testing.assert_array_equal(params["layer1"]["0"]["conv1"]["kernel"],
                                  pretrained["layer1"]["0"]["conv1"]["kernel"])
    assert loop.train(config, str(tmp_path / "finetune"))["steps"] == 4


@pytest.mark.parametrize("recipe", ["imagenet_resnet50", "imagenet_vit_s16"])
def test_imagenet_recipes_build_compile_one_step_and_plan(recipe):
    config = configure(load_config(recipe), {"data.image_size": 32, "batch_size": 8})
    text = loop.plan(config)
    assert "compiled in" in text and "GFLOP per step" in text and "total" in text


def test_a_training_run_never_imports_torch(tmp_path):
    """torch is installed here for the parity tests; the package must not load it (tensorboardX
    would, were it not kept out: `writer._summary_writer`)."""
    script = ("import sys; from tests.test_engine import tiny; from jaxvision.train import loop; "
              f"loop.train(tiny(num_steps=2), {str(tmp_path)!r}); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_eval_restores_the_weights_without_the_optimizer_state(tmp_path):
    """Partial restore: a config whose optimizer state has another structure (adamw's against the
    sgd state on disk) still evaluates the checkpoint, to the same numbers."""
    loop.train(tiny(num_steps=2), str(tmp_path))
    same = loop.evaluate(tiny(), str(tmp_path))
    other = loop.evaluate(tiny(**{"optim.name": "adamw", "ema.decay": 0.999}), str(tmp_path))
    assert other == same
