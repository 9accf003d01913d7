"""The three bird loaders, and the choice between them (`bird_loader`, `--loader auto`).

All three draw their sample order from the same `EpochSampler`, each crop and mirror from the same seeded
`draw_augmentation`, and resize as Pillow does, so that a checkpoint predicts the same whichever loader reads its
images: `TorchImageLoader` decodes with PIL in DataLoader workers; `NvjpegImageLoader` has reader workers hand over
each batch's file bytes and decodes and resamples the batch on the device (device_images.py); `DaliImageLoader` runs
a DALI pipeline (nvJPEG on a GPU, DALI's CPU decoder otherwise) fed by the same readers. Every loader takes every
format Pillow opens (HEIC through pillow-heif): what the fast path does not decode (a GIF, a PNG, a file its decoder
fails on) goes through PIL in the same batch, and on a CPU a large JPEG is decoded at 1/2, 1/4 or 1/8 of its size
straight from its DCT where the crop allows (`draft`). `--loader auto` picks DALI
where it imports, else nvjpeg on a CUDA device, else torch. The eval preprocessing (shorter side to img_size / 0.875,
centre crop, Pillow's antialiased bilinear) is one for all three (on the real subset: torch and nvjpeg predict the same
to the image, DALI 99.2% of them; BENCHMARKS.md), and every loader applies EXIF orientation. A broken file is skipped
when training and black in a test set (every id keeps its row). Every loader yields `(images, labels)` already on the
device, float and normalised, and has `set_epoch(epoch)`, `len()` (batches per epoch), `start_step` (to resume
mid-epoch) and `close()`. The files they read come from bird_data.py. Not run directly.
"""
import collections
import io
import math
import os
from typing import NamedTuple

import numpy as np
import torch

import devices
from bird_data import (dct_factor, dct_scalable, draft, jpeg_end, oriented, pil_rgb, pil_rgb_scaled, placeholder_jpeg, quiet_bombs,
                       scan_images, to_rgb, upright_size, warn_broken)
from data import DataError, EpochSampler, ListFlag, SampledLoader, warn
from device_images import Geometry, decode_jpegs, resample_batch, sample_geometry, to_device


def scaled_geometry(geometry, factor, image):
    """A sample's Geometry in the pixels of its source decoded at 1/factor (a JPEG's DCT-scaled decode, `draft`): every
    coordinate divided by the factor, the bounds kept within the decoded image (uint8 (3, H, W))."""
    g = Geometry(*(field / factor for field in geometry))
    return g._replace(hi_x=np.minimum(g.hi_x, image.shape[2]), hi_y=np.minimum(g.hi_y, image.shape[1]))


def ppm_bytes(image):
    """uint8 (3, H, W) pixels as a binary PPM file's bytes (a header and the raw pixels: no encoder needed), which DALI
    decodes to exactly these pixels: how PIL's decodes reach a DALI pipeline."""
    header = torch.frombuffer(bytearray(f"P6\n{image.shape[2]} {image.shape[1]}\n255\n".encode()), dtype=torch.uint8)
    return torch.cat([header, image.permute(1, 2, 0).reshape(-1)])


def file_bytes(path):
    """A file's bytes as a uint8 tensor; a JPEG's without what follows its end marker (a Motion Photo's video)."""
    blob = np.fromfile(path, dtype=np.uint8)
    if blob[:3].tobytes() == b"\xff\xd8\xff" and blob[-2:].tobytes() != b"\xff\xd9":
        blob = blob[:jpeg_end(blob.tobytes()) or len(blob)]
    return torch.from_numpy(blob)


# ----------------------------------------------------------------------------- the augmentation every loader draws

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
    if not aug:  # evaluation: nothing to draw (a generator per image cost 40 us)
        return None, False
    rng = np.random.default_rng(sample_seed)
    box = sample_crop(width, height, rng, scale) if "rrc" in aug else None
    return box, "flip" in aug and rng.random() < 0.5


BIRD_AUG = ListFlag(("rrc", "flip"), "augmentation")  # the birds' --aug


