"""Check the whole GPU path in one command, and print one table of the results.

Each row: the check, pass/FAIL/skip/skip (budget), its seconds, its figure or the first error line of a failure. The
table (and the per-check logs, in --out) is what goes into BENCHMARKS.md's GPU section. Every check that measures a
difference compares it with a limit stated in LIMITS below, and fails past it.

    bash tools/gpu_check.sh --quick                           # first, whenever a GPU is at hand: about 3 minutes
    bash tools/gpu_check.sh                                   # the default set: at most 420 s estimated (--list)
    bash tools/gpu_check.sh --cub-dir ../shared/data/CUB_200_2011_subset100 \
        --weights ../shared/weights/tf_efficientnet_lite0_in1k.pth --out gpu_check
    bash tools/gpu_check.sh --only cifar-fast,resume --skip bench
    python tools/gpu_check.py --list                          # every check with its estimated seconds

Checks (names for --only/--skip), in the order they run, with their estimated seconds on one H100/H200 (ESTIMATES;
--budget: a check that would start after it is skipped, and a running one stopped, both reported as skip (budget)):
  decode-under-load  the nvjpeg loader's batch and the same files reversed, decoded back to back behind ~100 ms
                 queued on the current stream, against both decoded on an idle device, bit for bit, in each row of
                 DECODE_ROWS (--list): the shipped ordering (also --deterministic, sync, and a decoder returning with
                 its writes queued) must pass; each planted fault (the unordered call on torchvision's decoder,
                 record_stream a no-op, wait_stream removed) must fail, and the check fails if one passes
  loader-pixels  each loader's GPU eval preprocessing against the PIL loader's (grey levels, LIMITS)
  gpu-decode     the nvjpeg loader's scan + one batched decode of the files it sends to the GPU, against PIL
                 (LIMITS), and progressive JPEGs decoded on the GPU against PIL in worker processes (which is faster)
  birds-nvjpeg   finetune_birds.py --loader nvjpeg (LP-FT default, 1 fine-tuning epoch, --no-compile)
  birds-torch    the same with --loader torch; with real weights its test accuracy must agree with every other
                 loader's within LIMITS
  birds-dali     the same with --loader dali; skipped, saying so, without DALI
  bench          python bench.py --sections 8,9: ResNet-50 img/s alone (built as the default fine-tune builds it) and
                 end to end from JPEG per loader; the batched crop+resize kernels (ours, roi_align, grid_sample)
  cifar-final    train_cifar.py --preset final on 50,000 generated CIFAR-format images for 3 epochs; prints the
                 projected wall time of the preset's 100 epochs
  ddp-nccl       a 1-process torchrun run: NCCL process group, DDP wrapper, all-reduce on the GPU
  resume         a --deterministic run killed with SIGKILL in epoch 2 and resumed, and one stopped by SIGTERM
                 mid-epoch (the step-level save) and resumed, each equal to the uninterrupted run
  deterministic  two --deterministic CUDA runs give bit-identical weights
--quick runs decode-under-load, loader-pixels, one bird run per loader and bench figure 8 on 1,024 images.
Not in the default set (name them with --only):
  dali-stream    DALI outputs bound to torch's CUDA stream vs host-synchronous outputs (img/s of both)
  cifar-fast     train_cifar.py, 2 epochs of ResNet-18 with the CUDA defaults (bf16, channels-last, compile), EMA,
                 CutMix and flip+shift TTA
  cifar-plain    the same with --no-compile --no-amp
  ladder-jobs    run_all.sh's CIFAR ladder (generated data, 3 epochs a run) with --jobs 1 and --jobs 4 on one GPU
  cpu-tests      the suite's device-path test files on this machine's torch/torchvision; they pin the CPU, so they
                 check this torch build, not CUDA
  suite-all      the whole test suite (python -m pytest -q)

Needs, beyond requirements.txt: a CUDA GPU and its driver; torchrun (part of torch). Without DALI the DALI
checks say so. Without --cub-dir the shared real subset (../shared) is used where present (on a GPU; the CPU dry run
runs the bird checks at 64 px on the generated tree), else a generated CUB tree
(600 images of 448 px, about a CUB photo's area; with a grayscale JPEG, a CMYK JPEG, a PNG named .jpg, an
EXIF-rotated and a progressive JPEG); without --weights the bird runs start from random weights (accuracy is then
meaningless, speed is not, and the accuracy agreement is not checked). CIFAR data is always generated.
"""
import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
SHARED_CUB = ROOT.parent / "shared" / "data" / "CUB_200_2011_subset100"
# The default set, most wanted first (the --budget cuts the tail), with each check's estimated seconds on one
# H100/H200. The estimates come from the 2026-11-25 H100 run (BENCHMARKS.md: compile 17-26 s, Lite0 fine-tuning at
# 1,084 img/s, 15,000 img/s batched decode, WRN-28-10 at 11,851 img/s) and the sizes chosen here; the next GPU run's
# table replaces them. They sum to at most 420 s, so the set fits a 15-minute slot with its start-up.
ESTIMATES = {"decode-under-load": 20, "loader-pixels": 20, "gpu-decode": 10, "birds-nvjpeg": 45, "birds-torch": 45,
             "birds-dali": 40, "bench": 50, "cifar-final": 100, "ddp-nccl": 20, "resume": 40, "deterministic": 20}
