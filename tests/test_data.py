"""CIFAR and CUB readers, the restricted unpickler, the split and the on-device augmentation."""
import contextlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import bird_data
import bird_loaders
import data
import device_images
import devices
import fixtures


def test_unpickler_reads_official_layout(cifar_dir):
    cifar = data.load_cifar100(cifar_dir)
    assert cifar["train_x"].shape == (4000, 3, 32, 32) and cifar["train_x"].dtype == np.uint8
    assert cifar["test_x"].shape == (600, 3, 32, 32)
    assert len(cifar["classes"]) == 100 and cifar["classes"][3] == "class_3"
    assert cifar["train_y"].min() == 0 and cifar["train_y"].max() == 99


@pytest.mark.parametrize("protocol", [2, 4, pickle.HIGHEST_PROTOCOL])
def test_unpickler_accepts_every_protocol(tmp_path, protocol):
    root = fixtures.write_cifar100(tmp_path, per_class_train=2, per_class_test=1, protocol=protocol)
    assert len(data.load_cifar100(root)["train_y"]) == 200


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unpickler_refuses_malicious_pickle_without_running_it(tmp_path):
    root = fixtures.write_cifar100(tmp_path, per_class_train=2, per_class_test=1)
    marker = tmp_path / "pwned"
    with open(root / "cifar-100-python" / "train", "wb") as f:
        pickle.dump({"data": Exploit(marker), "fine_labels": [0]}, f, protocol=2)
    with pytest.raises(data.DataError, match="refused to load"):
        data.load_cifar100(root)
    assert not marker.exists()


def test_truncated_pickle_is_a_clear_error(tmp_path):
    root = fixtures.write_cifar100(tmp_path, per_class_train=2, per_class_test=1)
    path = root / "cifar-100-python" / "test"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(data.DataError, match="truncated or corrupt"):
        data.load_cifar100(root)


def test_labels_out_of_range_and_wrong_layout(tmp_path):
    root = fixtures.write_cifar100(tmp_path, per_class_train=2, per_class_test=1)
    path = root / "cifar-100-python" / "train"
    with open(path, "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0, 100]}, f)
    with pytest.raises(data.DataError, match="labels outside 0..99"):
        data.load_cifar100(root)
    with open(path, "wb") as f:
        pickle.dump({"data": np.zeros((2, 100), np.uint8), "fine_labels": [0, 1]}, f)
    with pytest.raises(data.DataError, match=r"shape \(N, 3072\)"):
        data.load_cifar100(root)
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_cifar100(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="does not hold cifar-100-python"):
        data.load_cifar100(tmp_path / "empty")


def test_split_is_stratified_stable_and_disjoint():
    labels = np.repeat(np.arange(100), 500)
    np.random.default_rng(1).shuffle(labels)
    train, val = data.stratified_split(labels, val_per_class=50, seed=0)
    assert len(train) == 45_000 and len(val) == 5_000
    assert np.all(np.bincount(labels[val]) == 50) and np.all(np.bincount(labels[train]) == 450)
    assert not set(train) & set(val)
    train2, val2 = data.stratified_split(labels, val_per_class=50, seed=0)
    assert np.array_equal(val, val2) and np.array_equal(train, train2)
    _, val_other = data.stratified_split(labels, val_per_class=50, seed=1)
    assert not np.array_equal(val, val_other)


def test_test_labels_real_or_placeholder():
    assert data.labels_are_real([0, 3, 1])
    assert not data.labels_are_real([0, 0, 0])


def _augment(x, **kw):
    pad = kw.pop("pad", 0)
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    return data.augment_batch(torch.stack([padded, padded.flip(3)]), torch.arange(len(x)), pad=pad, scale=1.0, **kw)


def test_flip_and_crop_really_move_pixels():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.int32).remainder(251).to(torch.uint8).view(2, 3, 32, 32)
    flipped = _augment(x, flips=torch.tensor([True, False]))
    assert flipped.shape == x.shape
    assert torch.equal(flipped[0], x[0].flip(2).float()) and torch.equal(flipped[1], x[1].float())
    # shift (0, 0) of a 4-padded image: the content moves 4 px down-right, zeros come in
    cropped = _augment(x, pad=4, shifts=torch.tensor([[0, 0], [4, 4]]))
    assert torch.equal(cropped[0, :, 4:, 4:], x[0, :, :28, :28].float())
    assert cropped[0, :, :4].eq(0).all() and cropped[0, :, :, :4].eq(0).all()
    assert torch.equal(cropped[1], x[1].float())  # shift (4, 4) is the centre: unchanged
    both = _augment(x, pad=4, shifts=torch.tensor([[0, 8], [4, 4]]), flips=torch.tensor([True, True]))
    # crop (rows 0..27 land at 4..31, columns 4..31 at 0..27, zeros at 28..31), then mirror: zeros move left
    assert torch.equal(both[0, :, 4:, 4:], x[0, :, :28, 4:].flip(2).float()) and both[0, :, :, :4].eq(0).all()


def test_augment_matches_a_per_image_crop_and_mirror():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 3, 8, 6), dtype=torch.uint8, generator=g)
    idx = torch.randint(0, 40, (32,), generator=g)
    shifts, flips = torch.randint(0, 5, (32, 2), generator=g), torch.rand(32, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (2,) * 4)
    out = data.augment_batch(torch.stack([padded, padded.flip(3)]), idx, shifts, flips, pad=2, scale=1.0)
    for k in range(32):
        (dy, dx), image = shifts[k].tolist(), padded[idx[k]]
        crop = image[:, dy:dy + 8, dx:dx + 6]
        assert torch.equal(out[k], (crop.flip(2) if flips[k] else crop).float())


