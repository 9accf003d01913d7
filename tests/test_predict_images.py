"""predict.py --images on the shared real birds: a user's folder of photos (renamed, nested, re-encoded, rotated,
grey, CMYK, and a text file named .jpg) gets the answers the test split gets."""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import bird_data
import fixtures
from conftest import SHARED_CUB, SHARED_WEIGHTS, run_inline, run_script


def photo_folder(folder, test, n):
    """Copies of the first n test images as a user would have them: {copy: test index, or None where the copy does
    not hold the original's pixels}."""
    from PIL import Image
    made = {}
    for k, (path, _, _) in enumerate(test[:n]):
        nested = folder / f"trip{k % 2}" / ("day2" if k % 3 else "")
        nested.mkdir(parents=True, exist_ok=True)
        made[nested / f"IMG_{k:04d}.JPG"] = k  # renamed, nested, an upper-case suffix
        shutil.copy(path, nested / f"IMG_{k:04d}.JPG")
        with Image.open(path) as im:
            upright = bird_data.to_rgb(bird_data.oriented(im))
        upright.save(folder / f"lossless_{k}.png")
        upright.save(folder / f"lossless_{k}.webp", lossless=True)
        upright.convert("CMYK").save(folder / f"cmyk_{k}.tiff")  # PIL's CMYK round trip is exact
        made.update({folder / f"lossless_{k}.png": k, folder / f"lossless_{k}.webp": k, folder / f"cmyk_{k}.tiff": k})
        # upright again only through its EXIF orientation
        fixtures.save_turned(upright, folder / f"rotated_{k}.png", (3, 6, 8)[k % 3])
        made[folder / f"rotated_{k}.png"] = k
        upright.convert("L").save(folder / f"grey_{k}.jpg")
        made[folder / f"grey_{k}.jpg"] = None
    (folder / "notes.jpg").write_text("not a picture\n")
    return made


@pytest.mark.skipif(not (SHARED_CUB.is_dir() and SHARED_WEIGHTS.is_file()), reason="../shared is absent")
def test_own_photos_get_the_test_splits_answers(tmp_path):
    root = fixtures.real_cub_subset(SHARED_CUB, tmp_path, num_classes=3)
    run = tmp_path / "frozen"
    run_script("finetune_birds.py", "--data-dir", root, "--arch", "tf_efficientnet_lite0", "--weights", SHARED_WEIGHTS,
               "--freeze-backbone", "--img-size", "64", "--batch-size", "32", "--device", "cpu", "--quiet",
               "--out", run)
    run_script("predict.py", run / "best.pt", "--data-dir", root, "--out", tmp_path / "test.csv")
    submitted = pd.read_csv(tmp_path / "test.csv").Prediction1
    _, test, classes = bird_data.load_cub(root)
    made = photo_folder(tmp_path / "photos", test, 4)
    proc = run_script("predict.py", run / "best.pt", "--images", tmp_path / "photos",
                      "--out", tmp_path / "top.json", "--explain", tmp_path / "cams")
    assert f"skipping {tmp_path / 'photos' / 'notes.jpg'}: not an image" in proc.stderr
    rows = {Path(r["path"]): r["top"] for r in json.loads((tmp_path / "top.json").read_text())}
    assert set(rows) == set(made) and all(len(top) == 3 for top in rows.values())
    names = [bird_data.display_name(c) for c in classes]
    for copy, k in made.items():
        if k is not None:  # the original's pixels: the test split's answer, by name
            assert rows[copy][0]["name"] == names[submitted[k]], copy
    assert len(list((tmp_path / "cams").glob("*.png"))) == len(made)


# ----------------------------------------------------------------------------- what phones and the web produce

