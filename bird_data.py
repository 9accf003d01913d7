"""Bird images on disk, before any loader: the CUB-200-2011 text files (`load_cub`), a train/ test/ image folder
(`load_image_folder`), cheap checks of every file (`check_image_file`, `drop_bad_images`, one warning per broken
file: `warn_broken`) and the header scan that tells the GPU decoder's files from PIL's (`jpeg_header` on PIL's lazy
open, `scan_images`: sizes, EXIF orientation, coding process) without decoding any image. The loaders are in
bird_loaders.py. Not run directly.
"""
import contextlib
import io
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from data import DataError, find_cub_root, warn


# ----------------------------------------------------------------------------- the CUB and ImageFolder layouts

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


# The suffixes a folder search takes: what phones, cameras and the web save (HEIC/HEIF: the iPhone's default, read
# through pillow-heif where it is installed; AVIF: Pillow's own plugin).
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".heic",
                    ".heif", ".avif"}


def register_heif():
    """HEIC/HEIF (the iPhone's photos) for Pillow, through pillow-heif, once per process; False where it is missing."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


HEIF = register_heif()  # at import: DataLoader workers (forked or spawned) import this module too


def left_out(files):
    """The files a folder search does not take, {reason: [paths]}: a suffix no image has, or a hidden file."""
    reasons = {}
    for f in files:
        why = ("a hidden file" if f.name.startswith(".")
               else f"not an image suffix ({f.suffix.lower() or 'none'})" if f.suffix.lower() not in IMAGE_EXTENSIONS
               else None)
        if why:
            reasons.setdefault(why, []).append(f)
    return reasons


def say_left_out(reasons, where):
    """One warning line per reason a folder search left files out, with the first few names: never silently."""
    for why, files in sorted(reasons.items()):
        names = ", ".join(f.name for f in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        warn(f"{where}: left out {len(files)} file{'s' if len(files) > 1 else ''}, {why}: {names}")


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
            files = sorted(f for f in cls_dir.iterdir() if f.is_file())
            skipped = left_out(files)
            out += [(str(f), index_of[cls_dir.name], None) for f in files
                    if not any(f in fs for fs in skipped.values())]
            say_left_out(skipped, str(cls_dir))
        return out

    return listing("train"), listing("test"), classes


# ----------------------------------------------------------------------------- broken files

_WARNED_BROKEN = set()  # the files this process has warned about


def run_samples(args):
    """(train, test, classes) of the data set a run's recorded flags (config.json's args) name, on its crop boxes where
    it trained on them (--crop-boxes), as the run itself read them."""
    if args.get("dataset", "cub2011") == "cub2011":
        return load_cub(args["data_dir"], args.get("crop_boxes", False))
    return load_image_folder(args["data_dir"])


def warn_broken(path, why, keep):
    """The one warning for a broken image file, once per file and process, saying what happens to it: skipped (a
    training image) or, with keep (a test image, which must keep its row), replaced by a black image."""
    if path not in _WARNED_BROKEN:
        _WARNED_BROKEN.add(path)
        warn(f"{'black image for' if keep else 'skipping'} {path}: {why}")


def check_image_file(path):
    """Cheap sanity check (first and last bytes) that catches truncated and non-image files
    before a decoder meets them mid-epoch. Returns None when fine, else the reason. A JPEG whose last bytes are not
    its end marker is walked marker by marker to the end of its image (`jpeg_end`): a Motion Photo (a JPEG followed
    by a short video) is an image. A file of another kind is an image where Pillow reads its header."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(16)
            f.seek(max(0, size - 12))
            tail = f.read()
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if head[:3] == b"\xff\xd8\xff":
        if b"\xff\xd9" in tail:
            return None
        with open(path, "rb") as f:
            return None if jpeg_end(f.read()) is not None else "truncated JPEG (no end marker)"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return None if b"IEND" in tail else "truncated PNG"
    if head[:2] == b"BM" or head[:4] in (b"GIF8", b"RIFF") or head[:4] in (b"II*\x00", b"MM\x00*"):
        return None
    return None if pil_reads_header(path) else "not an image"


def pil_reads_header(path):
    """Whether Pillow (with pillow-heif: HEIC/HEIF; AVIF, PPM, ICO, ...) reads the file's header: no pixels decoded."""
    from PIL import Image
    try:
        with quiet_bombs(), Image.open(path):
            return True
    except Image.DecompressionBombError:
        return True  # an image, refused later by size with its own sentence
    except Exception:
        return False


_MARKER = re.compile(rb"\xff+[^\x00\xd0-\xd7\xff]")  # a marker inside entropy-coded data (not a stuffed 0xff00, a restart)