def test_cutout_zeroes_a_square():
    x = torch.full((1, 3, 32, 32), 200, dtype=torch.uint8)
    out = _augment(x, centres=torch.tensor([[16, 16]]), cutout=8)
    assert out[0, 0].eq(0).sum() == 64 and out[0, :, 12:20, 12:20].eq(0).all()


def test_augment_keeps_dtype_and_normalises():
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    loader = data.DeviceLoader(x, torch.arange(4), 4, aug={"flip", "crop", "cutout"}, mean=[0.5] * 3, std=[0.25] * 3)
    xb, _ = next(iter(loader))
    assert loader.x.dtype == torch.uint8 and xb.dtype == torch.float32 and xb.shape == (4, 3, 32, 32)
    plain = data.DeviceLoader(x, torch.arange(4), 4, mean=[0.5] * 3, std=[0.25] * 3)
    torch.testing.assert_close(next(iter(plain))[0], (x.float() / 255 - 0.5) / 0.25)


def test_compiled_augmentation_matches_eager():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    kw = dict(shuffle=True, aug={"flip", "crop", "cutout"}, mean=[0.4] * 3, std=[0.2] * 3, seed=5, batch_size=24)
    eager = list(data.DeviceLoader(x, torch.arange(64), **kw))
    compiled = list(data.DeviceLoader(x, torch.arange(64), compile=True, **kw))
    for (a, ya), (b, yb) in zip(eager, compiled, strict=True):
        assert torch.equal(ya, yb)
        torch.testing.assert_close(a, b)


def test_device_loader_is_deterministic_per_epoch_and_normalises():
    x = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(50)
    loader = data.DeviceLoader(x, y, 16, shuffle=True, aug={"flip", "crop", "cutout"}, mean=[0.5] * 3, std=[0.25] * 3,
                               seed=3)
    loader.set_epoch(2)
    first = [(a.clone(), b.clone()) for a, b in loader]
    second = list(loader)
    assert len(first) == len(loader) == 4
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(first, second, strict=True))
    assert first[0][0].dtype == torch.float32 and first[0][0].shape == (16, 3, 32, 32)
    assert sorted(torch.cat([b for _, b in first]).tolist()) == list(range(50))
    loader.set_epoch(3)
    assert not torch.equal(next(iter(loader))[1], first[0][1])
    loader.start_step = 2  # resuming mid-epoch gives the same remaining batches
    loader.set_epoch(2)
    assert torch.equal(next(iter(loader))[0], first[2][0])


def test_ranks_together_see_the_single_process_batch():
    x = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(40)
    single = data.DeviceLoader(x, y, 8, shuffle=True, aug={"flip", "crop"}, seed=1)
    ranks = [data.DeviceLoader(x, y, 8, shuffle=True, aug={"flip", "crop"}, seed=1, rank=r, world=2) for r in (0, 1)]
    for (xs, ys), (x0, y0), (x1, y1) in zip(single, *ranks, strict=True):
        assert torch.equal(ys[0::2], y0) and torch.equal(ys[1::2], y1)
        assert torch.equal(xs[0::2], x0) and torch.equal(xs[1::2], x1)


def test_unknown_augmentation_is_refused():
    import argparse
    with pytest.raises(argparse.ArgumentTypeError, match="unknown augmentation rotate"):
        data.AUG("flip,rotate")


# ----------------------------------------------------------------------------- birds

def test_cub_reader_follows_images_txt(cub_dir):
    train, test, classes = bird_data.load_cub(cub_dir.parent)  # the parent of CUB_200_2011 works too
    assert classes == ["001.Bird_1", "002.Bird_2", "003.Bird_3"]
    ids = [int(l.split()[0]) for l in (cub_dir / "images.txt").read_text().split("\n") if l]
    split = dict(l.split() for l in (cub_dir / "train_test_split.txt").read_text().split("\n") if l)
    paths = {int(l.split()[0]): l.split()[1] for l in (cub_dir / "images.txt").read_text().split("\n") if l}
    expected_test = [str(cub_dir / "images" / paths[i]) for i in ids if split[str(i)] == "0"]
    assert [s[0] for s in test] == expected_test
    assert len(train) + len(test) == 30
    assert {s[1] for s in train} == {0, 1, 2}


