"""Scaling out on this machine: 2 processes x 4 CPU devices (jax.distributed over loopback, gloo
collectives) against 1 process x 8 devices; FSDP and tensor-parallel ViT; restoring onto other
meshes and device counts; SIGTERM at a step boundary."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxvision.parallel.mesh import MeshError, make_mesh
from jaxvision.train import loop
from tests.test_engine import ROOT, TINY, cli, configure, flags, load_config, losses, tiny

# The small-ViT variant of the default job, shrunk like TINY (its kwargs have no `width`).
VIT_TINY = {k: v for k, v in TINY.items() if k != "model.kwargs.width"} | {"data.image_size": 16}


def vit(**overrides):
    return configure(load_config("default", "vit"), {**VIT_TINY, "num_steps": 3, **overrides})


def two_processes(workdir, overrides: dict, arg: str = ""):
    base = VIT_TINY if arg == "vit" else TINY
    out = subprocess.run(
        [sys.executable, "launch/local.py", "--processes", "2", "--devices", "4", "--",
         "--config", f"configs/default.py{':' + arg if arg else ''}", "--workdir", str(workdir),
         *flags({**base, "num_steps": 3, **overrides})],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:]
    return out.stdout


@pytest.fixture(scope="module")
def dp_reference(tmp_path_factory):
    """1 process x 8 devices, data parallel: the reference losses."""
    cnn, vit_dir = tmp_path_factory.mktemp("dp_cnn"), tmp_path_factory.mktemp("dp_vit")
    loop.train(tiny(num_steps=3), str(cnn))
    loop.train(vit(), str(vit_dir))
    return {"cnn": losses(cnn), "vit": losses(vit_dir)}


@pytest.mark.parametrize("case, overrides", [
    ("cnn", {}),
    ("cnn", {"mesh.data": 1, "mesh.fsdp": 4, "mesh_dcn.data": 2}),  # FSDP in a host, hybrid mesh
    ("vit", {"mesh.data": 1, "mesh.tensor": 4, "mesh_dcn.data": 2}),  # tensor parallel
], ids=["data-parallel", "fsdp-hybrid", "vit-tensor-parallel"])
def test_two_processes_match_one_process(case, overrides, dp_reference, tmp_path):
    stdout = two_processes(tmp_path, overrides, "vit" if case == "vit" else "")
    assert "processes       2" in stdout and "[1] step" not in stdout  # only process 0 reports
    np.testing.assert_allclose(losses(tmp_path), dp_reference[case], rtol=2e-5)


def test_tensor_and_fsdp_sharding_shrink_per_device_bytes(capsys):
    def per_device(**mesh):
        text = loop.plan(vit(mesh={"data": 1, "fsdp": 1, "tensor": 1, **mesh}, fsdp_min_size=1024), lower=False)
        whole, device = re.search(r"total: \d+ arrays, ([0-9.]+) MiB, ([0-9.]+) MiB per device", text).groups()
        print(text.splitlines()[1], "->", device, "MiB per device of", whole)
        return float(device), float(whole)
    dp, whole = per_device(data=8)
    tp, _ = per_device(data=2, tensor=4)
    fsdp, _ = per_device(data=1, fsdp=8)
    assert dp == whole and tp < 0.35 * dp and fsdp < 0.2 * dp


def test_checkpoint_restores_on_other_meshes_and_device_counts(tmp_path):
    straight = tmp_path / "straight"
    loop.train(tiny(num_steps=4, **{"mesh.data": 1, "mesh.fsdp": 8}), str(straight))
    first = tmp_path / "first_half"
    loop.train(tiny(num_steps=4, run_steps=2, **{"mesh.data": 1, "mesh.fsdp": 8}), str(first))
    on_2x4 = tmp_path / "on_2x4"
    shutil.copytree(first, on_2x4)
    loop.train(tiny(num_steps=4, **{"mesh.data": 2, "mesh.fsdp": 4}), str(on_2x4))
    np.testing.assert_allclose(losses(on_2x4), losses(straight), rtol=2e-5)
    on_4 = tmp_path / "on_4_devices"
    shutil.copytree(first, on_4)
    cli("--config", "configs/default.py", "--workdir", str(on_4),
        *flags({**TINY, "num_steps": 4, "mesh.data": 4}), devices=4)
    np.testing.assert_allclose(losses(on_4), losses(straight), rtol=2e-5)


def test_sigterm_saves_at_a_step_boundary_and_the_rerun_resumes(tmp_path):
    overrides = {**TINY, "num_steps": 60, "batch_size": 64, "model.kwargs.width": 16, "data.image_size": 16}
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "8", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    workdir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "jaxvision.main", "--config", "configs/default.py",
                             "--workdir", str(workdir), *flags(overrides)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "preemption notice: saved step" in out
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["preempted"] and 3 <= summary["steps"] < 60
    cli("--config", "configs/default.py", "--workdir", str(workdir), *flags(overrides))
    straight = tmp_path / "straight"
    loop.train(tiny(**{k: v for k, v in overrides.items()}), str(straight))
    assert len(losses(workdir)) == 60 and losses(workdir) == pytest.approx(losses(straight), rel=2e-5)


def test_bad_topology_fails_fast_with_the_numbers():
    with pytest.raises(MeshError, match="needs 12 devices but there are 8"):
        make_mesh({"data": 3, "fsdp": 4})
    with pytest.raises(MeshError, match="spans 2 processes but there are 1"):
        make_mesh({"fsdp": 4}, {"data": 2})
    with pytest.raises(MeshError, match="only one axis may be -1"):
        make_mesh({"data": -1, "fsdp": -1})
    assert dict(make_mesh({"data": 2, "fsdp": -1}).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert jax.device_count() == 8
