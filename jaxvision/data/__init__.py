"""Data: sources (digits, image folder, TFDS), host transforms, grain pipelines, device feeding."""

from jaxvision.data.sources import DataError, open_source  # noqa: F401
