"""Measure the speed figures of BENCHMARKS.md on whatever machine this runs on; print a table, write JSON.

    python bench.py                      # every section this machine can run (CPU: 1-5, 6-7 small, 9-10; GPU: all)
    python bench.py --sections 1,2 --repeats 5 --json bench.json

Ratios are measured side by side in the same run and each figure is the median of --repeats runs.
CIFAR figures use a generated 50k/10k data set in the official pickle layout (speed does not depend on
the pixels); bird figures use the real JPEGs of ../shared/data/CUB_200_2011_subset100 when present
(--cub-dir and --weights point elsewhere, e.g. at a copy carried to a GPU machine).
Not a test: no figure here is asserted anywhere.
"""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import bird_data
import bird_loaders
import checkpoints
import data
import device_images
import engine
import run_files
import models

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tests"))
SHARED_CUB = ROOT.parent / "shared" / "data" / "CUB_200_2011_subset100"
SHARED_WEIGHTS = ROOT.parent / "shared" / "weights" / "tf_efficientnet_lite0_in1k.pth"
# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s, matched against the GPU's name.
BF16_DENSE_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "GH200": 989.0,
                          "B200": 2250.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0,
                          "RTX 4090": 165.0, "RTX 3090": 71.0}


def bf16_peak(device):
    """(TFLOP/s, name of the peak used) for this GPU, or (None, reason) where the name is not in the table."""
    if device.type != "cuda":
        return None, "CPU: no tensor-core peak"
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_DENSE_PEAK_TFLOPS.items():  # longest, most specific names first where they share a prefix
        if key in name:
            return peak, f"{key} dense bf16 peak {peak:.0f} TFLOP/s"
    return None, f"no bf16 peak known for {name}"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loader(loader, device, epochs=1):
    """(images, seconds) of `epochs` passes over a loader, each batch moved to the device."""
    sync(device)
    t0, n = time.perf_counter(), 0
    for epoch in range(epochs):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for xb, _ in loader:
            n += len(xb.to(device))
    sync(device)
    return n, time.perf_counter() - t0


def median_rate(fn, repeats):
    """fn() -> (items, seconds); returns the median items/second over repeats."""
    rates = []
    for _ in range(repeats):
        items, seconds = fn()
        rates.append(items / seconds)
    return statistics.median(rates)


def cifar_fixture(tmp):
    import fixtures
    root = Path(tmp) / "cifar50k"
    if not (root / "cifar-100-python").exists():
        fixtures.write_cifar100(root, per_class_train=500, per_class_test=100)
    return root


# ----------------------------------------------------------------------------- 1. CIFAR input pipeline

def bench_cifar_loader(cifar_root, device, repeats, workers=2):
    import torchvision
    from torchvision import transforms as T
    cifar = data.load_cifar100(cifar_root)
    train_idx, _ = data.stratified_split(cifar["train_y"], val_per_class=50)
    x = torch.from_numpy(cifar["train_x"][train_idx]).to(device)
    y = torch.from_numpy(cifar["train_y"][train_idx]).to(device)
    mean, std = data.channel_stats(cifar["train_x"][train_idx])
    def make_run(compiled):
        loader = data.DeviceLoader(x, y, 256, shuffle=True, aug={"flip", "crop"}, mean=mean, std=std, compile=compiled)
        t0 = time.perf_counter()
        next(iter(loader))  # compiles once (dynamic shapes), excluded from the rate
        compile_seconds[compiled] = time.perf_counter() - t0
        return lambda: time_loader(loader, device, epochs=3)

    compile_seconds = {}

    class UncheckedCIFAR100(torchvision.datasets.CIFAR100):  # the generated copy has other md5s than the official
        base = torchvision.datasets.CIFAR100
        train_list = [[name, None] for name, _ in base.train_list]
        test_list = [[name, None] for name, _ in base.test_list]
        meta = {**base.meta, "md5": None}

    dataset = UncheckedCIFAR100(str(cifar_root), train=True, download=False, transform=T.Compose([
        T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)]))
    reference = torch.utils.data.DataLoader(dataset, batch_size=256, shuffle=True, num_workers=workers)

    rates = {compiled: median_rate(make_run(compiled), repeats) for compiled in (False, True)}
    ref_rate = median_rate(lambda: time_loader(reference, device), repeats)
    default = device.type == "cuda"  # train_cifar.py compiles by default on CUDA only
    ours_rate, other_rate = rates[default], rates[not default]
    return [dict(id=1, figure="CIFAR train input pipeline (crop+flip+normalise, batch 256), img/s",
                 value=ours_rate, baseline=ref_rate, ratio=ours_rate / ref_rate, target=">= 20x",
                 met=ours_rate / ref_rate >= 20,
                 notes=f"ours: DeviceLoader on {device}, the default path ({'compiled' if default else 'eager'}); "
                       f"{'eager' if default else 'compiled (--compile)'}: {other_rate:.0f} img/s = "
                       f"{other_rate / ref_rate:.1f}x; one-off compile {compile_seconds[True]:.1f} s; "
                       f"baseline: torchvision CIFAR100 + transforms, DataLoader {workers} workers")]