class BirdLoader(SampledLoader):
    """What the three bird loaders share: their arguments, the sample order (shuffled, and the last short batch
    dropped, when training), the normalisation on the device and channels-last. Each loader's `_batches(batches)`
    turns this epoch's (sample index, augmentation seed) batches into (images, labels) on the device; `__iter__`
    resumes at start_step and gives every batch the memory format the model wants."""

    def __init__(self, samples, img_size, batch_size, train, mean, std, device, aug=(), seed=0, workers=2,
                 rank=0, world=1, scale=(0.25, 1.0), channels_last=False, keep_broken=False, crop_frac=0.875):
        self.samples, self.img_size, self.device = samples, img_size, torch.device(device)
        self.aug = set(aug) if train else set()  # evaluation: the centre crop, never augmented
        self.scale, self.crop_frac, self.keep_broken = scale, crop_frac, keep_broken
        self.workers, self.channels_last, self.mean_std = workers, channels_last, (mean, std)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255
        self.sampler = EpochSampler(len(samples), batch_size, shuffle=train, seed=seed,
                                    drop_last=train and len(samples) > batch_size, rank=rank, world=world)

    def normalise(self, xb):
        """uint8 grey levels to the model's normalised floats."""
        return (xb.float() - self.mean) / self.std

    def __iter__(self):
        for xb, yb in self._batches(self._epoch_items()):
            yield xb.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format), yb

    def close(self):
        """Release what the loader keeps between epochs (reader processes; DALI's pipeline with its threads and
        decoder buffers) once it is done: a script calls it after a loader's last pass."""
        self.readers = self.pipe = self._reading = None

    def _batches(self, batches):
        raise NotImplementedError


# ----------------------------------------------------------------------------- PIL in DataLoader workers

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
        s = self.img_size
        try:
            with quiet_bombs(), Image.open(path) as im:
                crop, mirror, geometry = self._draw(im, box, sample_seed)
                factor = 1 if geometry is None else draft(im, dct_factor(min(geometry.scale_x[0], geometry.scale_y[0])))
                im = to_rgb(oriented(im))
        except Exception as e:  # any decoder failure: never crash the epoch
            warn_broken(path, f"cannot decode ({e})", self.keep_broken)
            if not self.keep_broken:
                return None
            im, box, factor = Image.new("RGB", (s, s)), None, 1
            crop, mirror = draw_augmentation(sample_seed, s, s, self.aug, self.scale)
        if factor > 1:  # a large JPEG decoded at 1/factor: the same source box, resampled as Pillow does
            image = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
            image = resample_batch([image], scaled_geometry(geometry, factor, image), s, [mirror])[0]
            return self._finish(image), label
        if box is not None:
            x, y, w, h = box
            im = im.crop((int(x), int(y), int(x + w), int(y + h)))
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
        return self._finish(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)), label

    def _draw(self, im, box, sample_seed):
        """The sample's crop and mirror (draw_augmentation, on its upright size within its crop box) and where it
        comes from in the source image (sample_geometry; None where no DCT-scaled decode can apply), from the header
        alone: before any pixel is decoded."""
        width, height = upright_size(im)
        region = (0, 0, width, height)
        if box is not None:  # PIL's crop: whole pixels, and at least one of them
            region = (int(box[0]), int(box[1]), max(int(box[0]) + 1, int(box[0] + box[2])),
                      max(int(box[1]) + 1, int(box[1] + box[3])))
        crop, mirror = draw_augmentation(sample_seed, region[2] - region[0], region[3] - region[1], self.aug, self.scale)
        if not dct_scalable(region[2] - region[0], region[3] - region[1], self.img_size):
            return crop, mirror, None
        return crop, mirror, sample_geometry([width], [height], [region], [crop or (math.nan,) * 4], self.img_size,
                                             self.crop_frac)

    def _finish(self, image):
        """uint8 (3, s, s) to what the worker hands over: normalised floats where it normalises (CPU training)."""
        if self.scale_bias is not None:
            image = torch.addcmul(self.scale_bias[1], image.float(), self.scale_bias[0])
        return image


def _collate(batch):
    batch = [b for b in batch if b is not None]
    if not batch:
        return torch.zeros(0, 3, 1, 1), torch.zeros(0, dtype=torch.long)
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch])


