"""Data for both jobs: CIFAR-100 and Caltech-UCSD Birds, from disk to batches on the device.

CIFAR-100 (official `cifar-100-python` pickles) is read with a restricted unpickler, split
45k/5k (stratified, seeded), and kept on the device as one uint8 tensor; crop/flip/cutout
and normalisation run batched on the device (`DeviceLoader`). Birds (CUB-200-2011, the
2010 edition or any train/ test/ image folder) are decoded by DALI (nvJPEG on the GPU, or
DALI's CPU decoder; `DaliImageLoader`), by torchvision's batched nvJPEG with batched resampling
on the device (`NvjpegImageLoader`), or by PIL in DataLoader workers (`TorchImageLoader`); all
three draw their sample order from the same `EpochSampler`, each crop and mirror from the same
`draw_augmentation`, and resize as Pillow does, so they apply the same preprocessing.

Every loader yields `(images, labels)` already on the device, float and normalised, and
has `set_epoch(epoch)`, `len()` (batches per epoch) and `start_step` (to resume mid-epoch).
Nothing here trains; `python data.py --help` offers the downloads.
"""
import argparse
import contextlib
import functools
import hashlib
import io
import math
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F


class DataError(Exception):
    """Bad input data: the message is one sentence meant for the user."""


def warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


_WARNED_BROKEN = set()  # the files this process has warned about


def warn_broken(path, why, keep):
    """The one warning for a broken image file, once per file and process, saying what happens to it: skipped (a
    training image) or, with keep (a test image, which must keep its row), replaced by a black image."""
    if path not in _WARNED_BROKEN:
        _WARNED_BROKEN.add(path)
        warn(f"{'black image for' if keep else 'skipping'} {path}: {why}")


# ----------------------------------------------------------------------------- downloads

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
CUB2011_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
CUB2011_MD5 = "97eceeb196236b17998738112f37df78"


def md5sum(path, chunk=1 << 20):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def download(url, dest, md5):
    """Fetch url to dest, resuming a partial `.part` file with an HTTP Range request."""
    dest = Path(dest)
    if dest.exists() and md5sum(dest) == md5:
        return dest
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            if have and response.status != 206:  # server ignored the range: start over
                have = 0
            with open(part, "ab" if have else "wb") as f:
                shutil.copyfileobj(response, f, length=1 << 20)
    except (urllib.error.URLError, OSError) as e:
        raise DataError(f"could not download {url} ({e}); fetch it by hand and save it as {dest}, "
                        f"then run again") from None
    if md5sum(part) != md5:
        part.unlink()
        raise DataError(f"{url} downloaded with the wrong md5 (expected {md5}); the partial file was "
                        f"removed, run again to retry")
    os.replace(part, dest)
    return dest


def extract_atomically(archive, into, top_name):
    """Unpack archive so that `into/top_name` appears whole or not at all."""
    into = Path(into)
    if (into / top_name).exists():
        return into / top_name
    with tempfile.TemporaryDirectory(dir=into, prefix=".extract-") as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")  # 'data' filter refuses absolute paths, links out, devices
        os.replace(Path(tmp) / top_name, into / top_name)
    return into / top_name


def download_cifar100(data_dir):
    archive = download(CIFAR100_URL, Path(data_dir) / "cifar-100-python.tar.gz", CIFAR100_MD5)
    return extract_atomically(archive, data_dir, "cifar-100-python")


def download_cub2011(data_dir):
    archive = download(CUB2011_URL, Path(data_dir) / "CUB_200_2011.tgz", CUB2011_MD5)
    return extract_atomically(archive, data_dir, "CUB_200_2011")


# ----------------------------------------------------------------------------- CIFAR-100

class RefusedGlobal(pickle.UnpicklingError):
    pass


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only what the cifar-100-python files need: plain containers and numpy arrays."""
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise RefusedGlobal(f"refused to load {module}.{name}: not part of the CIFAR format")


def safe_unpickle(path):
    """Load a CIFAR pickle without ever running code from it; keys come back as str."""
    try:
        with open(path, "rb") as f:
            obj = RestrictedUnpickler(f, encoding="latin1").load()
    except RefusedGlobal as e:
        raise DataError(f"{path} is not a safe CIFAR pickle: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            MemoryError, OverflowError, RecursionError) as e:  # a corrupt length or shape can ask for any size
        raise DataError(f"{path} is truncated or corrupt ({type(e).__name__}: {' '.join(str(e).split())})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} does not hold a dict as the CIFAR format does")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def find_cifar_dir(data_dir):
    data_dir = Path(data_dir)
    for candidate in (data_dir / "cifar-100-python", data_dir):
        if all((candidate / name).is_file() for name in ("train", "test", "meta")):
            return candidate
    if not data_dir.exists():
        raise DataError(f"data directory {data_dir} does not exist; pass --download to fetch CIFAR-100 "
                        f"or point --data-dir at the folder holding cifar-100-python/")
    raise DataError(f"{data_dir} does not hold cifar-100-python/{{train,test,meta}}; download "
                    f"{CIFAR100_URL} and unpack it there, or pass --download")


def _cifar_split(path, num_classes):
    d = safe_unpickle(path)
    if "data" not in d or "fine_labels" not in d:
        raise DataError(f"{path} lacks the 'data' or 'fine_labels' key of the CIFAR-100 format")
    images = np.asarray(d["data"])
    labels = np.asarray(d["fine_labels"], dtype=np.int64)
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3072:
        raise DataError(f"{path}: 'data' must be uint8 of shape (N, 3072), got {images.dtype} {images.shape}")
    if len(labels) != len(images):
        raise DataError(f"{path} has {len(images)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path} has labels outside 0..{num_classes - 1} (min {labels.min()}, max {labels.max()})")
    return images.reshape(-1, 3, 32, 32), labels


def load_cifar100(data_dir, download_if_missing=False):
    """Return dict with train/test uint8 images (N,3,32,32), int64 labels and class names."""
    if download_if_missing:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        if not (Path(data_dir) / "cifar-100-python").exists():
            download_cifar100(data_dir)
    root = find_cifar_dir(data_dir)
    meta = safe_unpickle(root / "meta")
    names = list(meta.get("fine_label_names", [str(i) for i in range(100)]))
    train_x, train_y = _cifar_split(root / "train", len(names))
    test_x, test_y = _cifar_split(root / "test", len(names))
    return dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, classes=names)


def stratified_split(labels, val_per_class=None, val_frac=None, seed=0):
    """Split indices into (train, val): the same number per class goes to val, chosen by seed.

    With val_frac each class gives round(frac * count) (at least one where it has two or more).
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    if val_per_class is not None:
        classes, counts = np.unique(labels, return_counts=True)
        if val_per_class < 0 or counts.min() <= val_per_class:
            raise DataError(f"--val-per-class {val_per_class} leaves no training images for class {classes[counts.argmin()]}, "
                            f"which has {counts.min()}; use a value below {counts.min()}")
    train_idx, val_idx = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = val_per_class if val_per_class is not None else int(round(val_frac * len(idx)))
        if val_frac and len(idx) >= 2:
            n_val = max(n_val, 1)
        n_val = min(n_val, len(idx) - 1) if len(idx) > 1 else 0
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


def labels_are_real(labels):
    """Competition copies ship the test set with all-zero labels; those must not be scored."""
    return len(labels) > 0 and bool(np.any(np.asarray(labels) != 0))


# ----------------------------------------------------------------------------- device loader

class EpochSampler:
    """The order of samples for an epoch: a permutation drawn from (seed, epoch), cut into global
    batches; under DDP each rank takes every world-th sample of each global batch, so the union of
    ranks sees exactly what a single process with the same global batch would see."""

    def __init__(self, n, batch_size, shuffle, seed=0, drop_last=False, rank=0, world=1):
        if batch_size % world:
            raise DataError(f"batch size {batch_size} is not divisible by the {world} processes")
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.drop_last, self.rank, self.world = drop_last, rank, world
        self.epoch = 0

    def generator(self, salt=0):
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 7919 + salt)

    def order(self):
        if self.shuffle:
            return torch.randperm(self.n, generator=self.generator())
        return torch.arange(self.n)

    def __len__(self):
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def sample_seeds(self, pos):
        """Seeds for the augmentation of the samples at these positions of this epoch's order."""
        return [self.seed * 1_000_003 + self.epoch * 7919 + int(p) for p in pos]

    def batches(self, start_step=0):
        """Yield (positions in the epoch order, sample indices) of this rank, batch by batch."""
        order = self.order()
        for step in range(start_step, len(self)):
            pos = torch.arange(step * self.batch_size, min((step + 1) * self.batch_size, self.n))
            pos = pos[self.rank::self.world]
            yield pos, order[pos]


