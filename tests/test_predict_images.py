"""predict.py --images on the shared real birds: a user's folder of photos (renamed, nested, re-encoded, rotated,
grey, CMYK, and a text file named .jpg) gets the answers the test split gets."""
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

import bird_data
import fixtures
from conftest import SHARED_CUB, SHARED_WEIGHTS, run_script

# EXIF orientation: how to turn the upright picture so that the tag turns it back (Pillow's transpose methods)
ROTATIONS = {3: "ROTATE_180", 6: "ROTATE_90", 8: "ROTATE_270"}


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
        orientation = (3, 6, 8)[k % 3]
        exif = Image.Exif()
        exif[0x0112] = orientation
        turned = upright.transpose(getattr(Image.Transpose, ROTATIONS[orientation]))
        turned.save(folder / f"rotated_{k}.png", exif=exif)  # upright again only through its EXIF orientation
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
    run_script("predict.py", run / "best.pt", "--data-dir", root, "--out", tmp_path / "test.csv", "--loader", "torch")
    submitted = pd.read_csv(tmp_path / "test.csv").Prediction1
    _, test, classes = bird_data.load_cub(root)
    made = photo_folder(tmp_path / "photos", test, 4)
    proc = run_script("predict.py", run / "best.pt", "--images", tmp_path / "photos", "--loader", "torch",
                      "--out", tmp_path / "top.json", "--explain", tmp_path / "cams")
    assert f"skipping {tmp_path / 'photos' / 'notes.jpg'}: not an image" in proc.stderr
    rows = {Path(r["path"]): r["top"] for r in json.loads((tmp_path / "top.json").read_text())}
    assert set(rows) == set(made) and all(len(top) == 3 for top in rows.values())
    names = [bird_data.display_name(c) for c in classes]
    for copy, k in made.items():
        if k is not None:  # the original's pixels: the test split's answer, by name
            assert rows[copy][0]["name"] == names[submitted[k]], copy
    assert len(list((tmp_path / "cams").glob("*.png"))) == len(made)
