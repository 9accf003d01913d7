"""Check the whole GPU path in one command, and print one table of the results.

Each row: the check, pass/FAIL/skip, its figure, or the first error line of a failure. The table (and the
per-check logs, in --out) is what goes into BENCHMARKS.md's GPU section.

    bash tools/gpu_check.sh                                   # everything, data generated where absent
    bash tools/gpu_check.sh --cub-dir ../shared/data/CUB_200_2011_subset100 \
        --weights ../shared/weights/tf_efficientnet_lite0_in1k.pth --out gpu_check
    bash tools/gpu_check.sh --only cifar-fast,resume --skip suite

Checks (names for --only/--skip), in the order they run; the default set is meant to end within 9 minutes on
one H100/H200 (--budget: a check that would start after it is skipped, saying so, and a running one is stopped):
  cifar-final    train_cifar.py --preset final (WRN-28-10, bf16, compile, EMA, CutMix, flip+shift TTA) on 50,000
                 generated CIFAR-format images for 3 epochs; prints the projected wall time of the preset's 100 epochs
  birds-nvjpeg   finetune_birds.py with --loader nvjpeg (torchvision's batched nvJPEG, batched crop/resize on the GPU)
  birds-torch    finetune_birds.py with --loader torch (PIL workers, normalised on the GPU)
  loader-pixels  each loader's GPU eval preprocessing against the PIL loader's (mean |difference| in grey levels)
  gpu-decode     the nvjpeg loader's scan + one batched decode_jpeg(device="cuda") of the files it sends to the GPU
  bench          python bench.py --sections 8,9: ResNet-50 img/s alone and end to end from JPEG per loader; the
                 batched crop+resize kernels (ours, roi_align, grid_sample)
  suite          the suite's device-path tests (loaders, engine, DDP, models) on this machine's torch/torchvision
  ddp-nccl       a 1-process torchrun run: NCCL process group, DDP wrapper, all-reduce on the GPU
  resume         a --deterministic run killed with SIGKILL in epoch 2 and resumed equals the uninterrupted one
  deterministic  two --deterministic CUDA runs give bit-identical weights
  birds-dali     finetune_birds.py with --loader dali (nvJPEG decoding); skipped, saying so, without DALI
  dali-stream    DALI outputs bound to torch's CUDA stream vs host-synchronous outputs (img/s of both)
Not in the default set (name them with --only):
  cifar-fast     train_cifar.py, 2 epochs of ResNet-18 with the CUDA defaults (bf16, channels-last, compile), EMA,
                 CutMix and flip+shift TTA
  cifar-plain    the same with --no-compile --no-amp
  ladder-jobs    run_all.sh's CIFAR ladder (generated data, 3 epochs a run) with --jobs 1 and --jobs 4 on one GPU:
                 the wall time of several small runs sharing a GPU (several minutes)
  suite-all      the whole test suite (python -m pytest -q)

Needs, beyond requirements.txt: a CUDA GPU and its driver; torchrun (part of torch). Without DALI the DALI
checks say so and the nvjpeg and torch loaders are checked instead. Without --cub-dir the shared real subset
(../shared) is used where present, else a generated CUB tree (600 images of 448 px, about a CUB photo's area; with
a grayscale JPEG, a CMYK JPEG and a PNG named .jpg); without --weights the bird runs start from random weights
(accuracy is then meaningless, speed is not). CIFAR data is always generated (CIFAR-format pickles), so no download
is needed.
"""
import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
SHARED_CUB = ROOT.parent / "shared" / "data" / "CUB_200_2011_subset100"
CHECKS = ["cifar-final", "birds-nvjpeg", "birds-torch", "loader-pixels", "gpu-decode", "bench", "suite", "ddp-nccl",
          "resume", "deterministic", "birds-dali", "dali-stream"]  # most wanted first: the --budget may cut the tail
