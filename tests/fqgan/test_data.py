"""Image data: official augmentation, image folders of any depth, the built-in sample set."""

import numpy as np
import pytest
import torch
from PIL import Image

from fqgan.data.datasets import (
    SAMPLE_PHOTOS,
    ImageFolder,
    SampleImages,
    build_dataset,
    center_crop_arr,
    collate,
    random_crop_arr,
    sample_photo_dir,
    to_tensor,
)


def _write_image(path, size=(40, 30), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def test_to_tensor_range_and_layout():
    arr = np.array([[[0, 255, 128]]], dtype=np.uint8)
    t = to_tensor(Image.fromarray(arr))
    assert t.shape == (3, 1, 1) and t.dtype == torch.float32
    torch.testing.assert_close(t.flatten(), torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]))


@pytest.mark.parametrize("size", [(97, 61), (61, 97), (300, 300), (33, 1000)])
def test_center_crop_shape(size):
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    assert center_crop_arr(img, 32).size == (32, 32)


@pytest.mark.parametrize("size", [(97, 61), (600, 400), (17, 17)])
def test_random_crop_shape_and_determinism(size):
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    a = random_crop_arr(img, 16, np.random.default_rng(5))
    b = random_crop_arr(img, 16, np.random.default_rng(5))
    assert a.size == (16, 16)
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_center_crop_of_a_square_at_its_size_is_identity():
    arr = np.random.default_rng(3).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(center_crop_arr(Image.fromarray(arr), 24)), arr)


def test_image_folder_any_depth_labels_from_first_level(tmp_path):
    _write_image(tmp_path / "cat" / "a.png")
    _write_image(tmp_path / "cat" / "deep" / "deeper" / "b.jpg", seed=1)
    _write_image(tmp_path / "dog" / "c.png", seed=2)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    ds = ImageFolder(tmp_path, 16, augment=True, seed=0)
    assert ds.classes == ["cat", "dog"]
    assert len(ds) == 3
    assert [ds[i][1] for i in range(3)] == [0, 0, 1]
    x, y = collate([ds[0], ds[2]])
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32 and y.tolist() == [0, 1]
    assert -1.0 <= x.min() and x.max() <= 1.0


def test_image_folder_empty_class_is_an_error_naming_it(tmp_path):
    """torchvision's rule: an empty class folder would shift the label of every later class."""
    _write_image(tmp_path / "a_cat" / "a.png")
    (tmp_path / "b_empty" / "sub").mkdir(parents=True)
    (tmp_path / "b_empty" / "readme.txt").write_text("no image")
    _write_image(tmp_path / "c_dog" / "c.png", seed=1)
    with pytest.raises(ValueError, match=r"class folder '.*b_empty' contains no images") as err:
        ImageFolder(tmp_path, 16)
    assert "put its images in it, or move it out" in str(err.value)


TREE = ["cat/a.png", "cat/deep/deeper/b.jpg", "cat/a/sub/y.png", "cat/a-1/z.png", "cat/a b/w.png", "cat/a/q.png",
        "dog/c.PNG", "dog/z.webp", "dog/e.tif", "eel/x.jpeg"]


def test_image_folder_equals_torchvision_image_folder(tmp_path):
    """Same classes, files, order and labels as torchvision.datasets.ImageFolder (nested folders whose
    names sort around "/" included), so a run sees the official scripts' data order."""
    from fqgan.runtime.vision import import_torchvision

    for i, rel in enumerate(TREE):
        _write_image(tmp_path / rel, size=(6, 5), seed=i)
    (tmp_path / "dog" / "notes.txt").write_text("x")
    ours = ImageFolder(tmp_path, 4)
    theirs = import_torchvision().datasets.ImageFolder(str(tmp_path))
    assert ours.classes == theirs.classes == ["cat", "dog", "eel"]
    assert ours.class_to_idx == theirs.class_to_idx
    assert ours.samples == theirs.samples
    assert [p[len(str(tmp_path)) + 1:] for p, _ in ours.samples][:6] == [
        "cat/a.png", "cat/a/q.png", "cat/a b/w.png", "cat/a-1/z.png", "cat/a/sub/y.png", "cat/deep/deeper/b.jpg"]


