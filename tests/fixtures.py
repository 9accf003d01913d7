"""Fixtures in the official on-disk formats, generated on the fly: cifar-100-python pickles
(learnable: each class is a distinct colour pattern plus noise) and a CUB_200_2011 tree."""
import pickle
from pathlib import Path

import numpy as np


def class_patterns(num_classes, seed=0):
    """One smooth colour layout per class (a 4x4 grid of random colours blown up to 32x32), so that
    crops and flips keep the class recognisable, as in real photos."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 256, size=(num_classes, 3, 4, 4)).astype(np.float32)
    return grid.repeat(8, axis=2).repeat(8, axis=3)


def make_cifar_images(labels, patterns, rng, noise=40.0):
    images = patterns[labels] + rng.normal(0, noise, size=(len(labels), 3, 32, 32))
    return np.clip(images, 0, 255).astype(np.uint8).reshape(len(labels), 3072)


def write_cifar100(root, per_class_train=60, per_class_test=10, num_classes=100, seed=0, test_labels=True,
                   protocol=2):
    """cifar-100-python/{train,test,meta} as the official tarball has them (dicts pickled with numpy data)."""
    root = Path(root) / "cifar-100-python"
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    patterns = class_patterns(num_classes, seed)
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        labels = np.repeat(np.arange(num_classes), per_class)
        rng.shuffle(labels)
        images = make_cifar_images(labels, patterns, rng)
        fine = labels.tolist() if (split == "train" or test_labels) else [0] * len(labels)
        d = {"filenames": [f"img_{i}.png" for i in range(len(labels))], "batch_label": f"{split} batch",
             "fine_labels": fine, "coarse_labels": [l // 5 for l in fine], "data": images}
        with open(root / split, "wb") as f:
            pickle.dump(d, f, protocol=protocol)
    with open(root / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class_{i}" for i in range(num_classes)],
                     "coarse_label_names": [f"super_{i}" for i in range(20)]}, f, protocol=protocol)
    return root.parent


def write_cub(root, num_classes=3, per_class=8, size=48, seed=0, broken=True):
    """A tiny CUB_200_2011 tree: text files + JPEG folders; includes a grayscale JPEG, a CMYK JPEG, a PNG saved
    under a .jpg name, an EXIF-rotated JPEG, a progressive JPEG and (with broken=True) a truncated JPEG."""
    from PIL import Image
    root = Path(root) / "CUB_200_2011"
    rng = np.random.default_rng(seed)
    colours = rng.integers(30, 225, size=(num_classes, 3))
    lines = {"images": [], "labels": [], "split": [], "boxes": []}
    classes = [f"{c + 1:03d}.Bird_{c + 1}" for c in range(num_classes)]
    image_id = 0
    for c, name in enumerate(classes):
        (root / "images" / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            image_id += 1
            rel = f"{name}/{name}_{k:04d}.jpg"
            pixels = np.clip(colours[c] + rng.normal(0, 25, size=(size, size + 8, 3)), 0, 255).astype(np.uint8)
            im = Image.fromarray(pixels)
            path = root / "images" / rel
            if image_id == 2:
                im.convert("L").save(path, "JPEG")
            elif image_id == 3:
                im.convert("CMYK").save(path, "JPEG")
            elif image_id == 4:
                im.save(path, "PNG")
            elif image_id == 5:  # shown turned a quarter (EXIF orientation 6): every loader must see it upright
                exif = Image.Exif()
                exif[0x0112] = 6
                im.save(path, "JPEG", quality=90, exif=exif)
            elif image_id == 6:
                im.save(path, "JPEG", quality=90, progressive=True)
            else:
                im.save(path, "JPEG", quality=90)
            lines["images"].append(f"{image_id} {rel}")
            lines["labels"].append(f"{image_id} {c + 1}")
            lines["split"].append(f"{image_id} {int(k < per_class // 2 + 1)}")
            lines["boxes"].append(f"{image_id} 2.0 2.0 {size - 4}.0 {size - 4}.0")
    if broken:
        victim = root / "images" / lines["images"][per_class + 1].split()[1]
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 2])
    (root / "images.txt").write_text("\n".join(lines["images"]) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(lines["labels"]) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(lines["split"]) + "\n")
    (root / "bounding_boxes.txt").write_text("\n".join(lines["boxes"]) + "\n")
    (root / "classes.txt").write_text("\n".join(f"{i + 1} {n}" for i, n in enumerate(classes)) + "\n")
    return root


def real_cub_subset(shared_cub, tmp_path, num_classes):
    """The first classes of the shared real CUB subset, re-listed in the official layout (images linked, not copied)."""
    import os
    root = Path(tmp_path) / "CUB_200_2011"
    (root / "images").mkdir(parents=True)
    classes = (shared_cub / "classes.txt").read_text().split("\n")[:num_classes]
    keep = {line.split()[0] for line in classes}
    labels = dict(l.split() for l in (shared_cub / "image_class_labels.txt").read_text().split("\n") if l)
    ids = {i for i, c in labels.items() if c in keep}
    for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt"):
        lines = [l for l in (shared_cub / name).read_text().split("\n") if l and l.split()[0] in ids]
        (root / name).write_text("\n".join(lines) + "\n")
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    for line in classes:
        os.symlink(shared_cub / "images" / line.split()[1], root / "images" / line.split()[1])
    return root


def phone_photo(upright, size=(4032, 3024)):
    """A phone-sized photo of a (square) bird picture: the picture scaled to the photo's height, in the middle of a
    frame of its own edge colours, so that the eval centre crop sees the bird as the original's centre crop does."""
    from PIL import Image, ImageOps
    side = min(size)
    big = upright.resize((side, side), Image.BILINEAR)
    return ImageOps.pad(big, size, color=tuple(int(v) for v in big.getpixel((0, side // 2))))


def save_turned(photo, path, orientation, **kw):
    """Save an upright PIL picture as a camera stores a turned one: the pixels turned, the EXIF orientation tag
    (1, 3, 6 or 8) saying how to turn them back."""
    from PIL import Image
    turns = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
    exif = Image.Exif()
    exif[0x0112] = orientation
    (photo.transpose(turns[orientation]) if orientation != 1 else photo).save(path, exif=exif, **kw)


def stand_in_nvidia_smi(bin_dir):
    """An nvidia-smi in bin_dir that reports a Tesla T4 on driver 550.54.15 (CUDA 12.4), older than CUDA 13 wheels
    need; returns a PATH with bin_dir first."""
    import os
    bin_dir = Path(bin_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "nvidia-smi").write_text("""#!/bin/sh
case "$*" in
  *--query-gpu*) echo "Tesla T4, 15360, 550.54.15" ;;
  *) echo "| NVIDIA-SMI 550.54.15      Driver Version: 550.54.15      CUDA Version: 12.4     |" ;;
esac
""")
    (bin_dir / "nvidia-smi").chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Write small generated data sets in the official layouts "
                                                 "(used by the tests and by run_all.sh --smoke).")
    parser.add_argument("what", choices=["cifar", "cub"], help="cifar: cifar-100-python pickles; cub: CUB_200_2011 tree")
    parser.add_argument("out", help="folder to write into")
    parser.add_argument("--per-class", type=int, default=40, help="training images per class")
    parser.add_argument("--classes", type=int, default=5, help="classes (cub only; cifar always has 100)")
    args = parser.parse_args()
    if args.what == "cifar":
        print(write_cifar100(args.out, per_class_train=args.per_class, per_class_test=max(2, args.per_class // 5)))
    else:
        print(write_cub(args.out, num_classes=args.classes, per_class=args.per_class, size=80, broken=False))