def jpeg_end(blob):
    """The length of the JPEG image at the start of `blob` (up to and with its end marker, EOI), or None where it is
    truncated: the segments are walked by their lengths, each scan's data searched for the next marker. Data after
    the image (a Motion Photo's video, a vendor's trailer) is not part of it."""
    pos, n = 2, len(blob)
    while pos + 4 <= n:
        if blob[pos] != 0xFF:
            return None
        marker = blob[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:
            return pos + 2
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        pos += 2 + int.from_bytes(blob[pos + 2:pos + 4], "big")
        if marker == 0xDA:  # start of scan: its entropy-coded data runs to the next marker
            found = _MARKER.search(blob, pos)
            if found is None:
                return None
            pos = found.end() - 2
    return None


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


def placeholder_jpeg(size=8):
    """A small black JPEG fed in place of a broken test image, so every test id still gets a row."""
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (size, size)).save(buf, "JPEG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- JPEG headers, EXIF orientation

# JPEG coding processes nvJPEG decodes: baseline, extended sequential and progressive Huffman (SOF0-2).
# Lossless, hierarchical and arithmetic-coded files (the other SOF markers) go to PIL.
NVJPEG_SOF = {0xC0, 0xC1, 0xC2}
SOF_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # C4 DHT, C8 reserved, CC DAC are not frame headers
EXIF_ORIENTATION = 0x0112  # the TIFF tag: 1 upright, 2-8 mirrored and/or rotated (5-8 swap width and height)


def oriented(im):
    """A PIL image as it is meant to be seen: its EXIF orientation applied (as TorchCodec and DALI's
    adjust_orientation do), so every loader sees the same pixels; images without one are returned as they are."""
    from PIL import ImageOps
    return ImageOps.exif_transpose(im) if im.getexif().get(EXIF_ORIENTATION, 1) != 1 else im


def upright_size(im):
    """(width, height) of a PIL image as it is meant to be seen (a quarter turn of its EXIF orientation swaps them),
    from its header."""
    width, height = im.size
    return (height, width) if im.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8) else (width, height)


def jpeg_coding(path):
    """The frame header's marker (0xC0-0xCF) of a JPEG file, from the markers before it, or None where none comes
    before the image data. Written here because PIL reads the frame header but does not keep which one it was."""
    with open(path, "rb") as f:
        f.read(2)  # SOI
        while f.read(1) == b"\xff":
            marker = f.read(1)
            while marker == b"\xff":  # fill bytes
                marker = f.read(1)
            if not marker or marker[0] in SOF_MARKERS:
                return marker[0] if marker else None
            if marker[0] == 0x01 or 0xD0 <= marker[0] <= 0xD8:  # markers without a length
                continue
            length = int.from_bytes(f.read(2), "big")
            if marker[0] == 0xDA or length < 2:  # start of scan before any frame header, or a broken length
                return None
            f.seek(length - 2, 1)
    return None


def jpeg_header(path):
    """(width, height, None) for a JPEG the GPU decoder takes, or (width, height, why PIL decodes it instead), both
    upright (an EXIF rotation applied), from PIL's lazy open: headers only, no pixels decoded. (None, None, why) for
    a file whose header PIL cannot read."""
    from PIL import Image
    try:
        with quiet_bombs(), Image.open(path) as im:
            (width, height), mode, fmt = im.size, im.mode, im.format
            orientation, adobe = im.getexif().get(EXIF_ORIENTATION, 1), im.info.get("adobe_transform")
    except Image.DecompressionBombError:
        return None, None, "more pixels than PIL's decompression-bomb limit"
    except Exception as e:  # passed the byte check, yet its header is unreadable
        return None, None, f"cannot read the image header ({type(e).__name__})"
    if orientation in (5, 6, 7, 8):  # a quarter turn: the upright size
        width, height = height, width
    too_many = too_many_pixels(fmt, width, height)
    if too_many:
        return None, None, too_many
    sof = jpeg_coding(path) if fmt == "JPEG" else None
    why = ("not a JPEG" if fmt != "JPEG"
           else "no frame header before the image data" if sof is None
           else f"JPEG process SOF{sof - 0xC0} (lossless, hierarchical or arithmetic)" if sof not in NVJPEG_SOF
           else f"EXIF orientation {orientation}" if orientation in range(2, 9)
           else "grayscale" if mode == "L"
           else "CMYK/YCCK" if mode == "CMYK"
           else "RGB-coded (Adobe, no YCbCr transform)" if adobe == 0
           else "no height in the frame header (DNL)" if not (width and height)
           else None)
    return width, height, why


