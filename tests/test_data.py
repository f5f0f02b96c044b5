"""Sources, transforms and grain pipelines: determinism, resume slicing, padding, bad input."""

import numpy as np
import pytest

from jaxvision.data import decode, folder_to_tfds, pipeline, sources, transforms
from tests.images import image_folder as make_folder


def test_digits_split_is_fixed_and_disjoint():
    train, test = sources.digits("train"), sources.digits("test")
    assert (len(train), len(test)) == (1438, 359)
    assert train[0]["image"].shape == (8, 8, 3) and train[0]["image"].dtype == np.uint8
    seen = {train[i]["image"].tobytes() for i in range(len(train))}
    assert not any(test[i]["image"].tobytes() in seen for i in range(len(test)))


def test_folder_split_is_deterministic_and_complete(tmp_path):
    root = make_folder(tmp_path / "data", per_class=30)
    train = sources.FolderSource(str(root), "train", val_fraction=0.2)
    val = sources.FolderSource(str(root), "val", val_fraction=0.2)
    assert train.class_names == ["cat", "dog", "emu"]
    assert sorted(train.files + val.files) == sorted(sources.FolderSource(str(root), "all").files)
    assert 0 < len(val) < len(train)
    assert sources.FolderSource(str(root), "val", val_fraction=0.2).files == val.files


def test_corrupt_image_is_reported_with_its_path_and_skipped(tmp_path, caplog):
    root = make_folder(tmp_path / "data", per_class=3)
    bad = root / "cat" / "0.jpg"
    bad.write_bytes(b"not a jpeg at all")
    src = sources.FolderSource(str(root), "all")
    index = src.files.index("cat/0.jpg")
    with caplog.at_level("WARNING"):
        example = src[index]
    assert example["image"].shape == (20, 24, 3)  # the next readable image stands in
    assert str(bad) in caplog.text


def test_bad_dataset_names_and_paths_give_clear_errors(tmp_path):
    with pytest.raises(sources.DataError, match="does not exist"):
        sources.open_source(f"folder:{tmp_path}/missing", "train")
    with pytest.raises(sources.DataError, match="unknown dataset"):
        sources.open_source("imagenet", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(sources.DataError, match="no class subfolders"):
        sources.open_source(f"folder:{tmp_path}/empty", "train")
    with pytest.raises(sources.DataError, match="cannot be read|not prepared"):
        sources.open_source("tfds:cifar10", "train", data_dir=str(tmp_path / "tfds"))


def test_an_image_folder_built_as_tfds_array_record_reads_like_the_folder(tmp_path):
    """folder_to_tfds writes the files as they are (no TensorFlow); the TFDS source hands them to
    the transforms still encoded and decodes to the folder's pixels."""
    root = make_folder(tmp_path / "data", per_class=4, size=(40, 52))
    folder_to_tfds.build(str(root), str(tmp_path / "tfds"), "tiny_folder")
    src = sources.open_source("tfds:tiny_folder", "train", data_dir=str(tmp_path / "tfds"))
    folder = sources.FolderSource(str(root), "all")
    assert src.class_names == folder.class_names and len(src) == len(folder)
    assert isinstance(src.raw(0)["image"], decode.EncodedImage)
    by_bytes = {src.raw(i)["image"].data: src.raw(i)["label"] for i in range(len(src))}
    for i in range(len(folder)):  # TFDS shuffles the records; every file is there with its label
        assert by_bytes[folder.raw(i)["image"].data] == folder.labels[i]
    batch = next(iter(pipeline.train_batches(src, transforms.TrainTransform(24), batch_size=4, seed=0)))
    assert batch["image"].shape == (4, 24, 24, 3) and batch["image"].dtype == np.uint8


def _take(batches, n):
    it = iter(batches)
    return [next(it) for _ in range(n)]


def test_train_batches_are_a_pure_function_of_seed_and_step():
    src = sources.digits("train")
    tf = transforms.TrainTransform(12, "pad_crop_flip")
    a = _take(pipeline.train_batches(src, tf, batch_size=32, seed=3), 50)  # crosses an epoch
    b = _take(pipeline.train_batches(src, tf, batch_size=32, seed=3, start_step=45), 5)
    for x, y in zip(a[45:], b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    c = next(iter(pipeline.train_batches(src, tf, batch_size=32, seed=4)))
    assert not np.array_equal(a[0]["label"], c["label"])
    # Epoch 2 is a new permutation of the same examples.
    per_epoch = len(src) // 32
    assert not np.array_equal(a[0]["label"], a[per_epoch]["label"])


def test_eval_batches_cover_every_example_once_with_a_mask():
    src = sources.digits("test")  # 359 examples
    batches = list(pipeline.eval_batches(src, transforms.EvalTransform(8, 1.0), batch_size=100))
    assert len(batches) == pipeline.num_eval_batches(359, 100) == 4
    assert all(b["image"].shape == (100, 8, 8, 3) for b in batches)
    mask = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])[mask > 0]
    assert mask.sum() == 359
    np.testing.assert_array_equal(labels, [src[i]["label"] for i in range(359)])


def test_transforms_shapes_and_crop_semantics():
    rng = np.random.default_rng(0)
    img = np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3)
    assert transforms.random_resized_crop(img, rng, 32).shape == (32, 32, 3)
    assert transforms.center_crop(img, 32, 0.875).shape == (32, 32, 3)
    out = transforms.pad_random_crop(img, rng, 16)
    assert out.shape == (16, 16, 3)
    same = np.zeros((16, 16, 3), np.uint8) + 7
    np.testing.assert_array_equal(transforms.center_crop(same, 16, 1.0), same)
    with pytest.raises(ValueError, match="unknown augment"):
        transforms.TrainTransform(8, "autoaugment")