class SampledLoader:
    """What every loader shares: an EpochSampler, `set_epoch`, `len()` in batches and `start_step`
    (the step of the epoch the next iteration starts at, for resuming mid-epoch)."""
    sampler: EpochSampler
    start_step = 0

    def set_epoch(self, epoch):
        self.sampler.epoch = epoch

    def __len__(self):
        return len(self.sampler)

    def _epoch_items(self):
        """This epoch's batches from start_step on, each a list of (sample index, augmentation seed); start_step is
        used once."""
        batches = [list(zip(idx.tolist(), self.sampler.sample_seeds(pos), strict=True))
                   for pos, idx in self.sampler.batches(self.start_step)]
        self.start_step = 0
        return batches


def augment_batch(images, idx, shifts=None, flips=None, centres=None, pad=0, cutout=0, scale=1 / 255, bias=0.0):
    """Gather images[idx] with a random crop, mirror and cutout, and normalise, in one pass.

    `images` is uint8 (M, N, C, H + 2*pad, W + 2*pad): the data set zero-padded by `pad`, and with
    M == 2 its mirror image as images[1], so a mirrored crop is a plain crop of the mirrored copy.
    `shifts` (B, 2) pick the crop's top-left corner in 0..2*pad, `flips` (B,) mirror (needs M == 2),
    `centres` (B, 2) place a cutout x cutout square (pixels set to 0 before normalising).
    Output: float (x * scale + bias), shape (B, C, H, W).
    """
    hp, wp = images.shape[-2:]
    h, w = hp - 2 * pad, wp - 2 * pad
    # Every possible crop as a view: windows[m, i, :, dy, dx] is image i cropped at (dy, dx). Indexing
    # it with B (mirror, image, dy, dx) tuples is one gather, where cropping and mirroring as separate
    # steps (or through a per-pixel index grid) costs several passes over the batch.
    windows = images.unfold(3, h, 1).unfold(4, w, 1)  # (M, N, C, 2*pad+1, 2*pad+1, H, W), a view
    dy = shifts[:, 0] if shifts is not None else torch.full_like(idx, pad)
    dx = shifts[:, 1] if shifts is not None else torch.full_like(idx, pad)
    mirror = torch.zeros_like(idx)
    if flips is not None:
        dx = torch.where(flips, 2 * pad - dx, dx)  # column offset of the same crop in the mirrored copy
        mirror = flips.long()
    out = windows[mirror, idx, :, dy, dx]  # (B, C, H, W)
    if centres is not None and cutout:
        top, left = centres[:, 0] - cutout // 2, centres[:, 1] - cutout // 2
        out = out.masked_fill(box_mask(top, top + cutout, left, left + cutout, h, w), 0)
    return torch.addcmul(torch.as_tensor(bias, device=out.device), out.float(), torch.as_tensor(scale, device=out.device))


def box_mask(y0, y1, x0, x1, h, w):
    """(B, 1, H, W) bool: True inside each sample's box, rows y0..y1-1 and columns x0..x1-1 (B-long tensors)."""
    rows = torch.arange(h, device=y0.device).view(1, h)
    cols = torch.arange(w, device=x0.device).view(1, w)
    inside_rows = (rows >= y0.view(-1, 1)) & (rows < y1.view(-1, 1))
    inside_cols = (cols >= x0.view(-1, 1)) & (cols < x1.view(-1, 1))
    return inside_rows.view(-1, 1, h, 1) & inside_cols.view(-1, 1, 1, w)


def mix_batch(x, y, num_classes, seed, mixup=0.0, cutmix=0.0, prob=1.0, smoothing=0.0, switch_prob=0.5):
    """MixUp / CutMix per sample, on the batch's device: (mixed images, soft targets of shape (B, classes)).

    Sample i is mixed with sample B-1-i (the batch reversed, as timm does) with probability `prob`: by MixUp
    (x = lam x_i + (1 - lam) x_j) or by CutMix (a box of area about (1 - lam) pasted from x_j, lam then set to
    the kept area), each drawn per sample, lam ~ Beta(alpha, alpha); with both alphas, CutMix with probability
    `switch_prob`. Targets: lam onehot(y_i) + (1 - lam) onehot(y_j), then label smoothing; every row sums to 1.

    Written here rather than taken from timm's Mixup (its per-sample mode loops over the batch in Python, and it
    draws from numpy's global RNG): every draw comes from `seed`, a function of (run seed, epoch, step), like the
    loader's crops and flips, so a resumed run mixes exactly as the uninterrupted one, with no host sync.
    """
    b, _, h, w = x.shape
    rng = np.random.default_rng(seed)
    use = rng.random(b) < prob
    cut = rng.random(b) < (switch_prob if (mixup and cutmix) else (1.0 if cutmix else 0.0))
    alpha = np.where(cut, cutmix or 1.0, mixup or 1.0)
    lam = np.where(use, rng.beta(alpha, alpha), 1.0)
    # CutMix box: side ratio sqrt(1 - lam), centre uniform, clipped to the image; lam becomes the kept area
    cy, cx = rng.integers(0, h, b), rng.integers(0, w, b)
    rh, rw = (np.sqrt(1 - lam) * h).astype(int), (np.sqrt(1 - lam) * w).astype(int)
    y0, y1 = np.clip(cy - rh // 2, 0, h), np.clip(cy + rh // 2, 0, h)
    x0, x1 = np.clip(cx - rw // 2, 0, w), np.clip(cx + rw // 2, 0, w)
    is_cut = use & cut
    lam = np.where(is_cut, 1 - (y1 - y0) * (x1 - x0) / (h * w), lam)
    dev = x.device
    as_t = lambda a, dtype=torch.float32: torch.from_numpy(np.asarray(a)).to(dev, dtype, non_blocking=True)  # noqa: E731
    lam_t, cut_t = as_t(lam), as_t(is_cut, torch.bool)
    partner = x.flip(0)
    box = box_mask(*(as_t(v, torch.long) for v in (y0, y1, x0, x1)), h, w)
    blended = torch.lerp(partner, x, lam_t.view(b, 1, 1, 1).to(x.dtype))  # lam x + (1 - lam) partner
    mixed = torch.where(cut_t.view(b, 1, 1, 1), torch.where(box, partner, x), blended)
    onehot = F.one_hot(y, num_classes).float()
    target = lam_t.view(b, 1) * onehot + (1 - lam_t.view(b, 1)) * onehot.flip(0)
    target = target * (1 - smoothing) + smoothing / num_classes
    if x.is_contiguous(memory_format=torch.channels_last):  # keep the layout the model was given
        mixed = mixed.contiguous(memory_format=torch.channels_last)
    return mixed, target


AUGMENTATIONS = ("flip", "crop", "cutout")


def parse_aug(text):
    names = [a for a in (text or "").replace(" ", "").split(",") if a and a != "none"]
    unknown = [a for a in names if a not in AUGMENTATIONS]
    if unknown:
        raise DataError(f"unknown augmentation {', '.join(unknown)}; choose from {', '.join(AUGMENTATIONS)}")
    return set(names)


class DeviceLoader(SampledLoader):
    """Batches from tensors that already live on the device (CIFAR uint8 images, or cached features).

    All random choices of an epoch (order, crop shifts, flips, cutout centres) are drawn up front from
    (seed, epoch), so an epoch can be resumed at any step and DDP ranks agree with one process.
    uint8 images, augmented or not, are gathered and normalised by `augment_batch` (compiled with
    compile=True).
    """

    def __init__(self, x, y, batch_size, shuffle=False, aug=(), mean=None, std=None, seed=0,
                 drop_last=False, rank=0, world=1, pad=4, cutout=8, channels_last=False, compile=False):
        self.aug = set(aug)
        self.pad = pad if "crop" in self.aug else 0
        self.x = x
        if x.dtype == torch.uint8:  # padded (and mirrored) once, not per batch: see augment_batch
            padded = F.pad(x, (self.pad,) * 4) if self.pad else x
            self.x = torch.stack([padded, padded.flip(3)]) if "flip" in self.aug else padded[None]
        self.y, self.cutout_size, self.channels_last = y, cutout, channels_last
        self.sampler = EpochSampler(len(x), batch_size, shuffle, seed, drop_last, rank, world)
        self.image_size = x.shape[-2:] if x.ndim == 4 else None
        mean = torch.as_tensor(mean if mean is not None else [0.0] * 3, device=x.device).view(1, -1, 1, 1)
        std = torch.as_tensor(std if std is not None else [1.0] * 3, device=x.device).view(1, -1, 1, 1)
        self.scale, self.bias = 1 / (255 * std), -mean / std
        self.augment = torch.compile(augment_batch, dynamic=True) if compile and x.dtype == torch.uint8 else augment_batch

    def _epoch_randomness(self):
        n, (h, w) = self.sampler.n, self.image_size
        g = self.sampler.generator(salt=1)
        shifts = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=g)
        flips = torch.rand(n, generator=g) < 0.5
        centres = torch.stack([torch.randint(0, h, (n,), generator=g), torch.randint(0, w, (n,), generator=g)], 1)
        return [t.to(self.x.device) for t in (shifts, flips, centres)]

    def __iter__(self):
        start, self.start_step = self.start_step, 0
        is_image = self.x.dtype == torch.uint8
        if is_image and self.aug:
            shifts, flips, centres = self._epoch_randomness()
        for pos, idx in self.sampler.batches(start):
            idx = idx.to(self.x.device, non_blocking=True)
            if not is_image:  # cached features: no augmentation
                yield self.x[idx], self.y[idx]
                continue
            if self.aug:
                pos = pos.to(self.x.device)
            xb = self.augment(self.x, idx, shifts[pos] if self.pad else None,
                              flips[pos] if "flip" in self.aug else None,
                              centres[pos] if "cutout" in self.aug else None, self.pad,
                              self.cutout_size if "cutout" in self.aug else 0, self.scale, self.bias)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, self.y[idx]


def channel_stats(images_uint8):
    """Per-channel mean and std (0..1 scale) of a uint8 (N,3,H,W) array or tensor."""
    x = torch.as_tensor(images_uint8)
    x = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1).double() / 255
    return x.mean(1).tolist(), x.std(1).tolist()