def test_cub_count_mismatch_and_missing_files(tmp_path):
    root = fixtures.write_cub(tmp_path, num_classes=2, per_class=4)
    lines = (root / "image_class_labels.txt").read_text().splitlines()
    (root / "image_class_labels.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(data.DataError, match="lists 7 images but images.txt lists 8"):
        bird_data.load_cub(root)
    (root / "classes.txt").unlink()
    with pytest.raises(data.DataError, match="lacks classes.txt"):
        bird_data.load_cub(root)
    with pytest.raises(data.DataError, match="does not exist"):
        bird_data.load_cub(tmp_path / "nowhere")


def test_broken_images_are_found_and_named(cub_dir):
    train, test, _ = bird_data.load_cub(cub_dir)
    kept, bad = bird_data.drop_bad_images(train + test, max_bad_frac=0.5)
    assert len(bad) == 1 and bad[0].endswith(".jpg") and len(kept) == 29
    with pytest.raises(data.DataError, match="1 of 30 images are broken"):
        bird_data.drop_bad_images(train + test, max_bad_frac=0.0)
    junk = cub_dir / "junk.jpg"
    junk.write_text("not an image")
    assert bird_data.check_image_file(str(junk)) == "not an image"


@pytest.mark.parametrize("kind", ["torch", "dali", "nvjpeg"])
def test_bird_loaders_decode_every_mode(cub_dir, kind):
    if kind == "dali" and not bird_loaders.dali_available():
        pytest.skip("nvidia-dali is not installed")
    train, test, _ = bird_data.load_cub(cub_dir)
    train, _ = bird_data.drop_bad_images(train, 0.5)
    loader = bird_loaders.bird_loader(kind, train, 32, 4, True, (0.5,) * 3, (0.5,) * 3, "cpu", aug={"rrc", "flip"}, workers=0)
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == len(loader) and all(x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 for x, _ in batches)
    # every test image gets a row, the truncated one as a black placeholder
    test_loader = bird_loaders.bird_loader(kind, test, 32, 5, False, (0.5,) * 3, (0.5,) * 3, "cpu", workers=0, keep_broken=True)
    assert sum(len(y) for _, y in test_loader) == len(test)


@pytest.mark.parametrize("kind", ["torch", "dali", "nvjpeg"])
def test_transparent_pixels_reach_every_loader_white(tmp_path, kind):
    """An RGBA PNG and a palette GIF with a transparent colour, red under alpha 0: white to the network (as a viewer
    shows them), in training and prediction alike (bird_data.to_rgb); the opaque half keeps its blue."""
    if kind == "dali" and not bird_loaders.dali_available():
        pytest.skip("nvidia-dali is not installed")
    from PIL import Image
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 32, 64, 64))
    rgba.save(tmp_path / "cutout.png")
    gif = Image.new("P", (64, 64), 0)  # colour 0 red and transparent, colour 1 blue
    gif.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    gif.paste(1, (0, 32, 64, 64))
    gif.save(tmp_path / "cutout.gif", transparency=0)
    samples = [(str(tmp_path / name), 0, None) for name in ("cutout.png", "cutout.gif")]
    x, _ = _loader_pixels(kind, samples, 32, False)
    top, bottom = x[:, :, 2:12], x[:, :, 20:30]  # well inside each half after the centre crop
    assert (top - 255).abs().max() <= 1, top.amin()
    assert (bottom[:, 2] - 255).abs().max() <= 1 and bottom[:, :2].max() <= 1


def _loader_pixels(kind, samples, size, train, **kw):
    """Every batch of one epoch as grey levels (the normalisation undone: mean 0.5, std 0.25), and the labels."""
    loader = bird_loaders.bird_loader(kind, samples, size, 6, train, (0.5,) * 3, (0.25,) * 3, "cpu", workers=0, **kw)
    loader.set_epoch(0)
    xs, ys = zip(*loader, strict=True)
    return (torch.cat(xs) * 0.25 + 0.5) * 255, torch.cat(ys)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_every_loader_gives_the_pil_loaders_pixels(cub_dir, train):
    """One preprocessing whichever loader reads the images: the eval resize and centre crop, and in training the same
    random-resized crops and mirrors (draw_augmentation), on every decodable file of the fixture (grayscale, CMYK,
    PNG named .jpg included). nvjpeg resamples as Pillow does (at most one grey level off, on few pixels); DALI's
    resize filters and rounds a little differently (BENCHMARKS.md gives both on the real subset)."""
    train_samples, test, _ = bird_data.load_cub(cub_dir)
    samples, _ = bird_data.drop_bad_images(train_samples + test, 0.5)
    kw = dict(aug={"rrc", "flip"}, seed=4) if train else {}
    pil, labels = _loader_pixels("torch", samples, 40, train, **kw)
    kinds = ["nvjpeg"] + (["dali"] if bird_loaders.dali_available() else [])
    for kind in kinds:
        x, y = _loader_pixels(kind, samples, 40, train, **kw)
        assert x.shape == pil.shape and torch.equal(y, labels), kind
        diff = (x - pil).abs()
        if kind == "nvjpeg":  # Pillow's rounding, not quite bit for bit: 2% of these pixels, 0.02% on real photos
            assert diff.max() < 1.01 and (diff > 0.5).float().mean() < 0.05
        else:  # another crop, or the mirror of the right one, would differ by tens of grey levels
            assert diff.mean() < 1.0 and diff.max() < 8, (diff.mean(), diff.max())


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_loaders_agree_around_the_dct_scale_bound(tmp_path, train):
    """JPEGs from just under to well over twice the image size: the loaders skip the sample geometry where the shorter
    side is under twice the size (bird_data.dct_scalable: there the geometry finds no DCT scale either) and decode at
    1/2 where one applies, so the PIL loader and the nvJPEG loader's CPU path (and DALI's) still agree to the pixel on
    textured images, whose full and half-scale decodes differ by tens of grey levels."""
    from PIL import Image
    rng = np.random.default_rng(3)
    samples = []
    for k, (w, h) in enumerate([(60, 80), (63, 90), (64, 64), (70, 100), (90, 74), (100, 130), (150, 140), (200, 96)]):
        texture = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)[:h, :w]
        Image.fromarray(texture).save(tmp_path / f"t{k}.jpg", quality=95)
        samples.append((str(tmp_path / f"t{k}.jpg"), k, None))
    kw = dict(aug={"rrc", "flip"}, seed=5) if train else {}
    # the bound itself: where it says no DCT scale applies, the sample's geometry finds none (eval and drawn crops)
    for w, h in [(side, other) for side in range(33, 200, 3) for other in (side, side + 29, side * 2)]:
        crops = [bird_loaders.draw_augmentation(seed, w, h, kw.get("aug", ()), (0.25, 1.0))[0] for seed in range(8)]
        g = device_images.sample_geometry([w] * 8, [h] * 8, [(0, 0, w, h)] * 8, [c or (np.nan,) * 4 for c in crops],
                                          32, 0.875)
        factors = {bird_data.dct_factor(min(sx, sy)) for sx, sy in zip(g.scale_x, g.scale_y, strict=True)}
        assert bird_data.dct_scalable(w, h, 32) or factors == {1}, (w, h, factors)
    pil, labels = _loader_pixels("torch", samples, 32, train, **kw)
    for kind in ["nvjpeg"] + (["dali"] if bird_loaders.dali_available() else []):
        x, y = _loader_pixels(kind, samples, 32, train, **kw)
        diff = (x - pil).abs()
        assert torch.equal(y, labels), kind
        if kind == "nvjpeg":  # Pillow's resampling, at most one grey level off
            assert diff.max() < 1.01, diff.max()
        else:  # DALI's own resize filter
            assert diff.mean() < 1.0 and diff.max() < 8, (diff.mean(), diff.max())