CHECKS = list(ESTIMATES)
ESTIMATES_MORE = {"bench-quick": 40}  # outside the default set, where --quick needs an estimate
QUICK = ["decode-under-load", "loader-pixels", "birds-nvjpeg", "birds-torch", "birds-dali", "bench-quick"]
OPTIONAL = ["dali-stream", "cifar-fast", "cifar-plain", "ladder-jobs", "cpu-tests", "suite-all", "bench-quick"]
DEVICE_PATH_TESTS = ["tests/test_data.py", "tests/test_engine.py", "tests/test_ddp.py", "tests/test_models.py"]
# What a difference check allows, in grey levels (0-255); past it the check fails. A one-pixel shift of a real photo
# moves its pixels by several grey levels on average (tests/test_engine.py hands each check one and sees it fail).
LIMITS = {
    "decode-under-load": dict(mean=0.0, max=0.0),  # the same bytes, the same decoder: bit for bit
    "loader-pixels": dict(mean=1.0, max=None),  # nvJPEG's IDCT is not libjpeg's (0.16 measured on an H100)
    "gpu-decode": dict(mean=1.0, max=None),
    "birds-accuracy": dict(accuracy=0.01),  # test accuracy of one bird run per loader, real weights
}
DEADLINE = [None]  # time.monotonic() by which every subprocess must have ended (--budget)


class Skip(Exception):
    """A check that cannot run here; the message says why."""


class BudgetSpent(Skip):
    """The --budget ran out before or during the check."""


class CheckFailed(Exception):
    """A figure past its limit: the message names the figure, its value and the limit."""


def compare_images(what, images, reference, limits):
    """Mean and max |images - reference| in grey levels, checked against limits (a LIMITS entry); raises CheckFailed
    naming the figure past its limit. Returns (mean, share of values off by more than half a level, max)."""
    import torch
    images, reference = torch.as_tensor(images).float().cpu(), torch.as_tensor(reference).float().cpu()
    if images.shape != reference.shape:
        raise CheckFailed(f"{what}: shape {tuple(images.shape)} against {tuple(reference.shape)}")
    diff = (images - reference).abs()
    mean, most = diff.mean().item(), diff.max().item()
    if mean > limits["mean"]:
        raise CheckFailed(f"{what}: mean |difference| {mean:.3f} grey levels, over the limit {limits['mean']}")
    if limits.get("max") is not None and most > limits["max"]:
        raise CheckFailed(f"{what}: max |difference| {most:.0f} grey levels, over the limit {limits['max']}")
    return mean, (diff > 0.5).float().mean().item(), most


def run_command(cmd, log, timeout=600, env=None):
    """Run a command (list), appending its output to log; raise with the first error line on failure. It is stopped
    at the --budget deadline too."""
    cmd = [str(c) for c in cmd]
    if DEADLINE[0] is not None:
        timeout = max(1.0, min(timeout, DEADLINE[0] - time.monotonic()))
    with open(log, "a") as f:
        f.write(f"\n$ {shlex.join(cmd)}\n")
        f.flush()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        except subprocess.TimeoutExpired:
            if DEADLINE[0] is not None and time.monotonic() >= DEADLINE[0] - 1:
                raise BudgetSpent(f"stopped after {timeout:.0f} s: the --budget ran out") from None
            raise RuntimeError(f"stopped after {timeout:.0f} s, its limit") from None
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {first_error(log)}")


def first_error(log):
    lines = Path(log).read_text(errors="replace").splitlines()
    for key in ("error:", "Error", "FAILED", "Traceback"):
        hit = next((line.strip() for line in reversed(lines) if key in line), None)
        if hit:
            return hit[:300]
    return (lines[-1] if lines else "no output")[:300]


def metrics(out):
    import pandas as pd
    return pd.read_csv(Path(out) / "metrics.csv")


def final(out):
    return json.loads((Path(out) / "final.json").read_text())


def same_weights(a, b):
    import torch
    wa = torch.load(Path(a) / "last.pt", map_location="cpu", weights_only=True)["model"]
    wb = torch.load(Path(b) / "last.pt", map_location="cpu", weights_only=True)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ----------------------------------------------------------------------------- the checks

def cifar_common(ctx, out, epochs=2):
    return ["train_cifar.py", "--data-dir", ctx.cifar, "--out", out, "--device", ctx.device, "--quiet", "--epochs", epochs,
            "--val-per-class", "20", "--normalize", "--aug", "flip,crop,cutout", "--batch-size", "256"]


def check_cifar(ctx, name, extra):
    out = ctx.tmp / name
    run_command([sys.executable, *cifar_common(ctx, out), "--model", "resnet18", "--lr", "0.1", "--schedule", "onecycle",
         "--wd", "5e-4", *extra], ctx.log(name))
    m, f = metrics(out), final(out)
    return (f"{m['images_per_second'].iloc[-1]:,.0f} img/s in epoch 2 (ResNet-18, batch 256); first step "
            f"{f['first_step_seconds']:.1f} s; val acc {f['best_val_acc']:.3f}")