def cifar_loaders(data, args, device, rank=0, world=1, split=None):
    """train/val/test DeviceLoaders for CIFAR-100 from `load_cifar100` output and parsed flags."""
    train_idx, val_idx = split or stratified_split(data["train_y"], val_per_class=args.val_per_class, seed=args.split_seed)
    train_x = data["train_x"][train_idx]
    mean, std = channel_stats(train_x) if args.normalize else (None, None)
    aug = parse_aug(args.aug)

    def on_device(x, y):
        return torch.from_numpy(np.ascontiguousarray(x)).to(device), torch.from_numpy(y).to(device)

    common = dict(mean=mean, std=std, rank=rank, world=world, channels_last=args.channels_last)
    train = DeviceLoader(*on_device(train_x, data["train_y"][train_idx]), args.batch_size, shuffle=True,
                         aug=aug, seed=args.seed, drop_last=len(train_idx) > args.batch_size,
                         cutout=args.cutout_size, compile=args.compile, **common)
    eval_batch = max(args.batch_size, 500) * world
    val = DeviceLoader(*on_device(data["train_x"][val_idx], data["train_y"][val_idx]), eval_batch, **common)
    test = DeviceLoader(*on_device(data["test_x"], data["test_y"]), eval_batch,  # rank 0 predicts all of it
                        **{**common, "rank": 0, "world": 1})
    # rank 0's error analysis after training reads all of validation, not its shard
    val_all = val if world == 1 else DeviceLoader(*on_device(data["train_x"][val_idx], data["train_y"][val_idx]),
                                                  eval_batch, **{**common, "rank": 0, "world": 1})
    return train, val, test, dict(mean=mean, std=std, train_size=len(train_idx), val_size=len(val_idx), val_all=val_all)


# ----------------------------------------------------------------------------- birds: reading

def find_cub_root(data_dir):
    data_dir = Path(data_dir)
    for candidate in (data_dir, data_dir / "CUB_200_2011"):
        if (candidate / "images.txt").is_file():
            return candidate
    if not data_dir.exists():
        raise DataError(f"data directory {data_dir} does not exist; pass --download to fetch CUB-200-2011 "
                        f"or point --data-dir at the CUB_200_2011 folder")
    raise DataError(f"{data_dir} is not a CUB_200_2011 folder (no images.txt); download {CUB2011_URL} and "
                    f"unpack it, or use --dataset folder for a train/ test/ image tree")


def _read_table(path, n_fields):
    rows, first_line = {}, {}
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < n_fields:
                raise DataError(f"{path} line {line_no} has {len(parts)} fields, expected {n_fields}")
            image_id = int(parts[0])
            if image_id in rows:
                raise DataError(f"{path} lists id {image_id} twice (lines {first_line[image_id]} and {line_no})")
            first_line[image_id] = line_no
            rows[image_id] = parts[1:n_fields] if n_fields > 2 else parts[1]
    return rows


def load_cub(data_dir, crop_boxes=False):
    """CUB-200-2011: lists of (path, label 0-based, box or None) for train and test, in images.txt order."""
    root = find_cub_root(data_dir)
    needed = ["images.txt", "image_class_labels.txt", "classes.txt", "train_test_split.txt"]
    missing = [n for n in needed if not (root / n).is_file()]
    if missing:
        raise DataError(f"{root} lacks {', '.join(missing)} of the CUB_200_2011 layout")
    try:
        images = _read_table(root / "images.txt", 2)
        labels = _read_table(root / "image_class_labels.txt", 2)
        classes = _read_table(root / "classes.txt", 2)
        is_train = _read_table(root / "train_test_split.txt", 2)
        boxes = _read_table(root / "bounding_boxes.txt", 5) if crop_boxes and (root / "bounding_boxes.txt").is_file() else {}
        labels = {image_id: int(c) for image_id, c in labels.items()}
    except ValueError as e:
        raise DataError(f"{root} has a malformed text file ({e})") from None
    if crop_boxes and not boxes:
        warn(f"--crop-boxes: {root}/bounding_boxes.txt is missing, using whole images")
    for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", is_train)):
        if set(table) != set(images):
            raise DataError(f"{root}/{name} lists {len(table)} images but images.txt lists {len(images)}")
    class_ids = sorted(classes)
    index_of = {cid: i for i, cid in enumerate(class_ids)}
    bad = sorted(set(labels.values()) - set(index_of))
    if bad:
        raise DataError(f"{root}/image_class_labels.txt uses class ids {bad[:5]} that classes.txt does not define")
    split = {"train": [], "test": []}
    for image_id in sorted(images):
        box = _parse_box(root, image_id, boxes[image_id]) if image_id in boxes else None
        sample = (str(root / "images" / images[image_id]), index_of[labels[image_id]], box)
        split["train" if is_train[image_id] == "1" else "test"].append(sample)
    return split["train"], split["test"], [classes[c] for c in class_ids]


def _parse_box(root, image_id, fields):
    """(x, y, w, h) of bounding_boxes.txt: finite numbers, a box of positive size, not left of or above the image."""
    try:
        box = tuple(float(v) for v in fields)
    except ValueError:
        box = None
    if box is None or not all(math.isfinite(v) for v in box) or box[2] <= 0 or box[3] <= 0 or min(box[:2]) < 0:
        raise DataError(f"{root}/bounding_boxes.txt has an invalid box for image {image_id}: {' '.join(fields)}")
    return box


IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def load_image_folder(data_dir):
    """A train/ and test/ tree of class folders (ImageFolder layout, e.g. CUB-200-2010 re-packed)."""
    data_dir = Path(data_dir)
    if not (data_dir / "train").is_dir():
        raise DataError(f"{data_dir} has no train/ folder of class sub-folders")
    classes = sorted(p.name for p in (data_dir / "train").iterdir() if p.is_dir())
    index_of = {c: i for i, c in enumerate(classes)}

    def listing(split):
        out = []
        if not (data_dir / split).is_dir():
            return out
        for cls_dir in sorted(p for p in (data_dir / split).iterdir() if p.is_dir()):
            if cls_dir.name not in index_of:
                raise DataError(f"{cls_dir} is a class that {data_dir}/train does not have")
            for f in sorted(cls_dir.iterdir()):
                if f.suffix.lower() in IMAGE_EXTENSIONS:
                    out.append((str(f), index_of[cls_dir.name], None))
        return out

    return listing("train"), listing("test"), classes


