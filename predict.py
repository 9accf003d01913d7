"""Predict with saved checkpoints: the competition CSV ("Id","Prediction1") of a data set's test split, or the top
classes of any images (your own photos) by name, with Grad-CAM pictures of where the network looked. One checkpoint,
or an ensemble of several (their softmax averaged), each with optional test-time augmentation.

    python predict.py runs/cifar/best.pt --data-dir data --out submission.csv --tta flip,shift
    python predict.py runs/final/seed*/best.pt --data-dir data --out ensemble.csv --tta flip
    python predict.py runs/birds/best.pt --data-dir data/CUB_200_2011 --out birds.csv
    python predict.py runs/basenet/best.pt runs/d8/best.pt --data-dir data --out mixed.csv  # any two CIFAR models
    python predict.py runs/birds/best.pt --images photos/ garden.png 'trip/*.webp' --top 3 --out top3.csv
    python predict.py runs/birds/best.pt --images photos/ --explain cams/   # one Grad-CAM PNG per image

Each checkpoint says which network and which preprocessing it needs (CIFAR-100 or birds; its normalisation and
image size) and its class names, and each member of an ensemble is evaluated through its own; they must share the data
set and its classes. --images takes files, folders (searched recursively; what is left out is said) and globs, any
image Pillow opens (JPEG, PNG, GIF, WebP, AVIF, TIFF, BMP, HEIC/HEIF; a Motion Photo's JPEG; transparency on white;
a phone's 12-108 MP JPEG decoded at the fraction of its size the crop needs), upright as its EXIF orientation says,
through the checkpoint's own evaluation preprocessing: a bird model's resize and centre crop (its loader), a CIFAR
model's centred square resized to 32 px; so a picture gets the answer it would get as a test image of --data-dir.
Checkpoints are loaded with weights_only=True, to the CPU. Test accuracy is printed where the test labels are real.
On a CPU two batches are in flight (--streams): one is loaded while the other is computed.
"""
import argparse
import csv
import glob
import io
import json
import math
from pathlib import Path

import numpy as np
import torch

import bird_data
import bird_loaders
import checkpoints
import data
import devices
import engine
import flags
import run_files
import models


GPU_BATCH = 256  # --batch-size on a GPU
CPU_BATCH_PIXELS = 2 ** 18  # images x pixels of a CPU batch whose activations stay in the caches (Lite0, measured)
CPU_STREAMS = 2  # batches in flight on a CPU, each on its share of the threads: one loads while another computes


def batch_size(args, device, img_size):
    """--batch-size, or by default from the device the run resolved and the checkpoint's image size: 256 on a GPU; on
    a CPU the power of two nearest CPU_BATCH_PIXELS / img_size**2 images, at most 32 (32 and 64 px: 32, 128 px: 16,
    160 px: 8, 224 px: 4): at 128 px 1.2x faster than a batch of 8 or 32, at 160 px 2.7x faster than one of 256
    (BENCHMARKS.md)."""
    if args.batch_size:
        return args.batch_size
    if device.type == "cuda":
        return GPU_BATCH
    return int(min(32, 2 ** round(math.log2(CPU_BATCH_PIXELS / img_size ** 2))))


def streams(args, device):
    """--streams, or by default from the device the run resolved: on a CPU with two or more torch threads
    CPU_STREAMS, each on its share of them (one stream's loading then overlaps the other's forward pass: 1.1-1.3x on 2
    cores, BENCHMARKS.md "Two prediction streams"); on a GPU one (the loading runs beside it already)."""
    if args.streams:
        return args.streams
    return CPU_STREAMS if device.type == "cpu" and torch.get_num_threads() >= 2 else 1


def bird_eval_loader(args, device, cfg, samples, **kw):
    """A bird checkpoint's evaluation loader over samples: its image size and normalisation, this run's --loader,
    batch and workers, and channels-last batches, the layout load_model's model takes (no copy between them)."""
    return bird_loaders.bird_loader(args.loader, samples, cfg["img_size"], batch_size(args, device, cfg["img_size"]),
                                    False, cfg["mean"], cfg["std"], device, workers=args.workers, channels_last=True,
                                    **kw)


