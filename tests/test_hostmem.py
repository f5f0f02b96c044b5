"""Huge pages for host memory: when the entry point restarts itself, and that the restart both
keeps the command line and really gives large allocations 2 MiB pages."""

import json
import os
import subprocess
import sys

import pytest

from jaxvision import hostmem

GLIBC = hostmem._glibc_version()
SUPPORTED = sys.platform == "linux" and GLIBC >= (2, 35) and hostmem._thp_mode() == "madvise"


@pytest.mark.parametrize("env, glibc, thp, expected", [
    ({}, (2, 36), "madvise", hostmem.TUNABLE),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}, (2, 36), "madvise",
     "glibc.malloc.trim_threshold=1:" + hostmem.TUNABLE),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), "madvise", None),  # the user's choice stands
    ({"JAXVISION_HUGEPAGES": "0"}, (2, 36), "madvise", None),
    ({}, (2, 31), "madvise", None),  # glibc without the tunable
    ({}, (), "madvise", None),  # not glibc
    ({}, (2, 36), "always", None),  # every large mapping gets huge pages already
    ({}, (2, 36), "never", None),
])
def test_when_the_tunable_is_added(env, glibc, thp, expected):
    out = hostmem.huge_pages_env(env, glibc, thp)
    assert (out and out["GLIBC_TUNABLES"]) == expected
    if out:
        others = lambda d: {k: v for k, v in d.items() if k != "GLIBC_TUNABLES"}  # noqa: E731
        assert others(out) == others(env)


def test_thp_mode_reads_the_bracketed_setting(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert hostmem._thp_mode(str(path)) == "madvise"
    assert hostmem._thp_mode(str(tmp_path / "missing")) == ""


# After the relaunch: the tunable, the original arguments, and huge pages under a 64 MiB malloc.
CHILD = """
import sys
from jaxvision import hostmem
hostmem.relaunch_with_huge_pages()
import ctypes, json, os
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
ctypes.memset(libc.malloc(64 * 2 ** 20), 1, 64 * 2 ** 20)  # (numpy would madvise by itself)
huge = sum(int(line.split()[1]) for line in open("/proc/self/smaps") if line.startswith("AnonHugePages:"))
print(json.dumps([os.environ.get("GLIBC_TUNABLES", ""), sys.argv[1:], huge]))
"""


@pytest.mark.skipif(not SUPPORTED, reason="needs Linux, glibc >= 2.35 and THP in madvise mode")
@pytest.mark.parametrize("opt_out", [False, True])
def test_relaunch_gives_large_allocations_huge_pages(opt_out):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXVISION_HUGEPAGES")}
    if opt_out:
        env["JAXVISION_HUGEPAGES"] = "0"
    out = subprocess.run([sys.executable, "-c", CHILD, "--flag", "x y"], env=env, capture_output=True,
                         text=True, check=True).stdout
    tunables, argv, huge_kib = json.loads(out)
    assert argv == ["--flag", "x y"]
    if opt_out:
        assert tunables == "" and huge_kib < 32 * 1024
    else:
        assert tunables == hostmem.TUNABLE and huge_kib >= 32 * 1024