def check_deterministic(ctx):
    outs = [ctx.tmp / f"det{i}" for i in (1, 2)]
    for out in outs:
        run_command([sys.executable, *cifar_common(ctx, out), "--model", "convnet", "--bn", "--deterministic", "--no-compile"],
            ctx.log("deterministic"))
    if not same_weights(*outs):
        raise RuntimeError("two --deterministic runs ended with different weights")
    return "2 runs of convnet --bn (bf16): bit-identical weights"


def check_resume(ctx):
    args = [*cifar_common(ctx, None, epochs=3), "--model", "convnet", "--bn", "--deterministic", "--no-compile",
            "--batch-size", "64"]
    full = ctx.tmp / "resume-full"
    run_command([sys.executable, *with_out(args, full)], ctx.log("resume"))
    seconds = metrics(full)["epoch_seconds"].iloc[1]
    columns = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr"]
    stops = []
    for sig in (signal.SIGKILL, signal.SIGTERM):
        out = ctx.tmp / f"resume-{sig.name.lower()}"
        cmd = [sys.executable, *with_out(args, out)]
        with open(ctx.log("resume"), "a") as f:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
            deadline = time.time() + 300
            while not (out / "metrics.csv").exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(0.4 * seconds)  # into epoch 2
            proc.send_signal(sig)
            proc.wait()
        if proc.poll() == 0:
            raise RuntimeError(f"the run ended before {sig.name} reached it")
        import torch
        step = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["step_in_epoch"]
        if sig == signal.SIGTERM and not step:
            raise RuntimeError("SIGTERM landed on an epoch boundary: the mid-epoch save was not exercised")
        run_command([sys.executable, *with_out(args, out), "--resume"], ctx.log("resume"))
        if not metrics(full)[columns].equals(metrics(out)[columns]):
            raise RuntimeError(f"metrics.csv after {sig.name} + resume differs from the uninterrupted run's")
        if not same_weights(full, out):
            raise RuntimeError(f"weights after {sig.name} + resume differ from the uninterrupted run's")
        if (full / "submission.csv").read_bytes() != (out / "submission.csv").read_bytes():
            raise RuntimeError(f"submission.csv after {sig.name} + resume differs")
        stops.append(f"{sig.name} in epoch 2" + (f" (saved at step {step})" if step else ""))
    return f"{' and '.join(stops)}, --resume: metrics, weights and submission.csv identical to the uninterrupted run"


def with_out(args, out):
    args = list(map(str, args))
    args[args.index("--out") + 1] = str(out)
    return args


def check_ddp(ctx):
    out = ctx.tmp / "ddp"
    run_command([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
         *cifar_common(ctx, out), "--model", "convnet", "--bn", "--no-compile"], ctx.log("ddp-nccl"),
        env={"NCCL_DEBUG": "INFO"})
    if ctx.device.type != "cuda":
        return f"dry run: torchrun, 1 process, gloo on the CPU; val acc {final(out)['best_val_acc']:.3f}"
    if "NCCL INFO" not in Path(ctx.log("ddp-nccl")).read_text(errors="replace"):
        raise RuntimeError("the run finished but NCCL never initialised (no NCCL INFO lines)")
    return f"torchrun, 1 process: NCCL group, DDP, all-reduce; val acc {final(out)['best_val_acc']:.3f}"


def birds_args(ctx, out, loader):
    arch, weights = ("tf_efficientnet_lite0", ctx.weights) if ctx.weights else ("resnet18", "none")
    return [sys.executable, "finetune_birds.py", "--data-dir", ctx.cub, "--out", out, "--device", ctx.device, "--quiet",
            "--arch", arch, "--weights", weights, "--loader", loader, "--epochs", "1", "--batch-size", "64",
            "--img-size", "224" if ctx.device.type == "cuda" else "64",  # the CPU dry run: small, to stay short
            "--no-compile"]  # the default recipe (LP-FT); --workers: this machine's cores


def check_birds(ctx, loader):
    if loader == "dali" and not ctx.dali:
        raise Skip("DALI is not installed (pip install nvidia-dali-cuda130); the nvjpeg and torch loaders are checked")
    out = ctx.tmp / f"birds-{loader}"
    run_command(birds_args(ctx, out, loader), ctx.log(f"birds-{loader}"))
    m, f = metrics(out), final(out)
    ctx.birds[loader] = f["test_acc"]
    acc = "n/a" if f["test_acc"] is None else f"{f['test_acc']:.3f}"
    figure = (f"{m['images_per_second'].iloc[-1]:,.0f} img/s fine-tuning (eager) "
              f"({'Lite0 ImageNet' if ctx.weights else 'ResNet-18 random init'}), test acc {acc}")
    if ctx.weights and f["test_acc"] is not None:  # one preprocessing for every loader: the same accuracy
        limit = LIMITS["birds-accuracy"]["accuracy"]
        for other, acc_other in ctx.birds.items():
            if other != loader and acc_other is not None and abs(acc_other - f["test_acc"]) > limit:
                raise CheckFailed(f"test accuracy {f['test_acc']:.4f} with --loader {loader} against {acc_other:.4f} "
                                  f"with --loader {other}: more than {limit} apart")
        others = [k for k in ctx.birds if k != loader and ctx.birds[k] is not None]
        if others:
            figure += f"; within {limit} of --loader {', '.join(others)}"
    return figure