def test_nvjpeg_training_crops_are_the_drawn_boxes(clean_cub_dir):
    """Each training image is Pillow's resize of the box draw_augmentation gives for its seed, mirrored when drawn."""
    from PIL import Image
    train, _, _ = bird_data.load_cub(clean_cub_dir)
    loader = bird_loaders.bird_loader("nvjpeg", train, 24, 4, True, (0.0,) * 3, (1 / 255,) * 3, "cpu", workers=0,
                              aug={"rrc", "flip"}, seed=9)
    loader.set_epoch(2)
    (pos, idx), = list(loader.sampler.batches())[:1]
    xb, _ = next(iter(loader))
    mirrored = 0
    for k, (i, seed) in enumerate(zip(idx.tolist(), loader.sampler.sample_seeds(pos), strict=True)):
        with Image.open(train[i][0]) as im:
            im = bird_data.oriented(im).convert("RGB")  # upright, as every loader reads it
        (x, y, w, h), mirror = bird_loaders.draw_augmentation(seed, im.width, im.height, {"rrc", "flip"}, (0.25, 1.0))
        im = im.resize((24, 24), Image.BILINEAR, box=(x, y, x + w, y + h))
        expected = torch.from_numpy(np.asarray(im.transpose(Image.FLIP_LEFT_RIGHT) if mirror else im).copy())
        assert (xb[k].permute(1, 2, 0) - expected.float()).abs().max() < 1.01
        mirrored += mirror
    assert 0 < mirrored < len(idx) or len(idx) < 3


def test_nvjpeg_sends_what_the_gpu_decoder_refuses_to_pil(cub_dir, tmp_path, monkeypatch):
    """Found when the data is scanned: grayscale, CMYK and the PNG named .jpg go to PIL, broken files are skipped or
    black; a batch nvJPEG still refuses at run time is decoded file by file, with PIL for what it refuses."""
    from PIL import Image
    train, test, _ = bird_data.load_cub(cub_dir)
    loader = bird_loaders.bird_loader("nvjpeg", train + test, 32, 4, False, (0.5,) * 3, (0.5,) * 3, "cpu", workers=0,
                              keep_broken=True)
    assert set(loader.pil_reasons) == {"grayscale", "CMYK/YCCK", "not a JPEG", "EXIF orientation 6"}
    progressive = tmp_path / "progressive.jpg"
    Image.new("RGB", (30, 20), (200, 10, 10)).save(progressive, "JPEG", progressive=True)
    assert bird_data.jpeg_header(progressive) == (30, 20, None)  # progressive JPEGs stay on the GPU path
    bomb = tmp_path / "bomb.jpg"  # a frame header claiming 20000 x 20000 pixels: refused at scan, as PIL refuses it
    blob = bytearray(progressive.read_bytes())
    sof = blob.index(b"\xff\xc2")
    blob[sof + 5:sof + 9] = (20000).to_bytes(2, "big") * 2
    bomb.write_bytes(bytes(blob))
    _, broken, _, _ = bird_data.scan_images([(str(bomb), 0, None)], pil_for_gpu_refused=True)
    assert "decompression-bomb" in broken[0]
    before = torch.cat([x for x, _ in loader])
    name, real = device_images.jpeg_decoder()

    def refuse_batches(datas, device):
        if len(datas) > 1:
            raise RuntimeError("nvjpeg: unsupported")
        return real(datas, device)
    monkeypatch.setattr(device_images, "jpeg_decoder", lambda: (name, refuse_batches))
    after = torch.cat([x for x, _ in loader])
    assert len(before) == len(train + test) and torch.equal(before, after)