# ----------------------------------------------------------------------------- 2. BaseNet epoch

def bench_basenet_epoch(cifar_root, device, repeats):
    """The default train_cifar.py path (channels-last), and channels-first beside it, repeats interleaved: the
    script's own recipe, model, loaders and loop (engine.fit), one epoch each."""
    import train_cifar
    cifar = data.load_cifar100(cifar_root)
    runs = {True: [], False: []}  # channels_last -> [(train s, validation s, wall s incl. writes)]
    for _ in range(repeats):
        for channels_last in (True, False):
            with tempfile.TemporaryDirectory() as out:
                argv = ["--epochs", "1", "--out", out, "--quiet", "--no-amp", "--no-compile", "--device", str(device),
                        "--channels-last" if channels_last else "--no-channels-last", "--no-tensorboard"]
                args = train_cifar.parse_args(argv)
                train_cifar.resolve(args, argv)
                checkpoints.seed_everything(0)
                train, val, _, _ = data.cifar_loaders(cifar, args, device)
                config = train_cifar.model_config(args, len(cifar["classes"]))
                model = models.build_model(config).to(device)
                if channels_last:
                    model = model.to(memory_format=torch.channels_last)
                t0 = time.perf_counter()
                state = engine.build_state(model, args, device, config["num_classes"])
                summary = engine.fit(state, checkpoints.Progress(), train, val, args, 1, out,
                                     {"model_config": config, "data_config": {}, "config": {}},
                                     run_files.EpochLog(out, "bench", echo=False))
                h = summary["history"][0]
                runs[channels_last].append((h["epoch_seconds"], h["eval_seconds"], time.perf_counter() - t0))
    (train_s, eval_s, wall), (nchw_train, nchw_eval, _) = (
        [statistics.median(t[i] for t in runs[cl]) for i in range(3)] for cl in (True, False))
    return [dict(id=2, figure="BaseNet full epoch (45k train + 5k validation), seconds", value=train_s + eval_s,
                 target="< 5 s", met=train_s + eval_s < 5,
                 notes=f"default path (channels-last, fp32 eager): train {train_s:.2f} s + validation {eval_s:.2f} s; "
                       f"with checkpoints, metrics.csv and curves.png written: {wall:.2f} s; channels-first: "
                       f"{nchw_train + nchw_eval:.2f} s; batch 64 (the baseline recipe); {torch.get_num_threads()} threads")]


# ----------------------------------------------------------------------------- 3./6. training throughput

def train_pass(state, args, batches):
    """(images, seconds) of one pass of the project's own training step (engine.train_one_epoch: learning rate,
    forward under autocast, loss, backward, optimizer step) over `batches`, a loader or a list."""
    sync(state.device)
    t0 = time.perf_counter()
    engine.train_one_epoch(state, batches, args, checkpoints.Progress(epochs=1),
                           engine.EpochSums(len(batches), state.device))
    sync(state.device)
    return sum(len(y) for _, y in batches), time.perf_counter() - t0


def step_state(model, device, amp, channels_last, compile_model, argv=(), param_groups=None):
    """The training state train_cifar.py builds for `model` (its flags, plus `argv`; SGD Nesterov), and the flags."""
    import train_cifar
    argv = ["--quiet", "--nesterov", "--device", str(device), "--amp" if amp else "--no-amp",
            "--compile" if compile_model else "--no-compile", *argv]
    args = train_cifar.parse_args(argv)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return engine.build_state(model, args, device, 100, param_groups), args


def train_rate(model, device, batch, size, steps, amp, channels_last, compile_model, classes=100, warmup_steps=3):
    """Training images/second of model on random data, and the seconds the first (compiling) steps took."""
    state, args = step_state(model, device, amp, channels_last, compile_model)
    x = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=device)
    _, warmup = train_pass(state, args, [(x, y)] * warmup_steps)
    images, seconds = train_pass(state, args, [(x, y)] * steps)
    return images / seconds, warmup


def bench_fast_path(device, repeats, steps):
    make = lambda: models.build_cifar_model("convnet", depth=8, width=32, norm="bn")  # noqa: E731
    batch = 256
    rows, rates = [], {}
    for name, amp, cl, comp in (("fp32 eager", False, False, False), ("bf16 eager", True, False, False),
                                ("bf16 + channels-last eager", True, True, False),
                                ("bf16 + channels-last + compile", True, True, True)):
        results = [train_rate(make(), device, batch, 32, steps, amp, cl, comp) for _ in range(repeats)]
        rates[name] = statistics.median(r[0] for r in results)
        rows.append(f"{name}: {rates[name]:.0f} img/s" + (f" (first 3 steps incl. compile {results[0][1]:.1f} s)" if comp else ""))
    fast, plain = rates["bf16 + channels-last + compile"], rates["fp32 eager"]
    return [dict(id=3, figure="--depth 8 --bn training img/s, bf16 + channels-last + compile vs fp32 eager",
                 value=fast, baseline=plain, ratio=fast / plain, target=">= 1.5x", met=fast / plain >= 1.5,
                 notes="; ".join(rows) + f"; batch {batch} on {device}")]


