"""The base of every error that means "the input is wrong" (config, data, checkpoint, topology).

The command line prints these as one message naming the problem and the fix; anything else is a
bug and keeps its traceback."""


class UserError(ValueError):
    pass


DEPLOY_EXTRA = "pip install 'jaxvision[deploy]'"  # qwix, jax2onnx, onnxruntime