class TorchImageLoader(BirdLoader):
    """PIL decoding in DataLoader workers; normalisation on the GPU (uint8 crosses the bus), or in the
    workers when training on the CPU."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        on_gpu = self.device.type == "cuda"
        mean, std = self.mean_std
        self.dataset = BirdImages(self.samples, self.img_size, self.aug, self.scale, self.crop_frac, self.keep_broken,
                                  None if on_gpu else mean, None if on_gpu else std)

    def _batches(self, batches):
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=batches, num_workers=self.workers, collate_fn=_collate,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
            prefetch_factor=4 if self.workers else None,
            generator=self.sampler.generator(salt=2))  # else DataLoader draws from the global RNG (dropout's)
        size = self.img_size
        for xb, yb in loader:
            if len(xb) == 0:  # every image of the batch was broken, or this rank's share was nothing
                xb = torch.zeros(0, 3, size, size, dtype=torch.uint8 if self.dataset.scale_bias is None else torch.float32)
            xb = xb.to(self.device, non_blocking=True)  # every batch, the empty one too
            if xb.dtype == torch.uint8:
                xb = self.normalise(xb)
            yield xb, yb.to(self.device, non_blocking=True)


# ----------------------------------------------------------------------------- reader workers (nvjpeg, DALI)

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
    skip: bool = False  # DALI: the stand-in for a broken file that is skipped (DALI runs full batches; cut off after)


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
    takes), and with `cpu_decode` every JPEG that a DCT-scaled decode covers (a large photo: `draft`), are decoded
    here by PIL, at 1/2, 1/4 or 1/8 of their size where the sample's crop allows, and join the same batch: as pixels,
    or with `as_ppm` (DALI) as PPM bytes. Broken files give None (skipped) or, with keep_broken, a black image.
    Returns a FileItem whose region and crop are in the pixels of what it holds."""

    def __init__(self, samples, sizes, img_size, aug=(), scale=(0.25, 1.0), broken=(), pil=(), keep_broken=False,
                 placeholder=None, crop_frac=0.875, cpu_decode=False, as_ppm=False):
        self.samples, self.sizes, self.img_size, self.aug, self.scale = samples, sizes, img_size, set(aug), scale
        self.broken, self.pil, self.keep_broken, self.placeholder = set(broken), set(pil), keep_broken, placeholder
        self.crop_frac, self.cpu_decode, self.as_ppm = crop_frac, cpu_decode, as_ppm

    def __len__(self):
        return len(self.samples)

    def _black(self, index, label):
        s = self.img_size
        if self.placeholder is not None:  # DALI decodes a placeholder JPEG
            return FileItem(index, torch.from_numpy(self.placeholder), False, label, (0, 0, 8, 8), None, False)
        return FileItem(index, torch.zeros(3, s, s, dtype=torch.uint8), True, label, (0, 0, s, s), None, False)

    def _skipped(self, index, label):
        """A broken file's item: black with keep_broken; else None (skipped), or for DALI a black stand-in marked skip."""
        if self.keep_broken:
            return self._black(index, label)
        return None if self.placeholder is None else self._black(index, label)._replace(skip=True)

    def __getitem__(self, item):
        index, sample_seed = item
        path, label, box = self.samples[index]
        if index in self.broken:
            return self._skipped(index, label)
        width, height = self.sizes[index]
        crop, mirror = draw_augmentation(sample_seed, width, height, self.aug, self.scale)
        region = (0, 0, width, height)
        if box is not None:
            region = (int(box[0]), int(box[1]), int(box[0]) + width, int(box[1]) + height)
        factor = 1
        # how far a DCT-scaled decode may shrink it (only PIL does that)
        if (index in self.pil or self.cpu_decode) and dct_scalable(width, height, self.img_size):
            g = sample_geometry([region[2]], [region[3]], [region], [crop or (math.nan,) * 4], self.img_size,
                                self.crop_frac)
            factor = dct_factor(min(g.scale_x[0], g.scale_y[0]))
        if index not in self.pil and factor == 1:
            return FileItem(index, file_bytes(path), False, label, region, crop, mirror)
        try:
            image, factor = pil_rgb_scaled(path, factor)
        except Exception as e:  # any decoder failure: never crash the epoch
            warn_broken(path, f"cannot decode ({e})", self.keep_broken)
            return self._skipped(index, label)
        region = tuple(v / factor for v in region)
        crop = None if crop is None else tuple(v / factor for v in crop)
        if self.as_ppm:
            return FileItem(index, ppm_bytes(image), False, label, region, crop, mirror)
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
        self.batch_list = []  # this epoch's batches: a list DataLoader iterates afresh each epoch
        workers = min(workers, self.MAX_READERS) if torch.device(device).type == "cuda" else 0
        self.loader = torch.utils.data.DataLoader(
            files, batch_sampler=self.batch_list, num_workers=workers, collate_fn=collate_files,
            prefetch_factor=4 if workers else None, persistent_workers=workers > 0,
            generator=seed_generator)  # else DataLoader draws its base seed from the global RNG (dropout's)

    def epoch(self, batches):
        self.batch_list[:] = batches
        return iter(self.loader)