def check_image_file(path):
    """Cheap sanity check (first and last bytes) that catches truncated and non-image files
    before a decoder meets them mid-epoch. Returns None when fine, else the reason."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(16)
            f.seek(max(0, size - 12))
            tail = f.read()
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if head[:3] == b"\xff\xd8\xff":
        return None if b"\xff\xd9" in tail else "truncated JPEG (no end marker)"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return None if b"IEND" in tail else "truncated PNG"
    if head[:2] == b"BM" or head[:4] in (b"GIF8", b"RIFF") or head[:4] in (b"II*\x00", b"MM\x00*"):
        return None
    return "not an image"


# JPEG coding processes nvJPEG decodes: baseline, extended sequential and progressive Huffman (SOF0-2).
# Lossless, hierarchical and arithmetic-coded files (the other SOF markers) go to PIL.
NVJPEG_SOF = {0xC0, 0xC1, 0xC2}
SOF_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # C4 DHT, C8 reserved, CC DAC are not frame headers


EXIF_ORIENTATION = 0x0112  # the TIFF tag: 1 upright, 2-8 mirrored and/or rotated (5-8 swap width and height)


def exif_orientation(payload):
    """The orientation tag of an APP1 Exif payload (1 where absent or unreadable)."""
    if payload[:6] != b"Exif\0\0" or len(payload) < 14:
        return 1
    tiff = payload[6:]
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None:
        return 1
    ifd = int.from_bytes(tiff[4:8], order)
    count = int.from_bytes(tiff[ifd:ifd + 2], order)
    for k in range(count):
        entry = tiff[ifd + 2 + 12 * k: ifd + 14 + 12 * k]
        if len(entry) == 12 and int.from_bytes(entry[:2], order) == EXIF_ORIENTATION:
            return int.from_bytes(entry[8:10], order)
    return 1


def oriented(im):
    """A PIL image as it is meant to be seen: its EXIF orientation applied (as TorchCodec and DALI's
    adjust_orientation do), so every loader sees the same pixels; images without one are returned as they are."""
    from PIL import ImageOps
    return ImageOps.exif_transpose(im) if im.getexif().get(EXIF_ORIENTATION, 1) != 1 else im


def jpeg_header(path):
    """(width, height, None) for a JPEG the GPU decoder takes, or (width, height, why PIL decodes it instead), read
    from the markers up to the frame header; (None, None, why) when no frame header is found. An EXIF-rotated JPEG
    goes to PIL (torchvision's GPU decoder does not rotate), and its width and height are then PIL's, upright."""
    adobe_transform, orientation = None, 1
    try:
        with open(path, "rb") as f:
            if f.read(2) != b"\xff\xd8":
                return None, None, "not a JPEG"
            while True:
                byte = f.read(1)
                if byte != b"\xff":
                    return None, None, "no frame header before the image data"
                marker = f.read(1)
                while marker == b"\xff":  # fill bytes
                    marker = f.read(1)
                if not marker:
                    return None, None, "no frame header"
                m = marker[0]
                if m == 0x01 or 0xD0 <= m <= 0xD8:  # markers without a length
                    continue
                length = int.from_bytes(f.read(2), "big")
                if m == 0xDA or length < 2:  # start of scan before any frame header, or a broken length
                    return None, None, "no frame header before the image data"
                if m in SOF_MARKERS:
                    frame = f.read(6)
                    if len(frame) < 6:
                        return None, None, "truncated frame header"
                    bits, height, width, channels = frame[0], int.from_bytes(frame[1:3], "big"), \
                        int.from_bytes(frame[3:5], "big"), frame[5]
                    why = (f"JPEG process SOF{m - 0xC0} (lossless, hierarchical or arithmetic)" if m not in NVJPEG_SOF
                           else f"EXIF orientation {orientation}" if orientation in range(2, 9)
                           else f"{bits}-bit samples" if bits != 8
                           else "grayscale" if channels == 1
                           else "CMYK/YCCK" if channels == 4
                           else "RGB-coded (Adobe, no YCbCr transform)" if channels == 3 and adobe_transform == 0
                           else f"{channels} channels" if channels != 3
                           else "no height in the frame header (DNL)" if not (width and height)
                           else None)
                    return width, height, why
                payload = f.read(length - 2)
                if m == 0xEE and payload[:5] == b"Adobe" and len(payload) >= 12:
                    adobe_transform = payload[11]
                if m == 0xE1:
                    orientation = exif_orientation(payload)
    except OSError as e:
        return None, None, f"unreadable ({e.strerror})"


def scan_images(samples, pil_for_gpu_refused):
    """What the nvJPEG and DALI loaders learn before the first epoch: each sample's (width, height) after its crop box,
    {index: why} of the broken files and, with pil_for_gpu_refused, the indices PIL decodes on the CPU (not a JPEG
    nvJPEG takes), with a count of the reasons. Headers are read, never the image data."""
    from PIL import Image
    sizes, broken, pil, reasons = [], {}, set(), {}
    for i, (path, _, box) in enumerate(samples):
        why_broken = check_image_file(path)
        width = height = None
        if why_broken is None:
            width, height, why_cpu = jpeg_header(path)
            if why_cpu is not None or width is None:
                try:
                    with Image.open(path) as im:
                        width, height = im.size
                        if im.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # a quarter turn: upright size
                            width, height = height, width
                except Exception as e:  # passed the byte check, yet its header is unreadable
                    why_broken = f"cannot read the image header ({type(e).__name__})"
            if why_broken is None and width * height > 2 * Image.MAX_IMAGE_PIXELS:  # where PIL refuses to decode
                why_broken = f"{width} x {height} pixels: larger than PIL's decompression-bomb limit"
            if why_broken is None and why_cpu is not None and pil_for_gpu_refused:
                pil.add(i)
                reasons[why_cpu] = reasons.get(why_cpu, 0) + 1
        if why_broken is not None:
            broken[i] = why_broken
            sizes.append((8, 8))
            continue
        if box is not None:  # PIL's crop: whole pixels, and at least one of them
            x0, y0, x1, y1 = int(box[0]), int(box[1]), int(box[0] + box[2]), int(box[1] + box[3])
            width, height = max(1, x1 - x0), max(1, y1 - y0)
        sizes.append((width, height))
    return sizes, broken, pil, reasons


def drop_bad_images(samples, max_bad_frac=0.05, what="images"):
    bad = [(s, reason) for s in samples if (reason := check_image_file(s[0]))]
    for (path, _, _), reason in bad[:20]:
        warn_broken(path, reason, keep=False)
    if len(bad) > 20:
        warn(f"skipping {len(bad) - 20} more broken {what}")
    if samples and len(bad) > max_bad_frac * len(samples):
        raise DataError(f"{len(bad)} of {len(samples)} {what} are broken (more than {max_bad_frac:.0%}); "
                        f"first: {bad[0][0][0]} ({bad[0][1]})")
    bad_paths = {s[0] for s, _ in bad}
    return [s for s in samples if s[0] not in bad_paths], [s[0] for s, _ in bad]


# ----------------------------------------------------------------------------- birds: loaders

def sample_crop(width, height, rng, scale, ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop's box (x, y, w, h) for an image, drawn from a numpy Generator."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side, side


def draw_augmentation(sample_seed, width, height, aug, scale):
    """One sample's random-resized-crop box (x, y, w, h), or None without 'rrc', and its mirror flag.
    A pure function of the sample's seed, so both bird loaders draw the same and resume at any step."""
    rng = np.random.default_rng(sample_seed)
    box = sample_crop(width, height, rng, scale) if "rrc" in aug else None
    return box, "flip" in aug and rng.random() < 0.5


BIRD_AUGMENTATIONS = ("rrc", "flip")


def parse_bird_aug(text):
    names = [a for a in (text or "").replace(" ", "").split(",") if a and a != "none"]
    unknown = [a for a in names if a not in BIRD_AUGMENTATIONS]
    if unknown:
        raise DataError(f"unknown augmentation {', '.join(unknown)}; choose from {', '.join(BIRD_AUGMENTATIONS)}")
    return set(names)


def placeholder_jpeg(size=8):
    """A small black JPEG fed in place of a broken test image, so every test id still gets a row."""
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (size, size)).save(buf, "JPEG")
    return buf.getvalue()


class BirdImages(torch.utils.data.Dataset):
    """Decodes one image with PIL (any mode to RGB) and returns it as uint8 CHW at img_size.

    aug 'rrc': random-resized crop, else resize the shorter side to img_size/crop_frac and centre crop
    (the eval policy); aug 'flip': mirror half the images. Randomness is seeded per sample by the
    sampler, so any number of workers gives the same epoch. A file that fails to decode is reported
    and dropped (None), or replaced by a black image where `keep_broken` (test sets: one row per id).
    """

    def __init__(self, samples, img_size, aug=(), scale=(0.25, 1.0), crop_frac=0.875, keep_broken=False,
                 mean=None, std=None):
        self.samples, self.img_size, self.aug = samples, img_size, set(aug)
        self.scale, self.crop_frac, self.keep_broken = scale, crop_frac, keep_broken
        # With mean/std the worker also normalises (CPU training: spreads the work over the workers).
        self.scale_bias = None if mean is None else (1 / (255 * torch.tensor(std).view(3, 1, 1)),
                                                       -torch.tensor(mean).view(3, 1, 1) / torch.tensor(std).view(3, 1, 1))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, item):
        from PIL import Image
        index, sample_seed = item
        path, label, box = self.samples[index]
        try:
            with Image.open(path) as im:
                im = oriented(im).convert("RGB")
        except Exception as e:  # any decoder failure: never crash the epoch
            warn_broken(path, f"cannot decode ({e})", self.keep_broken)
            if not self.keep_broken:
                return None
            im = Image.new("RGB", (self.img_size, self.img_size))
            box = None
        if box is not None:
            x, y, w, h = box
            im = im.crop((int(x), int(y), int(x + w), int(y + h)))
        s = self.img_size
        crop, mirror = draw_augmentation(sample_seed, im.width, im.height, self.aug, self.scale)
        if crop is not None:
            x, y, w, h = crop
            im = im.resize((s, s), Image.BILINEAR, box=(x, y, x + w, y + h))
        else:
            short = int(round(s / self.crop_frac))
            ratio = short / min(im.width, im.height)
            im = im.resize((max(s, round(im.width * ratio)), max(s, round(im.height * ratio))), Image.BILINEAR)
            left, top = (im.width - s) // 2, (im.height - s) // 2
            im = im.crop((left, top, left + s, top + s))
        if mirror:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        image = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
        if self.scale_bias is not None:
            image = torch.addcmul(self.scale_bias[1], image.float(), self.scale_bias[0])
        return image, label


