"""Nothing lost, nothing silent (issue 30), each point with its reproduction scaled down: the best
checkpoint survives restarts and evaluation uses it; a damaged checkpoint is moved aside and the
one before it used; divergence stops the run; one run per workdir; resumed metrics keep each step
once; the whole config is checked first; evaluation leaves unreadable images out; odd folder
layouts are named; and the smaller cases of point 9."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxvision import checkpoint, config as config_lib, workdir as workdir_lib
from jaxvision.data import sources
from jaxvision.errors import UserError
from jaxvision.train import loop
from tests.images import image_folder
from tests.test_engine import ROOT, cli, tiny

SAVE_EVERY = {"checkpoint_every": 2, "keep_checkpoints": 3}


def steps_on_disk(workdir) -> list[int]:
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def metric_steps(workdir) -> list[int]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [row["step"] for row in map(json.loads, f) if "loss" in row]


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A run of 4 steps with checkpoints at 2 and 4, for the tests to copy and damage."""
    workdir = str(tmp_path_factory.mktemp("four_steps"))
    loop.train(tiny(num_steps=4, **SAVE_EVERY), workdir)
    return workdir


def copy_of(run, tmp_path) -> str:
    return shutil.copytree(run, tmp_path / "run")


# 1. The best checkpoint ---------------------------------------------------------------------------

def test_the_best_checkpoint_survives_restarts_and_pruning(tmp_path):
    """Its metric is written with it (orbax's best_fn), so a new manager still knows it, keeps
    it beside the latest, and never takes a non-finite metric for the best."""
    import jax.numpy as jnp

    def saves(steps_metrics):
        ckpts = checkpoint.Checkpoints(str(tmp_path), keep=1, async_save=False)
        for step, metric in steps_metrics:
            ckpts.save(step, {"w": jnp.full((3,), float(step))}, {"next_batch": step},
                       metrics=None if metric is None else {"val_top1": metric})
        best = ckpts.best_step()
        ckpts.close()
        return best

    assert saves([(10, 0.9), (20, 0.5), (30, None)]) == 10
    assert steps_on_disk(tmp_path) == [10, 30]
    assert saves([(40, None), (50, float("nan"))]) == 10  # a restart: 10 is still the best, and kept
    assert steps_on_disk(tmp_path) == [10, 50]
    with pytest.raises(UserError, match="keep_checkpoints must be"):
        config_lib.check(tiny(keep_checkpoints=0))


