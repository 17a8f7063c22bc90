"""fqgan.data.images: uint8 conversion, image files in and out, grids (tile positions read back from the PNG)."""

import numpy as np
import pytest
import torch
from PIL import Image

from fqgan.data.datasets import center_crop_arr
from fqgan.data.images import from_uint8, list_images, load_image, save_comparison_grid, save_grid, save_image, to_uint8
from fqgan.runtime.checkpoint import MissingFileError


def _random_images(n, h=9, w=13):
    return torch.rand(n, 3, h, w) * 2 - 1


def _read(path):
    return np.asarray(Image.open(path).convert("RGB"))


# -- uint8 conversion -------------------------------------------------------------------------------
def test_to_uint8_matches_llamagen_formula_and_clamps():
    x = torch.randn(2, 3, 5, 7) * 1.5  # about half the values fall outside [-1, 1]
    expected = np.clip(127.5 * x.double().numpy() + 128.0, 0, 255).astype(np.uint8)  # truncation, as LlamaGen
    got = to_uint8(x)
    assert got.dtype == torch.uint8 and got.shape == x.shape
    np.testing.assert_array_equal(got.numpy(), expected)
    assert to_uint8(torch.full((3, 1, 1), -3.0)).max() == 0 and to_uint8(torch.full((3, 1, 1), 3.0)).min() == 255


# bfloat16 is left out: its 8-bit mantissa cannot hold u / 127.5 - 1 closely enough for every level u.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_uint8_roundtrip_is_exact_for_every_level(dtype):
    levels = torch.arange(256, dtype=torch.uint8).repeat(3, 1).T.reshape(16, 16, 3)  # [H, W, 3], all 256 levels
    x = from_uint8(levels)
    assert x.shape == (3, 16, 16) and x.min() == -1 and x.max() == 1
    np.testing.assert_array_equal(to_uint8(x.to(dtype)).permute(1, 2, 0).numpy(), levels.numpy())