def too_many_pixels(fmt, width, height):
    """The reason an image of this format and size is refused, or None: more pixels than Pillow's decompression-bomb
    limit, where it is no JPEG (a JPEG is decoded at a fraction of its size: `draft`)."""
    from PIL import Image
    if fmt != "JPEG" and width * height > (Image.MAX_IMAGE_PIXELS or math.inf):
        return f"{width}x{height} is more pixels than Pillow's decompression-bomb limit ({Image.MAX_IMAGE_PIXELS:,})"
    return None


def scan_images(samples, pil_for_gpu_refused, pil_for_non_jpeg=False):
    """What the nvJPEG and DALI loaders learn before the first epoch: each sample's (width, height) after its crop box,
    {index: why} of the broken files and the indices PIL decodes on the CPU, with a count of the reasons: with
    pil_for_gpu_refused every file that is not a JPEG nvJPEG takes, with pil_for_non_jpeg (DALI) the files that are no
    JPEG at all (GIF, HEIC, AVIF, PNG, WebP, ...) or one of a coding process outside nvJPEG's. Headers are read, never
    the image data."""
    sizes, broken, pil, reasons = [], {}, set(), {}
    for i, (path, _, box) in enumerate(samples):
        why_broken = check_image_file(path)
        if why_broken is None:
            width, height, why_cpu = jpeg_header(path)
            if width is None:
                why_broken = why_cpu
            elif why_cpu is not None and (pil_for_gpu_refused or pil_for_non_jpeg and not_a_plain_jpeg(why_cpu)):
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


def not_a_plain_jpeg(why):
    """Whether jpeg_header's reason says the file is no JPEG, or one of a coding process only PIL decodes."""
    return why == "not a JPEG" or why.startswith(("JPEG process", "no frame header"))


def to_rgb(im):
    """Any PIL mode as 8-bit RGB: 16- and 32-bit grey levels scaled to 8 bits (PIL's own convert clips them at 255),
    transparent pixels on white (as a viewer shows them; PIL's convert would keep whatever colour lies under alpha 0,
    often black), palette, grey and CMYK as PIL converts them."""
    from PIL import Image
    if im.mode.startswith("I") or im.mode == "F":
        grey = np.asarray(im, dtype=np.float64) / (256.0 if im.mode.startswith("I") else 1.0)
        im = Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB")
    return im.convert("RGB")  # a loaded copy even of an RGB image: the file may close after this


@contextlib.contextmanager
def quiet_bombs():
    """Pillow's DecompressionBombWarning silenced (its error is not): a large JPEG is decoded at a fraction of its size
    (`draft`), and every other large image is refused by size with one sentence of this project's."""
    from PIL import Image
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def draft(im, factor):
    """Ask PIL to decode a JPEG at 1/factor of its size straight from its DCT coefficients (libjpeg's scaled decode:
    1/2, 1/4 or 1/8, far cheaper than the whole image); the factor it will decode at (1 for any other format)."""
    if factor < 2 or im.format != "JPEG":
        return 1
    width, height = im.size
    got = im.draft(im.mode, (width // factor, height // factor))
    return 1 if got is None else width / got[1][2]


def dct_scalable(width, height, img_size):
    """Whether any DCT-scaled decode can apply to a sample whose crop box is width x height at img_size: the smaller
    of its two scales (source pixels per output pixel) is at most min(width, height) / img_size, since the eval resize
    and every crop lie within the box; under 2 the factor is 1, and the sample's geometry (70 us of numpy for one
    sample) need not be computed to find it. Both loaders that decode with PIL ask it (BirdImages, BirdFiles)."""
    return min(width, height) >= 2 * img_size


def dct_factor(scale):
    """The largest JPEG DCT scaling (1, 2, 4 or 8) that still gives at least one source pixel per output pixel, for a
    sample whose output pixels each span `scale` source pixels (the smaller of its two axes')."""
    return next((k for k in (8, 4, 2) if scale >= k), 1)


def pil_rgb(source):
    """A file (path or file object) decoded by PIL, upright (its EXIF orientation applied), any mode to RGB, as uint8
    (3, H, W)."""
    return pil_rgb_scaled(source, 1)[0]


def pil_rgb_scaled(source, factor):
    """pil_rgb, a JPEG decoded at 1/factor of its size (`draft`; factor 1: whole): (image, the factor it was decoded
    at), so that source coordinates divided by that factor are the decoded image's."""
    from PIL import Image
    with quiet_bombs(), Image.open(source) as im:
        got = draft(im, factor)
        return torch.from_numpy(np.asarray(to_rgb(oriented(im))).copy()).permute(2, 0, 1), got


def display_name(name):
    """A class as a person reads it: CUB's folder name "001.Black_footed_Albatross" as "Black footed Albatross"."""
    return re.sub(r"^\d+\.", "", str(name)).replace("_", " ")