def forward_flops(model, size, device):
    from torch.utils.flop_counter import FlopCounterMode
    model = model.to(device).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, size, size, device=device))
    return counter.get_total_flops()


def bench_gpu_models(device, repeats, steps):
    rows = []
    peak, peak_name = bf16_peak(device)
    # target: the final preset's 100 epochs of 45k images in 10 minutes, less about 90 s of compile and evaluation
    needed = 100 * 45_000 / (600 - 90)
    nets = (("final CIFAR network (--preset final: WRN-28-10)", lambda: models.build_cifar_model("wrn", depth=28, widen=10),
             needed), ("ResNet-18, CIFAR variant, width 64", lambda: models.CifarResNet18(), 40_000),
            ("convnet --depth 8 --width 64 --bn", lambda: models.build_cifar_model("convnet", depth=8, width=64, norm="bn"), None))
    for name, make, target in nets:
        batch = 512 if device.type == "cuda" else 128
        results = [train_rate(make(), device, batch, 32, steps, True, True, True) for _ in range(repeats)]
        rate = statistics.median(r[0] for r in results)
        flops = 3 * forward_flops(make(), 32, device)  # forward + backward ~ 3x forward
        achieved = flops * rate / 1e12
        mfu = achieved / peak if peak else None
        rows.append(dict(id=6, figure=f"{name}: training img/s, bf16 + channels-last + compile", value=rate,
                         target=f">= {target:,.0f} img/s on an H100" if target else "-",
                         met=(rate >= target) if (target and device.type == "cuda") else None,
                         notes=f"batch {batch}; {flops / 1e9:.2f} GFLOP per image (fwd+bwd); {achieved:.1f} TFLOP/s"
                               + (f"; MFU {mfu:.1%} of the {peak_name}" if mfu else f"; MFU n/a ({peak_name})")
                               + f"; first steps incl. compile {results[0][1]:.1f} s"))
    return rows


def bench_loader_vs_model(cifar_root, device, repeats, model_rate):
    cifar = data.load_cifar100(cifar_root)
    x = torch.from_numpy(cifar["train_x"]).to(device)
    y = torch.from_numpy(cifar["train_y"]).to(device)
    loader = data.DeviceLoader(x, y, 512, shuffle=True, aug={"flip", "crop", "cutout"}, mean=[0.5] * 3, std=[0.25] * 3,
                               channels_last=True, compile=device.type == "cuda")  # the default path per device
    time_loader(loader, device)  # compiles (on CUDA) and warms up outside the timed repeats
    rate = median_rate(lambda: time_loader(loader, device, epochs=3), repeats)
    return [dict(id=7, figure="CIFAR device loader alone (crop+flip+cutout+normalise, channels-last), img/s", value=rate,
                 baseline=model_rate, ratio=rate / model_rate, target=">= 10x the model's training rate",
                 met=rate / model_rate >= 10, notes=f"model rate = final CIFAR network above, on {device}")]


# ----------------------------------------------------------------------------- 4. birds input pipeline

def bird_samples(cub_dir, limit):
    train, _, _ = bird_data.load_cub(cub_dir)
    return train[:limit]


def bench_bird_loaders(cub_dir, device, repeats, n_images, workers=2):
    from PIL import Image
    from torchvision import transforms as T
    samples = bird_samples(cub_dir, n_images)
    mean, std = models.IMAGENET_MEAN, models.IMAGENET_STD
    rates = {}

    ours = bird_loaders.TorchImageLoader(samples, 224, 64, True, mean, std, device, aug={"rrc", "flip"}, workers=workers)
    rates["ours: PIL workers (--loader torch)"] = median_rate(lambda: time_loader(ours, device), repeats)
    nvjpeg = bird_loaders.NvjpegImageLoader(samples, 224, 64, True, mean, std, device, aug={"rrc", "flip"}, workers=workers)
    rates[f"ours: batched {'nvJPEG' if device.type == 'cuda' else 'libjpeg-turbo'} decode + resample (--loader nvjpeg)"] = \
        median_rate(lambda: time_loader(nvjpeg, device), repeats)
    if bird_loaders.dali_available():
        dali = bird_loaders.DaliImageLoader(samples, 224, 64, True, mean, std, device, aug={"rrc", "flip"}, workers=workers)
        rates[f"ours: DALI ({'nvJPEG' if device.type == 'cuda' else 'CPU'} decoder) (--loader dali)"] = \
            median_rate(lambda: time_loader(dali, device), repeats)

    class Folder(torch.utils.data.Dataset):  # what torchvision.datasets.ImageFolder does per item
        transform = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])

        def __len__(self):
            return len(samples)

        def __getitem__(self, i):
            with open(samples[i][0], "rb") as f:
                image = Image.open(f).convert("RGB")
            return self.transform(image), samples[i][1]

    reference = torch.utils.data.DataLoader(Folder(), batch_size=64, shuffle=True, num_workers=workers)

    ref = median_rate(lambda: time_loader(reference, device), repeats)
    default = bird_loaders.default_loader(device)
    default_rate = next(v for k, v in rates.items() if f"--loader {default}" in k)
    notes = "; ".join(f"{k}: {v:.0f} img/s" for k, v in rates.items())
    return [dict(id=4, figure="birds train input pipeline at 224 px (random-resized crop + flip + normalise), img/s",
                 value=default_rate, baseline=ref, ratio=default_rate / ref, target=">= 1x (as fast)",
                 met=default_rate >= ref,
                 notes=f"{len(samples)} real CUB JPEGs; {notes}; baseline: ImageFolder-style PIL + torchvision "
                       f"transforms, DataLoader {workers} workers; default loader here: {default}")]