def test_nvjpeg_ranks_together_see_the_single_process_batches(clean_cub_dir):
    train, _, _ = bird_data.load_cub(clean_cub_dir)
    kw = dict(aug={"rrc", "flip"}, seed=1)
    one, y_one = _loader_pixels("nvjpeg", train, 24, True, **kw)
    ranks = [bird_loaders.bird_loader("nvjpeg", train, 24, 6, True, (0.5,) * 3, (0.25,) * 3, "cpu", workers=0, rank=r, world=2,
                              **kw) for r in (0, 1)]
    step = 0
    for (x0, y0), (x1, y1) in zip(*ranks, strict=True):  # rank r holds every second sample of the global batch
        x = torch.stack([x0, x1], 1).flatten(0, 1)
        assert torch.equal((x * 0.25 + 0.5) * 255, one[step * 6:(step + 1) * 6])
        assert torch.equal(torch.stack([y0, y1], 1).flatten(), y_one[step * 6:(step + 1) * 6])
        step += 1
    assert step == len(train) // 6


def test_image_folder_layout(tmp_path):
    from PIL import Image
    for split in ("train", "test"):
        for cls in ("a_bird", "b_bird"):
            (tmp_path / split / cls).mkdir(parents=True)
            for k in range(2):
                Image.new("RGB", (20, 20), (k * 50, 0, 0)).save(tmp_path / split / cls / f"{k}.jpg")
    train, test, classes = bird_data.load_image_folder(tmp_path)
    assert classes == ["a_bird", "b_bird"] and len(train) == 4 and len(test) == 4
    assert [s[1] for s in test] == [0, 0, 1, 1]


@pytest.mark.parametrize("kind", ["torch", "dali", "nvjpeg"])
def test_bird_epoch_is_the_same_fresh_or_after_earlier_epochs(clean_cub_dir, kind):
    """What resuming needs: an epoch's augmented batches depend on (seed, epoch, step) only, at any step."""
    if kind == "dali" and not bird_loaders.dali_available():
        pytest.skip("nvidia-dali is not installed")
    train, _, _ = bird_data.load_cub(clean_cub_dir)
    make = lambda: bird_loaders.bird_loader(kind, train, 32, 4, True, (0.5,) * 3, (0.5,) * 3, "cpu",  # noqa: E731
                                    aug={"rrc", "flip"}, workers=0, seed=3)
    continued = make()
    continued.set_epoch(0)
    epoch0 = [x for x, _ in continued]
    continued.set_epoch(1)
    after = [x for x, _ in continued]
    fresh = make()
    fresh.set_epoch(1)
    assert all(torch.equal(a, b) for a, b in zip(after, [x for x, _ in fresh], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(epoch0, after, strict=True))
    # what resuming mid-epoch needs: starting at step 2 gives that epoch's batches from step 2 on
    resumed = make()
    resumed.set_epoch(1)
    resumed.start_step = 2
    rest = [x for x, _ in resumed]
    assert len(rest) == len(after) - 2 and all(torch.equal(a, b) for a, b in zip(after[2:], rest, strict=True))


def test_dali_skips_a_jpeg_whose_header_is_unreadable_with_one_warning(tmp_path, capsys):
    if not bird_loaders.dali_available():
        pytest.skip("nvidia-dali is not installed")
    train, _, _ = bird_data.load_cub(fixtures.write_cub(tmp_path, num_classes=2, per_class=4, broken=False))
    with open(train[0][0], "wb") as f:  # passes the byte check
        f.write(b"\xff\xd8\xff" + bytes(100) + b"\xff\xd9")
    assert bird_data.check_image_file(train[0][0]) is None
    loader = bird_loaders.DaliImageLoader(train, 32, 4, False, (0.5,) * 3, (0.5,) * 3, "cpu", workers=1)
    assert f"skipping {train[0][0]}: cannot read the image header" in capsys.readouterr().err
    assert sum(len(y) for _, y in loader) == len(train) - 1
    loader.close()


def test_dali_hands_a_batch_its_decoder_fails_on_to_pil_and_passes_other_errors_on(tmp_path, monkeypatch, capsys):
    """A JPEG whose header reads but whose Huffman table is bogus stops DALI's decoder mid-epoch (its message names no
    file): that batch goes to PIL, which names the file in one warning and skips it; every other image is kept. Any
    other DALI or CUDA runtime error keeps its own message (it is no image's fault)."""
    if not bird_loaders.dali_available():
        pytest.skip("nvidia-dali is not installed")
    train, _, _ = bird_data.load_cub(fixtures.write_cub(tmp_path, num_classes=2, per_class=4, broken=False))
    plain = [s for s in train if bird_data.jpeg_header(s[0])[2] is None]
    blob = bytearray(Path(plain[1][0]).read_bytes())
    table = blob.index(b"\xff\xc4")  # the first Huffman table's code counts, all 255
    blob[table + 5:table + 21] = b"\xff" * 16
    Path(plain[1][0]).write_bytes(bytes(blob))
    assert bird_data.jpeg_header(plain[1][0]) == bird_data.jpeg_header(plain[0][0])[:2] + (None,)  # the scan passes
    loader = bird_loaders.DaliImageLoader(plain, 32, 4, False, (0.5,) * 3, (0.5,) * 3, "cpu", workers=1)
    labels = torch.cat([y for _, y in loader])
    err = capsys.readouterr().err
    assert "DALI's decoder failed on a batch" in err and f"skipping {plain[1][0]}: cannot decode" in err
    assert labels.tolist() == [s[1] for k, s in enumerate(plain) if k != 1]  # eval order, the bogus file left out
    loader.close()
    assert loader.pipe is None and loader.readers is None
    fine = bird_loaders.DaliImageLoader(plain[2:], 32, 2, False, (0.5,) * 3, (0.5,) * 3, "cpu", workers=1)
    list(fine)
    monkeypatch.setattr(type(fine.pipe), "run", lambda *a: (_ for _ in ()).throw(RuntimeError("CUDA error: out of memory")))
    with pytest.raises(RuntimeError, match="^CUDA error: out of memory$"):
        list(fine)


# ----------------------------------------------------------------------------- downloads

def _tarball(tmp_path):
    import tarfile
    src = tmp_path / "src" / "cifar-100-python"
    src.mkdir(parents=True)
    (src / "meta").write_bytes(b"x")
    archive = tmp_path / "archive.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar-100-python")
    return archive