def test_eval_scores_the_best_checkpoint_not_the_latest(tmp_path):
    workdir = str(tmp_path)
    loop.train(tiny(num_steps=6, eval_every=2, **SAVE_EVERY), workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        evals = {row["step"]: row["val_top1"] for row in map(json.loads, f) if "val_top1" in row}
    best = max(evals, key=lambda k: (evals[k], -k))  # the first of equals, as orbax keeps it
    assert best in steps_on_disk(workdir)
    assert loop.evaluate(tiny(), workdir)["val_top1"] == pytest.approx(evals[best], abs=1e-6)


# 2. Damaged checkpoints ---------------------------------------------------------------------------

def _largest_data_file(workdir, step):
    folder = os.path.join(workdir, "checkpoints", str(step), "state")
    files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]
    return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_checkpoint_is_moved_aside_and_the_one_before_used(damage, four_steps, tmp_path, caplog):
    workdir = copy_of(four_steps, tmp_path)
    path = _largest_data_file(workdir, 4)
    data = bytearray(open(path, "rb").read())
    if damage == "flip":
        for i in (len(data) // 3, len(data) // 2, 2 * len(data) // 3):
            data[i] ^= 0x5A
    else:
        data = data[:len(data) // 2]
    open(path, "wb").write(bytes(data))
    summary = loop.train(tiny(num_steps=6, **SAVE_EVERY), workdir)
    assert summary["steps"] == 6 and np.isfinite(summary["final_val_top1"])
    aside = os.listdir(os.path.join(workdir, "checkpoints_corrupt"))
    assert len(aside) == 1 and aside[0].startswith("4-")
    assert any("checkpoint 4" in r.getMessage() and "moved it to" in r.getMessage() for r in caplog.records)
    assert 6 in steps_on_disk(workdir) and metric_steps(workdir) == [1, 2, 3, 4, 5, 6]  # 3-4 again, once


def test_no_good_checkpoint_is_one_line_and_nothing_is_deleted(four_steps, tmp_path):
    workdir = copy_of(four_steps, tmp_path)
    for step in (2, 4):
        open(_largest_data_file(workdir, step), "wb").write(b"")
    with pytest.raises(checkpoint.CheckpointError, match="no good checkpoint.*steps 4, 2 were damaged"):
        loop.train(tiny(num_steps=6, **SAVE_EVERY), workdir)
    assert sorted(d.split("-")[0] for d in os.listdir(os.path.join(workdir, "checkpoints_corrupt"))) == ["2", "4"]


# 3. Divergence ------------------------------------------------------------------------------------

def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(four_steps, tmp_path):
    workdir = copy_of(four_steps, tmp_path)
    with pytest.raises(loop.Diverged, match=r"diverged at step 6: loss nan.*step 4, is kept.*optim.lr=1e\+30"):
        loop.train(tiny(num_steps=8, **{"optim.lr": 1e30, "optim.warmup_steps": 0, **SAVE_EVERY}), workdir)
    assert steps_on_disk(workdir) == [2, 4]
    assert loop.Diverged.exit_code == 3
    for lr in ("nan", "-1"):
        out = cli("--config", "configs/default.py", "--workdir", str(tmp_path / "x"), f"--config.optim.lr={lr}",
                  check=False)
        assert out.returncode == 2 and "config.optim.lr must be a finite number >= 0" in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


# 4. One run per workdir; 5. metrics kept once ------------------------------------------------------

def test_a_second_run_is_refused_naming_the_first_and_a_dead_ones_lock_is_taken_over(tmp_path, caplog):
    workdir = str(tmp_path)
    with workdir_lib.RunLock(workdir_lib.prepare(workdir)):
        out = cli("--config", "configs/default.py", "--workdir", workdir, check=False)
        assert out.returncode == 2 and f"pid {os.getpid()}" in out.stderr and "another run" in out.stderr
        assert not os.path.exists(os.path.join(workdir, "checkpoints"))
    with open(os.path.join(workdir, workdir_lib.LOCK), "w") as f:  # left by a run killed with -9
        json.dump({"host": "gone", "pid": 999999, "started": "yesterday"}, f)
    assert loop.train(tiny(num_steps=2), workdir)["steps"] == 2
    assert any("took over the lock" in r.getMessage() and "pid 999999" in r.getMessage() for r in caplog.records)


def test_a_resumed_run_drops_the_rows_written_after_its_checkpoint(four_steps, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboardX import SummaryWriter

    workdir = copy_of(four_steps, tmp_path)
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:  # logged, then killed before saving
        f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n")
    with SummaryWriter(os.path.join(workdir, "tensorboard")) as tb:
        tb.add_scalar("loss", 1.0, 5)
    loop.train(tiny(num_steps=6, **SAVE_EVERY), workdir)
    assert metric_steps(workdir) == [1, 2, 3, 4, 5, 6]
    events = EventAccumulator(os.path.join(workdir, "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6] and 1.0 not in [e.value for e in events.Scalars("loss")]


# 5. (the eval batch) and 7. Numbers checked before anything is built ----------------------------

@pytest.mark.parametrize("override,message", [
    ({"num_epochs": 0.0, "num_steps": 0}, "config.num_epochs must be a finite number > 0"),
    ({"num_epochs": -3.0, "num_steps": 0}, "config.num_epochs must be a finite number > 0"),
    ({"batch_size": 0}, "config.batch_size must be an integer >= 1"),
    ({"data.image_size": -16}, "config.data.image_size must be an integer >= 0"),
    ({"data.workers": -2}, "config.data.workers must be an integer >= -1"),
    ({"tta": "mirror"}, "config.tta must be one of , flip, flip_translate"),
    ({"data.interpolation": "lanczos"}, "config.data.interpolation must be one of bicubic, bilinear, nearest"),
    ({"eval_batch_size": 118}, "eval_batch_size 118 does not split over the data-parallel size 8"),
    ({"mix.prob": 1.5}, "config.mix.prob must be a finite number >= 0 and <= 1"),
    ({"optim.name": "sgdd"}, "config.optim.name must be an optax optimizer such as sgd, adamw"),
])
def test_bad_numbers_are_one_line_before_anything_is_built(override, message, tmp_path):
    with pytest.raises(UserError, match=message):
        loop.train(tiny(**override), str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.parametrize("args,message", [
    (["--config.batch_size=abc"], "batch_size"),
    (["--mode", "foo"], "--mode"),
    (["--config.no_such_field=1"], "no field 'no_such_field'"),
    (["--config.model.kwargs.no_such_field=1", "--mode", "plan"], "resnet18 does not take no_such_field"),
])
def test_bad_flags_are_one_line(args, message, tmp_path):
    out = subprocess.run([sys.executable, "-m", "jaxvision.main", "--config", "configs/default.py",
                          "--workdir", str(tmp_path), *args], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


# 6. Evaluation never substitutes; 8. folder layouts -----------------------------------------------

def _folder(root, classes=("a", "b"), per_class=6):
    return image_folder(root, classes, per_class, size=(12, 12), png_every=0)


def test_evaluation_leaves_an_unreadable_image_out_and_counts_it(tmp_path):
    root = _folder(tmp_path / "data")
    config = tiny(**{"data.dataset": f"folder:{root}", "data.eval_split": "all", "eval_batch_size": 8,
                     "data.image_size": 8, "num_steps": 2})
    workdir = str(tmp_path / "run")
    loop.train(config, workdir)
    clean = loop.evaluate(config, workdir)
    victim = root / "b" / "5.jpg"
    data = victim.read_bytes()
    victim.write_bytes(data[:len(data) // 3])
    damaged = loop.evaluate(config, workdir)
    assert damaged["val_unreadable"] == 1 and "val_unreadable" not in clean
    victim.unlink()
    without = loop.evaluate(config, workdir)
    assert damaged["val_top1"] == without["val_top1"] and damaged["val_loss"] == pytest.approx(without["val_loss"])


def test_odd_folder_layouts_are_named_once_each(tmp_path, caplog):
    root = _folder(tmp_path / "data", classes=("a", "b"), per_class=3)
    os.makedirs(root / "empty")
    os.makedirs(root / "a" / "more")
    Image.new("RGB", (4, 4)).save(root / "a" / "more" / "x.png")
    (root / "b" / "notes.txt").write_text("not an image")
    for split in ("all", "train", "all"):
        sources.FolderSource(str(root), split, 0.3)
    text = [r.getMessage() for r in caplog.records]
    for needle in ("without images, which still count as classes: empty", "1 images in subfolders",
                   "1 files that are not images"):
        assert sum(needle in m for m in text) == 1, (needle, text)
    single = _folder(tmp_path / "one", classes=("only",), per_class=2)
    sources.FolderSource(str(single), "all")
    assert any("single class folder" in m for m in (r.getMessage() for r in caplog.records))


# 9. The smaller cases ------------------------------------------------------------------------------

def test_eval_of_a_missing_workdir_creates_nothing_and_a_file_as_workdir_is_one_line(tmp_path):
    missing = tmp_path / "no" / "such"
    with pytest.raises(checkpoint.CheckpointError, match="no such directory"):
        loop.evaluate(tiny(), str(missing))
    assert not (tmp_path / "no").exists()
    occupied = tmp_path / "file"
    occupied.write_text("")
    with pytest.raises(workdir_lib.WorkdirError, match="cannot write to the workdir"):
        loop.train(tiny(), str(occupied))


def test_the_local_launcher_returns_the_first_failure_and_stops_the_rest():
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import local

    slow = [sys.executable, "-c", "import time; time.sleep(60)"]
    fails = [sys.executable, "-c", "import sys, time; time.sleep(1); sys.exit(7)"]
    assert local.run([slow, fails], [dict(os.environ)] * 2) == 7  # rank 1 fails first, rank 0 is stopped
