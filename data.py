"""Finding and downloading both data sets, and CIFAR-100 from disk to batches on the device.

Downloads (md5-checked, resumed, unpacked atomically) and one find-or-download function per data set, which takes the
data set's own folder or its parent (`find_or_download_cifar`, `find_or_download_cub`). CIFAR-100 (the official
`cifar-100-python` pickles) is read with a restricted unpickler, split 45k/5k (stratified, seeded), and kept on the
device as one uint8 tensor; crop/flip/cutout and normalisation run batched on the device (`DeviceLoader`). What every
loader of both jobs shares is here too: the seeded sample order (`EpochSampler`, `stream_seed`), `SampledLoader`,
MixUp/CutMix on the device (`mix_batch`) and the list-flag type of `--aug` and `--tta` (`ListFlag`). The birds are in
bird_data.py (files on disk) and bird_loaders.py (batches).

    python data.py cifar100 --data-dir data           # fetch CIFAR-100 into data/cifar-100-python
    python data.py cub2011 --data-dir data            # fetch CUB-200-2011 into data/CUB_200_2011
    python data.py prepare --cifar-dir data ...        # what run_all.sh needs, fetched where missing
"""
import argparse
import math
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


class DataError(Exception):
    """Bad input data: the message is one sentence meant for the user."""


def warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- downloads

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
CUB2011_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
CUB2011_MD5 = "97eceeb196236b17998738112f37df78"


def download(url, dest, md5):
    """Fetch url to dest, resuming a partial `.part` file with an HTTP Range request (why not torchvision's
    download_url: it starts over), md5-checked with torchvision's check_integrity."""
    from torchvision.datasets.utils import check_integrity
    dest = Path(dest)
    if check_integrity(dest, md5):
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
    if not check_integrity(part, md5):
        part.unlink()
        raise DataError(f"{url} downloaded with the wrong md5 (expected {md5}); the partial file was "
                        f"removed, run again to retry")
    os.replace(part, dest)
    return dest


def extract_atomically(archive, into, top_name):
    """Unpack archive so that `into/top_name` appears whole or not at all (why not torchvision's extract_archive: it
    unpacks in place and without tarfile's 'data' filter)."""
    into = Path(into)
    if (into / top_name).exists():
        return into / top_name
    with tempfile.TemporaryDirectory(dir=into, prefix=".extract-") as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")  # 'data' filter refuses absolute paths, links out, devices
        os.replace(Path(tmp) / top_name, into / top_name)
    return into / top_name


def find_or_download(data_dir, missing_ok, find, url, md5, top_name):
    """The data set's folder: `data_dir` itself or its subfolder `top_name`, whichever holds it (`find`). Only where
    neither does and a download is asked for (`missing_ok`), fetch `url` into the folder that is to hold `top_name`
    (the parent of a `data_dir` named `top_name`), unpack it there, then find it."""
    try:
        return find(data_dir)
    except DataError:
        if not missing_ok:
            raise
    data_dir = Path(data_dir)
    into = data_dir.parent if data_dir.name == top_name else data_dir
    into.mkdir(parents=True, exist_ok=True)
    extract_atomically(download(url, into / url.rsplit("/", 1)[1], md5), into, top_name)
    return find(data_dir)


def find_or_download_cifar(data_dir, download=False):
    """The cifar-100-python folder in data_dir (or data_dir itself), downloaded there first where it is missing."""
    return find_or_download(data_dir, download, find_cifar_dir, CIFAR100_URL, CIFAR100_MD5, "cifar-100-python")


def find_or_download_cub(data_dir, download=False):
    """The CUB_200_2011 folder (data_dir itself or its subfolder), downloaded first where it is missing."""
    return find_or_download(data_dir, download, find_cub_root, CUB2011_URL, CUB2011_MD5, "CUB_200_2011")


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
    root = find_or_download_cifar(data_dir, download_if_missing)
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


# ----------------------------------------------------------------------------- sample order, shared by every loader

def stream_seed(seed, epoch, index, salt=0):
    """The seed of one random stream of a run: sample `index`'s augmentation in `epoch` (salt 0); an epoch's order,
    crop draws and reader workers (index 0, salt 0, 1, 2); training step `index`'s MixUp/CutMix (salt: the rank times
    104,729). seed x 1,000,003 + epoch x 7,919 + index + salt: multipliers that are primes larger than any salt or
    index used together, so that neighbouring seeds and epochs do not share a stream in practice. They are the
    constants every recorded run used, and stay: changing them would change every draw of a resumed or rerun run."""
    return seed * 1_000_003 + epoch * 7919 + index + salt


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
        return torch.Generator().manual_seed(stream_seed(self.seed, self.epoch, 0, salt))

    def order(self):
        if self.shuffle:
            return torch.randperm(self.n, generator=self.generator())
        return torch.arange(self.n)

    def __len__(self):
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def local_count(self):
        """How many samples of an epoch this rank takes (its share of every global batch)."""
        return sum(len(pos) for pos, _ in self.batches())

    def sample_seeds(self, pos):
        """Seeds for the augmentation of the samples at these positions of this epoch's order."""
        return [stream_seed(self.seed, self.epoch, int(p)) for p in pos]

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

    def close(self):
        """Release what the loader keeps between epochs, once it is done (the bird loaders' readers and pipelines)."""

    def __len__(self):
        return len(self.sampler)

    def _epoch_items(self):
        """This epoch's batches from start_step on, each a list of (sample index, augmentation seed); start_step is
        used once."""
        batches = [list(zip(idx.tolist(), self.sampler.sample_seeds(pos), strict=True))
                   for pos, idx in self.sampler.batches(self.start_step)]
        self.start_step = 0
        return batches


