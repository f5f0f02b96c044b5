"""jaxvision against timm on this machine, in the same run, alternating.

    python experiments/bench.py [--models resnet50 ...] [--batch 16] [--size 224] [--rounds 3] [--isolate]
                                [--dtype bfloat16]

For each model: training images/s (forward, backward, SGD-momentum update; jaxvision's own jitted
train step with donated state) and inference images/s, each the median over `rounds` alternating
rounds after warm-up; jaxvision's compile time, the model's FLOPs per step (`model_flops`) and
XLA's memory estimate; parameters. Also the matrix-multiply rate of this machine in the same dtype
(jnp.dot and torch.mm of 2048x2048, best of several), and each model's achieved training FLOP/s as
a share of the faster of the two.
`--dtype bfloat16` runs jaxvision's models with bfloat16 compute and timm's under torch.autocast.
Both processes get the host-memory setting of `jaxvision.backends.cpu.hostmem` (tcmalloc or
tbbmalloc when installed). jaxvision runs on the CPU backend (`jaxvision.backends.ops_for("cpu")`:
oneDNN's kernels when the `cpu` extra is installed), `--ops portable` on the portable ops.
Prints a markdown table (ratios are jaxvision / timm). Needs the `parity` extra (torch, timm).
Threads: both frameworks use every core (`--threads` to change torch's). Sharing one process,
they disturb each other through torch's OpenMP wait policy: spinning threads (ACTIVE) steal the
cores from XLA's next call (jaxvision ResNet-50 training 1.83 img/s against 2.83 with PASSIVE),
sleeping ones (PASSIVE) slow torch's many small kernels (timm efficientnet_b0 inference 72 -> 50
img/s). The script leaves OMP_WAIT_POLICY as it finds it; README and docs/performance.md quote both runs.
`--isolate` removes the interference instead: each framework runs in its own worker process, the
parent hands the turn from one to the other with a pause (`--pause`, 1 s) for torch's OpenMP
threads to go to sleep, and no framework ever runs while the other holds the cores. Each turn
starts with one untimed call: the first step after seconds of idling runs 2-3x slower here
(efficientnet_b0 training 3.7-6.2 img/s against 11-14 back to back; memory freed and left idle
goes back to the VM's host and faults in again), and a training loop never idles between steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxvision import backends, models
from jaxvision.backends.cpu import hostmem
from jaxvision.models.ops import PORTABLE
from jaxvision.parallel import mesh as mesh_lib
from jaxvision.train import optim
from jaxvision.train import state as state_lib
from jaxvision.train import step as step_lib


def timed(fn, repeats: int) -> float:
    """Seconds per call of `fn` (which must block until done)."""
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def matmul_rate(framework: str, dtype: str = "float32", n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of the best of `repeats` n x n matrix products in `dtype` (bfloat16: float32 results,
    as a mixed-precision layer accumulates)."""
    if framework == "jax":
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
        f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
        run = lambda: f(a).block_until_ready()  # noqa: E731
    else:
        import torch
        t = torch.randn(n, n).to(getattr(torch, dtype))
        run = lambda: torch.mm(t, t)  # noqa: E731
    run()
    return 2 * n ** 3 / min(timed(run, 1) for _ in range(repeats))


def model_flops(step, *args) -> float:
    """FLOPs of one call of `step` as the model defines them: XLA's cost analysis of the program
    traced with the portable ops (every convolution and dense layer the plain lax primitive),
    before compilation. The CPU backend's compiled program leaves out oneDNN's custom calls and
    counts Winograd's fewer multiplies."""
    cost = jax.jit(step).lower(*args).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


