"""An image folder written as a TFDS dataset in ArrayRecord, without TensorFlow or a network.

    python -m jaxvision.data.folder_to_tfds ROOT DATA_DIR [--name NAME]

then train with ``--config.data.dataset=tfds:NAME --config.data.data_dir=DATA_DIR``. The JPEG
files are stored as they are (no re-encoding, which is what would need TensorFlow), one split
"train" for the whole folder, classes the sorted subfolder names as in `FolderSource`.
"""

from __future__ import annotations

import argparse
import os

from jaxvision.data.sources import FolderSource


def build(root: str, data_dir: str, name: str = "image_folder") -> str:
    """Write `root` (``<class>/<image>``) as TFDS dataset `name` under `data_dir`; its folder."""
    import tensorflow_datasets as tfds

    folder = FolderSource(root, "all")

    class FolderArrayRecord(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=folder.class_names)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for path, label in zip(folder.files, folder.labels):
                yield path, {"image": os.path.join(root, path), "label": int(label)}

    FolderArrayRecord.name = name
    builder = FolderArrayRecord(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return builder.data_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root")
    parser.add_argument("data_dir")
    parser.add_argument("--name", default="image_folder")
    args = parser.parse_args()
    print(build(args.root, args.data_dir, args.name))


if __name__ == "__main__":
    main()