# ----------------------------------------------------------------------------- batched decode on the device

class NvjpegImageLoader(BirdLoader):
    """Batched JPEG decoding on the device (`decode_jpegs`: TorchCodec's or torchvision's nvJPEG decoder) and batched
    resampling there.

    DataLoader workers only read file bytes and draw each sample's crop and mirror (`BirdFiles`), and hand each batch
    over as one tensor of bytes (`FileBatch`). The device decodes the batch in one call, then crops, resizes
    (Pillow's antialiased bilinear, as the torch loader's PIL), mirrors and normalises it in two matmuls
    (`resample_batch`): no per-image loop. Files nvJPEG does not take (PNG under a .jpg name, grayscale, CMYK,
    lossless/arithmetic JPEG, EXIF-rotated) are found by `scan_images` and decoded by PIL in the workers into the same
    batch. On a CPU device the same code runs with libjpeg-turbo (the tests' path)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        sizes, broken, pil, self.pil_reasons = scan_images(self.samples, pil_for_gpu_refused=True)
        for i, why in broken.items():  # as the torch loader does when PIL fails on them
            warn_broken(self.samples[i][0], why, self.keep_broken)
        self.files = BirdFiles(self.samples, sizes, self.img_size, self.aug, self.scale, broken, pil, self.keep_broken,
                               crop_frac=self.crop_frac, cpu_decode=self.device.type != "cuda")
        self.readers = None

    def _batches(self, batches):
        if self.readers is None:
            self.readers = FileReaders(self.files, self.workers, self.sampler.generator(salt=2), self.device)
        for batch in self.readers.epoch(batches):
            yield self._to_batch(batch)

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
        return self.normalise(x), to_device(labels, self.device)


# ----------------------------------------------------------------------------- DALI, and the choice of loader

def dali_available():
    try:
        import nvidia.dali  # noqa: F401
        return True
    except Exception:
        return False


class DaliImageLoader(BirdLoader):
    """DALI pipeline: JPEG decode (nvJPEG, device='mixed' on a GPU; DALI's CPU decoder otherwise), then one resize of
    each sample's source box to img_size (antialiased), mirror and normalisation inside DALI. DataLoader workers feed
    it (`BirdFiles`): they read the bytes and draw each sample's crop and mirror with `draw_augmentation`, as the other
    loaders do, and `sample_geometry` turns those into the same source boxes the nvJPEG loader resamples: same order,
    same crops, the eval resize and centre crop of PIL, and an epoch resumes exactly at any step."""
    on_torch_stream = True  # False: host-synchronous outputs, as before (tools/gpu_check.sh times both)

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        samples = self.samples
        # DALI stops the whole pipeline on an undecodable file: catch them up front (headers only), and give DALI only
        # JPEGs: PIL decodes every other format (GIF, HEIC, AVIF, PNG, ...) in the readers, handed over as PPM
        sizes, bad, pil, self.pil_reasons = scan_images(samples, pil_for_gpu_refused=False, pil_for_non_jpeg=True)
        for i, why in bad.items():
            warn_broken(samples[i][0], why, self.keep_broken)
        placeholder = np.frombuffer(placeholder_jpeg(), dtype=np.uint8).copy()  # writable: workers wrap it in a tensor
        self.files = BirdFiles(samples, sizes, self.img_size, self.aug, self.scale, bad, pil, self.keep_broken,
                               placeholder, self.crop_frac, cpu_decode=self.device.type != "cuda", as_ppm=True)
        self.local_batch = self.sampler.batch_size // self.sampler.world
        self.build_args, self.pipe, self.readers = (self.img_size, *self.mean_std, self.workers), None, None
        self._skipped = collections.deque()  # per batch fed, in feeding order: the positions of skipped stand-ins

    def _build(self, img_size, mean, std, workers):
        from nvidia.dali import fn, pipeline_def, types
        gpu = self.device.type == "cuda"

        # the device's own GPU; one named without an index ("cuda") is the current device, as for torch's tensors
        index = self.device.index if self.device.index is not None else torch.cuda.current_device() if gpu else None

        @pipeline_def(batch_size=self.local_batch, num_threads=max(1, workers), device_id=index, prefetch_queue_depth=2,
                      exec_dynamic=True)
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
            # HWC out: permuted to NCHW on the torch side, it is channels-last already (no layout copy)
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="HWC", mirror=mirror,
                                              mean=[m * 255 for m in mean], std=[s * 255 for s in std])
            return images, labels.gpu() if gpu else labels

        built = pipe()
        built.build()
        return built

    def _feed(self, info=None):
        batch = next(self._reading)  # StopIteration ends DALI's epoch; the workers have read and drawn everything
        items, blobs = zip(*batch.encoded(), strict=True)  # DALI decodes every file, the black placeholder's too
        self._skipped.append([k for k, it in enumerate(items) if it.skip])
        regions = [it.region for it in items]  # DALI decodes whole files: a region ends where the file does
        geometry = sample_geometry([r[2] for r in regions], [r[3] for r in regions], regions,
                                   [it.crop or (math.nan,) * 4 for it in items], self.img_size, self.crop_frac)
        start = np.stack([geometry.start_y, geometry.start_x], 1).astype(np.float32)  # DALI's ROI: shape order, (y, x)
        end = start + self.img_size * np.stack([geometry.scale_y, geometry.scale_x], 1).astype(np.float32)
        return ([blob.numpy() for blob in blobs], [np.array(it.label, dtype=np.int64) for it in items],
                [np.array(int(it.mirror), dtype=np.int32) for it in items], list(start), list(end))

    def _batches(self, batches):
        # DALI needs full batches: a short one is padded (an empty one, on a rank whose share of the last global
        # batch is nothing, with sample 0) and the padding cut off afterwards, with the stand-ins of skipped files.
        sizes = [len(b) for b in batches]
        padded = [b + [b[-1] if b else (0, 0)] * (self.local_batch - len(b)) for b in batches]
        step = 0
        while step < len(padded):
            pipe, stream = self._start(padded[step:])
            try:
                for size in sizes[step:]:
                    images, labels = pipe.run(stream) if stream is not None else pipe.run()
                    skipped = self._skipped.popleft()
                    keep = [k for k in range(size) if k not in skipped]
                    # zero-copy (exec_dynamic keeps each batch alive while torch holds it), as DALI's own iterator does
                    images = torch.from_dlpack(images.as_tensor()).permute(0, 3, 1, 2)
                    labels = torch.from_dlpack(labels.as_tensor()).long().view(-1)
                    if len(keep) < size:
                        index = torch.tensor(keep, dtype=torch.long).to(images.device)
                        yield images.index_select(0, index), labels.index_select(0, index)
                    else:
                        yield images[:size], labels[:size]
                    step += 1
            except RuntimeError as e:  # a file that passed the header check but does not decode stops DALI
                if not self._to_pil(e, padded[step]):
                    raise
                continue  # a fresh pipeline from this batch on
            self.pipe = pipe  # ran to the end of the epoch: reusable after reset()

    def _start(self, batches):
        """The pipeline and its stream for these batches: the last one reset, or (first epoch, one left part-way, or
        after a decoding failure) a fresh one."""
        if self.readers is None:
            self.readers = FileReaders(self.files, self.workers, self.sampler.generator(salt=2), self.device)
        self._reading, self._skipped = self.readers.epoch(batches), collections.deque()
        if self.pipe is None:
            self.pipe = self._build(*self.build_args)
        else:
            self.pipe.reset()
        pipe, self.pipe = self.pipe, None
        # On a GPU the outputs are bound to torch's stream (no host sync per batch, so DALI's prefetch overlaps
        # the training step) and handed to torch on that stream; on the CPU they are host tensors anyway.
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" and self.on_torch_stream else None
        return pipe, stream

    def _to_pil(self, error, batch):
        """DALI's decoder failing on a batch (its message names no file): that batch's JPEGs go to PIL from now on
        (in fresh readers), so that the file PIL cannot decode either is named in one warning and skipped, or black in
        a test set, and the others are kept. False for any other DALI or CUDA error, which is no image's fault."""
        todo = {index for index, _ in batch} - self.files.pil - self.files.broken
        if "decoders.image" not in str(error) or not todo:
            return False
        names = ", ".join(self.samples[i][0] for i in sorted(todo)[:3]) + (" ..." if len(todo) > 3 else "")
        warn(f"DALI's decoder failed on a batch ({' '.join(str(error).split()[-8:])}); PIL decodes its "
             f"{len(todo)} files instead: {names}")
        self.files.pil |= todo
        self.readers = None  # reader processes hold a copy of the files' routing
        return True


def default_loader(device, say=True):
    """--loader auto: DALI wherever it imports and, on a GPU, where its CUDA build runs on this machine's driver
    (nvJPEG on a GPU, its CPU decoder otherwise: measured 2x the PIL paths on CPU, BENCHMARKS.md figure 4); else, on a
    CUDA device, torchvision's batched nvJPEG (a DALI the driver cannot run said in one line, `say`); else PIL in
    DataLoader workers. Decided from the device the run resolved, not from what the machine has."""
    gpu = torch.device(device).type == "cuda"
    if dali_available():
        too_new = devices.dali_too_new() if gpu else None
        if too_new is None:
            return "dali"
        if say:
            warn(f"--loader auto: nvjpeg, not DALI: {too_new}")
    return "nvjpeg" if gpu else "torch"


def default_workers():
    """--workers by default: this process's share of the CPU cores it may use (torchrun's LOCAL_WORLD_SIZE processes
    share them), at most 16; 2 on a 2-core machine, as before, and enough for nvJPEG's hybrid decoder on a GPU host."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(16, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))


LOADERS = ("auto", "dali", "nvjpeg", "torch")
LOADER_HELP = ("dali: DALI pipeline (nvJPEG on a GPU, DALI's CPU decoder otherwise); nvjpeg: batched JPEG decode "
               "(TorchCodec's, else torchvision's) and batched crop/resize on the device (libjpeg-turbo on a CPU "
               "device); torch: PIL in DataLoader workers; auto: dali when installed, else nvjpeg on a CUDA device, "
               "else torch; a DALI whose CUDA build this machine's driver cannot run is passed over, said in one line")


def bird_loader(kind, samples, img_size, batch_size, train, mean, std, device, **kw):
    """kind: 'dali', 'nvjpeg', 'torch' or 'auto' (see default_loader); workers=None: default_workers()."""
    if kind == "auto":
        kind = default_loader(device)
    if "workers" in kw and kw["workers"] is None:
        kw["workers"] = default_workers()
    if kind == "dali":
        if not dali_available():
            raise DataError("--loader dali needs the nvidia-dali package (pip install nvidia-dali-cuda130, or -cuda120 with torch's CUDA 12 wheels)")
        too_new = devices.dali_too_new() if torch.device(device).type == "cuda" else None
        if too_new is not None:
            raise DataError(f"--loader dali: {too_new}")
        return DaliImageLoader(samples, img_size, batch_size, train, mean, std, device, **kw)
    if kind == "nvjpeg":
        return NvjpegImageLoader(samples, img_size, batch_size, train, mean, std, device, **kw)
    return TorchImageLoader(samples, img_size, batch_size, train, mean, std, device, **kw)
