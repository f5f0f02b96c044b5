"""Entry point: ``python -m jaxvision.main --config configs/default.py --workdir DIR``.

Modes: ``train`` (default; resumes if DIR has checkpoints), ``eval`` (best or latest checkpoint
on `config.data.eval_dataset` / `eval_split`), ``plan`` (parameter sharding table and the cost of
one compiled step), ``predict`` (top-k for `config.predict.inputs`), ``calibrate`` (temperature
and OOD threshold on the eval split), ``quantize`` (int8 against float32 on the eval split),
``export`` (StableHLO or ONNX with preprocessing inside), ``explain`` (Grad-CAM or attention
rollout overlays for `config.predict.inputs`). Any config field can be
overridden: ``--config.optim.lr=0.05``.
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxvision.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file: configs/<recipe>.py[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and summaries.")
_MODE = flags.DEFINE_enum("mode", "train",
                          ["train", "eval", "plan", "predict", "calibrate", "quantize", "export", "explain"], "What to do.")

def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config configs/default.py")
    if _MODE.value != "plan" and not _WORKDIR.value:
        raise app.UsageError(f"--workdir is required for --mode={_MODE.value}")
    if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv):
        logging.set_verbosity(logging.WARNING)  # library INFO chatter (orbax, grain) off by default
    from jaxvision.parallel import distributed
    distributed.initialize(config)

    from jaxvision.train import loop
    try:
        if _MODE.value == "plan":
            print(loop.plan(config, _WORKDIR.value))
        elif _MODE.value == "eval":
            loop.evaluate(config, _WORKDIR.value)
        elif _MODE.value in ("predict", "calibrate", "quantize", "export", "explain"):
            from jaxvision.deploy import modes
            getattr(modes, _MODE.value)(config, _WORKDIR.value)
        else:
            os.makedirs(_WORKDIR.value, exist_ok=True)
            loop.train(config, _WORKDIR.value)
    except UserError as e:
        logging.debug("user error", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def parse_flags(argv):
    """absl's parser, with an unknown `--config.<field>` reported as such instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        text = str(e.args[0] if e.args else e).replace("\\n", "\n").replace("\\'", "'")
        found = re.search(r"'([A-Za-z0-9_]+)'", text)
        key = found.group(1) if found else text
        hint = re.search(r"Did you mean[^?]*\?", text)
        offending = [a.split("=")[0] for a in argv if a.startswith("--config.") and key in a]
        print(f"error: {', '.join(offending) or key}: the config has no field {key!r}. "
              f"{hint.group(0) + ' ' if hint else ''}Every field is listed in jaxvision/config.py.",
              file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from jaxvision.backends.cpu import hostmem
    hostmem.relaunch()  # CPU runs only: an allocator that keeps XLA:CPU's step memory mapped
    app.run(main, flags_parser=parse_flags)
