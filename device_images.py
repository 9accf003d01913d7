"""The GPU half of the nvjpeg bird loader, batched: JPEG decoding on the device ordered after the training step
(`decode_jpegs`), and Pillow's antialiased bilinear resize as two matmuls over the whole batch (`resample_batch`, with
each sample's source box from `sample_geometry`). On a CPU device the same code runs with libjpeg-turbo, which is how
the tests check it against PIL. Used by bird_loaders.py; not run directly.
"""
import contextlib
import functools
import warnings
from typing import NamedTuple

import numpy as np
import torch


# ----------------------------------------------------------------------------- decoding

@functools.cache
def jpeg_decoder(prefer="torchcodec"):
    """(name, decode): the batched JPEG decoder, decode(list of uint8 CPU tensors, device) -> list of RGB uint8
    (3, H, W) on the device. TorchCodec's where it imports (the maintained one: torchvision 0.29 deprecates its own
    image decoding in its favour), else (or with prefer="torchvision") torchvision's. On a CPU device both are
    libjpeg-turbo and give PIL's pixels."""
    if prefer == "torchcodec":
        try:
            from torchcodec.decoders import decode_jpeg
            return "torchcodec", lambda datas, device: decode_jpeg(datas, mode="RGB", device=device)
        except Exception:  # not installed, or built for another torch (its wheels follow torch's versions)
            pass
    from torchvision.io import ImageReadMode, decode_jpeg
    return "torchvision", lambda datas, device: decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)


# How decode_jpegs orders a CUDA decode after the work already queued on the caller's stream: "stream" (a side
# stream, no wait for the caller's stream) or "sync" (the host waits for the caller's stream first); "none" is the
# unordered call this repo made before, kept only so that tools/gpu_check.py can show its check failing on it.
DECODE_ORDER = "stream"
_DECODE_STREAMS = {}  # one side stream per CUDA device, made once


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
    """The one place that decodes JPEGs on the device (training, evaluation, the feature cache, predict.py and bench.py
    come here): a list of uint8 CPU tensors of file bytes -> RGB uint8 (3, H, W) on `device`.

    The fault it is built against: both decoders allocate their outputs from PyTorch's caching allocator on the current
    stream, which hands a block out as soon as it is freed there, while kernels queued there may still read it, and
    then write without waiting for them. torchvision decodes on a private pool stream that does not wait for the
    current one (torchvision/csrc/io/image/cuda/decode_jpegs_cuda.cpp); nvJPEG's hardware engine ignores the stream it
    is given (TorchCodec PR 1634, merged 2026-08-17, adds a host wait before nvjpegDecodeBatched for it). pytorch/vision
    PR 9606 (closed) reports its reproducer (2e8 cycles, about 100 ms, queued on the caller's stream) corrupting 199 of
    200 runs on an H100 with torch 2.12.0.dev20260408 and torchvision 0.29.0a0 main, 0 of 200 with its fix. So on CUDA:
    - the decode runs with this device's side stream current, made once (torch.cuda.Stream draws from a pool of 32
      that torchvision's decoder and NCCL draw from too) and waited for on the host first (microseconds when idle):
      whoever else uses that stream, every block its pool hands out is then free of queued work;
    - the caller's stream waits for the side stream: it reads the outputs after any decode work still queued there
      (both decoders wait on the host before returning today; one that did not would be ordered all the same);
    - each output is recorded on the caller's stream: its block is reused only once that stream is past its last use.
    No uninitialised-memory fill is queued (no_uninitialized_fill). DECODE_ORDER "sync" waits for the caller's stream
    on the host instead; tools/gpu_check.py's decode-under-load check fails on each step removed."""
    _, decode = jpeg_decoder()
    device = torch.device(device)
    if device.type != "cuda" or DECODE_ORDER == "none":  # "none": the old, unordered call, a planted fault only
        return decode(datas, device)
    current = torch.cuda.current_stream(device)
    with no_uninitialized_fill():
        if DECODE_ORDER == "sync":
            current.synchronize()  # nothing is queued any more, so no block the allocator hands out is still in use
            return decode(datas, device)
        side = side_stream(device)
        side.synchronize()
        with torch.cuda.stream(side):
            images = decode(datas, device)
    current.wait_stream(side)
    for image in images:
        image.record_stream(current)  # freed later on the host: not reused before the caller's stream is past it
    return images


def side_stream(device):
    """The side stream decode_jpegs decodes on, one per CUDA device, made at its first use."""
    device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    if device not in _DECODE_STREAMS:
        _DECODE_STREAMS[device] = torch.cuda.Stream(device)
    return _DECODE_STREAMS[device]


def to_device(tensor, device):
    """A host tensor onto the device: pinned and non-blocking on CUDA (the pinned copy is held by PyTorch's host
    allocator until the copy has run), a plain copy elsewhere."""
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


# ----------------------------------------------------------------------------- resampling as Pillow does

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
    a batch: uint8 (B, 3, size, size). geometry: a Geometry (sample_geometry); mirror: bool numpy (B,).

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
    g = Geometry(*to_device(torch.from_numpy(np.stack(geometry)), dev))  # one pinned copy for all eight fields
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
        chunk = g.take(slice(begin, end))
        wx = pil_bilinear_weights(chunk.start_x, chunk.scale_x, chunk.lo_x, chunk.hi_x, size, padded.shape[3])
        wx = torch.where(flip[begin:end].view(-1, 1, 1), wx.flip(1), wx)  # mirrored: the output columns reversed
        wy = pil_bilinear_weights(chunk.start_y, chunk.scale_y, chunk.lo_y, chunk.hi_y, size, padded.shape[2])
        b, c, h, w = padded.shape
        # each pass is one bmm per sample, the channels stacked into its rows or columns (no broadcast copies)
        rows = torch.bmm(padded.float().view(b, c * h, w), wx.transpose(1, 2))  # (b, c*H, size)
        rows = torch.floor(rows + 0.5).clamp_(0, 255).view(b, c, h, size).permute(0, 2, 1, 3).reshape(b, h, c * size)
        cols = torch.floor(torch.bmm(wy, rows) + 0.5).clamp_(0, 255)  # (b, size, c*size)
        out.append(cols.view(b, size, c, size).permute(0, 2, 1, 3).to(torch.uint8))
        begin = end
    return torch.cat(out)


class Geometry(NamedTuple):
    """Where each sample of a batch comes from in its source image, one float64 numpy (B,) array per field: output pixel
    i of sample b is centred at start + (i + 0.5) * scale source pixels, reading source pixels lo..hi-1 only; x along
    the width, y along the height (see pil_bilinear_weights)."""
    start_x: np.ndarray
    scale_x: np.ndarray
    lo_x: np.ndarray
    hi_x: np.ndarray
    start_y: np.ndarray
    scale_y: np.ndarray
    lo_y: np.ndarray
    hi_y: np.ndarray

    def take(self, index):
        """The geometry of some of the samples (an index, a slice or a mask over the batch)."""
        return Geometry(*(field[index] for field in self))


def sample_geometry(width, height, region, crops, size, crop_frac):
    """Per-sample source Geometry for resample_batch (and DALI's regions of interest), vectorised over the batch.

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
    return Geometry(start_x, scale_x, region[:, 0], hi_x, start_y, scale_y, region[:, 1], hi_y)