# ----------------------------------------------------------------------------- augmentation on the device

def augment_batch(images, idx, shifts=None, flips=None, centres=None, pad=0, cutout=0, scale=1 / 255, bias=0.0):
    """Gather images[idx] with a random crop, mirror and cutout, and normalise, in one pass.

    `images` is uint8 (M, N, C, H + 2*pad, W + 2*pad): the data set zero-padded by `pad`, and with
    M == 2 its mirror image as images[1], so a mirrored crop is a plain crop of the mirrored copy.
    `shifts` (B, 2) pick the crop's top-left corner in 0..2*pad, `flips` (B,) mirror (needs M == 2),
    `centres` (B, 2) place a cutout x cutout square (set to 0 after normalising: the training mean with --normalize).
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
    out = torch.addcmul(torch.as_tensor(bias, device=out.device), out.float(), torch.as_tensor(scale, device=out.device))
    if centres is not None and cutout:  # the hole is 0 after normalising: the mean, as DeVries & Taylor's code has it
        top, left = centres[:, 0] - cutout // 2, centres[:, 1] - cutout // 2
        out = out.masked_fill(box_mask(top, top + cutout, left, left + cutout, h, w), 0)
    return out


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


class ListFlag:
    """The argparse type of a comma-separated list flag (--aug flip,crop, --tta flip,shift): a name outside `choices`
    is argparse's own usage error (exit 2), naming the flag and the values it takes. The flag's value stays text, as
    given (spaces dropped; none for an empty list), so config.json reads as the command line did; `names` reads it
    back as a set."""

    def __init__(self, choices, what):
        self.choices, self.what = tuple(choices), what
        self.__name__ = what  # what argparse calls the type in its messages

    def names(self, text):
        return {n for n in (text or "none").replace(" ", "").split(",") if n and n != "none"}

    def __call__(self, text):
        unknown = sorted(self.names(text) - set(self.choices))
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {self.what} {', '.join(unknown)}; choose none or a "
                                             f"comma-separated list of {', '.join(self.choices)}")
        return text.replace(" ", "") or "none"

    def help(self):
        return f"none, or a comma-separated list of {', '.join(self.choices)}"


AUG = ListFlag(("flip", "crop", "cutout"), "augmentation")  # CIFAR's --aug


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


def micro_batch(args, world=1):
    """The global batch of one --accum-steps micro-batch, rounded up to a multiple of the processes."""
    return math.ceil(args.batch_size / args.accum_steps / world) * world


def cifar_loaders(data, args, device, rank=0, world=1, split=None):
    """train/val/test DeviceLoaders for CIFAR-100 from `load_cifar100` output and parsed flags."""
    train_idx, val_idx = split or stratified_split(data["train_y"], val_per_class=args.val_per_class, seed=args.split_seed)
    train_x = data["train_x"][train_idx]
    mean, std = channel_stats(train_x) if args.normalize else (None, None)
    aug = AUG.names(args.aug)

    def on_device(x, y):
        return torch.from_numpy(np.ascontiguousarray(x)).to(device), torch.from_numpy(y).to(device)

    common = dict(mean=mean, std=std, rank=rank, world=world, channels_last=args.channels_last)
    train = DeviceLoader(*on_device(train_x, data["train_y"][train_idx]), args.batch_size, shuffle=True,
                         aug=aug, seed=args.seed, drop_last=len(train_idx) > args.batch_size,
                         cutout=args.cutout_size, compile=args.compile, **common)
    # evaluation in batches of 500 per process; with --accum-steps in the training micro-batches (they fit)
    eval_batch = max(args.batch_size, 500) * world if args.accum_steps == 1 else micro_batch(args, world)
    val = DeviceLoader(*on_device(data["train_x"][val_idx], data["train_y"][val_idx]), eval_batch, **common)
    test = DeviceLoader(*on_device(data["test_x"], data["test_y"]), eval_batch,  # rank 0 predicts all of it
                        **{**common, "rank": 0, "world": 1})
    # rank 0's error analysis after training reads all of validation, not its shard
    val_all = val if world == 1 else DeviceLoader(*on_device(data["train_x"][val_idx], data["train_y"][val_idx]),
                                                  eval_batch, **{**common, "rank": 0, "world": 1})
    return train, val, test, dict(mean=mean, std=std, train_size=len(train_idx), val_size=len(val_idx), val_all=val_all)


# ----------------------------------------------------------------------------- command line

def prepare(cifar_dir=None, birds_dir=None, arch=None, weights=None):
    """What run_all.sh needs before its first run: fetch each missing piece (CIFAR-100 into cifar_dir, CUB-200-2011
    beside birds_dir, ImageNet weights into torchvision's/timm's cache); return one sentence per piece still missing."""
    problems = []
    for name, folder, fetch in (("CIFAR-100", cifar_dir, find_or_download_cifar),
                                ("CUB-200-2011", birds_dir, find_or_download_cub)):
        if folder:
            try:
                fetch(folder, download=True)
            except (DataError, OSError) as e:
                problems.append(f"{name} is not in {folder}: {e}")
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
        fetch = find_or_download_cifar if args.what == "cifar100" else find_or_download_cub
        path = fetch(args.data_dir, download=True)
    except (DataError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"ready: {path}")


if __name__ == "__main__":
    main()