class JaxBench:
    def __init__(self, name: str, batch: int, size: int, dtype: str = "float32", ops=None):
        mesh = mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
        ops = ops or backends.ops_for("cpu")
        self.model = models.create(name, dtype=jnp.dtype(dtype), ops=ops)
        self.ops = ops.describe()
        card = models.model_card(name)
        cfg = {"name": "sgd", "lr": 0.01, "momentum": 0.9, "schedule": "constant"}
        import ml_collections
        tx = optim.optimizer(ml_collections.ConfigDict(cfg), 1000)
        init, shapes, shardings = state_lib.abstract_state(self.model, tx, size, mesh, 2 ** 62)
        self.state = jax.jit(init, out_shardings=shardings)()
        opts = step_lib.StepOptions(num_classes=card.num_classes, mean=card.mean, std=card.std)
        step = step_lib.make_train_step(self.model, tx, opts, mesh)
        self.train_step = jax.jit(step, donate_argnums=0)
        rng = np.random.RandomState(0)
        self.batch = {"image": jnp.asarray(rng.randint(0, 256, (batch, size, size, 3)), jnp.uint8),
                      "label": jnp.asarray(rng.randint(0, card.num_classes, (batch,)), jnp.int32)}
        t = time.perf_counter()
        compiled = self.train_step.lower(self.state, self.batch).compile()
        self.compile_seconds = time.perf_counter() - t
        portable = self.model.clone(ops=PORTABLE)
        self.train_flops = model_flops(step_lib.make_train_step(portable, tx, opts, mesh), self.state, self.batch)
        mem = compiled.memory_analysis()
        self.memory_bytes = (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                             + mem.output_size_in_bytes - mem.alias_size_in_bytes)
        self.infer = jax.jit(lambda v, x: self.model.apply(v, step_lib.normalize(x, card.mean, card.std)))
        self.params = models.count_params(self.state.params)
        settle(self)

    def train(self):
        self.state, metrics = self.train_step(self.state, self.batch)
        jax.block_until_ready(metrics)

    def inference(self):
        self.infer(self.state.variables(), self.batch["image"]).block_until_ready()


class TorchBench:
    """timm's model in float32, or with `dtype="bfloat16"` under `torch.autocast` (PyTorch's mixed
    precision: bfloat16 matrix products and convolutions, float32 parameters), as jaxvision's
    `dtype=bfloat16` computes in bfloat16 with float32 parameters."""

    def __init__(self, name: str, batch: int, size: int, dtype: str = "float32"):
        import timm
        import torch

        self.torch = torch
        self.precision = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bfloat16" \
            else contextlib.nullcontext
        self.model = timm.create_model(name, pretrained=False)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.x = torch.randn(batch, 3, size, size)
        self.y = torch.randint(0, 1000, (batch,))
        self.params = sum(p.numel() for p in self.model.parameters())
        settle(self)

    def train(self):
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        with self.precision():
            loss = self.torch.nn.functional.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()

    def inference(self):
        self.model.eval()
        with self.torch.inference_mode(), self.precision():
            self.model(self.x)


def settle(bench, least: int = 3, most: int = 8, quiet: int = 1000) -> None:
    """Warm-up: `least` pairs of a train step and an inference call, then more until a pair faults
    fewer than `quiet` pages in, `most` in all. An allocator that keeps memory still remaps it
    while its heap settles: tcmalloc unmaps all its free pages when it would otherwise grow, and
    ResNet-50's fourth or fifth step faulted 2.2 GB in and took 6.2-6.6 s against 2.8-3.0 for the
    twelve after it, which would otherwise land in a timed round."""
    for i in range(most):
        before = page_faults()[0]
        bench.train(), bench.inference()
        if i + 1 >= least and page_faults()[0] - before < quiet:
            return


def page_faults() -> tuple[int, float]:
    """(minor page faults, system CPU seconds) of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_stime


def jax_only(args) -> None:
    """jaxvision alone, medians over `rounds`, one JSON line per model, with the page faults and
    kernel time per training step (memory the allocator returned to the system and takes back)."""
    for name in args.models:
        ours = JaxBench(name, args.batch, args.size, args.dtype, backends.ops_for("cpu", args.ops))
        before = page_faults()
        train = statistics.median(timed(ours.train, args.train_steps) for _ in range(args.rounds))
        steps = args.rounds * args.train_steps
        faults, sys_seconds = ((now - then) / steps for now, then in zip(page_faults(), before))
        infer = statistics.median(timed(ours.inference, args.infer_steps) for _ in range(args.rounds))
        print(json.dumps({"model": name, "train": args.batch / train, "infer": args.batch / infer,
                          "compile": ours.compile_seconds, "faults_per_step": faults,
                          "sys_seconds_per_step": sys_seconds}), flush=True)


def describe(bench) -> dict:
    """Parameters, and for jaxvision compile seconds, XLA's train-step FLOPs and memory."""
    return {"params": bench.params, "compile": getattr(bench, "compile_seconds", 0.0),
            "flops": getattr(bench, "train_flops", 0.0), "memory": getattr(bench, "memory_bytes", 0)}


