"""Test session setup: 8 virtual CPU devices for sharding tests (must be set before JAX starts),
absl flags marked parsed so grain and absl-using code run under pytest, and one persistent
compilation cache for the session and the command-line runs it spawns (many tests compile the
same tiny train step; sharing it cut tests/test_engine.py from 200 s to 152 s). pytest-xdist's
workers inherit the controller's environment, so they share the cache, and the controller
removes it."""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"  # pretrained weights come from caches the tests build
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxvision-tests-xla-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()


# Files that run for minutes go out first, so that the other worker works through the short ones
# meanwhile instead of idling at the end (addopts turns off xdist's reordering by test count).
LONGEST_FIRST = ("test_scale.py", "test_cpu_native.py", "test_distill.py", "test_recipe.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_sessionfinish(session, exitstatus):
    if "_CACHE" in globals():
        shutil.rmtree(_CACHE, ignore_errors=True)
