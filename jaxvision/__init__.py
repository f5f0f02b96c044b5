"""jaxvision: image classification in JAX/Flax: a faithful model zoo, sharded training, a modern recipe."""

__version__ = "0.1.0"