def test_download_checks_md5_resumes_and_unpacks_atomically(tmp_path):
    from torchvision.datasets.utils import calculate_md5
    archive = _tarball(tmp_path)
    good_md5 = calculate_md5(archive)
    dest = tmp_path / "dl" / "cifar.tar.gz"
    dest.parent.mkdir()
    part = dest.with_name(dest.name + ".part")
    part.write_bytes(archive.read_bytes()[:10])  # an interrupted earlier download
    data.download(archive.as_uri(), dest, good_md5)
    assert calculate_md5(dest) == good_md5 and not part.exists()
    root = data.extract_atomically(dest, tmp_path / "dl", "cifar-100-python")
    assert (root / "meta").read_bytes() == b"x"
    assert not list((tmp_path / "dl").glob(".extract-*"))
    with pytest.raises(data.DataError, match="wrong md5"):
        data.download(archive.as_uri(), tmp_path / "dl" / "other.tar.gz", "0" * 32)
    assert not (tmp_path / "dl" / "other.tar.gz.part").exists()


def test_download_on_a_folder_that_holds_the_data_does_not_download(cifar_dir, clean_cub_dir, tmp_path, monkeypatch):
    """--download finds the data in the data set's own folder or in its parent, and downloads only where neither holds
    it (it once asked to download CIFAR into cifar-100-python/ itself, and CUB into a CUB folder of another name)."""
    def no_download(url, dest, md5):
        raise AssertionError(f"downloaded {url} into {dest} although the data is there")
    monkeypatch.setattr(data, "download", no_download)
    for folder in (cifar_dir, cifar_dir / "cifar-100-python"):
        assert data.find_or_download_cifar(folder, download=True) == cifar_dir / "cifar-100-python"
        assert len(data.load_cifar100(folder, download_if_missing=True)["train_y"]) == 4000
    renamed = tmp_path / "my_birds"
    renamed.symlink_to(clean_cub_dir, target_is_directory=True)
    for folder in (clean_cub_dir, clean_cub_dir.parent, renamed):
        assert (data.find_or_download_cub(folder, download=True) / "images.txt").is_file()
    with pytest.raises(AssertionError, match="downloaded"):  # and where neither holds it, it does download
        data.find_or_download_cub(clean_cub_dir.parent / "elsewhere", download=True)


def test_download_offline_is_one_sentence(tmp_path):
    with pytest.raises(data.DataError, match=r"could not download .* fetch it by hand and save it as"):
        data.download((tmp_path / "nowhere.tar.gz").as_uri(), tmp_path / "x.tar.gz", "0" * 32)