OPTIONAL = ["cifar-fast", "cifar-plain", "ladder-jobs", "suite-all"]
SUITE_SUBSET = ["tests/test_data.py", "tests/test_engine.py", "tests/test_ddp.py", "tests/test_models.py"]
DEADLINE = [None]  # time.monotonic() by which every subprocess must have ended (--budget)


class Skip(Exception):
    """A check that cannot run here; the message says why."""


def run(cmd, log, timeout=600, env=None):
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
            raise RuntimeError(f"stopped after {timeout:.0f} s (its limit, or the --budget deadline)") from None
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
    return ["train_cifar.py", "--data-dir", ctx.cifar, "--out", out, "--device", "cuda", "--quiet", "--epochs", epochs,
            "--val-per-class", "20", "--normalize", "--aug", "flip,crop,cutout", "--batch-size", "256"]


def check_cifar(ctx, name, extra):
    out = ctx.tmp / name
    run([sys.executable, *cifar_common(ctx, out), "--model", "resnet18", "--lr", "0.1", "--schedule", "onecycle",
         "--wd", "5e-4", *extra], ctx.log(name))
    m, f = metrics(out), final(out)
    return (f"{m['images_per_second'].iloc[-1]:,.0f} img/s in epoch 2 (ResNet-18, batch 256); first step "
            f"{f['first_step_seconds']:.1f} s; val acc {f['best_val_acc']:.3f}")


def check_deterministic(ctx):
    outs = [ctx.tmp / f"det{i}" for i in (1, 2)]
    for out in outs:
        run([sys.executable, *cifar_common(ctx, out), "--model", "convnet", "--bn", "--deterministic", "--no-compile"],
            ctx.log("deterministic"))
    if not same_weights(*outs):
        raise RuntimeError("two --deterministic runs ended with different weights")
    return "2 runs of convnet --bn (bf16): bit-identical weights"


def check_resume(ctx):
    args = [*cifar_common(ctx, None, epochs=3), "--model", "convnet", "--bn", "--deterministic", "--no-compile",
            "--batch-size", "64"]
    full, killed = ctx.tmp / "resume-full", ctx.tmp / "resume-killed"
    args[args.index("--out") + 1] = str(full)
    run([sys.executable, *args], ctx.log("resume"))
    args[args.index("--out") + 1] = str(killed)
    cmd = [sys.executable, *map(str, args)]
    with open(ctx.log("resume"), "a") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while not (killed / "metrics.csv").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3 * metrics(full)["epoch_seconds"].iloc[1])  # into epoch 2
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    if proc.returncode != -signal.SIGKILL:
        raise RuntimeError(f"the run ended (exit {proc.returncode}) before it could be killed")
    run([sys.executable, *args, "--resume"], ctx.log("resume"))
    columns = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr"]
    if not metrics(full)[columns].equals(metrics(killed)[columns]):
        raise RuntimeError("metrics.csv after kill + resume differs from the uninterrupted run's")
    if not same_weights(full, killed):
        raise RuntimeError("weights after kill + resume differ from the uninterrupted run's")
    same_csv = (full / "submission.csv").read_bytes() == (killed / "submission.csv").read_bytes()
    if not same_csv:
        raise RuntimeError("submission.csv after kill + resume differs")
    return "SIGKILL in epoch 2, --resume: metrics, weights and submission.csv identical to the uninterrupted run"


def check_ddp(ctx):
    out = ctx.tmp / "ddp"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
         *cifar_common(ctx, out), "--model", "convnet", "--bn", "--no-compile"], ctx.log("ddp-nccl"),
        env={"NCCL_DEBUG": "INFO"})
    if "NCCL INFO" not in Path(ctx.log("ddp-nccl")).read_text(errors="replace"):
        raise RuntimeError("the run finished but NCCL never initialised (no NCCL INFO lines)")
    return f"torchrun, 1 process: NCCL group, DDP, all-reduce; val acc {final(out)['best_val_acc']:.3f}"