# ----------------------------------------------------------------------------- 5. feature cache

def bench_feature_cache(cub_dir, weights, device, repeats, n_images):
    samples = bird_samples(cub_dir, n_images)
    model = models.TransferNet("tf_efficientnet_lite0", 100, freeze_backbone=True)
    models.load_backbone_weights(model.backbone, weights)
    state, args = step_state(model, device, False, False, False, ["--lr", "0.01"],
                             [{"params": list(model.head.parameters()), "lr_mult": 1.0}])
    loader = bird_loaders.TorchImageLoader(samples, 224, 64, True, model.mean, model.std, device, aug=(), workers=2)
    uncached = median_rate(lambda: train_pass(state, args, loader), repeats)
    with torch.inference_mode():
        feats = [(model.features(xb).clone(), yb.clone()) for xb, yb in loader]
    cache = data.DeviceLoader(torch.cat([f for f, _ in feats]), torch.cat([y for _, y in feats]), 64, shuffle=True)
    cached = median_rate(lambda: train_pass(state, args, cache), max(repeats, 5))
    return [dict(id=5, figure="frozen-backbone head training per epoch, feature cache vs none, img/s", value=cached,
                 baseline=uncached, ratio=cached / uncached, target=">= 10x", met=cached / uncached >= 10,
                 notes=f"tf_efficientnet_lite0 at 224 px, {len(samples)} real CUB images, epochs after the first")]


# ----------------------------------------------------------------------------- 8. ResNet-50 from JPEG (GPU)

def bench_resnet50_jpeg(cub_dir, device, repeats, n_images, workers, arch="resnet50", size=224, batch=256):
    """Fine-tuning img/s of ResNet-50 at 224 px: the model alone on random tensors already on the device, then end to
    end from the JPEG files through each of the project's loaders (bird_loader: torch, nvjpeg, and dali where
    installed), all on one compiled bf16 channels-last model. The loader is the bottleneck where end to end is below
    90% of the model alone. On a CPU, run it small (--sections 8 --device cpu): resnet18 at 64 px, batch 16."""
    samples = bird_samples(cub_dir, n_images)
    samples = (samples * math.ceil(n_images / len(samples)))[:n_images]  # a small tree is read more than once
    on_gpu = device.type == "cuda"
    # the step the default fine-tune trains: finetune_birds.py's own model (BatchNorm statistics frozen) and optimizer
    import finetune_birds
    args = finetune_birds.parse_args(["--arch", arch, "--weights", "none", "--batch-size", str(batch), "--quiet", "--amp",
                                      "--compile" if on_gpu else "--no-compile"])
    model = finetune_birds.build_model(args, 100).to(device).to(memory_format=torch.channels_last)
    state = engine.build_state(model, args, device, 100, model.param_groups(args.backbone_lr_mult, args.layer_decay))
    steps = len(samples) // batch
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (batch,), device=device)
    train_pass(state, args, [(x, y)] * 3)  # compile + warm-up
    alone = median_rate(lambda: train_pass(state, args, [(x, y)] * steps), repeats)
    kinds = ["torch", "nvjpeg"] + (["dali"] if bird_loaders.dali_available() else [])
    rows = [dict(id=8, figure=f"{arch} fine-tuning at {size} px, model alone (random tensors on the device), img/s",
                 value=alone, target="the ceiling for the loaders below", met=None,
                 notes=f"batch {batch}, bf16 + channels-last{' + compile' if on_gpu else ''}, the default fine-tune's "
                       f"model (BatchNorm {args.bn_mode}) and optimizer ({args.optimizer}); {steps} steps a pass")]
    for kind in kinds:
        loader = bird_loaders.bird_loader(kind, samples, size, batch, True, model.mean, model.std, device, aug={"rrc", "flip"},
                                  workers=workers, channels_last=True)
        epoch = lambda loader=loader: train_pass(state, args, loader)  # noqa: E731
        epoch()  # warm-up: worker start, DALI's pipeline, the decoder's buffers
        rate = median_rate(epoch, repeats)
        full = on_gpu and arch == "resnet50" and size == 224
        rows.append(dict(id=8, figure=f"{arch} fine-tuning at {size} px from JPEG, end to end, --loader {kind}, img/s",
                         value=rate, baseline=alone, ratio=rate / alone,
                         target=">= 4,000 img/s on an H100/H200 and >= 90% of the model alone",
                         met=(rate >= 4000 and rate >= 0.9 * alone) if full else None,
                         notes=f"bound by the {'loader' if rate < 0.9 * alone else 'model'}; {len(samples)} JPEGs "
                               f"from {cub_dir}; --workers {workers}; random-resized crop + flip"))
    return rows


