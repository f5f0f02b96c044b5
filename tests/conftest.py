"""Test session setup: 8 virtual CPU devices for sharding tests (must be set before JAX starts),
and absl flags marked parsed so grain and absl-using code run under pytest."""

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
