"""Write a 32x32 CIFAR-format copy of a CUB-layout folder's *training split*: the real-image proxy for CIFAR
recipe decisions when CIFAR-100 itself cannot be downloaded.

    python tools/make_proxy32.py ../shared/data/CUB_200_2011_subset100 proxy32
    python train_cifar.py --data-dir proxy32 --preset cpu5 --val-per-class 5 --device cpu

Only the official training images are used (about 30 a class for the shared subset), each resized to 32x32
(shorter side to 32, centre crop; PIL bilinear with antialiasing) and written as cifar-100-python/{train,test,meta}
pickles with the class names. train_cifar.py carves its validation split from them as usual
(--val-per-class). The test pickle holds 100 black images with all-zero labels, a placeholder that the scripts
never score, so the CUB test split stays untouched for the bird study. Once a recipe has been chosen by validation
accuracy, `--test-split` writes the official test images (same resizing, real labels) as the test pickle instead,
so that its test accuracy can be reported once:

    python tools/make_proxy32.py ../shared/data/CUB_200_2011_subset100 proxy32test --test-split
"""
import argparse
import pickle
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bird_data  # noqa: E402
import data  # noqa: E402


def to32(path):
    with Image.open(path) as im:
        im = bird_data.oriented(im).convert("RGB")
        scale = 32 / min(im.size)
        im = im.resize((max(32, round(im.width * scale)), max(32, round(im.height * scale))), Image.BILINEAR,
                       reducing_gap=None)
        left, top = (im.width - 32) // 2, (im.height - 32) // 2
        return np.asarray(im.crop((left, top, left + 32, top + 32))).transpose(2, 0, 1).reshape(-1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cub_dir", help="CUB_200_2011-layout folder")
    parser.add_argument("out", help="folder to write cifar-100-python/ into")
    parser.add_argument("--test-split", action="store_true",
                        help="write the official test images with their labels as the test pickle (for reporting a "
                             "chosen recipe's test accuracy once), instead of the never-scored placeholder")
    args = parser.parse_args()
    try:
        train, test, classes = bird_data.load_cub(args.cub_dir)
        train, skipped = bird_data.drop_bad_images(train, 0.05, "training images")
        if args.test_split:
            test, _ = bird_data.drop_bad_images(test, 0.05, "test images")
    except data.DataError as e:
        sys.exit(f"error: {e}")
    if len(classes) > 100:
        sys.exit(f"error: {len(classes)} classes; the CIFAR-100 format holds at most 100")
    images = np.stack([to32(p) for p, _, _ in train]).astype(np.uint8)
    labels = [int(label) for _, label, _ in train]
    root = Path(args.out) / "cifar-100-python"
    root.mkdir(parents=True, exist_ok=True)
    names = [c.split(".", 1)[-1] for c in classes] + [f"unused_{i}" for i in range(len(classes), 100)]
    splits = {"train": (images, labels), "test": (np.zeros((100, 3072), np.uint8), [0] * 100)}
    if args.test_split:
        splits["test"] = (np.stack([to32(p) for p, _, _ in test]).astype(np.uint8), [int(y) for _, y, _ in test])
    for split, (x, y) in splits.items():
        with open(root / split, "wb") as f:
            pickle.dump({"data": x, "fine_labels": y, "coarse_labels": [0] * len(y),
                         "filenames": [f"{split}_{i}.png" for i in range(len(y))], "batch_label": split}, f, protocol=4)
    with open(root / "meta", "wb") as f:
        pickle.dump({"fine_label_names": names, "coarse_label_names": [f"super_{i}" for i in range(20)]}, f, protocol=4)
    print(f"wrote {len(labels)} training images of {len(classes)} classes (32x32) to {root}"
          + (f", and {len(splits['test'][1])} test images with their labels" if args.test_split else "")
          + (f"; skipped {len(skipped)} broken" if skipped else ""))


if __name__ == "__main__":
    main()