def birds_args(ctx, out, loader):
    arch, weights = ("tf_efficientnet_lite0", ctx.weights) if ctx.weights else ("resnet18", "none")
    return [sys.executable, "finetune_birds.py", "--data-dir", ctx.cub, "--out", out, "--device", "cuda", "--quiet",
            "--arch", arch, "--weights", weights, "--loader", loader, "--epochs", "2", "--batch-size", "64",
            "--img-size", "224", "--lr", "0.01"]  # --workers: the default, this machine's cores


def check_birds(ctx, loader):
    if loader == "dali" and not ctx.dali:
        raise Skip("DALI is not installed (pip install nvidia-dali-cuda130); the torch loader and "
                   "torchvision GPU decoding are checked instead")
    out = ctx.tmp / f"birds-{loader}"
    run(birds_args(ctx, out, loader), ctx.log(f"birds-{loader}"))
    m, f = metrics(out), final(out)
    acc = "n/a" if f["test_acc"] is None else f"{f['test_acc']:.3f}"
    return (f"{m['images_per_second'].iloc[-1]:,.0f} img/s fine-tuning in epoch 2 "
            f"({'Lite0 ImageNet' if ctx.weights else 'ResNet-18 random init'}), test acc {acc}")


def check_loader_pixels(ctx):
    """Every loader's eval images on the GPU against the PIL loader's, in grey levels (0-255)."""
    import compare_loaders

    import data
    samples = data.load_cub(ctx.cub)[1][:128]
    _, diffs = compare_loaders.compare(samples, 224, ctx.device, data.default_workers(), train=False, batch=64)
    for kind, mean, _, _ in diffs:
        if mean > 2.0:
            raise RuntimeError(f"{kind} and PIL eval images differ by {mean:.2f} grey levels on average")
    parts = [f"{kind}: mean {mean:.3f}, {off:.2%} of values off, max {most:.0f}" for kind, mean, off, most in diffs]
    return f"|loader - PIL| in grey levels, 128 test images at 224 px: {'; '.join(parts)}"