def _collate(batch):
    batch = [b for b in batch if b is not None]
    if not batch:
        return torch.zeros(0, 3, 1, 1), torch.zeros(0, dtype=torch.long)
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch])


class _BatchList(torch.utils.data.Sampler):
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class TorchImageLoader(SampledLoader):
    """PIL decoding in DataLoader workers; normalisation on the GPU (uint8 crosses the bus), or in the
    workers when training on the CPU."""
    may_yield_empty = True  # broken files are skipped: a batch of only broken files is empty

    def __init__(self, samples, img_size, batch_size, train, mean, std, device, aug=(), seed=0, workers=2,
                 rank=0, world=1, scale=(0.25, 1.0), channels_last=False, keep_broken=False, crop_frac=0.875):
        self.device, self.workers, self.channels_last = torch.device(device), workers, channels_last
        on_gpu = self.device.type == "cuda"
        self.dataset = BirdImages(samples, img_size, aug if train else (), scale, crop_frac, keep_broken,
                                  None if on_gpu else mean, None if on_gpu else std)
        self.sampler = EpochSampler(len(samples), batch_size, shuffle=train, seed=seed,
                                    drop_last=train and len(samples) > batch_size, rank=rank, world=world)
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255

    def __iter__(self):
        batches = self._epoch_items()
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=_BatchList(batches), num_workers=self.workers, collate_fn=_collate,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
            prefetch_factor=4 if self.workers else None,
            generator=self.sampler.generator(salt=2))  # else DataLoader draws from the global RNG (dropout's)
        size = self.dataset.img_size
        for xb, yb in loader:
            if len(xb) == 0:  # every image of the batch was broken, or this rank's share was nothing
                xb = torch.zeros(0, 3, size, size, dtype=torch.uint8 if self.dataset.scale_bias is None else torch.float32)
            xb = xb.to(self.device, non_blocking=True)  # every batch, the empty one too
            if xb.dtype == torch.uint8:
                xb = (xb.float() - self.mean) / self.std
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, yb.to(self.device, non_blocking=True)


# ----------------------------------------------------------------------------- birds: batched nvJPEG

PIL_PRECISION_BITS = 22  # Pillow's fixed-point precision for the resize coefficients of 8-bit images (32 - 8 - 2)


def pil_bilinear_weights(start, scale, lo, hi, out_size, in_max):
    """(B, out_size, in_max) float32: the weights of Pillow's bilinear resize along one axis, one row per output pixel.

    Sample b's output pixel i is centred at start + (i + 0.5) * scale source pixels; it averages the source pixels
    within max(scale, 1) of that centre with a triangle filter (the antialiasing of Pillow and of torchvision's
    antialias=True), restricted to lo..hi-1, normalised, and rounded to Pillow's fixed point. Written here because
    Pillow's is one image at a time and F.interpolate cannot take one box per sample; as a matrix it batches."""
    dev = start.device
    start, scale, lo, hi = (torch.as_tensor(v, dtype=torch.float64, device=dev) for v in (start, scale, lo, hi))
    support = scale.clamp(min=1.0)
    centre = start[:, None] + (torch.arange(out_size, dtype=torch.float64, device=dev) + 0.5) * scale[:, None]
    first = torch.maximum(torch.trunc(centre - support[:, None] + 0.5), lo[:, None])
    last = torch.minimum(torch.trunc(centre + support[:, None] + 0.5), hi[:, None])  # exclusive
    j = torch.arange(in_max, dtype=torch.float64, device=dev).view(1, 1, -1)
    w = (1 - ((j - centre[..., None] + 0.5) / support.view(-1, 1, 1)).abs()).clamp(min=0)
    w = w * ((j >= first[..., None]) & (j < last[..., None]))
    w = w / w.sum(-1, keepdim=True).clamp(min=1e-300)
    return (torch.round(w * 2 ** PIL_PRECISION_BITS) / 2 ** PIL_PRECISION_BITS).float()