def parse_args(argv=None):
    parser = flags.ArgumentParser(__doc__)
    parser.add_argument("checkpoints", nargs="+", metavar="checkpoint",
                        help="best.pt (or last.pt: with the EMA's weights where the run kept one) written by "
                             "train_cifar.py or finetune_birds.py; several: an ensemble "
                             "(same data set and classes; each through its own preprocessing: normalisation, image "
                             "size), softmax averaged")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir", help="the data set the checkpoint was trained for: its test split to the "
                                           "competition CSV")
    source.add_argument("--images", nargs="+", metavar="PATH",
                        help="image files, folders (searched recursively for image files) or globs: each image's top "
                             "classes, one printed line per image")
    parser.add_argument("--out", help="file to write: with --data-dir the competition CSV (required); with --images a "
                                      "CSV (path, name_1, prob_1, ..., name_K, prob_K), or JSON where it ends in .json")
    parser.add_argument("--top", type=int, default=5, metavar="K", help="--images: the K most probable classes")
    parser.add_argument("--explain", metavar="DIR",
                        help="--images: one PNG per image into DIR: the image as the (first) network saw it, its "
                             "Grad-CAM map for the top class on the last convolutional stage (captum), the top-3 names")
    parser.add_argument("--tta", type=engine.TTA, nargs="?", const="flip", default="none",
                        help="test-time augmentation: none, flip, or flip,shift (mirror and one-pixel shifts)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per forward pass; default: %d on a GPU; on a CPU about 2**18 / image size**2, at "
                             "most 32 (128 px: 16, 224 px: 4; a larger batch is slower per image there: BENCHMARKS.md)"
                             % GPU_BATCH)
    parser.add_argument("--streams", type=int, default=None,
                        help="batches predicted at once, each by its own thread on its share of torch's threads, so "
                             "one loads while another computes; default: %d on a CPU with two or more threads, 1 on a "
                             "GPU" % CPU_STREAMS)
    parser.add_argument("--loader", choices=bird_loaders.LOADERS, default="auto", help="bird image loader; " + bird_loaders.LOADER_HELP)
    parser.add_argument("--workers", type=int, default=None,
                        help="decoding workers for bird images; default: this process's share of the CPU cores, at "
                             "most 16 (the torch loader on a CPU: none, PIL decodes in this process, which is faster "
                             "than worker processes beside the model's threads: BENCHMARKS.md)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="autocast: bf16, or fp16 on a GPU without bf16 in hardware (T4, V100); default: on for CUDA")
    return parser.parse_args(argv)


DATASETS = {"cifar100": "CIFAR-100", "cub2011": "CUB-200-2011", "folder": "an image folder"}


class TestSets:
    """Each checkpoint's own test-time preprocessing over the test split of --data-dir. The data set is read
    once; a loader is built once per distinct preprocessing (normalisation, image size, crop boxes), so the
    members of an ensemble may differ in all of those but must share the data set."""

    def __init__(self, args, device):
        self.args, self.device, self.loaders, self.dataset, self.first = args, device, {}, None, None
        self._cifar, self._birds = None, {}

    def loader(self, ckpt, path):
        """(loader, number of classes) for this checkpoint's data_config."""
        cfg = ckpt.get("data_config") or {}
        dataset = cfg.get("dataset")
        if dataset not in DATASETS:
            raise flags.UsageError(f"{path} does not say which data set it was trained on")
        if self.dataset is None:
            self.dataset, self.first = dataset, path
        elif dataset != self.dataset:
            raise flags.UsageError(f"{path} was trained on {DATASETS[dataset]} but {self.first} on "
                                    f"{DATASETS[self.dataset]}: an ensemble needs one data set")
        key = json.dumps(cfg, sort_keys=True)
        if key not in self.loaders:
            self.loaders[key] = self._build(cfg)
        return self.loaders[key]

    def _build(self, cfg):
        args, device = self.args, self.device
        if cfg["dataset"] == "cifar100":
            if self._cifar is None:
                cifar = data.load_cifar100(args.data_dir)
                self._cifar = (torch.from_numpy(cifar["test_x"]).to(device), torch.from_numpy(cifar["test_y"]).to(device),
                               len(cifar["classes"]))
            x, y, num_classes = self._cifar
            batch = batch_size(args, device, 32)
            return data.DeviceLoader(x, y, batch, mean=cfg["mean"], std=cfg["std"]), num_classes
        boxes = cfg.get("crop_boxes", False)
        if boxes not in self._birds:
            if cfg["dataset"] == "cub2011":
                _, test, classes = bird_data.load_cub(args.data_dir, boxes)
            else:
                _, test, classes = bird_data.load_image_folder(args.data_dir)
            self._birds[boxes] = (test, len(classes))
        test, num_classes = self._birds[boxes]
        return bird_eval_loader(args, device, cfg, test, keep_broken=True), num_classes


def load_model(ckpt, path, device, num_classes=None, data_dir=None, quiet=False):
    """The checkpoint's network on the device (checkpoints are loaded to the CPU; load_state_dict moves them), with the
    weights it predicts with (checkpoints.eval_weights: last.pt's EMA where it has one); `num_classes`: the data set's,
    which the checkpoint must predict; quiet: the note on which weights left unsaid (said once per run already)."""
    if num_classes is not None and ckpt["model_config"].get("num_classes") != num_classes:
        raise flags.UsageError(f"{path} predicts {ckpt['model_config'].get('num_classes')} classes but "
                                f"{data_dir} has {num_classes}: checkpoint and data set do not match")
    # channels-last: the layout the convolutions of oneDNN (CPU) and cuDNN (GPU) run fastest in (BENCHMARKS.md)
    model = models.build_model(ckpt["model_config"]).to(device, memory_format=torch.channels_last)
    weights, note = checkpoints.eval_weights(ckpt)
    if note and not quiet:
        print(f"{path}: predicting with {note}")
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1:2] or [""]
        raise flags.UsageError(f"{path} holds weights of a different model than its config "
                                f"describes ({first[0].strip()})") from None
    return model