def check_dali_stream(ctx):
    """An epoch of DALI batches feeding a small GPU workload, outputs bound to torch's stream vs host-synchronous."""
    if not ctx.dali:
        raise Skip("DALI is not installed")
    import torch

    import data
    import models
    samples = data.load_cub(ctx.cub)[0][:1024]
    net = models.TransferNet("resnet18", 10).cuda().to(memory_format=torch.channels_last)
    rates = {}
    for on_stream in (False, True, False, True):  # interleaved; the second of each pair counts
        loader = data.DaliImageLoader(samples, 224, 128, True, [0.5] * 3, [0.5] * 3, torch.device("cuda"),
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
    grayscale and a CMYK JPEG: those go to PIL), then decode the rest in one batched call on the GPU."""
    import numpy as np
    import torch
    import torchvision
    from PIL import Image

    import data
    samples = data.load_cub(ctx.cub)[0][:256]
    _, broken, pil, reasons = data.scan_images(samples, pil_for_gpu_refused=True)
    gpu = [s for i, s in enumerate(samples) if i not in pil and i not in broken]
    raw = [torchvision.io.read_file(s[0]) for s in gpu]
    rgb = torchvision.io.ImageReadMode.RGB
    images = torchvision.io.decode_jpeg(raw, device=ctx.device, mode=rgb)  # warm-up
    ctx.sync()
    t0 = time.perf_counter()
    images = torchvision.io.decode_jpeg(raw, device=ctx.device, mode=rgb)
    ctx.sync()
    seconds = time.perf_counter() - t0
    diffs = []
    for image, s in zip(images[:32], gpu[:32], strict=False):
        ref = torch.from_numpy(np.array(Image.open(s[0]).convert("RGB"))).permute(2, 0, 1)
        diffs.append((image.cpu().float() - ref.float()).abs().mean().item())
    routed = ", ".join(f"{n} {why}" for why, n in reasons.items()) or "none"
    return (f"{len(raw) / seconds:,.0f} img/s batched decode of {len(raw)} files; to PIL at scan time: {routed}; "
            f"mean |nvJPEG - PIL| {sum(diffs) / len(diffs):.2f} of 255 (32 images, before any resize)")


def check_bench(ctx):
    out_json = ctx.tmp / "bench.json"
    cmd = [sys.executable, "bench.py", "--sections", "8,9", "--repeats", "2", "--json", out_json, "--cub-dir", ctx.cub]
    run(cmd, ctx.log("bench"), timeout=900)
    report = json.loads(out_json.read_text())
    ctx.bench = report
    parts = [("model alone" if "alone" in r["figure"] else r["figure"].split("--loader ")[-1].split(",")[0])
             + f" {r['value']:,.0f} img/s" + (f" ({r['ratio']:.0%} of it)" if r.get("ratio") else "")
             for r in report["results"]]
    return "; ".join(parts) + (f"; skipped: {', '.join(report['skipped'])}" if report["skipped"] else "")


def check_suite(ctx, files=()):
    log = ctx.log("suite")
    try:
        run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files], log, timeout=1500)
    finally:
        tail = [line for line in Path(log).read_text(errors="replace").splitlines() if " in " in line and "passed" in line]
    return tail[-1] if tail else "see log"


def check_cifar_final(ctx, epochs=3):
    """The final preset on a CIFAR-100-sized generated set: a few epochs, and the full 100 projected from them."""
    import fixtures
    cifar = fixtures.write_cifar100(ctx.tmp / "cifar50k", per_class_train=500, per_class_test=100)
    out = ctx.tmp / "cifar-final"
    t0 = time.perf_counter()
    run([sys.executable, "train_cifar.py", "--preset", "final", "--data-dir", cifar, "--out", out, "--device", "cuda",
         "--quiet", "--epochs", epochs], ctx.log("cifar-final"), timeout=480)
    wall = time.perf_counter() - t0  # the whole command: start-up, data, compile, epochs, TTA, the test CSV
    m = metrics(out)
    steady = float(m["epoch_seconds"].iloc[1:].median())
    projected = wall + (100 - epochs) * steady
    return (f"{epochs} epochs in {wall:.0f} s wall (first epoch {m['epoch_seconds'].iloc[0]:.0f} s incl. "
            f"compile, then {steady:.1f} s/epoch, {m['images_per_second'].iloc[-1]:,.0f} img/s); projected 100 epochs: "
            f"{projected / 60:.1f} min ({'within' if projected <= 600 else 'OVER'} the README's 10 minutes)")


def check_ladder_jobs(ctx):
    seconds = {}
    gpu = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
    for jobs in (1, 4):
        env = {**os.environ, "RESULTS": str(ctx.tmp / f"ladder{jobs}"), "CIFAR_DATA": str(ctx.cifar), "CIFAR_FINAL": "0",
               "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": gpu, "EXTRA": "--val-per-class 20"}
        t0 = time.perf_counter()
        run(["bash", "run_all.sh", "--only", "cifar", "--epochs-scale", "0.1", "--jobs", jobs], ctx.log("ladder-jobs"),
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

        import data
        self.device = torch.device(device)
        self.tmp, self.out = Path(tmp), Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.dali = data.dali_available()
        self.weights = args.weights if args.weights and Path(args.weights).is_file() else None
        self.bench = None
        import fixtures
        self.cifar = fixtures.write_cifar100(self.tmp / "cifar", per_class_train=100, per_class_test=20)
        cub = Path(args.cub_dir) if args.cub_dir else SHARED_CUB
        self.cub_is_real = cub.is_dir()
        self.cub = cub if self.cub_is_real else fixtures.write_cub(self.tmp / "cub", num_classes=10, per_class=60,
                                                                   size=448, broken=False)

    def log(self, name):
        return self.out / f"{name}.log"

    def sync(self):
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__[__doc__.index("Checks"):])
    parser.add_argument("--cub-dir", default=None, help="CUB_200_2011-layout birds (default: ../shared's subset, else generated)")
    parser.add_argument("--weights", default=None, help="tf_efficientnet_lite0 ImageNet state dict for the bird runs")
    parser.add_argument("--out", default="gpu_check", help="folder for the per-check logs, the table and bench.json")
    parser.add_argument("--only", default=None, help="comma-separated checks to run (default: all)")
    parser.add_argument("--skip", default="", help="comma-separated checks to leave out")
    parser.add_argument("--budget", type=float, default=540,
                        help="seconds the whole check may take: later checks are skipped, a running one stopped")
    args = parser.parse_args()
    t_start = time.monotonic()
    DEADLINE[0] = t_start + args.budget
    import torch
    if not torch.cuda.is_available():
        sys.exit("error: tools/gpu_check.sh checks the CUDA path and needs a CUDA GPU; none is visible here")
    wanted = CHECKS if not args.only else args.only.split(",")
    unknown = sorted(set(wanted + [s for s in args.skip.split(",") if s]) - set(CHECKS + OPTIONAL))
    if unknown:
        sys.exit(f"error: unknown check {', '.join(unknown)}; choose from {', '.join(CHECKS + OPTIONAL)}")
    wanted = [c for c in wanted if c not in args.skip.split(",")]
    functions = {
        "cifar-fast": lambda ctx: check_cifar(ctx, "cifar-fast", ["--ema", "0.99", "--cutmix", "1.0", "--mix-prob", "0.5",
                                                                 "--tta", "flip,shift"]),
        "cifar-plain": lambda ctx: check_cifar(ctx, "cifar-plain", ["--no-compile", "--no-amp"]),
        "deterministic": check_deterministic, "resume": check_resume, "ddp-nccl": check_ddp,
        "birds-dali": lambda ctx: check_birds(ctx, "dali"), "birds-torch": lambda ctx: check_birds(ctx, "torch"),
        "birds-nvjpeg": lambda ctx: check_birds(ctx, "nvjpeg"), "cifar-final": check_cifar_final,
        "loader-pixels": check_loader_pixels, "dali-stream": check_dali_stream, "gpu-decode": check_gpu_decode,
        "bench": check_bench, "suite": lambda ctx: check_suite(ctx, SUITE_SUBSET), "suite-all": check_suite,
        "ladder-jobs": check_ladder_jobs,
    }
    header = (f"{torch.cuda.get_device_name()} | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
              f"{time.strftime('%Y-%m-%d %H:%M')} | ")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(args, tmp)
        header += (f"DALI {'yes' if ctx.dali else 'not installed'} | birds: {ctx.cub if ctx.cub_is_real else 'generated'}"
                   f" | weights: {ctx.weights or 'none (random init)'}")
        print(header, flush=True)
        for name in wanted:
            t0 = time.perf_counter()
            try:
                if time.monotonic() > DEADLINE[0] - 5:
                    raise Skip(f"the --budget of {args.budget:.0f} s was spent before this check")
                status, figure = "pass", functions[name](ctx)
            except Skip as e:
                status, figure = "skip", str(e)
            except Exception as e:  # any failure: keep going, report its first line
                status, figure = "FAIL", str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            rows.append((name, status, figure, time.perf_counter() - t0))
            print(f"{name:14s} {status:5s} {rows[-1][3]:6.1f}s  {figure}", flush=True)
    header += f" | total {time.monotonic() - t_start:.0f} s of a {args.budget:.0f} s budget"
    table = ["| check | result | seconds | figure or first error line |", "|---|---|---:|---|"]
    table += [f"| {n} | {s} | {sec:.0f} | {fig.replace('|', '/')} |" for n, s, fig, sec in rows]
    text = f"{header}\n\n" + "\n".join(table) + "\n"
    (ctx.out / "gpu_check.md").write_text(text)
    if ctx.bench:
        (ctx.out / "bench.json").write_text(json.dumps(ctx.bench, indent=2) + "\n")
    print("\n" + text)
    sys.exit(1 if any(s == "FAIL" for _, s, _, _ in rows) else 0)


if __name__ == "__main__":
    main()