def pad_batch(images):
    """A list of (C, H_i, W_i) tensors as one (B, C, H_max, W_max) batch, zero-padded at the bottom and right, in one
    library call (torch.nested: its strided layout is marked prototype, but its padding is exactly this)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.nested.as_nested_tensor(list(images)).to_padded_tensor(0)


def resample_batch(images, geometry, size, mirror, max_elements=1 << 27):
    """Crop, resize (Pillow's bilinear, antialiased) and mirror a list of uint8 (3, H_i, W_i) images on their device, as
    a batch: uint8 (B, 3, size, size). geometry: float64 numpy (B, 8) of per-sample (start, scale, lo, hi) for x then y
    (see pil_bilinear_weights); mirror: bool numpy (B,).

    Two batched matmuls per chunk (width first, rounded to uint8 in between, then height), as Pillow resizes, so
    the pixels equal Pillow's up to float rounding. The images are zero-padded to the chunk's largest; chunks keep
    that padded copy under max_elements floats, so a batch of large photos does not claim the whole GPU."""
    with exact_float32(images[0].device):
        return _resample_batch(images, geometry, size, mirror, max_elements)


@contextlib.contextmanager
def exact_float32(device):
    """float32 matmuls at full precision and no autocast, for resample_batch: TF32 (on in fast CUDA runs, engine.py)
    keeps 10 mantissa bits and bf16 autocast 8, either of which would round Pillow's weights and move pixels by a
    grey level. The matmul precision is a process-wide setting: it is restored on the way out (kernels already
    launched keep the precision they were launched with)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast(torch.device(device).type, enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _resample_batch(images, geometry, size, mirror, max_elements):
    dev = images[0].device
    g = to_device(torch.from_numpy(np.ascontiguousarray(geometry)), dev)
    flip = to_device(torch.from_numpy(np.asarray(mirror, dtype=bool)), dev)
    out, begin = [], 0
    while begin < len(images):
        end, h_max, w_max = begin, 0, 0
        while end < len(images):  # grow the chunk while its padded copy stays under the cap (at least one image)
            h, w = max(h_max, images[end].shape[1]), max(w_max, images[end].shape[2])
            if end > begin and (end + 1 - begin) * 3 * h * w > max_elements:
                break
            end, h_max, w_max = end + 1, h, w
        padded = pad_batch(images[begin:end])
        wx = pil_bilinear_weights(*g[begin:end, :4].unbind(1), size, padded.shape[3])
        wx = torch.where(flip[begin:end].view(-1, 1, 1), wx.flip(1), wx)  # mirrored: the output columns reversed
        wy = pil_bilinear_weights(*g[begin:end, 4:].unbind(1), size, padded.shape[2])
        b, c, h, w = padded.shape
        # each pass is one bmm per sample, the channels stacked into its rows or columns (no broadcast copies)
        rows = torch.bmm(padded.float().view(b, c * h, w), wx.transpose(1, 2))  # (b, c*H, size)
        rows = torch.floor(rows + 0.5).clamp_(0, 255).view(b, c, h, size).permute(0, 2, 1, 3).reshape(b, h, c * size)
        cols = torch.floor(torch.bmm(wy, rows) + 0.5).clamp_(0, 255)  # (b, size, c*size)
        out.append(cols.view(b, size, c, size).permute(0, 2, 1, 3).to(torch.uint8))
        begin = end
    return torch.cat(out)


def sample_geometry(width, height, region, crops, size, crop_frac):
    """Per-sample source geometry for resample_batch, numpy (B, 8), vectorised over the batch.

    width/height: the decoded images' sizes; region: (B, 4) x0, y0, x1, y1 of each sample's crop box (the whole image
    without one); crops: (B, 4) x, y, w, h of the random-resized crop within the region, or NaN rows for the eval
    policy (shorter side to size / crop_frac, centre crop), computed as BirdImages computes it with PIL."""
    region = np.asarray(region, dtype=np.float64)
    crops = np.asarray(crops, dtype=np.float64)
    rw, rh = region[:, 2] - region[:, 0], region[:, 3] - region[:, 1]
    short = round(size / crop_frac)
    ratio = short / np.minimum(rw, rh)
    resized_w, resized_h = np.maximum(size, np.round(rw * ratio)), np.maximum(size, np.round(rh * ratio))
    eval_x = np.floor((resized_w - size) / 2) * rw / resized_w
    eval_y = np.floor((resized_h - size) / 2) * rh / resized_h
    is_eval = np.isnan(crops[:, 0])
    start_x = region[:, 0] + np.where(is_eval, eval_x, crops[:, 0])
    start_y = region[:, 1] + np.where(is_eval, eval_y, crops[:, 1])
    scale_x = np.where(is_eval, rw / resized_w, crops[:, 2] / size)
    scale_y = np.where(is_eval, rh / resized_h, crops[:, 3] / size)
    hi_x, hi_y = np.minimum(region[:, 2], width), np.minimum(region[:, 3], height)
    return np.stack([start_x, scale_x, region[:, 0], hi_x, start_y, scale_y, region[:, 1], hi_y], 1)


def pil_rgb(source):
    """A file (path or file object) decoded by PIL, any mode to RGB, as uint8 (3, H, W)."""
    from PIL import Image
    with Image.open(source) as im:
        return torch.from_numpy(np.asarray(oriented(im).convert("RGB")).copy()).permute(2, 0, 1)


class FileItem(NamedTuple):
    """One sample as a BirdFiles worker hands it over."""
    index: int  # into the loader's samples
    image: torch.Tensor | None  # uint8: the file's bytes, or (3, H, W) pixels where decoded already; in a FileBatch
    #                             an encoded item's bytes are in the batch's one tensor instead (None here)
    decoded: bool  # True: PIL decoded it (or it is the black stand-in for a broken file)
    label: int
    region: tuple  # (x0, y0, x1, y1) in source pixels: the crop box, or the whole image
    crop: tuple | None  # (x, y, w, h) of the random-resized crop within the region; None: the eval policy
    mirror: bool


class FileBatch(NamedTuple):
    """A batch as the reader workers hand it over: the encoded files' bytes one after another in one tensor (one
    shared-memory segment and one file-descriptor handshake per batch, not one per file), and the items."""
    items: list  # FileItems; an encoded one's image is None, its bytes are in `data`
    data: torch.Tensor  # uint8 (total bytes,)
    offsets: list  # the k-th encoded item's bytes are data[offsets[k]:offsets[k + 1]]

    def encoded(self):
        """(item, its bytes as a view of `data`) for each encoded item, in batch order."""
        todo = [it for it in self.items if not it.decoded]
        return [(it, self.data[a:b]) for it, a, b in zip(todo, self.offsets, self.offsets[1:], strict=False)]


def collate_files(batch):
    """BirdFiles items (None: a skipped broken file) into a FileBatch; runs in the worker, before the hand-over."""
    items = [b for b in batch if b is not None]
    blobs = [it.image for it in items if not it.decoded]
    offsets = np.cumsum([0] + [len(b) for b in blobs]).tolist()
    data = torch.cat(blobs) if blobs else torch.zeros(0, dtype=torch.uint8)
    return FileBatch([it if it.decoded else it._replace(image=None) for it in items], data, offsets)


class BirdFiles(torch.utils.data.Dataset):
    """What a DataLoader worker does for the nvJPEG and DALI loaders: read one file's bytes and draw its augmentation
    (`draw_augmentation`, from the size found by `scan_images`). The few files in `pil` (not a JPEG the GPU decoder
    takes) are decoded here by PIL, to full size, and join the same batch; broken files give None (skipped) or, with
    keep_broken, a black image. Returns a FileItem."""

    def __init__(self, samples, sizes, img_size, aug=(), scale=(0.25, 1.0), broken=(), pil=(), keep_broken=False,
                 placeholder=None):
        self.samples, self.sizes, self.img_size, self.aug, self.scale = samples, sizes, img_size, set(aug), scale
        self.broken, self.pil, self.keep_broken, self.placeholder = set(broken), set(pil), keep_broken, placeholder

    def __len__(self):
        return len(self.samples)

    def _black(self, index, label):
        s = self.img_size
        if self.placeholder is not None:  # DALI decodes a placeholder JPEG
            return FileItem(index, torch.from_numpy(self.placeholder), False, label, (0, 0, 8, 8), None, False)
        return FileItem(index, torch.zeros(3, s, s, dtype=torch.uint8), True, label, (0, 0, s, s), None, False)

    def __getitem__(self, item):
        index, sample_seed = item
        path, label, box = self.samples[index]
        if index in self.broken:
            return self._black(index, label) if self.keep_broken else None
        width, height = self.sizes[index]
        crop, mirror = draw_augmentation(sample_seed, width, height, self.aug, self.scale)
        region = (0, 0, width, height)
        if box is not None:
            region = (int(box[0]), int(box[1]), int(box[0]) + width, int(box[1]) + height)
        if index not in self.pil:
            return FileItem(index, torch.from_numpy(np.fromfile(path, dtype=np.uint8)), False, label, region, crop, mirror)
        try:
            image = pil_rgb(path)
        except Exception as e:  # any decoder failure: never crash the epoch
            warn_broken(path, f"cannot decode ({e})", self.keep_broken)
            return self._black(index, label) if self.keep_broken else None
        return FileItem(index, image, True, label, region, crop, mirror)


class FileReaders:
    """DataLoader workers that read BirdFiles items, batch by batch, for the nvJPEG and DALI loaders. The workers
    persist across epochs (each epoch only swaps the list of batches), so a short epoch does not pay their start-up
    again; they touch no device, so forking them after CUDA or DALI started is safe. At most 4: reading a file and
    drawing its crop take about 60 us (BENCHMARKS.md), so 4 processes feed far more images per second than any GPU
    trains on; the decoding itself is the device's (or DALI's threads'). None for a CPU device: there those 60 us
    are nothing next to the model's milliseconds per image, and reader processes would take cores from the decoder
    and the model (DALI's CPU loader alone: 846 img/s with 2 readers on 2 cores, 1,288 without; BENCHMARKS.md)."""
    MAX_READERS = 4

    def __init__(self, files, workers, seed_generator, device):
        self.batch_list = _BatchList([])
        workers = min(workers, self.MAX_READERS) if torch.device(device).type == "cuda" else 0
        self.loader = torch.utils.data.DataLoader(
            files, batch_sampler=self.batch_list, num_workers=workers, collate_fn=collate_files,
            prefetch_factor=4 if workers else None, persistent_workers=workers > 0,
            generator=seed_generator)  # else DataLoader draws its base seed from the global RNG (dropout's)

    def epoch(self, batches):
        self.batch_list.batches = batches
        return iter(self.loader)


@functools.cache
def jpeg_decoder():
    """(name, decode): the batched JPEG decoder, decode(list of uint8 CPU tensors, device) -> list of RGB uint8
    (3, H, W) on the device. TorchCodec's where it imports (the maintained one: torchvision 0.29 deprecates its own
    image decoding in its favour), else torchvision's. On a CPU device both are libjpeg-turbo and give PIL's pixels."""
    try:
        from torchcodec.decoders import decode_jpeg
        return "torchcodec", lambda datas, device: decode_jpeg(datas, mode="RGB", device=device)
    except Exception:  # not installed, or built for another torch (its wheels follow torch's versions)
        from torchvision.io import ImageReadMode, decode_jpeg
        return "torchvision", lambda datas, device: decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)


# How decode_jpegs orders a CUDA decode after the work already queued on the caller's stream: "stream" (a side
# stream, no host wait) or "sync" (the host waits for the caller's stream first); "none" is the unordered call
# this repo made before, kept only so that tools/gpu_check.py can show its decode-under-load check failing on it.
DECODE_ORDER = "stream"
_DECODE_STREAMS = {}  # one side stream per CUDA device


@contextlib.contextmanager
def no_uninitialized_fill():
    """Under --deterministic torch fills every torch.empty with a fill kernel on the current stream
    (torch.utils.deterministic.fill_uninitialized_memory); the decoders allocate their outputs so while decoding on
    a stream of their own, which does not wait for that fill: it would land after the pixels and blank them (to the
    same values every run, so a determinism check passes). Their outputs are written whole, so nothing needs it."""
    import torch.utils.deterministic as deterministic
    previous = deterministic.fill_uninitialized_memory
    deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        deterministic.fill_uninitialized_memory = previous


def decode_jpegs(datas, device):
    """The one place that decodes JPEGs on the device (training, evaluation, the feature cache and predict.py all come
    here through NvjpegImageLoader): a list of uint8 CPU tensors of file bytes -> RGB uint8 (3, H, W) on `device`.

    On CUDA, torchvision 0.26's decode_jpeg allocates its outputs from PyTorch's caching allocator on the current
    stream, then decodes on a private stream that does not wait for the work queued there; nvJPEG's hardware engine
    also ignores stream order (TorchCodec's, too). The allocator hands out a block as soon as it is freed on its
    stream, so the decoder can be given memory that a queued kernel of the running step (forward, backward,
    evaluation) still reads or writes, and the images or the step come out wrong: reproduced upstream on an H100 in
    199 runs of 200 (pytorch/vision PR 9606, TorchCodec PR 1634, neither in the torch 2.11 builds we run on). So the
    decode runs with a side stream current: its outputs come from that stream's pool, which holds only blocks whose
    every use is finished (the outputs of earlier decodes are recorded on the caller's stream below, so the allocator
    keeps them until the caller's stream has passed their last use). Then the caller's stream waits for the side
    stream (the decoder makes the side stream wait for its own), no host wait at all. DECODE_ORDER "sync" waits on
    the host instead. No uninitialised-memory fill is queued either way (no_uninitialized_fill)."""
    _, decode = jpeg_decoder()
    device = torch.device(device)
    if device.type != "cuda":
        return decode(datas, device)
    if DECODE_ORDER == "none":  # the old, unordered call: a planted fault for gpu_check, never the default
        return decode(datas, device)
    current = torch.cuda.current_stream(device)
    with no_uninitialized_fill():
        if DECODE_ORDER == "sync":
            current.synchronize()  # nothing is queued any more, so no block the allocator hands out is still in use
            return decode(datas, device)
        side = _DECODE_STREAMS.setdefault(device, torch.cuda.Stream(device))
        with torch.cuda.stream(side):
            images = decode(datas, device)
    current.wait_stream(side)
    for image in images:
        image.record_stream(current)  # freed later on the host: not reused before the caller's stream is past it
    return images


def to_device(tensor, device):
    """A host tensor onto the device: pinned and non-blocking on CUDA (the pinned copy is held by PyTorch's host
    allocator until the copy has run), a plain copy elsewhere."""
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class NvjpegImageLoader(SampledLoader):
    """Batched JPEG decoding on the device (`decode_jpegs`: TorchCodec's or torchvision's nvJPEG decoder) and batched
    resampling there.

    DataLoader workers only read file bytes and draw each sample's crop and mirror (`BirdFiles`), and hand each batch
    over as one tensor of bytes (`FileBatch`). The device decodes the batch in one call, then crops, resizes
    (Pillow's antialiased bilinear, as the torch loader's PIL), mirrors and normalises it in two matmuls
    (`resample_batch`): no per-image loop. Files nvJPEG does not take (PNG under a .jpg name, grayscale, CMYK,
    lossless/arithmetic JPEG, EXIF-rotated) are found by `scan_images` and decoded by PIL in the workers into the same
    batch. On a CPU device the same code runs with libjpeg-turbo (the tests' path)."""
    may_yield_empty = True  # broken files are skipped: a batch of only broken files is empty

    def __init__(self, samples, img_size, batch_size, train, mean, std, device, aug=(), seed=0, workers=2,
                 rank=0, world=1, scale=(0.25, 1.0), channels_last=False, keep_broken=False, crop_frac=0.875):
        self.device, self.workers, self.channels_last = torch.device(device), workers, channels_last
        self.img_size, self.crop_frac, self.keep_broken = img_size, crop_frac, keep_broken
        self.samples = samples
        sizes, broken, pil, self.pil_reasons = scan_images(samples, pil_for_gpu_refused=True)
        for i, why in broken.items():  # as the torch loader does when PIL fails on them
            warn_broken(samples[i][0], why, keep_broken)
        self.files = BirdFiles(samples, sizes, img_size, aug if train else (), scale, broken, pil, keep_broken)
        self.readers = None
        self.sampler = EpochSampler(len(samples), batch_size, shuffle=train, seed=seed,
                                    drop_last=train and len(samples) > batch_size, rank=rank, world=world)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255

    def __iter__(self):
        batches = self._epoch_items()
        if self.readers is None:
            self.readers = FileReaders(self.files, self.workers, self.sampler.generator(salt=2), self.device)
        for batch in self.readers.epoch(batches):
            xb, yb = self._to_batch(batch)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, yb

    def _decode(self, encoded):
        """Decode [(item, bytes)] on the device in one batched call; a batch the decoder refuses is decoded file by
        file, and what it still refuses goes to PIL here (None: not decodable at all)."""
        if not encoded:
            return []
        try:
            return decode_jpegs([blob for _, blob in encoded], self.device)
        except (RuntimeError, ValueError):
            pass
        out = []
        for it, blob in encoded:  # only after a refused batch
            try:
                out.append(decode_jpegs([blob], self.device)[0])
                continue
            except (RuntimeError, ValueError):
                pass
            path = self.samples[it.index][0]
            try:
                image = pil_rgb(io.BytesIO(blob.numpy().tobytes()))
                warn(f"{path}: the GPU decoder refused it, decoded by PIL")
                out.append(to_device(image, self.device))
            except Exception as e:
                warn_broken(path, f"cannot decode ({e})", self.keep_broken)
                out.append(None)
        return out

    def _to_batch(self, batch):
        s = self.img_size
        encoded = batch.encoded()
        decoded = dict(zip((it.index for it, _ in encoded), self._decode(encoded), strict=True))
        images, kept = [], []
        for it in batch.items:
            image = to_device(it.image, self.device) if it.decoded else decoded[it.index]
            if image is None and self.keep_broken:  # the black stand-in BirdFiles gives a broken file
                it = self.files._black(it.index, it.label)
                image = to_device(it.image, self.device)
            if image is not None:
                images.append(image)
                kept.append(it)
        labels = torch.tensor([it.label for it in kept], dtype=torch.long)
        if not kept:  # every image of the batch was broken: an empty batch, on the device like any other
            return torch.zeros(0, 3, s, s, device=self.device), labels.to(self.device)
        geometry = sample_geometry([im.shape[2] for im in images], [im.shape[1] for im in images],
                                   [it.region for it in kept], [it.crop or (math.nan,) * 4 for it in kept],
                                   s, self.crop_frac)
        x = resample_batch(images, geometry, s, [it.mirror for it in kept])
        return (x.float() - self.mean) / self.std, to_device(labels, self.device)


def dali_available():
    try:
        import nvidia.dali  # noqa: F401
        return True
    except Exception:
        return False


class DaliImageLoader(SampledLoader):
    """DALI pipeline: JPEG decode (nvJPEG, device='mixed' on a GPU; DALI's CPU decoder otherwise), then one resize of
    each sample's source box to img_size (antialiased), mirror and normalisation inside DALI. DataLoader workers feed
    it (`BirdFiles`): they read the bytes and draw each sample's crop and mirror with `draw_augmentation`, as the other
    loaders do, and `sample_geometry` turns those into the same source boxes the nvJPEG loader resamples: same order,
    same crops, the eval resize and centre crop of PIL, and an epoch resumes exactly at any step."""
    on_torch_stream = True  # False: host-synchronous outputs, as before (tools/gpu_check.sh times both)

    def __init__(self, samples, img_size, batch_size, train, mean, std, device, aug=(), seed=0, workers=2,
                 rank=0, world=1, scale=(0.25, 1.0), channels_last=False, keep_broken=False, crop_frac=0.875):
        self.samples, self.device, self.channels_last = samples, torch.device(device), channels_last
        self.img_size, self.crop_frac, self.workers = img_size, crop_frac, workers
        # DALI stops the whole pipeline on an undecodable file: catch them up front (headers only).
        sizes, bad, _, _ = scan_images(samples, pil_for_gpu_refused=False)
        if bad and not keep_broken:
            first = min(bad)
            raise DataError(f"{samples[first][0]}: {bad[first]}"
                            f"{f' (and {len(bad) - 1} more broken images)' if len(bad) > 1 else ''}; remove it, or use "
                            f"--loader torch or nvjpeg, which skip such files")
        for i, why in bad.items():
            warn_broken(samples[i][0], why, keep=True)
        placeholder = np.frombuffer(placeholder_jpeg(), dtype=np.uint8).copy()  # writable: workers wrap it in a tensor
        self.files = BirdFiles(samples, sizes, img_size, aug if train else (), scale, bad, (), keep_broken, placeholder)
        self.sampler = EpochSampler(len(samples), batch_size, shuffle=train, seed=seed,
                                    drop_last=train and len(samples) > batch_size, rank=rank, world=world)
        self.local_batch = batch_size // world
        self.build_args, self.pipe, self.readers = (img_size, mean, std, workers), None, None

    def _build(self, img_size, mean, std, workers):
        from nvidia.dali import fn, pipeline_def, types
        gpu = self.device.type == "cuda"

        @pipeline_def(batch_size=self.local_batch, num_threads=max(1, workers),
                      device_id=(self.device.index or 0) if gpu else None, prefetch_queue_depth=2, exec_dynamic=True)
        def pipe():
            jpegs, labels, mirror, roi_start, roi_end = fn.external_source(
                source=self._feed, num_outputs=5, batch=True,
                dtype=[types.UINT8, types.INT64, types.INT32, types.FLOAT, types.FLOAT])
            # EXIF orientation applied, as the other loaders do (`oriented`), so every loader sees the same pixels,
            # and fancy (smooth) chroma upsampling on the GPU too: nvJPEG's default differs from libjpeg's
            # The whole image is decoded (decoding only the crop's box measured no faster on the CPU, and its filter
            # cannot reach past the box as PIL's does: 14 grey levels off at box edges)
            images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                       adjust_orientation=True, jpeg_fancy_upsampling=True)
            # the sample's source box (from sample_geometry) to img_size x img_size, antialiased as PIL's bilinear
            images = fn.resize(images, resize_x=img_size, resize_y=img_size, roi_start=roi_start, roi_end=roi_end,
                               roi_relative=False, antialias=True)
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mirror=mirror,
                                              mean=[m * 255 for m in mean], std=[s * 255 for s in std])
            return images, labels.gpu() if gpu else labels

        built = pipe()
        built.build()
        return built

    def _feed(self, info=None):
        batch = next(self._batches)  # StopIteration ends DALI's epoch; the workers have read and drawn everything
        items, blobs = zip(*batch.encoded(), strict=True)  # DALI decodes every file, the black placeholder's too
        regions = [it.region for it in items]  # DALI decodes whole files: a region ends where the file does
        geometry = sample_geometry([r[2] for r in regions], [r[3] for r in regions], regions,
                                   [it.crop or (math.nan,) * 4 for it in items], self.img_size, self.crop_frac)
        start = np.stack([geometry[:, 4], geometry[:, 0]], 1).astype(np.float32)  # DALI's ROI is in shape order: (y, x)
        end = start + self.img_size * np.stack([geometry[:, 5], geometry[:, 1]], 1).astype(np.float32)
        return ([blob.numpy() for blob in blobs], [np.array(it.label, dtype=np.int64) for it in items],
                [np.array(int(it.mirror), dtype=np.int32) for it in items], list(start), list(end))

    def __iter__(self):
        batches = self._epoch_items()
        # DALI needs full batches: a short one is padded (an empty one, on a rank whose share of the last global
        # batch is nothing, with sample 0) and the padding cut off afterwards.
        sizes = [len(b) for b in batches]
        padded = [b + [b[-1] if b else (0, 0)] * (self.local_batch - len(b)) for b in batches]
        if self.readers is None:
            self.readers = FileReaders(self.files, self.workers, self.sampler.generator(salt=2), self.device)
        self._batches = self.readers.epoch(padded)
        if self.pipe is None:  # first epoch, or the last one was left part-way: a fresh pipeline
            self.pipe = self._build(*self.build_args)
        else:
            self.pipe.reset()
        pipe, self.pipe = self.pipe, None
        # On a GPU the outputs are bound to torch's stream (no host sync per batch, so DALI's prefetch overlaps
        # the training step) and copied on that stream; on the CPU they are host tensors anyway.
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" and self.on_torch_stream else None
        for step, size in enumerate(sizes):
            try:
                images, labels = pipe.run(stream) if stream is not None else pipe.run()
            except RuntimeError as e:  # a file that passed the header check but does not decode stops DALI
                names = ", ".join(Path(self.samples[i][0]).name for i, _ in batches[step][:4])
                first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
                raise DataError(f"DALI could not decode an image of the batch holding {names}... ({first}); remove "
                                f"it, or use --loader torch, which skips undecodable files with a warning") from None
            xb = _dali_to_torch(images, self.device)[:size]
            yb = _dali_to_torch(labels, self.device)[:size].long().view(-1)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, yb
        self.pipe = pipe  # ran to the end of the epoch: reusable after reset()


