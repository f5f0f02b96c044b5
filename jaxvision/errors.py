"""The base of every error that means "the input is wrong" (config, data, checkpoint, topology),
or that a run stopped for a reason the user must act on (it diverged).

The command line prints these as one message naming the problem and the fix, and exits with the
error's `exit_code`; anything else is a bug and keeps its traceback."""


class UserError(ValueError):
    """`exit_code`: 2 for bad input; subclasses for other outcomes a scheduler must tell apart."""

    exit_code = 2


DEPLOY_EXTRA = "pip install 'jaxvision[deploy]'"  # qwix, jax2onnx, onnxruntime