def check_loader_pixels(ctx):
    """Every loader's eval images on the GPU against the PIL loader's, in grey levels (0-255)."""
    import compare_loaders

    import bird_data
    import bird_loaders
    samples = bird_data.load_cub(ctx.cub)[1][:128]
    out, _ = compare_loaders.compare(samples, 224, ctx.device, bird_loaders.default_workers(), train=False, batch=64)
    parts = []
    for kind in out:
        if kind != "torch":
            mean, off, most = compare_images(f"--loader {kind} against PIL", out[kind][0], out["torch"][0],
                                             LIMITS["loader-pixels"])
            parts.append(f"{kind}: mean {mean:.3f}, {off:.2%} of values off, max {most:.0f}")
    return f"|loader - PIL| in grey levels, 128 test images at 224 px: {'; '.join(parts)}"


def check_dali_stream(ctx):
    """An epoch of DALI batches feeding a small GPU workload, outputs bound to torch's stream vs host-synchronous."""
    if ctx.device.type != "cuda":
        raise Skip("needs a CUDA device (it times the hand-over to torch's CUDA stream)")
    if not ctx.dali:
        raise Skip("DALI is not installed")
    import torch

    import bird_data
    import bird_loaders
    import models
    samples = bird_data.load_cub(ctx.cub)[0][:1024]
    net = models.TransferNet("resnet18", 10).cuda().to(memory_format=torch.channels_last)
    rates = {}
    for on_stream in (False, True, False, True):  # interleaved; the second of each pair counts
        loader = bird_loaders.DaliImageLoader(samples, 224, 128, True, [0.5] * 3, [0.5] * 3, torch.device("cuda"),
                                      aug={"rrc", "flip"}, workers=8, channels_last=True)
        loader.on_torch_stream = on_stream
        torch.cuda.synchronize()
        t0, n = time.perf_counter(), 0
        with torch.autocast("cuda", torch.bfloat16), torch.no_grad():
            for x, _ in loader:
                net(x)
                n += len(x)
        torch.cuda.synchronize()
        rates[on_stream] = n / (time.perf_counter() - t0)
    return (f"{rates[True]:,.0f} img/s with outputs on torch's stream vs {rates[False]:,.0f} host-synchronous "
            f"({rates[True] / rates[False]:.2f}x; ResNet-18 forward at 224 px, 1,024 images)")


def check_gpu_decode(ctx):
    """What the nvjpeg loader does before resampling: scan the files (the generated tree holds a PNG named .jpg, a
    grayscale, a CMYK and an EXIF-rotated JPEG: those go to PIL), then decode the rest in one batched call on the GPU
    (device_images.decode_jpegs), against PIL. Then progressive JPEGs (the real images re-encoded so): the GPU decoder against
    PIL in worker processes, the measurement behind where bird_data.scan_images sends them."""
    import numpy as np
    import torch
    from PIL import Image

    import bird_data
    import device_images
    samples = bird_data.load_cub(ctx.cub)[0][:256]
    _, broken, pil, reasons = bird_data.scan_images(samples, pil_for_gpu_refused=True)
    gpu = [s for i, s in enumerate(samples) if i not in pil and i not in broken]
    raw = [torch.from_numpy(np.fromfile(s[0], dtype=np.uint8)) for s in gpu]
    rate = decode_rate(raw, ctx)
    images = device_images.decode_jpegs(raw[:32], ctx.device)
    ref = [torch.from_numpy(np.array(Image.open(s[0]).convert("RGB"))).permute(2, 0, 1) for s in gpu[:32]]
    mean, _, _ = compare_images(f"{device_images.jpeg_decoder()[0]} decode against PIL", torch.cat([i.flatten() for i in images]),
                                torch.cat([r.flatten() for r in ref]), LIMITS["gpu-decode"])
    routed = ", ".join(f"{n} {why}" for why, n in reasons.items()) or "none"
    progressive = progressive_rates(gpu[:128], ctx)
    return (f"{rate:,.0f} img/s batched {device_images.jpeg_decoder()[0]} decode of {len(raw)} files; to PIL at scan time: "
            f"{routed}; mean |decode - PIL| {mean:.2f} of 255 (32 images, before any resize); {progressive}")


def decode_rate(raw, ctx, repeats=3):
    import device_images
    device_images.decode_jpegs(raw, ctx.device)  # warm-up: the decoder's handles and buffers
    ctx.sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        device_images.decode_jpegs(raw, ctx.device)
    ctx.sync()
    return repeats * len(raw) / (time.perf_counter() - t0)


