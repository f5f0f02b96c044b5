"""Entry point: ``python -m jaxvision.main --config configs/default.py --workdir DIR``.

Exit status: 0 done, 2 bad input (one line names it), 3 diverged, 75 stopped by SIGTERM with a
checkpoint saved (run the same command again to resume).

Modes: ``train`` (default; resumes if DIR has checkpoints), ``eval`` (best or latest checkpoint
on `config.data.eval_dataset` / `eval_split`), ``plan`` (parameter sharding table and the cost of
one compiled step), ``predict`` (top-k for `config.predict.inputs`), ``calibrate`` (temperature
and OOD threshold on the eval split), ``quantize`` (int8 against float32 on the eval split),
``export`` (StableHLO or ONNX with preprocessing inside), ``explain`` (Grad-CAM or attention
rollout overlays for `config.predict.inputs`). Any config field can be
overridden: ``--config.optim.lr=0.05``.
"""

from __future__ import annotations

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
    from jaxvision import config as config_lib
    from jaxvision.backends.cpu import hostmem
    from jaxvision.parallel import distributed, preemption
    from jaxvision.train import loop
    try:
        config_lib.check(config)  # every bad value is one line here, before anything is built
        hostmem.relaunch()  # CPU runs only: an allocator that keeps XLA:CPU's step memory mapped
        distributed.initialize(config)
        if _MODE.value == "plan":
            print(loop.plan(config, _WORKDIR.value))
        elif _MODE.value == "eval":
            loop.evaluate(config, _WORKDIR.value)
        elif _MODE.value in ("predict", "calibrate", "quantize", "export", "explain"):
            from jaxvision.deploy import modes
            getattr(modes, _MODE.value)(config, _WORKDIR.value)
        elif loop.train(config, _WORKDIR.value)["preempted"]:
            sys.exit(preemption.EXIT_CODE)  # saved, to be resumed: a scheduler requeues on it
    except UserError as e:
        logging.debug("user error", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


# Overrides passed to models.create as given: any field the model takes (checked there), so not
# only the keys the recipe lists, e.g. --config.model.kwargs.scan_blocks=True.
FREE_FORM = ("--config.model.kwargs.", "--config.distill.teacher_kwargs.")


def parse_flags(argv):
    """absl's parser, with a bad flag or `--config.<field>` reported in one line, not a traceback."""
    free = [a for a in argv if a.startswith(FREE_FORM) and "=" in a]
    full, sys.argv = sys.argv, [a for a in argv if a not in free]  # config_flags also reads sys.argv
    try:
        rest = flags.FLAGS(sys.argv)
        if free and _CONFIG.value is not None:
            with _CONFIG.value.unlocked():
                for flag in free:
                    path, value = flag[len("--config."):].split("=", 1)
                    *parents, key = path.split(".")
                    node = _CONFIG.value
                    for part in parents:
                        node = node[part]
                    node[key] = _literal(value)
        return rest
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
        text = str(e.args[0] if e.args else e).strip()
        print(f"error: {_unknown_field(argv) or (text.splitlines() or ['bad flags'])[0]}", file=sys.stderr)
        sys.exit(2)
    finally:
        sys.argv = full  # a relaunch (hostmem) runs the command as given


def _literal(text: str):
    """A flag's value as Python reads it (True, 0.1, (2, 2)), else the string itself."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _unknown_field(argv) -> str | None:
    """The first `--config.<path>` override naming a field the recipe's config does not have."""
    from ml_collections import ConfigDict

    from jaxvision import config as config_lib

    recipe = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if recipe is None and "--config" in argv[:-1]:
        recipe = argv[argv.index("--config") + 1]
    try:
        path, _, arg = recipe.partition(":")
        config = config_lib.load(path, arg or None)
    except Exception:  # noqa: BLE001  (the parser's own message says what is wrong with the file)
        return None
    for flag in (a for a in argv if a.startswith("--config.") and not a.startswith(FREE_FORM)):
        node, seen = config, []
        for part in flag[len("--config."):].split("=", 1)[0].split("."):
            if not isinstance(node, ConfigDict) or part not in node:
                where = f" in config.{'.'.join(seen)}" if seen else ""
                return (f"{flag.split('=', 1)[0]}: the config has no field {part!r}{where}. Every field is "
                        "listed in jaxvision/config.py")
            node, seen = node[part], seen + [part]
    return None


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