def test_to_uint8_bad_input():
    with pytest.raises(TypeError, match="floating-point"):
        to_uint8(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        to_uint8(torch.rand(4, 4))
    with pytest.raises(ValueError, match="RGB"):
        to_uint8(torch.rand(1, 4, 4, 4))
    x = torch.rand(1, 3, 4, 4)
    x[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(x)
    with pytest.raises(TypeError, match="uint8"):
        from_uint8(np.zeros((4, 4, 3), np.float32))


# -- files ------------------------------------------------------------------------------------------
def test_load_image_reads_exact_pixels_and_converts_modes(tmp_path):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (11, 17, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "rgb.png")
    x = load_image(tmp_path / "rgb.png")
    assert x.dtype == torch.float32 and x.shape == (3, 11, 17)
    np.testing.assert_array_equal(to_uint8(x).permute(1, 2, 0).numpy(), pixels)

    grey = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    g = to_uint8(load_image(tmp_path / "grey.png"))
    assert g.shape == (3, 6, 5)
    for c in range(3):
        np.testing.assert_array_equal(g[c].numpy(), grey)

    rgba = rng.integers(0, 256, (4, 4, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    np.testing.assert_array_equal(to_uint8(load_image(tmp_path / "alpha.png")).permute(1, 2, 0).numpy(),
                                  rgba[..., :3])


def test_load_image_resizes_with_the_evaluation_center_crop(tmp_path):
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (50, 81, 3), dtype=np.uint8)  # landscape, odd width, > 2x the target
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    x = load_image(tmp_path / "wide.png", size=24)
    assert x.shape == (3, 24, 24)
    expected = np.asarray(center_crop_arr(Image.fromarray(pixels), 24))
    np.testing.assert_array_equal(to_uint8(x).permute(1, 2, 0).numpy(), expected)
    with pytest.raises(ValueError, match="size"):
        load_image(tmp_path / "wide.png", size=0)


def test_load_image_bad_files(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(MissingFileError, match="nope.png") as info:
        load_image(missing)
    assert isinstance(info.value, ValueError) and isinstance(info.value, FileNotFoundError)
    assert str(missing.resolve()) in str(info.value)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        load_image(tmp_path / "text.png")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ValueError, match="directory"):
        load_image(tmp_path / "dir.png")


def test_save_image_roundtrip(tmp_path):
    x = _random_images(1)[0]
    path = save_image(x, tmp_path / "sub" / "one.png")
    np.testing.assert_array_equal(_read(path), to_uint8(x).permute(1, 2, 0).numpy())
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        save_image(_random_images(2), tmp_path / "two.png")


def test_list_images_expands_folders(tmp_path):
    for name in ("b.png", "a.jpg", "c.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "extra.PNG").write_bytes(b"x")
    assert [p.name for p in list_images([tmp_path])] == ["a.jpg", "b.png", "extra.PNG"]
    assert [p.name for p in list_images([tmp_path / "c.txt", tmp_path / "a.jpg"])] == ["c.txt", "a.jpg"]
    with pytest.raises(MissingFileError, match="gone.png"):
        list_images([tmp_path / "gone.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image file"):
        list_images([tmp_path / "empty"])
    with pytest.raises(ValueError, match="no image given"):
        list_images([])


# -- grids ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("labels", [None, ["first", "second"]])
def test_save_grid_places_tiles_row_by_row(tmp_path, labels):
    images = _random_images(5)
    layout = save_grid(images, tmp_path / "grid.png", nrow=3, padding=2, row_labels=labels)
    canvas = _read(layout.path)
    assert (layout.rows, layout.cols) == (2, 3)
    assert (layout.label_width > 0) == (labels is not None)
    assert canvas.shape == (2 + 2 * (9 + 2), layout.label_width + 2 + 3 * (13 + 2), 3)
    tiles = to_uint8(images).permute(0, 2, 3, 1).numpy()
    covered = np.zeros(canvas.shape[:2], bool)
    for i in range(6):
        top, left, bottom, right = layout.tile_box(i // 3, i % 3)
        if i < 5:
            np.testing.assert_array_equal(canvas[top:bottom, left:right], tiles[i])
        else:  # unused cell of the last row
            assert (canvas[top:bottom, left:right] == 255).all()
        covered[top:bottom, left:right] = True
    grid_part = canvas[:, layout.label_width:]
    assert (grid_part[~covered[:, layout.label_width:]] == 255).all()  # padding
    if labels is not None:  # text drawn in each row's band of the label column
        for r in range(2):
            top, _, bottom, _ = layout.tile_box(r, 0)
            assert (canvas[top:bottom, :layout.label_width] < 128).any()


def test_save_grid_is_torchvision_make_grid_of_the_uint8_tiles(tmp_path):
    """Without labels the file holds make_grid(to_uint8(images)) exactly, every grey level included (the
    save_image path gives back each byte), and for one image the padding stays (make_grid drops it)."""
    from fqgan.runtime.vision import import_torchvision

    tv = import_torchvision()
    levels = (torch.arange(256.0).view(1, 1, 16, 16) / 127.5 - 1).expand(3, 3, 16, 16).clone()
    levels[1] = levels[1].flip(-1)
    levels[2] = -levels[2]  # 1.0 ... -1.0
    for n, nrow, padding, pad_value in [(3, 2, 2, 255), (3, 8, 0, 0), (2, 1, 5, 128)]:
        layout = save_grid(levels[:n], tmp_path / f"g{n}{nrow}.png", nrow=nrow, padding=padding, pad_value=pad_value)
        expected = tv.utils.make_grid(to_uint8(levels[:n]), nrow=nrow, padding=padding, pad_value=pad_value)
        np.testing.assert_array_equal(_read(layout.path), expected.permute(1, 2, 0).numpy())
    one = save_grid(levels[:1], tmp_path / "one.png", padding=3, pad_value=7)
    canvas = _read(one.path)
    assert canvas.shape == (16 + 6, 16 + 6, 3) and one.tile_box(0, 0) == (3, 3, 19, 19)
    np.testing.assert_array_equal(canvas[3:19, 3:19], to_uint8(levels[0]).permute(1, 2, 0).numpy())
    assert (canvas[:3] == 7).all() and (canvas[:, -3:] == 7).all()


def test_save_grid_scale_draws_each_pixel_as_a_block(tmp_path):
    """scale=s: every tile s times larger, each pixel an s x s block of its byte (nearest neighbour, the same as
    torch's nearest interpolation before the grid); the layout knows the larger tiles."""
    images = _random_images(3)
    layout = save_grid(images, tmp_path / "big.png", nrow=2, padding=2, scale=3, row_labels=["a", "b"])
    canvas = _read(layout.path)
    assert (layout.tile_height, layout.tile_width) == (3 * 9, 3 * 13)
    enlarged = torch.nn.functional.interpolate(images, scale_factor=3, mode="nearest")
    tiles = to_uint8(enlarged).permute(0, 2, 3, 1).numpy()
    for i in range(3):
        top, left, bottom, right = layout.tile_box(i // 2, i % 2)
        np.testing.assert_array_equal(canvas[top:bottom, left:right], tiles[i])
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="scale must be a positive int"):
            save_grid(images, tmp_path / "x.png", scale=bad)
    assert not (tmp_path / "x.png").exists()


def test_save_grid_bad_input(tmp_path):
    with pytest.raises(ValueError, match="row_labels has 1 entries, the grid has 2 rows"):
        save_grid(_random_images(3), tmp_path / "g.png", nrow=2, row_labels=["x"])
    with pytest.raises(ValueError, match="nrow"):
        save_grid(_random_images(3), tmp_path / "g.png", nrow=0)
    with pytest.raises(ValueError, match="empty"):
        save_grid(_random_images(0), tmp_path / "g.png")


def test_comparison_grid_puts_originals_above_reconstructions(tmp_path):
    originals, recons = _random_images(5), _random_images(5)
    layout = save_comparison_grid(originals, recons, tmp_path / "cmp.png", nrow=3)
    canvas = _read(layout.path)
    assert (layout.rows, layout.cols) == (4, 3) and layout.label_width > 0
    o = to_uint8(originals).permute(0, 2, 3, 1).numpy()
    r = to_uint8(recons).permute(0, 2, 3, 1).numpy()
    for i in range(5):
        row, col = 2 * (i // 3), i % 3
        top, left, bottom, right = layout.tile_box(row, col)
        np.testing.assert_array_equal(canvas[top:bottom, left:right], o[i])
        top, left, bottom, right = layout.tile_box(row + 1, col)
        np.testing.assert_array_equal(canvas[top:bottom, left:right], r[i])
    top, left, bottom, right = layout.tile_box(3, 2)  # no 6th image
    assert (canvas[top:bottom, left:right] == 255).all()
    with pytest.raises(ValueError, match="same shape"):
        save_comparison_grid(originals, recons[:4], tmp_path / "x.png")