def progressive_rates(samples, ctx):
    """img/s of progressive JPEGs through the GPU decoder (one batched call) and through PIL in default_workers()
    processes, as BirdFiles decodes the files it is given: which path is faster for them."""
    import io
    from concurrent.futures import ProcessPoolExecutor

    import numpy as np
    import torch
    from PIL import Image

    import bird_loaders
    blobs = []
    for path, _, _ in samples:
        buf = io.BytesIO()
        Image.open(path).convert("RGB").save(buf, "JPEG", quality=90, progressive=True)
        blobs.append(buf.getvalue())
    gpu = decode_rate([torch.from_numpy(np.frombuffer(b, dtype=np.uint8).copy()) for b in blobs], ctx)
    workers = bird_loaders.default_workers()
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_pil_decode, blobs[:workers]))  # start-up
        t0 = time.perf_counter()
        list(pool.map(_pil_decode, blobs, chunksize=8))
        cpu = len(blobs) / (time.perf_counter() - t0)
    faster = "the GPU decoder" if gpu >= cpu else "PIL in the workers"
    return (f"progressive JPEGs ({len(blobs)}): {gpu:,.0f} img/s GPU decoder, {cpu:,.0f} img/s PIL in {workers} "
            f"processes: {faster} is faster")


def _pil_decode(blob):
    import io

    import bird_data
    return bird_data.pil_rgb(io.BytesIO(blob)).shape


# The decode-under-load rows: (name, what is planted, the outcome it must have). A planted row is a fault the ordering in
# device_images.decode_jpegs guards against; on a GPU it must fail, or the check could not see that fault at all.
DECODE_ROWS = [
    ("shipped", (), "pass"),
    ("shipped, --deterministic", ("deterministic",), "pass"),
    ("DECODE_ORDER sync", ("sync",), "pass"),
    ("shipped, a decoder returning with its writes queued", ("queued-writes",), "pass"),
    ("planted: the unordered call, torchvision's decoder", ("unordered",), "fail"),
    ("planted: record_stream a no-op", ("no-record-stream",), "fail"),
    ("planted: wait_stream removed, a decoder returning with its writes queued", ("no-wait-stream", "queued-writes"),
     "fail"),
]
LOAD_CYCLES = 200_000_000  # about 100 ms of torch.cuda._sleep at an H100/H200's clock: pytorch/vision PR 9606's stall


@contextlib.contextmanager
def planted(faults, device):
    """The decode path with `faults` put in for the length of the block, and everything put back after it."""
    import torch

    import device_images
    with contextlib.ExitStack() as stack:
        patch = lambda *a: stack.enter_context(mock.patch.object(*a))  # noqa: E731
        if "deterministic" in faults:
            stack.callback(torch.use_deterministic_algorithms, torch.are_deterministic_algorithms_enabled())
            torch.use_deterministic_algorithms(True)
        if "sync" in faults or "unordered" in faults:
            patch(device_images, "DECODE_ORDER", "sync" if "sync" in faults else "none")
        decoder = device_images.jpeg_decoder("torchvision" if "unordered" in faults else "torchcodec")
        if "queued-writes" in faults:
            decoder = (decoder[0], queued_writes(decoder[1], device))
        patch(device_images, "jpeg_decoder", lambda: decoder)
        if "no-record-stream" in faults:
            patch(torch.Tensor, "record_stream", lambda self, stream: None)
        if "no-wait-stream" in faults:
            patch(torch.cuda.Stream, "wait_stream", lambda self, stream: None)
        yield decoder[0]


def queued_writes(decode, device):
    """A decoder that returns before its last writes have run: the images, decoded, are copied into fresh outputs by
    kernels queued on the decoding stream behind 3x the load (zero-filled first, so an early read sees zeros). Both
    decoders wait on the host before returning today (TorchCodec's host wait: a TODO asks whether it should); this is
    the decoder that the caller's wait_stream must still order after."""
    import torch

    def decode_late(datas, dev):
        images = decode(datas, dev)
        outputs = [torch.zeros_like(image) for image in images]
        if torch.device(device).type == "cuda":
            torch.cuda._sleep(3 * LOAD_CYCLES)
        for out, image in zip(outputs, images, strict=True):
            out.copy_(image)
        return outputs
    return decode_late