def test_cub_labels_must_name_defined_classes(tmp_path):
    root = fixtures.write_cub(tmp_path, num_classes=2, per_class=3, broken=False)
    lines = (root / "image_class_labels.txt").read_text().splitlines()
    lines[0] = lines[0].split()[0] + " 9"
    (root / "image_class_labels.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(data.DataError, match=r"class ids \[9\] that classes.txt does not define"):
        bird_data.load_cub(root)


@pytest.mark.parametrize("table", ["images.txt", "image_class_labels.txt", "train_test_split.txt"])
def test_an_id_listed_twice_is_one_sentence(tmp_path, table):
    root = fixtures.write_cub(tmp_path, num_classes=2, per_class=3, broken=False)
    lines = (root / table).read_text().splitlines()
    (root / table).write_text("\n".join(lines + [lines[2]]) + "\n")
    with pytest.raises(data.DataError, match=rf"{table} lists id 3 twice \(lines 3 and 7\)$"):
        bird_data.load_cub(root)


def test_validation_cannot_swallow_a_class():
    labels = np.repeat(np.arange(3), 5)
    with pytest.raises(data.DataError, match="--val-per-class 5 leaves no training images for class 0, which has 5"):
        data.stratified_split(labels, val_per_class=5)
    train, val = data.stratified_split(labels, val_per_class=4)
    assert len(train) == 3 and len(val) == 12


def test_compiled_augmentation_is_one_graph():
    """The point of compiling augment_batch is one fused kernel: no graph break (as_strided/storage_offset broke it)."""
    import torch._dynamo
    x = torch.randint(0, 255, (2, 20, 3, 40, 40), dtype=torch.uint8)
    idx, shifts = torch.randint(0, 20, (8,)), torch.randint(0, 9, (8, 2))
    flips, centres = torch.rand(8) < 0.5, torch.randint(0, 32, (8, 2))
    explained = torch._dynamo.explain(data.augment_batch)(x, idx, shifts, flips, centres, 4, 8, 1 / 255, 0.0)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def test_an_all_broken_batch_still_lands_on_the_device(tmp_path):
    """The empty batch of a step whose images are all broken goes to the loader's device like any other (on a GPU
    it stayed on the CPU and evaluate fed a CPU tensor to a CUDA model). The 'meta' device stands in for CUDA."""
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    loader = bird_loaders.TorchImageLoader([(str(bad), 0, None)] * 2, 16, 2, False, [0.5] * 3, [0.5] * 3, "meta", workers=0)
    (xb, yb), = list(loader)  # both skipped with a warning on stderr
    assert xb.device.type == "meta" and yb.device.type == "meta" and len(xb) == 0


@pytest.mark.parametrize("kind", ["dali", "nvjpeg", "torch"])
def test_a_rank_whose_share_of_the_last_eval_batch_is_empty(clean_cub_dir, kind):
    """torchrun evaluation: 5 images in global batches of 4 leave rank 1 nothing in the last one. It gets an empty
    batch (DALI used to raise IndexError there), and the ranks together still see every image once."""
    if kind == "dali" and not bird_loaders.dali_available():
        pytest.skip("nvidia-dali is not installed")
    _, test, _ = bird_data.load_cub(clean_cub_dir)
    test = test[:5]
    ranks = [list(bird_loaders.bird_loader(kind, test, 24, 4, False, (0.5,) * 3, (0.5,) * 3, "cpu", workers=0, rank=r, world=2))
             for r in (0, 1)]
    assert [len(y) for _, y in ranks[0]] == [2, 1] and [len(y) for _, y in ranks[1]] == [2, 0]
    assert ranks[1][-1][0].shape == (0, 3, 24, 24)
    labels = sorted(int(v) for r in ranks for _, y in r for v in y)
    assert labels == sorted(s[1] for s in test)


def test_resampling_is_exact_under_autocast_and_tf32_and_restores_them(clean_cub_dir):
    """resample_batch runs its matmuls in full fp32 whatever the run set (bf16 autocast, TF32 in fast CUDA runs),
    and leaves the process's matmul precision as it found it."""
    from PIL import Image
    train, _, _ = bird_data.load_cub(clean_cub_dir)
    images = [torch.from_numpy(np.asarray(Image.open(s[0]).convert("RGB")).copy()).permute(2, 0, 1) for s in train[:4]]
    w, h = [im.shape[2] for im in images], [im.shape[1] for im in images]
    geometry = device_images.sample_geometry(w, h, [(0, 0, a, b) for a, b in zip(w, h, strict=True)],
                                    [(1, 2, 30, 20)] * 4, 24, 0.875)
    plain = device_images.resample_batch(images, geometry, 24, [False, True, False, True])
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            again = device_images.resample_batch(images, geometry, 24, [False, True, False, True])
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert torch.equal(plain, again) and plain.dtype == torch.uint8
    assert torch.equal(plain[1], device_images.resample_batch(images[1:2], geometry.take(slice(1, 2)), 24, [False]).flip(-1)[0])
    # a second run in the same process (a notebook, a test) that turns determinism on still resamples: one API sets
    # the precision (torch 2.14 refused to read it after the legacy TF32 flag had followed the API's restore)
    previous = torch.get_float32_matmul_precision()
    try:
        devices.set_determinism(False)
        device_images.resample_batch(images, geometry, 24, [False] * 4)
        devices.set_determinism(True)
        assert torch.equal(device_images.resample_batch(images, geometry, 24, [False, True, False, True]), plain)
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cuda.matmul.allow_tf32
    finally:
        devices.set_determinism(False)
        torch.use_deterministic_algorithms(False)
        torch.set_float32_matmul_precision(previous)


def test_exif_rotated_jpegs_are_upright_in_every_loader(cub_dir):
    """The fixture's image 5 is stored 48 x 56 with EXIF orientation 6 (turn it a quarter clockwise): each loader's
    eval pixels are those of the upright 56 x 48 photo (TorchCodec and DALI rotate; the nvjpeg loader sends it to PIL)."""
    from PIL import Image
    train, _, _ = bird_data.load_cub(cub_dir)
    exif = [s for s in train if s[0].endswith("_0004.jpg") and "001." in s[0]]
    assert bird_data.jpeg_header(exif[0][0])[2] == "EXIF orientation 6"
    with Image.open(exif[0][0]) as im:
        upright = im.convert("RGB").transpose(Image.ROTATE_270)  # what orientation 6 means
        assert bird_data.oriented(im).size == upright.size == (48, 56)
    short = round(40 / 0.875)  # the eval policy on the upright image, by hand
    im = upright.resize((short, round(56 * short / 48)), Image.BILINEAR)
    top = (im.height - 40) // 2
    expected = torch.from_numpy(np.asarray(im.crop((3, top, 43, top + 40))).copy()).permute(2, 0, 1).float()
    for kind in ["torch", "nvjpeg"] + (["dali"] if bird_loaders.dali_available() else []):
        x, _ = _loader_pixels(kind, exif, 40, False)
        assert (x[0] - expected).abs().mean() < 1.0, kind


def test_decode_jpegs_orders_the_decode_after_the_callers_stream(monkeypatch):
    """The CUDA ordering, recorded with fake streams on the CPU: the side stream is made once per device and waited
    for on the host, the decode runs with it current and no uninitialised-memory fill, the caller's stream then waits
    for the side stream, and every output is recorded on the caller's stream; with DECODE_ORDER 'sync' the host waits
    for the caller's stream before the decode."""
    import torch.utils.deterministic as deterministic
    calls = []

    class FakeStream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            calls.append(("wait", self.name, other.name))

        def synchronize(self):
            calls.append(("synchronize", self.name))

    class Output:
        def record_stream(self, stream):
            calls.append(("record", stream.name))

    current = [FakeStream("caller")]

    @contextlib.contextmanager
    def use(stream):
        before, current[0] = current[0], stream
        yield
        current[0] = before

    def fake_decode(datas, device):
        calls.append(("decode", current[0].name, deterministic.fill_uninitialized_memory))
        return [Output() for _ in datas]
    monkeypatch.setattr(device_images, "jpeg_decoder", lambda: ("fake", fake_decode))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[0])
    made = []
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: made.append(device) or FakeStream("side"))
    monkeypatch.setattr(torch.cuda, "stream", use)
    monkeypatch.setattr(device_images, "_DECODE_STREAMS", {})
    cuda = torch.device("cuda", 0)
    assert deterministic.fill_uninitialized_memory
    for _ in range(2):
        calls.clear()
        device_images.decode_jpegs([torch.zeros(4, dtype=torch.uint8)] * 2, cuda)
        assert calls == [("synchronize", "side"), ("decode", "side", False), ("wait", "caller", "side"),
                         ("record", "caller"), ("record", "caller")]
    assert made == [cuda]  # one side stream for the device, not one drawn from the pool per call
    assert deterministic.fill_uninitialized_memory  # restored
    calls.clear()
    monkeypatch.setattr(device_images, "DECODE_ORDER", "sync")
    device_images.decode_jpegs([torch.zeros(4, dtype=torch.uint8)], cuda)
    assert calls == [("synchronize", "caller"), ("decode", "caller", False)]
    calls.clear()
    monkeypatch.setattr(device_images, "DECODE_ORDER", "none")  # the old call: what gpu_check's planted fault runs
    device_images.decode_jpegs([torch.zeros(4, dtype=torch.uint8)], cuda)
    assert calls == [("decode", "caller", True)]