def _dali_to_torch(tensor_list, device):
    """Copy a DALI batch (CPU or GPU) into a new torch tensor on `device`, on torch's current stream."""
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
    array = tensor_list.as_tensor()
    out = torch.empty(array.shape(), dtype=to_torch_type[array.dtype], device=device)
    feed_ndarray(array, out, cuda_stream=torch.cuda.current_stream(device) if device.type == "cuda" else None)
    return out


def default_loader(device):
    """--loader auto: DALI wherever it imports (nvJPEG on a GPU, its CPU decoder otherwise: measured 2x the PIL paths
    on CPU, BENCHMARKS.md figure 4); else, on a CUDA device, torchvision's batched nvJPEG; else PIL in DataLoader
    workers. Decided from the device the run resolved, not from what the machine has."""
    if dali_available():
        return "dali"
    return "nvjpeg" if torch.device(device).type == "cuda" else "torch"


def default_workers():
    """--workers by default: this process's share of the CPU cores it may use (torchrun's LOCAL_WORLD_SIZE processes
    share them), at most 16; 2 on a 2-core machine, as before, and enough for nvJPEG's hybrid decoder on a GPU host."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(16, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))


LOADERS = ("auto", "dali", "nvjpeg", "torch")
LOADER_HELP = ("dali: DALI pipeline (nvJPEG on a GPU, DALI's CPU decoder otherwise); nvjpeg: torchvision's batched "
               "nvJPEG decode and batched crop/resize on the device (libjpeg-turbo on a CPU device); torch: PIL in "
               "DataLoader workers; auto: dali when installed, else nvjpeg on a CUDA device, else torch")


def bird_loader(kind, samples, img_size, batch_size, train, mean, std, device, **kw):
    """kind: 'dali', 'nvjpeg', 'torch' or 'auto' (see default_loader); workers=None: default_workers()."""
    if kind == "auto":
        kind = default_loader(device)
    if "workers" in kw and kw["workers"] is None:
        kw["workers"] = default_workers()
    if kind == "dali":
        if not dali_available():
            raise DataError("--loader dali needs the nvidia-dali package (pip install nvidia-dali-cuda130, or -cuda120 with torch's CUDA 12 wheels)")
        return DaliImageLoader(samples, img_size, batch_size, train, mean, std, device, **kw)
    if kind == "nvjpeg":
        return NvjpegImageLoader(samples, img_size, batch_size, train, mean, std, device, **kw)
    return TorchImageLoader(samples, img_size, batch_size, train, mean, std, device, **kw)


# ----------------------------------------------------------------------------- command line

def prepare(cifar_dir=None, birds_dir=None, arch=None, weights=None):
    """What run_all.sh needs before its first run: fetch each missing piece (CIFAR-100 into cifar_dir, CUB-200-2011
    beside birds_dir, ImageNet weights into torchvision's/timm's cache); return one sentence per piece still missing."""
    problems = []
    if cifar_dir:
        try:
            find_cifar_dir(cifar_dir)
        except DataError:
            try:
                Path(cifar_dir).mkdir(parents=True, exist_ok=True)
                download_cifar100(cifar_dir)
            except (DataError, OSError) as e:
                problems.append(f"CIFAR-100 is not in {cifar_dir}: {e}")
    if birds_dir:
        try:
            find_cub_root(birds_dir)
        except DataError:
            root = Path(birds_dir)
            parent = root.parent if root.name == "CUB_200_2011" else root
            try:
                parent.mkdir(parents=True, exist_ok=True)
                download_cub2011(parent)
            except (DataError, OSError) as e:
                problems.append(f"CUB-200-2011 is not in {birds_dir}: {e}")
    if arch and weights == "imagenet":
        import models
        try:
            models.make_backbone(arch, pretrained_imagenet=True)
        except ValueError as e:
            problems.append(str(e))
        except Exception as e:  # offline hub or download failure, whatever the library raises
            problems.append(f"ImageNet weights for {arch} are not cached and could not be fetched "
                            f"({type(e).__name__}); connect once so torchvision/timm cache them, or set "
                            f"BIRDS_WEIGHTS to a local state-dict file")
    elif weights not in (None, "none", "imagenet") and not Path(weights).is_file():
        problems.append(f"the weights file {weights} does not exist")
    return problems


def main():
    parser = argparse.ArgumentParser(description="Download the data sets, or (prepare) check and fetch everything "
                                                 "run_all.sh needs.")
    parser.add_argument("what", choices=["cifar100", "cub2011", "prepare"],
                        help="cifar100 / cub2011: fetch one data set; prepare: fetch whatever of the next flags is missing")
    parser.add_argument("--data-dir", default="data", help="folder to download and unpack into (cifar100, cub2011)")
    parser.add_argument("--cifar-dir", default=None, help="prepare: CIFAR-100 folder")
    parser.add_argument("--birds-dir", default=None, help="prepare: CUB_200_2011 folder")
    parser.add_argument("--arch", default=None, help="prepare: backbone whose ImageNet weights must be cached")
    parser.add_argument("--weights", default=None, help="prepare: imagenet, none or a weights file")
    args = parser.parse_args()
    if args.what == "prepare":
        problems = prepare(args.cifar_dir, args.birds_dir, args.arch, args.weights)
        for p in problems:
            print(f"error: {' '.join(p.split())}", file=sys.stderr)
        sys.exit(1 if problems else 0)
    try:
        Path(args.data_dir).mkdir(parents=True, exist_ok=True)
        path = download_cifar100(args.data_dir) if args.what == "cifar100" else download_cub2011(args.data_dir)
    except DataError as e:
        sys.exit(f"error: {e}")
    print(f"ready: {path}")


if __name__ == "__main__":
    main()