def main(argv=None):
    args = parse_args(argv)
    flags.require(args.batch_size is None or args.batch_size >= 1, "--batch-size", args.batch_size, "at least 1")
    flags.require(args.workers is None or args.workers >= 0, "--workers", args.workers, ">= 0")
    flags.require(args.streams is None or args.streams >= 1, "--streams", args.streams, "at least 1")
    flags.require(args.top >= 1, "--top", args.top, "at least 1")
    if args.data_dir is not None and (args.out is None or args.explain):
        raise flags.UsageError("--data-dir writes the competition CSV: it needs --out, and --explain goes with "
                               "--images")
    tta = engine.TTA.names(args.tta)
    device = devices.pick_device(args.device)
    amp = device.type == "cuda" if args.amp is None else args.amp
    if args.loader == "auto":  # resolved once: its choice may come with a line of its own
        args.loader = bird_loaders.default_loader(device)
    if args.workers is None and device.type == "cpu" and args.loader == "torch":
        args.workers = 0  # PIL in this process: worker processes would take the cores the model's threads run on
    if args.images:
        return predict_images(args, device, amp, tta)
    sets = TestSets(args, device)
    probs, labels = None, None
    for path in args.checkpoints:  # one at a time: only one network is in memory
        ckpt = checkpoints.load_checkpoint(path)
        loader, n = sets.loader(ckpt, path)
        model = load_model(ckpt, path, device, n, args.data_dir)  # refuses a class count unlike the data set's
        p, y = engine.predict_probs(model, loader, device, amp, tta, streams=streams(args, device))
        if labels is not None and not torch.equal(y, labels):  # every loader lists the test split in one order
            raise flags.UsageError(f"{path} sees the test images in another order than {sets.first}")
        probs, labels = (p, y) if probs is None else (probs + p, labels)
    for loader, _ in sets.loaders.values():
        loader.close()
    test_acc = run_files.write_predictions(args.out, probs / len(args.checkpoints), labels)
    what = f"an ensemble of {len(args.checkpoints)} checkpoints" if len(args.checkpoints) > 1 else "one checkpoint"
    print(f"wrote {len(labels)} predictions from {what} to {args.out}"
          + ("" if test_acc is None else f"; test accuracy {test_acc:.4f}"))


# ----------------------------------------------------------------------------- --images: any picture

def find_images(patterns):
    """The image files of --images, sorted within each argument: a file as it is, a folder's image files (by their
    suffix, recursively; what it leaves out is said, one line per reason), a glob's matches. A path that matches
    nothing is one sentence."""
    found = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            files = [p for p in path.rglob("*") if p.is_file()]
            skipped = bird_data.left_out(files)
            bird_data.say_left_out(skipped, f"--images {pattern}")
            skipped = {f for fs in skipped.values() for f in fs}
            matches = [p for p in files if p not in skipped]
        elif path.is_file():
            matches = [path]
        else:
            matches = [Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file()]
            if not matches:
                raise flags.UsageError(f"--images {pattern}: no such file or folder, and no file matches it")
        found += sorted(matches)
    found = list(dict.fromkeys(found))  # each file once, in the order given
    if not found:
        raise flags.UsageError(f"--images {' '.join(patterns)}: no image files found (looked for "
                               f"{', '.join(sorted(bird_data.IMAGE_EXTENSIONS))})")
    return found