def test_reader_batches_carry_the_files_bytes_as_one_tensor(clean_cub_dir):
    """What the reader workers hand over: one uint8 tensor of every encoded file's bytes, plus offsets, and PIL's
    pixels only for the files sent to PIL; with reader processes (as on a GPU host) too."""
    train, _, _ = bird_data.load_cub(clean_cub_dir)
    loader = bird_loaders.NvjpegImageLoader(train, 32, 6, True, (0.5,) * 3, (0.5,) * 3, "cpu", aug={"rrc"}, workers=0)
    batches = [[(i, i) for i in range(k, k + 6)] for k in (0, 6)]
    in_processes = torch.utils.data.DataLoader(  # FileReaders' DataLoader as on a CUDA device: 2 reader processes
        loader.files, batch_sampler=batches, num_workers=2, collate_fn=bird_loaders.collate_files)
    for epoch in (bird_loaders.FileReaders(loader.files, 0, torch.Generator(), "cpu").epoch(batches), in_processes):
        for batch in epoch:
            assert isinstance(batch, bird_loaders.FileBatch) and batch.data.dtype == torch.uint8 and batch.data.ndim == 1
            assert all(it.image is None for it in batch.items if not it.decoded)
            encoded = batch.encoded()
            assert encoded and batch.offsets[-1] == len(batch.data)
            for it, blob in encoded:
                assert blob.untyped_storage().data_ptr() == batch.data.untyped_storage().data_ptr()  # a view
                assert blob.numpy().tobytes() == Path(train[it.index][0]).read_bytes()


def test_the_decode_raises_no_deprecation_warning(clean_cub_dir):
    """Our decode calls go to TorchCodec where it is installed (requirements.txt has it), not to torchvision's
    deprecated decoder."""
    import warnings
    train, _, _ = bird_data.load_cub(clean_cub_dir)
    loader = bird_loaders.bird_loader("nvjpeg", train[:6], 32, 6, False, (0.5,) * 3, (0.5,) * 3, "cpu", workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert len(torch.cat([x for x, _ in loader])) == 6
    assert device_images.jpeg_decoder()[0] == "torchcodec"


def test_cutout_hole_is_the_mean_after_normalising():
    """Cutout as DeVries & Taylor's code has it: the hole is 0 after normalisation (the training mean); the rest of
    the image is normalised as without cutout."""
    images = torch.randint(0, 256, (1, 4, 3, 16, 16), dtype=torch.uint8)
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    idx, centres = torch.arange(4), torch.tensor([[8, 8], [0, 0], [15, 3], [4, 12]])
    scale, bias = 1 / (255 * std), -mean / std
    plain = data.augment_batch(images, idx, scale=scale, bias=bias)
    cut = data.augment_batch(images, idx, centres=centres, cutout=6, scale=scale, bias=bias)
    hole = data.box_mask(centres[:, 0] - 3, centres[:, 0] + 3, centres[:, 1] - 3, centres[:, 1] + 3, 16, 16)
    hole = hole.expand_as(cut)
    assert hole.any() and torch.all(cut[hole] == 0)
    assert torch.equal(cut[~hole], plain[~hole])