def check_decode_under_load(ctx, batch_size=64, trials=3):
    """The nvjpeg loader's decode + resample (`_to_batch`) of a batch and of the same files in reverse order, back to
    back with no sync between, behind about 100 ms of work queued on the current stream (a training step still
    running), against both decoded on an idle device: bit for bit, in every row of DECODE_ROWS. The shipped rows must
    pass and each planted row must fail; a planted row that passes fails the check. On a CPU (a dry run) there are no
    streams to race: every row runs and passes, and only that is checked."""
    import torch

    import bird_data
    import bird_loaders
    samples = bird_data.load_cub(ctx.cub)[1][:batch_size]
    loader = bird_loaders.NvjpegImageLoader(samples, 224, batch_size, False, [0.5] * 3, [0.5] * 3, ctx.device, workers=0)
    forward = bird_loaders.collate_files([loader.files[(i, 0)] for i in range(len(samples))])
    backward = bird_loaders.collate_files([loader.files[(i, 0)] for i in reversed(range(len(samples)))])
    ctx.sync()
    reference = [loader._to_batch(b)[0].clone() for b in (forward, backward)]
    ctx.sync()
    rows = []
    for name, faults, expected in DECODE_ROWS:
        bad, seconds = 0, 0.0
        with planted(faults, ctx.device) as decoder:
            for _ in range(trials):
                ctx.sync()
                t0 = time.perf_counter()
                if ctx.device.type == "cuda":
                    torch.cuda._sleep(LOAD_CYCLES)
                out = [loader._to_batch(b)[0] for b in (forward, backward)]
                ctx.sync()
                seconds += time.perf_counter() - t0
                bad += not all(torch.equal(o, r) for o, r in zip(out, reference, strict=True))
        rows.append((name, expected, "fail" if bad else "pass", bad, 1000 * seconds / trials, decoder))
    return decode_verdict(rows, trials, ctx.device.type == "cuda")


def decode_verdict(rows, trials, on_gpu):
    """The decode-under-load figure from its rows (name, expected, outcome, bad trials, ms a pair, decoder). Raises
    CheckFailed for a row whose outcome is not the one it must have on a GPU (any failing row on a CPU), saying what
    that outcome means: a planted row that passes is a fault the check cannot see; a shipped row that fails is an
    ordering that does not hold."""
    from importlib.metadata import PackageNotFoundError, version
    versions = []
    for package in ("torch", "torchvision", "torchcodec"):
        try:
            versions.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            versions.append(f"{package} absent")
    parts = [f"{name} [{decoder}]: {outcome} ({bad}/{trials} pairs differ, {ms:.0f} ms a pair; must {expected})"
             for name, expected, outcome, bad, ms, decoder in rows]
    meaning = {"fail": "passed: the check cannot see this fault here, so it measures nothing",
               "pass": "differs from the idle decode: the ordering does not hold"}
    for name, expected, outcome, *_ in rows:
        if outcome != (expected if on_gpu else "pass"):
            why = meaning[expected] if on_gpu else "differs from the idle decode on a CPU, where nothing races"
            raise CheckFailed(f"{name}: {why} ({', '.join(versions)}); {'; '.join(parts)}")
    what = ("every planted fault seen failing, every shipped row identical to the idle decode" if on_gpu else
            "dry run: a CPU has no streams to race, so every row passes and the planted ones cannot fail here")
    return f"{what} ({', '.join(versions)}): {'; '.join(parts)}"


def check_bench(ctx, quick=False):
    out_json = ctx.tmp / "bench.json"
    sizes = ["--sections", "8", "--repeats", "1", "--fig8-images", "1024"] if quick else \
        ["--sections", "8,9", "--repeats", "2", "--fig8-images", "2048"]
    cmd = [sys.executable, "bench.py", *sizes, "--json", out_json, "--cub-dir", ctx.cub, "--device", ctx.device.type]
    run_command(cmd, ctx.log("bench"), timeout=900)
    report = json.loads(out_json.read_text())
    ctx.bench = report
    parts = [bench_label(r["figure"]) + f" {r['value']:,.0f} img/s" + (f" ({r['ratio']:.0%} of it)" if r.get("ratio") else "")
             for r in report["results"]]
    return "; ".join(parts) + (f"; skipped: {', '.join(report['skipped'])}" if report["skipped"] else "")


def bench_label(figure):
    """A bench.py figure's short name in the table: figure 8's model alone or its loader, figure 9's decode or kernel."""
    if "model alone" in figure:
        return "model alone"
    if "--loader " in figure:
        return figure.split("--loader ")[-1].split(",")[0]
    if figure.startswith("batched JPEG decode"):
        return figure.removeprefix("batched JPEG decode, ").removesuffix(", img/s")
    return figure.split(": ")[-1].split(" (")[0]


def check_suite(ctx, files=(), name="suite-all"):
    log = ctx.log(name)
    try:
        serial = [] if importlib.util.find_spec("xdist") else ["-o", "addopts="]  # pytest.ini's -n needs pytest-xdist
        run_command([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *serial, *files], log, timeout=1500)
    finally:
        tail = [line for line in Path(log).read_text(errors="replace").splitlines() if " in " in line and "passed" in line]
    return tail[-1] if tail else "see log"


