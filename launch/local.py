"""Run N jaxvision processes on this machine, joined by `jax.distributed` over loopback: the
multi-host code path (per-process data shards, global arrays, collective checkpoints, CPU
collectives through gloo) without a cluster.

    python launch/local.py --processes 2 --devices 4 -- \\
        --config configs/default.py --workdir /tmp/jv_multi

Each process gets `--devices` virtual CPU devices. Output lines are prefixed with the process
index (process 0 alone logs metrics). Ctrl-C or SIGTERM is passed on to every process, which
saves a checkpoint at the next step boundary and exits. When one process fails, the others (which
would wait on it forever) are stopped. Exit status: that of the first process to fail, else 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(commands: list[list[str]], envs: list[dict]) -> int:
    """Run the commands together, their output prefixed with their index; when one fails, stop
    the others. The exit status of the first to fail, else 0."""
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd, env in zip(commands, envs)]

    def relay(rank, proc):
        for line in proc.stdout:
            sys.stdout.write(f"[{rank}] {line}")
            sys.stdout.flush()

    threads = [threading.Thread(target=relay, args=(r, p), daemon=True) for r, p in enumerate(procs)]
    for t in threads:
        t.start()

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
    first_failure = 0
    while [p.poll() for p in procs].count(None):
        failed = [p.returncode for p in procs if p.returncode]
        if failed and not first_failure:
            first_failure = failed[0]
            forward(signal.SIGTERM, None)
        time.sleep(0.1)
    for t in threads:
        t.join()
    return first_failure or next((p.returncode for p in procs if p.returncode), 0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices", type=int, default=4, help="virtual CPU devices per process")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then python -m jaxvision.main arguments")
    opts = parser.parse_args(argv)
    args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
    address = f"127.0.0.1:{free_port()}"
    envs = [{**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": address,
             "JAX_NUM_PROCESSES": str(opts.processes), "JAX_PROCESS_ID": str(rank),
             "JAX_NUM_CPU_DEVICES": str(opts.devices),
             "XLA_FLAGS": f"--xla_force_host_platform_device_count={opts.devices}"}
            for rank in range(opts.processes)]
    return run([[sys.executable, "-m", "jaxvision.main", *args]] * opts.processes, envs)


if __name__ == "__main__":
    sys.exit(main())
