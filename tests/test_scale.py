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
    assert proc.returncode == 75, out[-3000:]  # preempted, saved: EX_TEMPFAIL
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


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


START = ("import types, jax; from jaxvision.parallel import distributed; "
         "up = distributed.initialize(types.SimpleNamespace(distributed='auto')); "
         "print(up, jax.process_count(), jax.process_index())")


def cluster_env(kind: str, rank: int, port: int) -> dict:
    """What JAX's own cluster detection reads for each launcher, on loopback."""
    scrubbed = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS"))}
    base = {**scrubbed, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "2", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    return base | {
        "none": {},
        "coordinator": {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(rank)},
        "slurm": {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
                  "SLURM_PROCID": str(rank), "SLURM_LOCALID": "0", "JAX_COORDINATOR_PORT": str(port)},
        "ompi": {"OMPI_MCA_orte_hnp_uri": f"1531576320.0;tcp://127.0.0.1:{port}", "OMPI_COMM_WORLD_SIZE": "2",
                 "OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_LOCAL_RANK": "0", "JAX_COORDINATOR_PORT": str(port)},
    }[kind]


@pytest.mark.parametrize("kind", ["none", "coordinator", "slurm", "ompi"])
def test_start_up_joins_the_cluster_jax_detects_and_only_then(kind):
    """`distributed=auto` leaves a plain host alone and joins the two processes of every launcher
    JAX detects (here faked on loopback through the variables its detection reads)."""
    port, ranks = free_port(), (0,) if kind == "none" else (0, 1)
    procs = [subprocess.Popen([sys.executable, "-c", START], cwd=ROOT, env=cluster_env(kind, r, port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in ranks]
    outs = [p.communicate(timeout=180)[0].strip().splitlines()[-1] for p in procs]
    want = ["False 1 0"] if kind == "none" else ["True 2 0", "True 2 1"]
    assert outs == want, outs


def test_a_sigterm_to_one_process_stops_both_at_one_step_and_the_rerun_resumes(tmp_path):
    """JAX's preemption service carries the notice to the other process; both save the same step
    and exit 75; the rerun resumes to the losses of an uninterrupted two-process run."""
    overrides = {**TINY, "num_steps": 12, "log_every": 1, "checkpoint_every": 1000}

    def command(workdir):
        return [sys.executable, "launch/local.py", "--processes", "2", "--devices", "4", "--",
                "--config", "configs/default.py", "--workdir", str(workdir), *flags(overrides)]

    launcher = subprocess.Popen(command(tmp_path / "run"), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    with open(f"/proc/{launcher.pid}/task/{launcher.pid}/children") as f:
        children = [int(pid) for pid in f.read().split()]
    os.kill(children[1], signal.SIGTERM)  # rank 1 only
    out, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 75, out[-3000:]
    saved = re.findall(r"preemption notice: saved step (\d+)", out)
    assert len(saved) == 1 and 3 <= int(saved[0]) < 12
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == [saved[0]]
    for workdir in ("run", "straight"):  # the rerun resumes; the reference runs through
        done = subprocess.run(command(tmp_path / workdir), cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:]
    assert losses(tmp_path / "run") == losses(tmp_path / "straight")