class Worker:
    """One framework in its own process (`--worker jax|torch`), driven line by line over pipes;
    replies are the stdout lines that start with REPLY."""

    REPLY = "@@bench "

    def __init__(self, framework: str, args):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", framework, "--batch", str(args.batch),
               "--size", str(args.size), "--threads", str(args.threads), "--dtype", args.dtype, "--ops", args.ops]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ask("ready")  # imports done: nothing of this worker runs during the other's turn

    def ask(self, *command) -> dict:
        self.proc.stdin.write(" ".join(map(str, command)) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(self.REPLY):
                return json.loads(line[len(self.REPLY):])
        raise RuntimeError(f"bench worker exited ({self.proc.wait()}) on {command}")

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def serve_worker(args) -> None:
    """The worker side of `Worker`: ready | setup NAME | train N | infer N | matmul."""
    if args.worker == "torch":
        import torch
        torch.set_num_threads(args.threads)
    bench = None
    for line in sys.stdin:
        command, *rest = line.split()
        if command == "setup":
            if args.worker == "jax":
                bench = JaxBench(rest[0], args.batch, args.size, args.dtype, backends.ops_for("cpu", args.ops))
            else:
                bench = TorchBench(rest[0], args.batch, args.size, args.dtype)
            reply = describe(bench)
        elif command == "ready":
            reply = {}
        elif command == "matmul":
            reply = {"rate": matmul_rate(args.worker, args.dtype)}
        else:  # one untimed call first: see the module docstring
            fn = bench.train if command == "train" else bench.inference
            fn()
            reply = {"seconds": timed(fn, int(rest[0]))}
        print(Worker.REPLY + json.dumps(reply), flush=True)


def isolated_rows(args):
    """(matmul rates, rows) with each framework in its own process, taking turns."""
    workers = {"j": Worker("jax", args)}
    workers["t"] = Worker("torch", args)  # started after the jax worker is ready

    def turn(key, *command):
        time.sleep(args.pause)  # the other framework's threads stop spinning
        return workers[key].ask(*command)

    rates = (turn("j", "matmul")["rate"], turn("t", "matmul")["rate"])
    rows = []
    for name in args.models:
        ours, ref = turn("j", "setup", name), turn("t", "setup", name)
        times = {k: [] for k in ("jt", "tt", "ji", "ti")}
        for r in range(args.rounds):
            order = ("j", "t") if r % 2 == 0 else ("t", "j")
            for what, steps in (("t", args.train_steps), ("i", args.infer_steps)):
                for key in order:
                    times[key + what].append(turn(key, "train" if what == "t" else "infer", steps)["seconds"])
        rows.append(row(name, args, ours, ref, times, max(rates)))
    for w in workers.values():
        w.close()
    return rates, rows


def shared_rows(args):
    """(matmul rates, rows) with both frameworks in this process, alternating."""
    import torch
    torch.set_num_threads(args.threads)
    rates = (matmul_rate("jax", args.dtype), matmul_rate("torch", args.dtype))
    rows = []
    for name in args.models:
        ours = JaxBench(name, args.batch, args.size, args.dtype, backends.ops_for("cpu", args.ops))
        ref = TorchBench(name, args.batch, args.size, args.dtype)
        times = {k: [] for k in ("jt", "tt", "ji", "ti")}
        for r in range(args.rounds):
            pairs = [(ours, ref), (ref, ours)][r % 2]  # alternate who goes first
            for b in pairs:
                times[("j" if b is ours else "t") + "t"].append(timed(b.train, args.train_steps))
            for b in pairs:
                times[("j" if b is ours else "t") + "i"].append(timed(b.inference, args.infer_steps))
        rows.append(row(name, args, describe(ours), describe(ref), times, max(rates)))
        del ours, ref
    return rates, rows


def row(name, args, ours: dict, ref: dict, times: dict, matmul_peak: float) -> tuple:
    """The table row; the achieved share is of the faster of the two frameworks' matmul rates."""
    med = {k: statistics.median(v) for k, v in times.items()}
    jt, tt = args.batch / med["jt"], args.batch / med["tt"]
    ji, ti = args.batch / med["ji"], args.batch / med["ti"]
    print(f"{name}: train {jt:.2f} vs {tt:.2f} img/s, inference {ji:.2f} vs {ti:.2f} img/s", flush=True)
    return (name, ours["params"], ref["params"], jt, tt, ji, ti, ours["compile"], ours["flops"] / args.batch / 1e9,
            ours["memory"] / 2 ** 20, ours["flops"] / med["jt"] / matmul_peak)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["resnet50", "efficientnet_b0",
                                                       "mobilenetv3_large_100", "vit_small_patch16_224"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=2, help="timed train steps per round")
    parser.add_argument("--infer-steps", type=int, default=4, help="timed inference batches per round")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="compute dtype of both: jaxvision's model dtype, timm under torch.autocast")
    parser.add_argument("--jax-only", action="store_true",
                        help="no timm: print one JSON line per model (for experiments/xla_flags.py)")
    parser.add_argument("--isolate", action="store_true",
                        help="each framework in its own process, taking turns (no OpenMP interference)")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between turns with --isolate")
    parser.add_argument("--ops", choices=("auto", "portable"), default="auto",
                        help="jaxvision's ops: the CPU backend where installed (auto), or portable")
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return serve_worker(args)
    if args.jax_only:
        return jax_only(args)
    (jax_rate, torch_rate), rows = (isolated_rows if args.isolate else shared_rows)(args)
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    how = "--isolate" if args.isolate else "one process"
    print(f"\n# jaxvision vs timm (`python experiments/bench.py --batch {args.batch} --size {args.size} "
          f"--rounds {args.rounds}{' --dtype bfloat16' if args.dtype == 'bfloat16' else ''}"
          f"{' --ops portable' if args.ops == 'portable' else ''}"
          f"{' ' + how if args.isolate else ''}`)\n")
    print(f"Machine: {os.cpu_count()} cores ({cpu}), jax {jax.__version__}, torch {torch.__version__}, "
          f"{args.threads} torch threads (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}), "
          f"malloc {hostmem.applied()} (both frameworks), {how}; jaxvision's ops: "
          f"{backends.ops_for('cpu', args.ops).describe()}; {args.dtype}, batch {args.batch}, {args.size} px. {args.dtype.capitalize()} matmul "
          f"(2048^3): {jax_rate / 1e9:.0f} GFLOP/s in XLA, {torch_rate / 1e9:.0f} GFLOP/s in torch.\n")
    print("| model | params (ours = timm) | train img/s jaxvision | train img/s timm | ratio | "
          "infer img/s jaxvision | infer img/s timm | ratio | compile s | train GFLOP/img (model) | "
          "XLA memory MiB | train FLOP/s / best matmul |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, p_ours, p_ref, jt, tt, ji, ti, comp, gflop, mem, frac in rows:
        same = "=" if p_ours == p_ref else "!="
        print(f"| {name} | {p_ours:,} {same} | {jt:.2f} | {tt:.2f} | {jt / tt:.2f} | {ji:.2f} | {ti:.2f} | "
              f"{ji / ti:.2f} | {comp:.1f} | {gflop:.2f} | {mem:.0f} | {frac:.0%} |")


if __name__ == "__main__":
    hostmem.relaunch()  # as jaxvision.main does (each worker runs this too)
    main()
