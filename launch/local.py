"""Run N jaxvision processes on this machine, joined by `jax.distributed` over loopback: the
multi-host code path (per-process data shards, global arrays, collective checkpoints, CPU
collectives through gloo) without a cluster.

    python launch/local.py --processes 2 --devices 4 -- \\
        --config configs/default.py --workdir /tmp/jv_multi

Each process gets `--devices` virtual CPU devices. Output lines are prefixed with the process
index (process 0 alone logs metrics). Ctrl-C or SIGTERM is passed on to every process, which
saves a checkpoint at the next step boundary and exits. Exit status: the first failure, else 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices", type=int, default=4, help="virtual CPU devices per process")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then python -m jaxvision.main arguments")
    opts = parser.parse_args(argv)
    args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
    address = f"127.0.0.1:{free_port()}"
    procs = []
    for rank in range(opts.processes):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": address,
               "JAX_NUM_PROCESSES": str(opts.processes), "JAX_PROCESS_ID": str(rank),
               "JAX_NUM_CPU_DEVICES": str(opts.devices),
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={opts.devices}"}
        procs.append(subprocess.Popen([sys.executable, "-m", "jaxvision.main", *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))

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

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [p.wait() for p in procs]
    for t in threads:
        t.join()
    return next((c for c in codes if c), 0)


if __name__ == "__main__":
    sys.exit(main())