# ----------------------------------------------------------------------------- 9. batched decode, crop + resize kernels

def bench_resize_kernels(cub_dir, device, repeats, n_images=256, size=224):
    """The nvjpeg loader's batched decode (device_images.decode_jpegs, what the loaders call, and the decoder's call
    alone beside it: what the ordering costs), then its choice of batched crop + resize, on the decoded real images with
    their draw_augmentation boxes: its Pillow-exact separable matmuls (device_images.resample_batch) against torchvision.ops.roi_align (averages
    ceil(scale)^2 bilinear samples per output pixel) and one F.grid_sample (bilinear, no antialiasing): ms per batch,
    and mean |difference| to PIL's output in grey levels."""
    import numpy as np
    import torch.nn.functional as F
    from PIL import Image
    from torchvision.ops import roi_align
    samples = bird_samples(cub_dir, n_images)
    sizes, _, pil_files, _ = bird_data.scan_images(samples, pil_for_gpu_refused=True)
    keep = [i for i in range(len(samples)) if i not in pil_files]
    raw = [torch.from_numpy(np.fromfile(samples[i][0], dtype=np.uint8)) for i in keep]
    images = device_images.decode_jpegs(raw, device)  # as the nvjpeg loader decodes
    boxes = [bird_loaders.draw_augmentation(i, *sizes[i], {"rrc"}, (0.25, 1.0))[0] for i in keep]
    reference = []
    for i, (x, y, w, h) in zip(keep, boxes, strict=True):
        with Image.open(samples[i][0]) as im:
            reference.append(torch.from_numpy(np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR,
                                                                                   box=(x, y, x + w, y + h))).copy()))
    reference = torch.stack(reference).permute(0, 3, 1, 2).float().to(device)
    width = [im.shape[2] for im in images]
    height = [im.shape[1] for im in images]
    geometry = device_images.sample_geometry(width, height, [(0, 0, w, h) for w, h in zip(width, height, strict=True)],
                                    boxes, size, 0.875)
    no_flip = np.zeros(len(images), dtype=bool)
    padded = device_images.pad_batch(images).float()
    rois = torch.tensor([(k, x, y, x + w, y + h) for k, (x, y, w, h) in enumerate(boxes)], dtype=torch.float32,
                        device=device)
    hp, wp = padded.shape[2:]
    t = torch.linspace(-1 + 1 / size, 1 - 1 / size, size, device=device)  # output pixel centres in [-1, 1]
    b = rois[:, 1:]

    def grid():
        gx = ((b[:, 0:1] + (t + 1) / 2 * (b[:, 2:3] - b[:, 0:1])) / wp * 2 - 1)  # (B, size) in padded coordinates
        gy = ((b[:, 1:2] + (t + 1) / 2 * (b[:, 3:4] - b[:, 1:2])) / hp * 2 - 1)
        return torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), -1)

    decoder, decode = device_images.jpeg_decoder()
    kernels = {  # the decode first: as the loaders call it (ordered after the step), then the decoder's call alone
        f"JPEG decode, device_images.decode_jpegs ({decoder}, ordered)": lambda: device_images.decode_jpegs(raw, device),
        f"JPEG decode, {decoder}'s call alone (unordered, what ordering costs)": lambda: decode(raw, device),
        "resample_batch (ours: Pillow's bilinear, antialiased)": lambda: device_images.resample_batch(images, geometry, size, no_flip).float(),
        "torchvision.ops.roi_align (aligned, adaptive sampling)": lambda: roi_align(padded, rois, size, aligned=True),
        "F.grid_sample (bilinear, no antialiasing)": lambda: F.grid_sample(padded, grid(), align_corners=False),
    }
    rows = []
    for name, fn in kernels.items():
        out = fn()  # warm-up
        def timed(fn=fn):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            return len(images), time.perf_counter() - t0
        rate = median_rate(timed, max(repeats, 5))
        if name.startswith("JPEG decode"):
            rows.append(dict(id=9, figure=f"batched {name}, img/s", value=rate, met=None, target="-",
                             notes=f"{1000 * len(images) / rate:.1f} ms per batch of {len(images)} real CUB JPEGs"))
            continue
        diff = (out.round().clamp(0, 255) - reference).abs().mean().item()
        rows.append(dict(id=9, figure=f"batched crop + resize to {size} px: {name}, img/s", value=rate, met=None,
                         target="the loader's choice: as close to PIL as the batch allows, at a rate far above the model's",
                         notes=f"{1000 * len(images) / rate:.1f} ms per batch of {len(images)} decoded real CUB images "
                               f"(padding included where a kernel needs it: ours pads inside); mean |difference| to PIL "
                               f"{diff:.3f} grey levels"))
    return rows


