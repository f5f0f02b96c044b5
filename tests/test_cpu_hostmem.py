"""Host memory: which environment the entry point restarts itself in, only for CPU runs; that the
restart keeps the command line, says so in one line, gives child processes the environment as it
was, and really stops the page faults of a step's memory the second time round."""

import json
import os
import subprocess
import sys

import pytest

from jaxvision.backends.cpu import hostmem

GLIBC = hostmem._glibc_version()
TCMALLOC = hostmem.find_tcmalloc()
TBBMALLOC = hostmem.find_tbbmalloc()
TBB = "/venv/lib/libtbbmalloc.so.2:/venv/lib/libtbbmalloc_proxy.so.2"
TBB_ENV = {"LD_PRELOAD": TBB, hostmem.TBB_THRESHOLD: str(2 ** 20)}
THP = "/sys/kernel/mm/transparent_hugepage/enabled"
THP_MODE = open(THP).read() if os.path.exists(THP) else ""
THP_ALWAYS, THP_NEVER = "[always]" in THP_MODE, "[always]" not in THP_MODE and "[madvise]" not in THP_MODE


@pytest.mark.parametrize("env, tcmalloc, tbbmalloc, glibc, expected", [
    ({}, "libtcmalloc_minimal.so.4", TBB, (2, 36),
     {"LD_PRELOAD": "libtcmalloc_minimal.so.4", "TCMALLOC_RELEASE_RATE": "0"}),
    ({}, None, TBB, (2, 36), TBB_ENV),  # auto: the cpu extra's allocator
    ({}, None, None, (2, 36), {"GLIBC_TUNABLES": hostmem.HUGE_PAGES}),  # auto with neither
    ({"LD_PRELOAD": "libfoo.so"}, "libtcmalloc.so.4", None, (2, 36),
     {"LD_PRELOAD": "libtcmalloc.so.4:libfoo.so", "TCMALLOC_RELEASE_RATE": "0"}),
    ({"JAXVISION_MALLOC": "tbbmalloc"}, "libtcmalloc.so.4", TBB, (2, 36), TBB_ENV),
    ({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=1", "JAXVISION_MALLOC": "huge"}, "libtcmalloc.so.4", TBB,
     (2, 36), {"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=1:glibc.malloc.hugetlb=1"}),
    ({"JAXVISION_MALLOC": "huge"}, None, None, (2, 31), None),  # glibc without the tunable
    ({"JAXVISION_MALLOC": "tcmalloc"}, None, TBB, (2, 36), None),  # asked for, not installed
    ({"JAXVISION_MALLOC": "tbbmalloc"}, "libtcmalloc.so.4", None, (2, 36), None),
    ({"JAXVISION_MALLOC": "system"}, "libtcmalloc.so.4", TBB, (2, 36), None),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, None, TBB, (2, 36), None),  # the user's choice stands
    ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, "libtcmalloc.so.4", TBB, (2, 36), None),
    ({hostmem.MARK: "huge"}, None, None, (2, 36), None),  # restarted already
    ({}, None, TBB, (), None),  # not glibc
])
def test_the_restarted_environment(env, tcmalloc, tbbmalloc, glibc, expected):
    out = hostmem.malloc_env(env, tcmalloc, tbbmalloc, glibc)
    if expected is None:
        assert out is None
        return
    changed = {k: v for k, v in out.items() if env.get(k) != v}
    assert changed.pop(hostmem.MARK) in hostmem.MODES
    assert changed == expected


def test_an_unknown_mode_is_named():
    with pytest.raises(ValueError, match="JAXVISION_MALLOC='fast'.*auto, tcmalloc, tbbmalloc, huge, system"):
        hostmem.malloc_env({"JAXVISION_MALLOC": "fast"}, None, None, (2, 36))


# After the restart: the mode, the original arguments, and the page faults of mallocing, touching
# and freeing 64 MiB (above glibc's largest mmap threshold) for the second time.
CHILD = """
import sys
from jaxvision.backends.cpu import hostmem
hostmem.relaunch()
import ctypes, json, os, resource
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def step():
    block = libc.malloc(64 * 2 ** 20)
    ctypes.memset(block, 1, 64 * 2 ** 20)
    libc.free(block)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
child_env = {k: os.environ.get(k) for k in ("LD_PRELOAD", "GLIBC_TUNABLES", "TCMALLOC_RELEASE_RATE",
                                           hostmem.TBB_THRESHOLD, hostmem.MARK)}
print(json.dumps([hostmem.applied(), sys.argv[1:], faults, child_env]))
"""

MODES = (["system"] + (["huge"] if GLIBC >= (2, 35) and not THP_NEVER else []) + (["tcmalloc"] if TCMALLOC else [])
         + (["tbbmalloc"] if TBBMALLOC else []))


@pytest.mark.skipif(sys.platform != "linux" or not GLIBC, reason="needs Linux with glibc")
@pytest.mark.parametrize("mode", MODES)
def test_restart_stops_the_page_faults(mode):
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", "TCMALLOC_RELEASE_RATE", hostmem.TBB_THRESHOLD, hostmem.MARK)}
    env.update(JAXVISION_MALLOC=mode, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", CHILD, "--flag", "x y"], env=env, capture_output=True,
                          text=True, check=True)
    applied, argv, faults, child_env = json.loads(done.stdout)
    assert argv == ["--flag", "x y"]
    assert applied == mode
    assert child_env == {k: None for k in child_env}  # children start on the system's allocator
    restarts = [line for line in done.stderr.splitlines() if "restarting" in line]
    assert len(restarts) == (mode != "system") and all(mode in line and "JAXVISION_MALLOC=system" in line
                                                      for line in restarts)
    pages_4k = 64 * 2 ** 20 // 4096
    if mode in ("tcmalloc", "tbbmalloc"):
        assert faults < 10  # kept mapped
    elif mode == "huge" or THP_ALWAYS:
        assert faults < pages_4k // 10  # mapped afresh, mostly in 2 MiB pages (500-600 faults)
    else:
        assert faults >= pages_4k // 2  # mapped afresh, a fault per 4 KiB page


def test_no_restart_where_the_run_is_on_an_accelerator(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("restarted for an accelerator run"))
    monkeypatch.delenv(hostmem.MARK, raising=False)
    monkeypatch.setenv("JAXVISION_MALLOC", "huge")
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    hostmem.relaunch()
    assert hostmem.cpu_run({"JAX_PLATFORMS": "cpu"}) and not hostmem.cpu_run({"JAX_PLATFORMS": "cuda,cpu"})
    assert hostmem.cpu_run({})  # this machine: no accelerator plugin or device


def test_asking_for_a_missing_tcmalloc_says_so_and_runs_on(monkeypatch, capsys):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setattr(hostmem, "find_tcmalloc", lambda: None)
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("restarted without tcmalloc"))
    monkeypatch.setenv("JAXVISION_MALLOC", "tcmalloc")
    monkeypatch.delenv(hostmem.MARK, raising=False)
    hostmem.relaunch()
    assert "apt install libtcmalloc-minimal4" in capsys.readouterr().err