def unreadable(path):
    """Why --images leaves an image out before decoding it (None: it is kept): not an image Pillow opens, a truncated
    file, or more pixels than Pillow's decompression-bomb limit. A JPEG may hold more: it is decoded at a fraction of
    its size (bird_data.draft), up to twice the limit, where Pillow refuses to open any file."""
    from PIL import Image
    try:
        with bird_data.quiet_bombs(), Image.open(path) as im:
            (width, height), fmt = im.size, im.format
    except Image.DecompressionBombError:
        return f"more pixels than Pillow's decompression-bomb limit allows to open ({2 * Image.MAX_IMAGE_PIXELS:,})"
    except Exception as e:
        return f"not an image Pillow opens ({type(e).__name__})"
    return bird_data.too_many_pixels(fmt, width, height) or bird_data.check_image_file(path)  # or a truncated file


def readable_images(paths):
    """The paths --images decodes, each other file named in one warning (`unreadable`) and left out."""
    kept = []
    for path in paths:
        why = unreadable(path)
        if why is None:
            kept.append(path)
        else:
            data.warn(f"skipping {path}: {why}")
    if not kept:
        raise data.DataError(f"none of the {len(paths)} files of --images is an image this can decode")
    return kept


def cifar_view(path, size=32):
    """A picture as a CIFAR model sees one: upright, RGB (transparency on white), its centred square resized to 32 px
    (Pillow's antialiased bilinear; a 32x32 image, a CIFAR test image, is unchanged; a large JPEG decoded at the
    fraction of its size that still covers 32 px): uint8 (3, 32, 32)."""
    from PIL import Image
    with bird_data.quiet_bombs(), Image.open(path) as im:
        bird_data.draft(im, bird_data.dct_factor(min(im.size) / size))
        im = bird_data.to_rgb(bird_data.oriented(im))
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


def image_loader(ckpt, path, paths, args, device):
    """The images through the checkpoint's own evaluation preprocessing, batched: (images, index into paths). A
    bird model's: its loader's resize and centre crop (--loader); a CIFAR model's: cifar_view. A file that does not
    decode is skipped with a warning."""
    cfg = ckpt.get("data_config") or {}
    if cfg.get("dataset") not in DATASETS:
        raise flags.UsageError(f"{path} does not say which data set it was trained on")
    if cfg["dataset"] != "cifar100":
        samples = [(str(p), i, None) for i, p in enumerate(paths)]
        return bird_eval_loader(args, device, cfg, samples)
    images, index = [], []
    for i, p in enumerate(paths):
        try:
            images.append(cifar_view(p))
            index.append(i)
        except Exception as e:  # passed the header check, yet does not decode
            bird_data.warn_broken(str(p), f"cannot decode ({type(e).__name__}: {e})", keep=False)
    x = torch.stack(images) if images else torch.zeros(0, 3, 32, 32, dtype=torch.uint8)
    return data.DeviceLoader(x.to(device), torch.tensor(index, dtype=torch.long).to(device),
                             batch_size(args, device, 32), mean=cfg["mean"], std=cfg["std"])


def class_names(ckpt, path, names_so_far):
    """The checkpoint's class names (data_config), which every member of an ensemble must share; a checkpoint written
    before they were stored: its class indices, said in one line."""
    names = (ckpt.get("data_config") or {}).get("classes")
    if names is None:
        names = [str(i) for i in range(ckpt["model_config"]["num_classes"])]
        print(f"{path} holds no class names (saved before checkpoints carried them): classes are shown by index")
    if names_so_far is not None and list(names) != list(names_so_far):
        raise flags.UsageError(f"{path} predicts other classes than the checkpoint before it: an ensemble needs one "
                               f"set of classes")
    return list(names)