# ----------------------------------------------------------------------------- 10. predict.py at the model's speed

def keep_heap():
    """Fix glibc's malloc thresholds for this process (mallopt; glibc only, where the user set none): in a loop that
    allocates nothing else, glibc hands each forward pass's freed activations back to the OS and maps them afresh on
    the next, so model_alone measured Lite0 at 128 px, batch 16, at 470 img/s against 685 with the heap kept, while
    predict.py with the loading ran at 495 img/s at that batch (where glibc's own thresholds changed nothing)."""
    glibc = "CS_GNU_LIBC_VERSION" in getattr(os, "confstr_names", {}) and \
        (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    if not glibc or any(k.startswith("MALLOC_") for k in os.environ):
        return
    import ctypes
    mallopt = ctypes.CDLL(None).mallopt
    mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD: blocks under 64 MiB come from the heap
    mallopt(-1, 128 << 20)  # M_TRIM_THRESHOLD: keep up to 128 MiB of it free for the next pass


def model_alone(model, device, size, batches=(4, 8, 16, 32, 64, 256), seconds=1.0, streams=1):
    """The network's own forward rate, img/s: random channels-last batches already on the device, inference mode;
    {batch size: rate} for each of `batches`. With streams > 1, that many threads forward at once, each on its share
    of torch's threads (as predict.py --streams runs it)."""
    rates = {}

    @torch.inference_mode()
    def forward(batch, ready, counts):
        x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        try:
            model(x)  # warm up
            sync(device)
        except BaseException:
            ready.abort()  # the other streams and the timer stop waiting (BrokenBarrierError) instead of hanging
            raise
        ready.wait()  # every stream starts together, warm
        until = time.perf_counter() + seconds
        while time.perf_counter() < until:
            model(x)
            counts.append(batch)
        sync(device)

    with engine.threads_per_stream(streams):
        for batch in batches:
            counts, ready = [], threading.Barrier(streams + 1)
            workers = [threading.Thread(target=forward, args=(batch, ready, counts)) for _ in range(streams)]
            for w in workers:
                w.start()
            ready.wait()
            t0 = time.perf_counter()
            for w in workers:
                w.join()
            rates[batch] = sum(counts) / (time.perf_counter() - t0)
    return rates


def timed_predict(argv, loader_alone=False):
    """predict.py's command line run here, its prediction phase timed (engine.predict_probs: loading, decoding and
    the forward passes, what the progress bar shows); with loader_alone, one pass of its loader without the model
    instead (the images as its prediction loop gets them: decoded, resized, normalised, on the device), before the
    prediction runs untimed: (images, seconds)."""
    import predict
    spans, real = [], engine.predict_probs

    def timing(model, loader, device, *a, **kw):
        t0 = time.perf_counter()
        if loader_alone:
            n = sum(len(x) for x, _ in loader)
        else:
            out = real(model, loader, device, *a, **kw)
            n = len(out[1])
        sync(device)
        spans.append((n, time.perf_counter() - t0))
        return real(model, loader, device, *a, **kw) if loader_alone else out
    engine.predict_probs = timing
    try:
        predict.main([str(a) for a in argv])
    finally:
        engine.predict_probs = real
    return spans[0]


def predict_vs_model(model, ckpt, root, files, device, size, batch, streams, repeats, tmp):
    """predict.py --images and --data-dir against the model alone, side by side in each repeat: {"images": ...,
    "data_dir": ...}, each the repeat whose ratio is the median, and the number of repeats."""
    common = ["--device", device.type, "--top", "1"]
    runs = []
    for _ in range(max(repeats, 5)):  # the median ratio: a shared CPU's speed drifts by 30% within a minute
        # the model alone, every batch size, in one stream and in predict.py's streams: the reference is the best
        # configuration, timed again right before and after each prediction (its sweep's maximum would favour
        # whichever configuration the drift happened to lift)
        alone = {(b, k): rate for k in sorted({1, streams})
                 for b, rate in model_alone(model, device, size, sorted({4, 8, 16, 32, 64, 256, batch}), 1.0, k).items()}
        best = max(alone, key=alone.get)

        def beside(best=best):
            return model_alone(model, device, size, best[:1], 1.0, best[1])[best[0]]
        before = beside()
        n, s = timed_predict([ckpt, "--images", *files, *common, "--out", tmp / "p.csv"])
        between = beside()
        m, t = timed_predict([ckpt, "--data-dir", root, *common[:2], "--out", tmp / "t.csv"])
        after = beside()
        k, u = timed_predict([ckpt, "--data-dir", root, *common[:2], "--out", tmp / "t.csv"], loader_alone=True)
        # the issue's reference: the best of 32, 64 and 256 in one stream; the serial bound: the model at
        # predict.py's own batch and streams, then its loader alone, one after the other (above 1x, the streams
        # overlap the loading with the forward passes)
        runs.append(dict(best=best, images=n / s, images_ref=(before + between) / 2, data_dir=m / t,
                         data_dir_ref=(between + after) / 2, issues=max(alone[b, 1] for b in (32, 64, 256)),
                         serial=1 / (1 / alone[batch, streams] + u / k), loader=k / u))
    return {kind: sorted(runs, key=lambda r: r[kind] / r[kind + "_ref"])[len(runs) // 2]
            for kind in ("images", "data_dir")}, len(runs)


def phone_photo_cost(ckpt, files, device, repeats, n_photos, tmp):
    """n_photos 12 MP (4032x3024) EXIF-turned phone copies of test birds against the same birds at 227 px, through
    predict.py --images: (seconds per photo above them, their seconds, the birds' seconds, how many keep their top-1)."""
    import fixtures
    from PIL import Image
    picks = files[:: max(1, len(files) // n_photos)][:n_photos]
    (tmp / "birds").mkdir()
    (tmp / "phone").mkdir()
    for k, path in enumerate(picks):
        with Image.open(path) as im:
            upright = bird_data.to_rgb(bird_data.oriented(im))
        upright.save(tmp / "birds" / f"{k:03d}.jpg", quality=95)
        fixtures.save_turned(fixtures.phone_photo(upright), tmp / "phone" / f"{k:03d}.jpg", (1, 3, 6, 8)[k % 4],
                             quality=90)
    seconds = {}
    for kind in ("birds", "phone"):
        runs = [timed_predict([ckpt, "--images", tmp / kind, "--device", device.type, "--top", "1",
                               "--out", tmp / f"{kind}.csv"]) for _ in range(repeats)]
        seconds[kind] = statistics.median(s for _, s in runs)
    top1 = {kind: [line.split(",")[1] for line in (tmp / f"{kind}.csv").read_text().splitlines()[1:]]
            for kind in ("birds", "phone")}
    same = sum(a == b for a, b in zip(top1["birds"], top1["phone"], strict=True))
    return (seconds["phone"] - seconds["birds"]) / len(picks), seconds["phone"], seconds["birds"], same, len(picks)


def bench_predict(cub_dir, weights, device, repeats, size=128, n_photos=24):
    """predict.py --images and --data-dir (default loader, batch and streams) against the model alone, on a frozen
    Lite0 probe at `size` px over the real test birds of 9 classes; and phone-sized copies of test birds against the
    same birds at 227 px: the cost per photo above them and whether they keep their top-1."""
    import fixtures
    import finetune_birds
    import predict
    keep_heap()  # for both sides: the model alone's reference, and predict.py (which it does not speed up)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = fixtures.real_cub_subset(cub_dir, tmp, num_classes=9)
        ckpt = tmp / "probe" / "best.pt"
        finetune_birds.main(["--data-dir", str(root), "--arch", "tf_efficientnet_lite0", "--weights", str(weights),
                             "--freeze-backbone", "--img-size", str(size), "--epochs", "2", "--quiet",
                             "--device", str(device), "--out", str(ckpt.parent)])
        model = predict.load_model(checkpoints.load_checkpoint(ckpt), ckpt, device).eval()
        _, test, _ = bird_data.load_cub(root)
        files = [path for path, _, _ in test]
        defaults = argparse.Namespace(batch_size=None, streams=None)
        batch, streams = predict.batch_size(defaults, device, size), predict.streams(defaults, device)
        median, n_runs = predict_vs_model(model, ckpt, root, files, device, size, batch, streams, repeats, tmp)
        extra, phone, birds, same, n_photos = phone_photo_cost(ckpt, files, device, repeats, n_photos, tmp)
    note = (f"tf_efficientnet_lite0 probe at {size} px, {len(files)} real CUB test images, default loader, batch "
            f"({batch}) and streams ({streams})")
    rows = []
    for kind, flag in (("images", "--images"), ("data_dir", "--data-dir")):
        r = median[kind]
        value, ref, (b, k) = r[kind], r[kind + "_ref"], r["best"]
        rows.append(dict(id=10, figure=f"predict.py {flag}, img/s, vs the model alone", value=value, baseline=ref,
                         ratio=value / ref, target=">= 0.8x", met=value / ref >= 0.8,
                         notes=f"{note}; the model alone: channels-last, the best of batch 4-256 in 1 or {streams} "
                               f"streams (batch {b} in {k}), timed right before and after; the median of {n_runs} "
                               f"(against the best of 32/64/256 in one stream, {r['issues']:.0f} img/s: "
                               f"{value / r['issues']:.2f}x)"))
    r = median["data_dir"]
    return rows + [
        dict(id=10, figure="predict.py --data-dir, img/s, vs its model and loader one after the other",
             value=r["data_dir"], baseline=r["serial"], ratio=r["data_dir"] / r["serial"], target="-", met=None,
             notes=f"{note}; the model alone at predict.py's batch and streams, then the loader alone "
                   f"({r['loader']:.0f} img/s): above 1x, the streams overlap loading with the model"),
        dict(id=10, figure="12 MP phone photo, seconds each above the same bird at 227 px", value=extra,
             target="<= 0.1 s", met=extra <= 0.1,
             notes=f"{n_photos} EXIF-turned 4032x3024 copies: {phone:.2f} s vs {birds:.2f} s; top-1 the same for "
                   f"{same} of {n_photos}")]


# ----------------------------------------------------------------------------- main

def machine(device):
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"
    if device.type == "cuda":
        text = f"{torch.cuda.get_device_name(device)}; " + text
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", default="all", help="comma-separated figure numbers 1-10, or all")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per figure (the median is reported)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default 10 on CPU, 50 on GPU)")
    parser.add_argument("--fig8-images", type=int, default=2560,
                        help="JPEGs per pass of figure 8 on a GPU (the real subset is read more than once to reach it)")
    parser.add_argument("--bird-images", type=int, default=512,
                        help="real CUB images for figures 4 and 5 (and at most 64 for figure 8's small CPU run)")
    parser.add_argument("--cub-dir", default=str(SHARED_CUB), help="real CUB images (official layout) for figures 4, 5, 8")
    parser.add_argument("--weights", default=str(SHARED_WEIGHTS), help="tf_efficientnet_lite0 ImageNet weights for figure 5")
    parser.add_argument("--json", default="bench.json", help="where to write the results")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    steps = args.steps or (50 if device.type == "cuda" else 10)
    wanted = set(range(1, 11)) if args.sections == "all" else {int(s) for s in args.sections.split(",")}
    cub_dir, weights = Path(args.cub_dir), Path(args.weights)
    has_birds, has_weights = cub_dir.is_dir(), weights.is_file()
    rows, skipped = [], []
    with tempfile.TemporaryDirectory() as tmp:
        cifar_root = cifar_fixture(tmp) if wanted & {1, 2, 7} else None
        sections = [
            (1, lambda: bench_cifar_loader(cifar_root, device, args.repeats)),
            (2, lambda: bench_basenet_epoch(cifar_root, device, args.repeats)),
            (3, lambda: bench_fast_path(device, args.repeats, steps)),
            (4, lambda: bench_bird_loaders(cub_dir, device, args.repeats, args.bird_images)
             if has_birds else f"no birds in {cub_dir}"),
            (5, lambda: bench_feature_cache(cub_dir, weights, device, args.repeats, min(args.bird_images, 256))
             if has_birds and has_weights else f"needs birds in {cub_dir} and weights {weights}"),
            (6, lambda: bench_gpu_models(device, args.repeats, steps)),
            (7, lambda: bench_loader_vs_model(cifar_root, device, args.repeats,
                                              next((r["value"] for r in rows if r["id"] == 6), None) or
                                              bench_gpu_models(device, 1, steps)[0]["value"])),
            (8, lambda: (bench_resnet50_jpeg(cub_dir, device, args.repeats, args.fig8_images, bird_loaders.default_workers())
                         if device.type == "cuda" else
                         bench_resnet50_jpeg(cub_dir, device, args.repeats, min(args.bird_images, 64), bird_loaders.default_workers(),
                                             arch="resnet18", size=64, batch=16))
             if has_birds and (device.type == "cuda" or args.sections != "all")
             else f"needs birds in {cub_dir}" if not has_birds else "ResNet-50 at 224 px needs a GPU (ask for --sections 8 to run it small here)"),
            (9, lambda: bench_resize_kernels(cub_dir, device, args.repeats) if has_birds else f"no birds in {cub_dir}"),
            (10, lambda: bench_predict(cub_dir, weights, device, args.repeats)
             if has_birds and has_weights else f"needs birds in {cub_dir} and weights {weights}"),
        ]
        for number, fn in sections:
            if number not in wanted:
                continue
            t0 = time.perf_counter()
            result = fn()
            if isinstance(result, str):
                skipped.append(f"{number}: {result}")
                continue
            for r in result:
                r["bench_seconds"] = round(time.perf_counter() - t0, 1)
                rows.append(r)
                print(f"[{r['id']}] {r['figure']}: {r['value']:.2f}"
                      + (f" vs {r['baseline']:.2f} = {r['ratio']:.2f}x" if r.get("baseline") else "")
                      + f"  target {r['target']}: {'met' if r['met'] else 'MISSED' if r['met'] is False else 'n/a here'}"
                      + f"  ({r['notes']})", flush=True)
    report = {"date": time.strftime("%Y-%m-%d"), "machine": machine(device), "device": str(device),
              "command": " ".join(["python"] + sys.argv), "results": rows, "skipped": skipped}
    run_files.atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    for s in skipped:
        print(f"skipped {s}")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