def test_image_folder_skips_hidden_names(tmp_path):
    """Hidden folders are not classes and hidden files are not images (torchvision takes both)."""
    _write_image(tmp_path / "cat" / "a.png")
    _write_image(tmp_path / "cat" / ".cache" / "h.png", seed=1)
    (tmp_path / "cat" / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble, no image")
    _write_image(tmp_path / ".ipynb_checkpoints" / "x.png", seed=2)
    _write_image(tmp_path / "dog" / "b.png", seed=3)
    ds = ImageFolder(tmp_path, 8)
    assert ds.classes == ["cat", "dog"]
    assert [(p[len(str(tmp_path)) + 1:], y) for p, y in ds.samples] == [("cat/a.png", 0), ("dog/b.png", 1)]


def test_image_folder_flat_is_one_class(tmp_path):
    _write_image(tmp_path / "a.png")
    _write_image(tmp_path / "b.png", seed=1)
    ds = ImageFolder(tmp_path, 8, augment=False)
    assert len(ds) == 2 and {ds[i][1] for i in range(2)} == {0}


def test_augmentation_is_a_function_of_seed_epoch_index(tmp_path):
    _write_image(tmp_path / "c" / "a.png", size=(64, 48))
    ds = ImageFolder(tmp_path, 16, augment=True, seed=3)
    same = ImageFolder(tmp_path, 16, augment=True, seed=3)
    torch.testing.assert_close(ds[0][0], same[0][0], rtol=0, atol=0)
    draws = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        draws.add(ds[0][0].numpy().tobytes())
    assert len(draws) > 1  # crops and flips change with the epoch


def test_empty_folder_error(tmp_path):
    (tmp_path / "class_a").mkdir()
    (tmp_path / "class_a" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="contains no images"):
        ImageFolder(tmp_path, 16)


def test_missing_folder_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "nope", 16)


def test_mixed_loose_and_class_folders_error(tmp_path):
    _write_image(tmp_path / "a.png")
    _write_image(tmp_path / "cls" / "b.png")
    with pytest.raises(ValueError, match="both loose images"):
        ImageFolder(tmp_path, 16)
    (tmp_path / "cls" / "b.png").unlink()  # an empty sub-folder beside loose images: still ambiguous
    with pytest.raises(ValueError, match=r"both loose images \('a.png', ...\) and sub-folders \('cls', ...\)"):
        ImageFolder(tmp_path, 16)
    (tmp_path / "cls").rmdir()
    (tmp_path / ".thumbnails").mkdir()  # hidden: ignored
    assert len(ImageFolder(tmp_path, 16)) == 1


def test_unreadable_image_error(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "broken.png").write_bytes(b"\x89PNG not really")
    ds = ImageFolder(tmp_path, 16)
    with pytest.raises(ValueError, match="cannot read image"):
        ds[0]


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_image_size(bad, tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        SampleImages(bad)


def test_sample_photos_are_shipped():
    import os

    root = sample_photo_dir()
    missing = [p for p in SAMPLE_PHOTOS if not os.path.isfile(os.path.join(root, p))]
    assert not missing


def test_sample_images_deterministic_and_labelled():
    ds = SampleImages(32, length=2 * len(SAMPLE_PHOTOS) + 1, augment=False, seed=7)
    again = SampleImages(32, length=len(ds), augment=False, seed=7)
    other_seed = SampleImages(32, length=len(ds), augment=False, seed=8)
    x0, y0 = ds[0]
    assert x0.shape == (3, 32, 32) and y0 == 0
    assert ds[len(SAMPLE_PHOTOS)][1] == 0 and ds[len(SAMPLE_PHOTOS) + 1][1] == 1
    torch.testing.assert_close(x0, again[0][0], rtol=0, atol=0)
    assert not torch.equal(x0, other_seed[0][0])
    ds.set_epoch(5)  # fixed crops without augmentation
    torch.testing.assert_close(x0, ds[0][0], rtol=0, atol=0)
    assert x0.std() > 0.01  # a photograph, not a flat patch


def test_build_dataset_dispatch(tmp_path):
    assert isinstance(build_dataset("sample", 16, sample_length=4), SampleImages)
    _write_image(tmp_path / "c" / "a.png")
    assert isinstance(build_dataset(str(tmp_path), 16), ImageFolder)