def predict_images(args, device, amp, tta):
    """--images: every checkpoint's softmax over the readable images, averaged; one printed line per image with its
    top-K names, --out as CSV or JSON, --explain's Grad-CAM pictures."""
    paths = readable_images(find_images(args.images))
    probs, index, names = None, None, None
    for path in args.checkpoints:  # one at a time: only one network is in memory
        ckpt = checkpoints.load_checkpoint(path)
        names = class_names(ckpt, path, names)
        loader = image_loader(ckpt, path, paths, args, device)
        model = load_model(ckpt, path, device)
        if args.explain and path == args.checkpoints[0]:
            refuse_non_convolutional(model)
        p, i = engine.predict_probs(model, loader, device, amp, tta, progress=True, desc=f"predict {Path(path).name}",
                                    streams=streams(args, device))
        loader.close()
        order = i.argsort()
        p, i = p[order], i[order]
        if index is not None and not torch.equal(i, index):
            raise data.DataError(f"{path}'s loader decoded other images than {args.checkpoints[0]}'s")
        probs, index = (p, i) if probs is None else (probs + p, index)
    if not len(index):
        raise data.DataError("no image of --images could be decoded")
    probs = probs / len(args.checkpoints)
    top_p, top_c = probs.topk(min(args.top, probs.shape[1]), dim=1)
    rows = [(str(paths[i]), [(names[c], float(pr)) for c, pr in zip(cs, ps, strict=True)])
            for i, cs, ps in zip(index.tolist(), top_c.tolist(), top_p.tolist(), strict=True)]
    for path, top in rows:
        print(f"{path}  " + "  ".join(f"{name} {p:.3f}" for name, p in top))
    if args.out:
        write_top(args.out, rows)
    if args.explain:
        explain_images(args, [paths[i] for i in index.tolist()], probs, names, device)
    what = f"an ensemble of {len(args.checkpoints)} checkpoints" if len(args.checkpoints) > 1 else "one checkpoint"
    print(f"predicted {len(rows)} images with {what}" + (f"; wrote {args.out}" if args.out else ""))


def write_top(out, rows):
    """--out: JSON where the name ends in .json, else CSV with the columns path, name_1, prob_1, ..., name_K, prob_K."""
    if str(out).lower().endswith(".json"):
        text = json.dumps([{"path": path, "top": [{"name": n, "prob": round(p, 6)} for n, p in top]}
                           for path, top in rows], indent=1) + "\n"
    else:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        k = len(rows[0][1])
        writer.writerow(["path", *[f"{col}_{r}" for r in range(1, k + 1) for col in ("name", "prob")]])
        writer.writerows([path, *[v for n, p in top for v in (n, f"{p:.6f}")]] for path, top in rows)
        text = buf.getvalue()
    run_files.atomic_write_text(out, text)


def refuse_non_convolutional(model):
    """--explain's Grad-CAM needs a convolutional network: a transformer is one sentence before any work."""
    import explain
    try:
        explain.check_convolutional(model)
    except explain.NotConvolutional as e:
        raise flags.UsageError(f"--explain: {e}") from None


def explain_images(args, paths, probs, names, device):
    """--explain DIR: the first checkpoint's Grad-CAM map of the (ensemble's) top class of each image, on its last
    convolutional stage, in float32 (explain.CHUNK images per backward pass, whatever --batch-size is); one PNG per
    image, numbered in the order of the printed lines, titled with the checkpoint as given."""
    import explain
    path = args.checkpoints[0]
    ckpt = checkpoints.load_checkpoint(path)
    model, cfg = load_model(ckpt, path, device, quiet=True), ckpt["data_config"]
    loader = image_loader(ckpt, path, paths, args, device)
    layer = None
    for x, idx in loader:
        if layer is None:
            layer_name, layer = explain.last_conv_stage(model, (1, *x.shape[1:]))
        cams = explain.grad_cam(model, layer, x, probs[idx.cpu()].argmax(1))
        for xi, i, cam in zip(x, idx.tolist(), cams, strict=True):
            top_p, top_c = probs[i].topk(min(3, probs.shape[1]))
            explain.draw(Path(args.explain) / f"{i + 1:05d}_{Path(paths[i]).stem}.png",
                         explain.to_picture(xi, cfg["mean"], cfg["std"]), cam.numpy(),
                         [(names[c], float(p)) for c, p in zip(top_c.tolist(), top_p.tolist(), strict=True)],
                         f"{paths[i]}\n{path}, Grad-CAM on {layer_name}")
    loader.close()
    print(f"wrote {len(paths)} Grad-CAM pictures to {args.explain} ({Path(path).name}'s {layer_name})")


if __name__ == "__main__":
    engine.cli(main)