def check_cifar_final(ctx, epochs=3):
    """The final preset on a CIFAR-100-sized generated set: its --time-budget calibration (how many epochs its 600 s
    hold on this GPU), then a few epochs run and the whole budgeted run projected from them."""
    import fixtures
    dry = ctx.device.type != "cuda"  # a CPU dry run: the same command on 1,000 images and a WRN-10-1
    cifar = fixtures.write_cifar100(ctx.tmp / "cifar50k", per_class_train=10 if dry else 500,
                                    per_class_test=2 if dry else 100)
    out = ctx.tmp / "cifar-final"
    t0 = time.perf_counter()
    run_command([sys.executable, "train_cifar.py", "--preset", "final", "--data-dir", cifar, "--out", out, "--device", ctx.device,
         "--quiet", "--epochs", epochs, *(["--depth", "10", "--widen", "1", "--val-per-class", "2"] if dry else [])],
        ctx.log("cifar-final"), timeout=480)
    wall = time.perf_counter() - t0  # the whole command: start-up, data, compile, calibration, epochs, TTA, the CSV
    m = metrics(out)
    budget = json.loads((out / "config.json").read_text())["time_budget"]
    steady = float(m["epoch_seconds"].iloc[1:].median())
    projected = wall + (budget["fits_epochs"] - epochs) * (steady + float(m["eval_seconds"].iloc[1:].median()))
    return (f"the {budget['budget_seconds']:.0f} s budget holds {budget['fits_epochs']} epochs here (calibrated: "
            f"{budget['images_per_second']:,.0f} img/s); {epochs} epochs ran in {wall:.0f} s wall (first epoch "
            f"{m['epoch_seconds'].iloc[0]:.0f} s, then {steady:.1f} s/epoch, {m['images_per_second'].iloc[-1]:,.0f} "
            f"img/s); the budgeted run projected from them: {projected / 60:.1f} min "
            f"({'within' if projected <= 1.1 * budget['budget_seconds'] else 'OVER'} its budget)")


def check_ladder_jobs(ctx):
    seconds = {}
    gpu = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
    for jobs in (1, 4):
        env = {**os.environ, "RESULTS": str(ctx.tmp / f"ladder{jobs}"), "CIFAR_DATA": str(ctx.cifar), "CIFAR_FINAL": "0",
               "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": gpu, "EXTRA": "--val-per-class 20"}
        t0 = time.perf_counter()
        run_command(["bash", "run_all.sh", "--only", "cifar", "--epochs-scale", "0.1", "--jobs", jobs], ctx.log("ladder-jobs"),
            timeout=900, env=env)
        seconds[jobs] = time.perf_counter() - t0
    return (f"11 ladder runs (3 epochs each, report included) on GPU {gpu}: --jobs 1 {seconds[1]:.0f} s, --jobs 4 "
            f"{seconds[4]:.0f} s ({seconds[1] / seconds[4]:.2f}x)")


# ----------------------------------------------------------------------------- main

class Context:
    """What every check shares: the data (generated where absent), the log folder and the device (cuda; the suite
    runs the checks that allow it on the CPU, tests/test_engine.py)."""

    def __init__(self, args, tmp, device="cuda"):
        import torch

        import bird_loaders
        self.device = torch.device(device)
        self.tmp, self.out = Path(tmp), Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.dali = bird_loaders.dali_available()
        self.weights = args.weights if args.weights and Path(args.weights).is_file() else None
        self.bench = None
        self.birds = {}  # test accuracy per loader, for the agreement check
        import fixtures
        self.cifar = fixtures.write_cifar100(self.tmp / "cifar", per_class_train=100, per_class_test=20)
        cub = Path(args.cub_dir) if args.cub_dir else SHARED_CUB if self.device.type == "cuda" else Path("none")
        self.cub_is_real = cub.is_dir()
        self.cub = cub if self.cub_is_real else fixtures.write_cub(self.tmp / "cub", num_classes=10, per_class=60,
                                                                   size=448, broken=False)

    def log(self, name):
        return self.out / f"{name}.log"

    def sync(self):
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def list_checks():
    """--list: the default set with each check's estimated seconds and their sum, then the quick and optional sets."""
    lines = [f"  {name:18s} {ESTIMATES[name]:4d} s" for name in CHECKS]
    lines.append(f"  {'total':18s} {sum(ESTIMATES.values()):4d} s (estimated, one H100/H200; the default set)")
    quick = sum({**ESTIMATES, **ESTIMATES_MORE}[name] for name in QUICK)
    lines.append(f"--quick: {', '.join(QUICK)} ({quick} s estimated, birds-dali only where DALI is installed)")
    lines.append(f"not in the default set: {', '.join(OPTIONAL)}")
    lines.append("decode-under-load rows (on a GPU each must have its outcome; a planted row that passes fails the check):")
    lines += [f"- {name}: must {expected}" for name, _, expected in DECODE_ROWS]
    return "\n".join(lines)


CHECK_FUNCTIONS = {
    "cifar-fast": lambda ctx: check_cifar(ctx, "cifar-fast", ["--ema", "0.99", "--cutmix", "1.0", "--mix-prob", "0.5",
                                                             "--tta", "flip,shift"]),
    "cifar-plain": lambda ctx: check_cifar(ctx, "cifar-plain", ["--no-compile", "--no-amp"]),
    "deterministic": check_deterministic, "resume": check_resume, "ddp-nccl": check_ddp,
    "birds-dali": lambda ctx: check_birds(ctx, "dali"), "birds-torch": lambda ctx: check_birds(ctx, "torch"),
    "birds-nvjpeg": lambda ctx: check_birds(ctx, "nvjpeg"), "cifar-final": check_cifar_final,
    "loader-pixels": check_loader_pixels, "dali-stream": check_dali_stream, "gpu-decode": check_gpu_decode,
    "decode-under-load": check_decode_under_load, "bench": check_bench,
    "bench-quick": lambda ctx: check_bench(ctx, quick=True),
    "cpu-tests": lambda ctx: check_suite(ctx, DEVICE_PATH_TESTS, "cpu-tests"), "suite-all": check_suite,
    "ladder-jobs": check_ladder_jobs,
}