def phone_folder(folder, test):
    """What a phone and the web leave in a folder, made from four test images (`test`: their paths): {file: the index
    of the one whose top-1 it must get (its pixels, or a phone-sized copy of them), or None (predicted; pixels
    changed)}."""
    from PIL import Image
    folder.mkdir()
    uprights = []
    for path in test:
        with Image.open(path) as im:
            uprights.append(bird_data.to_rgb(bird_data.oriented(im)))
    made = {}
    for k, orientation in enumerate((1, 3, 6, 8)):  # 12 MP, the way a phone stores a turned photo
        fixtures.save_turned(fixtures.phone_photo(uprights[k]), folder / f"PXL_{k}.jpg", orientation, quality=90)
        made[folder / f"PXL_{k}.jpg"] = k
    blob = Path(test[0]).read_bytes()  # a Motion Photo: the JPEG, then a short MP4 (no 0xff byte in it)
    (folder / "MVIMG_0.jpg").write_bytes(blob + b"\x00\x00\x00\x18ftypmp42" + bytes(range(200)) * 40)
    shutil.copy(test[1], folder / "web_1.jfif")
    made.update({folder / "MVIMG_0.jpg": 0, folder / "web_1.jfif": 1})
    fixtures.save_turned(uprights[2], folder / "shared_2.webp", 6, lossless=True)
    made[folder / "shared_2.webp"] = 2
    fixtures.phone_photo(uprights[3], (12000, 9000)).save(folder / "PANO_108MP.jpg", quality=75)
    uprights[0].save(folder / "IMG_0001.HEIC", quality=90)  # pillow-heif
    uprights[1].save(folder / "web_1.avif", quality=80)
    uprights[2].convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "anim_2.gif")
    rgba = uprights[3].convert("RGBA")
    rgba.paste((0, 0, 0, 0), (0, 0, rgba.width, 6))  # a transparent strip, white to the network
    rgba.save(folder / "cutout_3.png")
    Image.fromarray((np.asarray(uprights[0].convert("L"), dtype=np.uint16) * 257)).save(folder / "scan16_0.png")
    made.update({folder / f: None for f in ("PANO_108MP.jpg", "IMG_0001.HEIC", "web_1.avif", "anim_2.gif",
                                            "cutout_3.png", "scan16_0.png")})
    (folder / "notes.jpg").write_text("not a picture\n")
    return made


@pytest.mark.skipif(not (SHARED_CUB.is_dir() and SHARED_WEIGHTS.is_file()), reason="../shared is absent")
def test_a_phones_photos_are_predicted_under_every_loader(tmp_path):
    """The default loader (and each other that installs here) over what a phone and the web produce: 12 MP photos in
    four EXIF orientations, a 108 MP panorama, a Motion Photo, HEIC, AVIF, GIF, lossless WebP with EXIF, .jfif, RGBA
    and 16-bit PNG, and a text file named .jpg: every image predicted, the text file named in a warning, exit 0; each
    copy of an original's pixels, phone-sized too, gets the original's top-1."""
    import bird_loaders
    root = fixtures.real_cub_subset(SHARED_CUB, tmp_path, num_classes=3)
    run = tmp_path / "frozen"
    run_script("finetune_birds.py", "--data-dir", root, "--arch", "tf_efficientnet_lite0", "--weights", SHARED_WEIGHTS,
               "--freeze-backbone", "--img-size", "64", "--batch-size", "32", "--device", "cpu", "--quiet",
               "--epochs", "8", "--lr", "0.01", "--out", run)
    _, test, _ = bird_data.load_cub(root)
    by_class = [[path for path, label, _ in test if label == c] for c in range(3)]
    originals = [by_class[0][0], by_class[1][0], by_class[2][0], by_class[1][1]]
    made = phone_folder(tmp_path / "photos", originals)
    run_inline("predict.py", run / "best.pt", "--images", *originals, "--loader", "torch", "--device", "cpu",
               "--out", tmp_path / "originals.json")
    top1 = [r["top"][0]["name"] for r in json.loads((tmp_path / "originals.json").read_text())]
    assert len(set(top1)) > 1  # a probe that tells the birds apart
    assert bird_loaders.default_loader("cpu") == ("dali" if bird_loaders.dali_available() else "torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # as on a user's 2-core machine (here: this worker's share): predict.py's 2 streams
    try:
        runs = {loader: run_inline("predict.py", run / "best.pt", "--images", tmp_path / "photos", "--loader", loader,
                                   "--device", "cpu", "--out", tmp_path / f"top_{loader}.json")
                for loader in ("auto", "torch", "nvjpeg")}  # auto: DALI where it installs, as here
    finally:
        torch.set_num_threads(threads)
    for loader, proc in runs.items():
        assert f"skipping {tmp_path / 'photos' / 'notes.jpg'}: not an image" in proc.stderr, loader
        assert proc.stderr.count("skipping") == 1, (loader, proc.stderr)
        rows = {Path(r["path"]): r["top"][0]["name"] for r in json.loads((tmp_path / f"top_{loader}.json").read_text())}
        assert set(rows) == set(made), (loader, set(made) - set(rows))
        wrong = [copy.name for copy, k in made.items() if k is not None and rows[copy] != top1[k]]
        assert not wrong, (loader, wrong, top1)
