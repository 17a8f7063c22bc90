"""``fqgan extract-codes --ten-crop``: the official ten crops of real photographs, pixel for pixel (the official
script's ``center_crop_arr`` to ``int(image_size * crop_range)``, then torchvision ``TenCrop``), their order,
their storage as 10 augmentations of one image, and the generator's data loader drawing one per image per epoch."""

import numpy as np
import pytest
import torch

from fqgan.cli import main
from fqgan.data.codes import CodeDataset
from fqgan.data.datasets import ImageFolder, TenCropImages, center_crop_arr, load_sample_photo, ten_crop_arr
from fqgan.runtime.vision import import_torchvision

PHOTOS = ["chelsea.png", "rocket.jpg", "camera.png", "coffee.png"]  # colour PNG, JPEG, grey, 600 x 400
# (image size, crop range): the released run's (256, 1.1) -> a 281 px centre crop; the official data set's
# second folder (1.05); small sizes whose products are not integers (64 * 1.1 = 70.4, 30 * 1.05 = 31.5)
SIZES = [(256, 1.1), (64, 1.1), (30, 1.05), (32, 1.0)]


pytestmark = pytest.mark.usefixtures("one_thread")


def official_ten_crop(img, image_size, crop_range):
    """The official transform (extract_codes_c2i_dual_code.py, ``--ten-crop``), composed as that script does."""
    T = import_torchvision().transforms
    crop_size = int(image_size * crop_range)
    transform = T.Compose([
        T.Lambda(lambda pil_image: center_crop_arr(pil_image, crop_size)),
        T.TenCrop(image_size),
        T.Lambda(lambda crops: torch.stack([T.ToTensor()(crop) for crop in crops])),
        T.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], inplace=True),
    ])
    return transform(img)  # [10, 3, S, S] in [-1, 1]


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats of 8-bit images back to their uint8 pixels."""
    return ((x + 1) * 127.5).round().to(torch.uint8)


@pytest.mark.parametrize("size,crop_range", SIZES)
@pytest.mark.parametrize("photo", PHOTOS)
def test_crops_equal_the_official_transform(photo, size, crop_range):
    img = load_sample_photo(photo)
    want = official_ten_crop(img, size, crop_range)
    got = torch.stack([torch.from_numpy(np.asarray(c).copy()).permute(2, 0, 1) for c in ten_crop_arr(img, size,
                                                                                                        crop_range)])
    assert got.shape == (10, 3, size, size)
    assert torch.equal(got, to_pixels(want))  # pixel-identical


@pytest.mark.parametrize("size,crop_range", [(256, 1.1), (30, 1.05)])
def test_crop_order_and_the_crop_range_arithmetic(size, crop_range):
    """TenCrop's order, written out without torchvision: the four corners (tl, tr, bl, br) and the centre of the
    int(size * crop_range) centre crop, then the same five of its mirror image."""
    img = load_sample_photo("coffee.png")
    crops = [np.asarray(c) for c in ten_crop_arr(img, size, crop_range)]
    cc = np.asarray(center_crop_arr(img, int(size * crop_range)))
    C, S = cc.shape[0], size
    assert C == {(256, 1.1): 281, (30, 1.05): 31}[(size, crop_range)]  # int(), not round(): 281.6 -> 281
    top = round((C - S) / 2.0)  # torchvision's centre offset

    def five(a):
        return [a[:S, :S], a[:S, C - S:], a[C - S:, :S], a[C - S:, C - S:], a[top:top + S, top:top + S]]

    want = five(cc) + five(cc[:, ::-1])
    for i, (g, w) in enumerate(zip(crops, want)):
        assert np.array_equal(g, w), i
    assert np.array_equal(crops[5], crops[1][:, ::-1])  # the flipped top-left is the mirrored top-right


def test_ten_crop_dataset_items_equal_the_official_transform(tmp_path):
    for i, photo in enumerate(PHOTOS[:3]):
        (tmp_path / f"c{i}").mkdir()
        load_sample_photo(photo).save(tmp_path / f"c{i}" / photo.replace(".jpg", ".png"))
    folder = ImageFolder(str(tmp_path), 64, augment=False)
    crops = TenCropImages(folder, 1.1)
    assert len(crops) == 3 and crops.classes == ["c0", "c1", "c2"]
    for index in range(3):
        x, label = crops[index]
        path = folder.samples[index][0]
        from PIL import Image

        with Image.open(path) as f:
            want = official_ten_crop(f.convert("RGB"), 64, 1.1)
        assert label == index and x.shape == (10, 3, 64, 64) and x.dtype == torch.float32
        assert torch.equal(to_pixels(x), to_pixels(want))
        torch.testing.assert_close(x, want, rtol=0, atol=1e-6)  # x / 127.5 - 1 vs (x / 255 - 0.5) / 0.5
    with pytest.raises(ValueError, match="crop_range must be >= 1"):
        TenCropImages(folder, 0.9)
    with pytest.raises(ValueError, match="crop_range must be >= 1"):
        ten_crop_arr(load_sample_photo("coffee.png"), 64, 0.5)


TINY_FLAGS = ["--preset", "tiny", "--codebook-size", "64", "--perceptual-weight", "0", "--semantic-weight", "0",
              "--batch-size", "4", "--num-workers", "0", "--quiet", "--device", "cpu"]


def test_extract_codes_ten_crop_command(tmp_path, capsys):
    """Through the command: 10 augmentations per image, each the tokenizer's codes of that official crop; the
    generator's data set draws every one of them over the epochs."""
    from fqgan.tokenizer.load import load_tokenizer

    tok = tmp_path / "tok"
    assert main(["train-tokenizer", *TINY_FLAGS, "--steps", "1", "--out-dir", str(tok)]) == 0
    data = tmp_path / "photos"
    for i, photo in enumerate(PHOTOS):
        (data / f"c{i}").mkdir(parents=True)
        load_sample_photo(photo).save(data / f"c{i}" / photo.replace(".jpg", ".png"))
    codes = tmp_path / "codes"
    base = ["extract-codes", "--tokenizer", str(tok / "last.pt"), "--data", str(data), "--num-workers", "0",
            "--device", "cpu", "--quiet", "--batch-size", "3"]
    assert main([*base, "--out", str(codes), "--ten-crop"]) == 0
    assert "4 images x 10" in capsys.readouterr().out
    ds = CodeDataset(codes)
    assert ds.meta.num_aug == 10 and ds.meta.augmentation == "ten-crop x1.1"
    stored = np.load(codes / "codes.npy")  # [N, 10, k, h, w]
    tokenizer = load_tokenizer(str(tok / "last.pt"), "cpu")
    size = tokenizer.config.image_size
    folder = ImageFolder(str(data), size, augment=False)
    with torch.no_grad():
        for n in range(len(folder)):
            from PIL import Image

            with Image.open(folder.samples[n][0]) as f:
                x = official_ten_crop(f.convert("RGB"), size, 1.1)
            assert np.array_equal(stored[n], tokenizer.encode(x).numpy()), n
    # one augmentation per image per epoch, drawn from (seed, epoch, index): every crop is used (crops that
    # a one-step tokenizer happens to encode alike count once)
    views = {stored[1, a].tobytes() for a in range(10)}
    seen = set()
    for epoch in range(60):
        ds.set_epoch(epoch)
        item, label = ds[1]
        assert item.shape == (2, stored.shape[-1] ** 2) and label == 1
        drawn = item.numpy().astype(stored.dtype).reshape(stored.shape[2:]).tobytes()
        assert drawn in views
        seen.add(drawn)
    assert seen == views
    # --ten-crop holds the flips already
    with pytest.raises(SystemExit) as e:
        main([*base, "--out", str(tmp_path / "c2"), "--ten-crop", "--no-flip"])
    assert e.value.code == 2
    assert "--ten-crop and --no-flip exclude each other" in capsys.readouterr().err