def write_table(ctx, header, rows):
    """gpu_check.md (and bench.json) in --out, the table printed too; the exit status: 1 where a check failed."""
    table = ["| check | result | seconds (estimate) | figure or first error line |", "|---|---|---:|---|"]
    table += [f"| {n} | {s} | {sec:.0f} ({ESTIMATES.get(n, ESTIMATES_MORE.get(n, '-'))}) | {fig.replace('|', '/')} |"
              for n, s, fig, sec in rows]
    text = f"{header}\n\n" + "\n".join(table) + "\n"
    (ctx.out / "gpu_check.md").write_text(text)
    if ctx.bench:
        (ctx.out / "bench.json").write_text(json.dumps(ctx.bench, indent=2) + "\n")
    print("\n" + text)
    return 1 if any(s == "FAIL" for _, s, _, _ in rows) else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__[__doc__.index("Checks"):])
    parser.add_argument("--cub-dir", default=None, help="CUB_200_2011-layout birds (default: ../shared's subset, else generated)")
    parser.add_argument("--weights", default=None, help="tf_efficientnet_lite0 ImageNet state dict for the bird runs")
    parser.add_argument("--out", default="gpu_check", help="folder for the per-check logs, the table and bench.json")
    parser.add_argument("--only", default=None, help="comma-separated checks to run (default: the default set)")
    parser.add_argument("--skip", default="", help="comma-separated checks to leave out")
    parser.add_argument("--quick", action="store_true",
                        help="about three minutes: decode-under-load, loader-pixels, one bird run per loader, bench "
                             "figure 8 on 1,024 images; run it first whenever a GPU is at hand")
    parser.add_argument("--list", action="store_true", help="print every check with its estimated seconds and exit")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: a dry run of the checks' own code on this machine (figures meaningless, the CUDA-only "
                             "checks skipped), so that a broken check is found before a GPU slot is spent on it")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds the whole check may take: later checks are skipped and a running one stopped, "
                             "as skip (budget) (default: 540, or 240 with --quick; a CPU dry run 1800)")
    args = parser.parse_args()
    if args.list:
        print(list_checks())
        return
    budget = args.budget if args.budget is not None else 240 if args.quick else 540 if args.device == "cuda" else 1800
    t_start = time.monotonic()
    DEADLINE[0] = t_start + budget
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # decode-under-load runs deterministic kernels too
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: tools/gpu_check.sh checks the CUDA path and needs a CUDA GPU; none is visible here "
                 "(--device cpu dry-runs the checks)")
    wanted = QUICK if args.quick else CHECKS if not args.only else args.only.split(",")
    unknown = sorted(set(wanted + [s for s in args.skip.split(",") if s]) - set(CHECKS + OPTIONAL))
    if unknown:
        sys.exit(f"error: unknown check {', '.join(unknown)}; choose from {', '.join(CHECKS + OPTIONAL)}")
    wanted = [c for c in wanted if c not in args.skip.split(",")]
    import device_images
    machine = torch.cuda.get_device_name() if args.device == "cuda" else "CPU dry run (figures meaningless)"
    header = (f"{machine} | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
              f"{time.strftime('%Y-%m-%d %H:%M')} | decoder {device_images.jpeg_decoder()[0]}, DECODE_ORDER {device_images.DECODE_ORDER} | ")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(args, tmp, args.device)
        header += (f"DALI {'yes' if ctx.dali else 'not installed'} | birds: {ctx.cub if ctx.cub_is_real else 'generated'}"
                   f" | weights: {ctx.weights or 'none (random init)'}")
        print(header, flush=True)
        for name in wanted:
            t0 = time.perf_counter()
            try:
                if time.monotonic() > DEADLINE[0] - 5:
                    raise BudgetSpent(f"the --budget of {budget:.0f} s was spent before this check")
                status, figure = "pass", CHECK_FUNCTIONS[name](ctx)
            except BudgetSpent as e:
                status, figure = "skip (budget)", str(e)
            except Skip as e:
                status, figure = "skip", str(e)
            except Exception as e:  # any failure: keep going, report its first line
                status, figure = "FAIL", str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            rows.append((name, status, figure, time.perf_counter() - t0))
            print(f"{name:18s} {status:13s} {rows[-1][3]:6.1f}s  {figure}", flush=True)
    header += f" | total {time.monotonic() - t_start:.0f} s of a {budget:.0f} s budget"
    sys.exit(write_table(ctx, header, rows))

if __name__ == "__main__":
    main()
