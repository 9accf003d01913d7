"""The training loop both scripts share, and everything a run writes.

`fit()` trains any model on any loader that yields device batches: SGD/AdamW, warm-up and
none/step/cosine/onecycle schedules, bf16 autocast (fp16 + loss scaling where bf16 is
missing), torch.compile, channels-last, DistributedDataParallel under torchrun, metrics
accumulated on the device (no host sync per step), a progress bar, and a run folder:

    OUT/config.json  metrics.csv  last.pt  best.pt  curves.png  architecture.md
    OUT/final.json   submission.csv         (the last two written by the scripts)

Every file is written to a temporary name and renamed. `last.pt` holds model, optimizer,
scaler, epoch, step and every RNG, so `--resume` continues a killed run exactly; Ctrl-C
(or SIGTERM) saves it mid-epoch. Checkpoints hold only tensors and plain types and are
loaded with `weights_only=True`. Not run directly.
"""
import argparse
import copy
import csv
import io
import itertools
import json
import math
import os
import platform
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn


class UsageError(Exception):
    """A flag value that cannot work: the message is one sentence for the user."""


class NonFiniteLoss(Exception):
    pass


class WriteError(Exception):
    """A file of the run could not be written (disk full, read-only, not a folder): one sentence for the user."""


# ----------------------------------------------------------------------------- flags

def add_training_args(parser, defaults):
    """Flags both scripts share, in --help sections. `defaults` holds each script's own recipe."""
    opt = parser.add_argument_group("optimisation").add_argument
    opt("--epochs", type=int, default=defaults["epochs"], help="passes over the training split")
    opt("--batch-size", type=int, default=defaults["batch_size"], help="global batch size (split over torchrun processes)")
    opt("--optimizer", choices=["sgd", "adamw"], default=defaults["optimizer"], help="optimizer")
    opt("--lr", type=float, default=defaults["lr"], help="peak learning rate")
    opt("--momentum", type=float, default=0.9, help="SGD momentum (AdamW beta1)")
    opt("--nesterov", action=argparse.BooleanOptionalAction, default=False,
        help="Nesterov momentum for SGD (the course baseline uses plain momentum)")
    opt("--wd", type=float, default=defaults["wd"], help="weight decay (not applied to biases and norm layers)")
    opt("--schedule", choices=["none", "step", "cosine", "onecycle"], default=defaults["schedule"],
        help="learning-rate schedule over the run: step divides by 10 at 50%% and 75%% of it")
    opt("--warmup", type=float, default=0.0, help="epochs of linear warm-up from 0 to --lr")
    opt("--time-budget", type=float, default=defaults.get("time_budget"), metavar="SECONDS",
        help="choose the epochs for the machine this runs on: time a few real training steps (compiled where "
             "--compile), one validation pass and a checkpoint save first, then train as many epochs as end, with "
             "their evaluation and the final predictions, within SECONDS of the command's start; the schedule and "
             "warm-up are laid over those epochs. --epochs given too is the most it may choose. config.json records "
             "the budget, the measured times and the chosen epochs, and --resume keeps them (0 or unset: off, "
             "--epochs decides)")
    reg = parser.add_argument_group("regularisation").add_argument
    reg("--label-smoothing", type=float, default=0.0, help="label smoothing of the cross-entropy")
    reg("--ema", type=float, default=0.0, metavar="DECAY",
        help="keep an exponential moving average of the weights and BatchNorm buffers (e.g. 0.999), updated every "
             "step; it is what is validated, saved in best.pt and predicts the CSV (0: off)")
    reg("--ema-warmup", action=argparse.BooleanOptionalAction, default=True,
        help="ramp the EMA decay up as min(DECAY, 1 - step^-0.75) at optimizer step 1, 2, ... (timm's warm-up; "
             "step 1 copies the weights), so the random initial weights do not linger in the average of a short "
             "run; --no-ema-warmup: DECAY from the first step")
    reg("--mixup", type=float, default=0.0, metavar="ALPHA", help="MixUp per sample with lam ~ Beta(ALPHA, ALPHA) (0: off)")
    reg("--cutmix", type=float, default=0.0, metavar="ALPHA", help="CutMix per sample with lam ~ Beta(ALPHA, ALPHA) (0: off); "
        "with --mixup too, each mixed sample takes one of the two at random")
    reg("--mix-prob", type=float, default=1.0,
        help="probability that a sample is mixed at all; with mixing, train_acc counts a prediction correct when "
             "it is the sample's dominant label")
    dev = parser.add_argument_group("speed and device").add_argument
    dev("--amp", action=argparse.BooleanOptionalAction, default=None,
        help="bf16 autocast (fp16 with loss scaling where bf16 is unsupported); default: on for CUDA, off on CPU")
    dev("--compile", action=argparse.BooleanOptionalAction, default=None,
        help="torch.compile the model (first-compile time is reported apart); default: on for CUDA, off on CPU")
    dev("--channels-last", action=argparse.BooleanOptionalAction, default=None,
        help="channels-last memory format (default: on; faster on GPUs and, measured, on CPUs too)")
    dev("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    dev("--deterministic", action="store_true",
        help="bit-identical reruns on the same machine and software (exact resume); on CUDA: fixed cuBLAS "
             "workspace, no TF32, deterministic cuDNN, and an op with no deterministic kernel stops the run")
    dev("--sync-bn", action="store_true", help="synchronise BatchNorm statistics across torchrun processes")
    run = parser.add_argument_group("run folder").add_argument
    run("--out", default=defaults["out"], help="run folder for checkpoints, metrics, plots and the CSV")
    run("--resume", action="store_true", help="continue the run in --out from last.pt (starts fresh if none)")
    run("--force", action="store_true", help="overwrite a run already in --out")
    run("--seed", type=int, default=0, help="seed for initialisation, shuffling, augmentation, mixing and dropout")
    run("--quiet", action="store_true", help="no progress bar")
    run("--tensorboard", action=argparse.BooleanOptionalAction, default=True,
        help="TensorBoard event files in the run folder: loss, accuracy, lr and img/s per epoch, the final figures "
             "as hparams, the flags as text (`tensorboard --logdir results` shows a whole sweep, live)")


def require(ok, flag, value, what):
    """A flag's range check: one sentence naming the one flag that is wrong and its value."""
    if not ok:
        raise UsageError(f"{flag} must be {what}, got {value}")


def epochs_cap(args, argv):
    """With --time-budget, an --epochs given on the command line caps the epochs the budget chooses (a default or a
    preset's epochs do not)."""
    argv = sys.argv[1:] if argv is None else argv
    given = any(a == "--epochs" or a.startswith("--epochs=") for a in argv)
    return args.epochs if args.time_budget and given else None


def tta_view_count(tta):
    """How many views tta_views makes of a batch."""
    return (5 if "shift" in tta else 1) * (2 if "flip" in tta else 1)


def check_training_args(args, train_size):
    require(args.epochs >= 1, "--epochs", args.epochs, "at least 1")
    require(args.time_budget is None or args.time_budget >= 0, "--time-budget", args.time_budget, ">= 0 (0: off)")
    require(args.lr > 0 and math.isfinite(args.lr), "--lr", args.lr, "a positive number")
    require(args.batch_size >= 1, "--batch-size", args.batch_size, "at least 1")
    if args.batch_size > train_size:
        raise UsageError(f"--batch-size {args.batch_size} is larger than the {train_size} training images")
    require(args.wd >= 0, "--wd", args.wd, ">= 0")
    require(args.warmup >= 0, "--warmup", args.warmup, ">= 0")
    require(0 <= args.label_smoothing < 1, "--label-smoothing", args.label_smoothing, "in [0, 1)")
    require(0 <= args.momentum < 1, "--momentum", args.momentum, "in [0, 1)")
    require(0 <= args.ema < 1, "--ema", args.ema, "in [0, 1)")
    require(args.mixup >= 0, "--mixup", args.mixup, ">= 0")
    require(args.cutmix >= 0, "--cutmix", args.cutmix, ">= 0")
    require(0 <= args.mix_prob <= 1, "--mix-prob", args.mix_prob, "in [0, 1]")
    require(0 <= getattr(args, "dropout", 0) < 1, "--dropout", getattr(args, "dropout", 0), "in [0, 1)")


# ----------------------------------------------------------------------------- device, DDP

def resolve_device(args):
    """The device this process trains on: --device, else CUDA where visible; under torchrun, the process's
    LOCAL_RANK GPU. Everything device-dependent below (process-group backend, amp/compile defaults, RNG
    state) is decided from this device, never from whether CUDA merely exists."""
    device = pick_device(args.device)
    # bf16 autocast and compile pay off on GPUs; on a CPU bf16 can be slower (no bf16 units, or tiny
    # models) and compiling costs more than it saves in short runs. Channels-last was faster for every
    # model here on CPU too (BENCHMARKS.md).
    fast = device.type == "cuda"
    for flag in ("amp", "compile"):
        if getattr(args, flag) is None:
            setattr(args, flag, fast)
    if args.channels_last is None:
        args.channels_last = True
    set_determinism(args.deterministic)
    return device


def pick_device(name=None):
    """torch.device from --device (None: CUDA where visible, else CPU), checked, made current."""
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name} is not a device name (cuda, cuda:N or cpu)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} asked for, but no CUDA GPU is visible")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def set_determinism(deterministic):
    """--deterministic: the same seed gives bit-identical runs on the same machine and software. On CUDA that
    needs cuBLAS's fixed workspace (set before its first use), no TF32, deterministic cuDNN algorithms, and
    no op without a deterministic kernel: such an op stops the run naming it instead of warning."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = not deterministic
    torch.backends.cudnn.allow_tf32 = not deterministic


def process_group_backend(device):
    return "nccl" if device.type == "cuda" else "gloo"


def setup_distributed(device):
    """(rank, world) under torchrun (which sets LOCAL_RANK and WORLD_SIZE), else (0, 1). The backend follows the device this
    process resolved: NCCL, bound to its GPU, for CUDA; gloo for CPU, also on a machine that has GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if "LOCAL_RANK" not in os.environ:  # not launched by torchrun; one torchrun process still gets a group + DDP
        return 0, 1
    if not dist.is_initialized():
        backend = process_group_backend(device)
        dist.init_process_group(backend, **({"device_id": device} if backend == "nccl" else {}))
    return dist.get_rank(), world


def device_name(device):
    """The machine a run used, for the report: the GPU's name, or the CPU's with its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def amp_dtype(device):
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast(device, enabled):
    return torch.autocast(device.type, dtype=amp_dtype(device), enabled=enabled)


def is_main(rank):
    return rank == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


_HOST_GROUP = []  # the gloo group the ranks agree on host-side values through (made at first use, by every rank)


def all_ranks_nonempty(count):
    """Whether every rank's share of this step holds samples; without DDP, whether this one does. A rank whose images
    were all broken must not skip the step alone: the others would wait forever in the gradient all-reduce. So the
    ranks skip together. The counts are host values (a batch's shape) reduced over gloo: no GPU synchronisation."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return count > 0
    if not _HOST_GROUP:
        _HOST_GROUP.append(dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo"))
    smallest = torch.tensor([count])
    dist.all_reduce(smallest, op=dist.ReduceOp.MIN, group=_HOST_GROUP[0])
    return int(smallest) > 0


# ----------------------------------------------------------------------------- atomic files

def atomic_write(path, write):
    """Run write(file) on a temporary file beside path, then rename it into place."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):  # disk full, read-only, a file where a folder should be: the old file stays
            raise WriteError(f"cannot write {path} ({e.strerror or type(e).__name__}); the files already in "
                             f"{path.parent} are unchanged") from None
        raise


def atomic_write_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_torch_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path):
    """Checkpoints are only ever loaded with weights_only=True (tensors and plain types), and always to the
    CPU: load_state_dict copies weights onto the model's device, and RNG states must stay CPU tensors."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"checkpoint {path} does not exist") from None
    except Exception as e:
        raise UsageError(f"{path} is not a checkpoint this repo can load safely ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise UsageError(f"{path} is not a checkpoint written by this repo (no model/model_config)")
    return ckpt


def write_submission(path, predictions):
    """Kaggle format: header "Id","Prediction1", every field quoted, ids 0..N-1 in order."""
    buf = io.StringIO()
    writer = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
    writer.writerow(["Id", "Prediction1"])
    writer.writerows((i, int(p)) for i, p in enumerate(predictions))
    atomic_write_text(path, buf.getvalue())


METRIC_COLUMNS = ["epoch", "phase", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds", "images_per_second",
                  "eval_seconds"]


def write_metrics(path, history):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buf.getvalue())


def plot_curves(path, history, title=""):
    """Training loss and validation accuracy per epoch; a run with a linear-probe phase before fine-tuning is
    drawn as one axis of epochs with a line where fine-tuning starts."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = list(range(1, len(history) + 1))
    phases = [h.get("phase", "train") for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(x, [h["train_loss"] for h in history], marker="o")
    ax1.set(xlabel="epoch", ylabel="training loss", title="training loss")
    ax2.plot(x, [h["val_acc"] for h in history], marker="o", color="tab:orange")
    ax2.set(xlabel="epoch", ylabel="validation accuracy", title="validation accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if "lp" in phases and "ft" in phases:
            ax.axvline(phases.index("ft") + 0.5, color="grey", linestyle="--", label="fine-tuning starts")
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


# ----------------------------------------------------------------------------- run folder

# Flags that may differ when a run is resumed: they change how, not what, it trains.
RESUMABLE_CHANGES = {"epochs", "device", "quiet", "compile", "resume", "force", "workers", "loader", "out", "download",
                     "tensorboard", "epochs_cap"}


def prepare_run_dir(out, config, resume, force, rank=0):
    """Refuse to mix two different runs in one folder; write config.json. Every process checks before
    rank 0 writes anything, so all of them agree on the verdict."""
    out = Path(out)
    old_path = out / "config.json"
    if out.exists() and not out.is_dir() or any(p.exists() and not p.is_dir() for p in out.parents):
        raise UsageError(f"--out {out} cannot be a run folder: {out if out.exists() else 'a folder above it'} is a file")
    if old_path.exists() and not force:
        try:
            old = json.loads(old_path.read_text()).get("args", {})
        except (ValueError, AttributeError):
            raise UsageError(f"{old_path} is not a readable config; use another --out or --force") from None
        new = config["args"]
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
        if not resume:
            raise UsageError(f"{out} already holds a run; pass --resume to continue it or --force to overwrite it")
        if changed:
            raise UsageError(f"{out} holds a run with a different config ({', '.join(changed)} differ); "
                             f"use another --out or --force to overwrite it")
    barrier()
    if is_main(rank):
        if force:
            for name in ("last.pt", "best.pt", "metrics.csv", "final.json", "submission.csv", "curves.png", "wall.json",
                         "per_class.csv", "confusion_val.csv", "confusion_test.csv", "predictions.csv"):
                (out / name).unlink(missing_ok=True)
            for events in out.glob("events.out.tfevents.*"):  # TensorBoard curves of the run overwritten
                events.unlink()
        for stale in out.glob(".*.tmp"):  # half-written by a run killed (SIGKILL) in the middle of a write
            stale.unlink()
        atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    barrier()


class WallClock:
    """A run's wall time over every process that worked on it: each checkpoint save writes the seconds so far to
    OUT/wall.json, and a resumed process starts from there (time after a killed process's last save is lost
    with the work it did)."""

    def __init__(self, out, resume, start=None):
        self.path = Path(out) / "wall.json"
        self.start = time.perf_counter() if start is None else start
        self.before = 0.0
        if resume and self.path.is_file():
            try:
                self.before = float(json.loads(self.path.read_text())["seconds"])
            except (ValueError, KeyError, TypeError):
                self.before = 0.0  # a damaged ledger: count this process only

    def seconds(self):
        return self.before + time.perf_counter() - self.start

    def save(self):
        atomic_write_text(self.path, json.dumps({"seconds": round(self.seconds(), 2)}) + "\n")


def run_config(args, extra=None):
    return {
        "args": {k: v for k, v in vars(args).items()},
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "numpy": np.__version__, "platform": platform.platform()},
        "seed": args.seed,
        **(extra or {}),
    }


# ----------------------------------------------------------------------------- RNG state

def rng_state(device):
    """Every RNG the run draws from, as CPU tensors and plain types (the CUDA generator only on a CUDA run)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), np_state[2], np_state[3], np_state[4]],
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else [],
    }


def set_rng_state(state, device):
    """Inverse of rng_state. The states are CPU tensors (checkpoints are loaded to the CPU); `.cpu()` keeps a
    state that was moved elsewhere usable all the same."""
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"][0].cpu(), device)


def seed_everything(seed, rank=0):
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


# ----------------------------------------------------------------------------- optimisation

def make_optimizer(param_groups, args):
    """param_groups: [{'params': [...], 'lr_mult': m}]; biases and norm weights get no decay."""
    groups = []
    for g in param_groups:
        params = [p for p in g["params"] if p.requires_grad]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        for ps, wd in ((decay, args.wd), (no_decay, 0.0)):
            if ps:
                groups.append({"params": ps, "weight_decay": wd, "lr": args.lr * g.get("lr_mult", 1.0),
                               "lr_mult": g.get("lr_mult", 1.0)})
    if not groups:
        raise UsageError("the model has no trainable parameters")
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov and args.momentum > 0)
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.momentum, 0.999))


def lr_factor(step, total_steps, warmup_steps, schedule):
    """Multiplier of the peak lr at a global optimizer step (a pure function: nothing to checkpoint)."""
    if schedule == "onecycle":
        warmup_steps = warmup_steps or max(1, int(0.25 * total_steps))
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "step":
        return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "onecycle":
        return max(0.0, 1 - progress)
    return 1.0


# ----------------------------------------------------------------------------- evaluation

def reduce_sums(*tensors):
    """Sum device tensors over all torchrun processes (no-op outside torchrun)."""
    if dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t)
    return tensors


@torch.inference_mode()
def evaluate(model, loader, device, amp, criterion=None):
    """(mean loss, accuracy) over the whole loader, gathered across processes."""
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    count = torch.zeros((), device=device, dtype=torch.long)
    criterion = criterion or nn.CrossEntropyLoss(reduction="sum")
    for x, y in loader:
        with autocast(device, amp):
            logits = model(x)
        loss_sum += criterion(logits.float(), y).double()
        correct += (logits.argmax(1) == y).sum()
        count += y.numel()
    reduce_sums(loss_sum, correct, count)
    n = max(1, count.item())
    return loss_sum.item() / n, correct.item() / n


TTA_VIEWS = ("flip", "shift")


def parse_tta(text):
    """--tta: none, flip, or flip,shift (shift alone is allowed too). Returns a set."""
    views = {v for v in (text or "none").replace(" ", "").split(",") if v and v != "none"}
    unknown = sorted(views - set(TTA_VIEWS))
    if unknown:
        raise UsageError(f"unknown --tta view {', '.join(unknown)}; choose none, flip, shift or flip,shift")
    return views


def tta_views(x, tta):
    """The test-time views of a batch: the image; with 'flip' its mirror; with 'shift' the four one-pixel
    translations (edge pixels repeated), and their mirrors too when both are asked for."""
    views = [x]
    if "shift" in tta:
        padded = nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
        h, w = x.shape[-2:]
        views += [padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))]
    if "flip" in tta:
        views += [v.flip(3) for v in views]
    return views


@torch.inference_mode()
def predict_probs(model, loader, device, amp, tta=(), progress=False, desc="predict"):
    """Softmax probabilities (float32, CPU) in loader order, averaged over the TTA views, and the labels."""
    from tqdm import tqdm
    model.eval()
    probs, labels = [], []
    for x, y in tqdm(loader, desc=desc, disable=not (progress and sys.stderr.isatty()), leave=False, unit="batch"):
        views = tta_views(x, tta) if x.ndim == 4 else [x]  # cached features have no views
        with autocast(device, amp):
            p = sum(model(v).float().softmax(1) for v in views) / len(views)
        probs.append(p.cpu())
        labels.append(y.cpu())
    return torch.cat(probs), torch.cat(labels)


def write_predictions(path, probs, labels):
    """The competition CSV from class probabilities; return the test accuracy, or None where the test labels
    are placeholders (all zero) and must not be scored."""
    from data import labels_are_real
    preds = probs.argmax(1)
    write_submission(path, preds.tolist())
    return (preds == labels).float().mean().item() if labels_are_real(labels.numpy()) else None


# ----------------------------------------------------------------------------- error analysis files

def write_error_analysis(out, classes, val, test):
    """What the report's error analysis reads, so it never re-runs a model. `val` and `test` are (probs, labels)
    of the final model (validation as validated: no TTA; test as submitted). Writes into OUT:

    per_class.csv       class, name, val_n, val_acc, test_n, test_acc (test columns empty without test labels)
    confusion_val.csv   counts, row = true class, column = predicted class (confusion_test.csv with test labels)
    predictions.csv     every test image: Id, label (empty without labels), top-5 classes and probabilities
    """
    from data import labels_are_real
    out, k = Path(out), len(classes)
    per_class = {"class": list(range(k)), "name": [str(c) for c in classes]}
    for split, (probs, labels) in (("val", val), ("test", test)):
        real = labels_are_real(labels.numpy())
        preds = probs.argmax(1)
        if real:
            confusion = torch.bincount(labels * k + preds, minlength=k * k).view(k, k)
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerow(["true\\pred", *range(k)])
            writer.writerows([c, *row] for c, row in enumerate(confusion.tolist()))
            atomic_write_text(out / f"confusion_{split}.csv", buf.getvalue())
            n = confusion.sum(1)
            per_class[f"{split}_n"] = n.tolist()
            per_class[f"{split}_acc"] = [round(d / m, 6) if m else "" for d, m in zip(confusion.diag().tolist(),
                                                                                       n.tolist(), strict=True)]
        else:
            per_class[f"{split}_n"] = per_class[f"{split}_acc"] = [""] * k
        if split == "test":
            top_p, top_c = probs.topk(min(5, k), dim=1)
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerow(["Id", "label", *[f"top{i + 1}" for i in range(top_c.shape[1])],
                             *[f"p{i + 1}" for i in range(top_c.shape[1])]])
            for i, (c, pr) in enumerate(zip(top_c.tolist(), top_p.tolist(), strict=True)):
                writer.writerow([i, int(labels[i]) if real else "", *c, *(f"{v:.5f}" for v in pr)])
            atomic_write_text(out / "predictions.csv", buf.getvalue())
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(list(per_class))
    writer.writerows(zip(*per_class.values(), strict=True))
    atomic_write_text(out / "per_class.csv", buf.getvalue())


# ----------------------------------------------------------------------------- time budget

CALIBRATION_STEPS = 8  # timed training steps, after 2 warm-up steps (compilation, cuDNN's autotuning, the loader's start)


def now():
    """The clock the time budget measures with: a function, so that a test can hand it a fake clock."""
    return time.perf_counter()


def epochs_for_budget(budget, elapsed, epoch_seconds, eval_seconds, final_seconds, cap=None):
    """The most epochs whose training and per-epoch evaluation, after `elapsed` seconds already spent, end with the
    final predictions within `budget` seconds: at least 1, at most `cap` (an --epochs given too)."""
    epochs = max(1, int((budget - elapsed - final_seconds) // (epoch_seconds + eval_seconds)))
    return min(epochs, cap) if cap else epochs


def fit_budget(model, raw_model, ema, optimizer, scaler, run, train_loader, val_loader, eval_model, args, device,
               start, final_images, save):
    """--time-budget: time real steps of this run (its model, compiled where --compile, its loader and augmentation,
    its precision, its optimizer and EMA), one validation pass and one checkpoint save, then put the weights, the
    optimizer, the scaler, the EMA and every RNG back as they were, and choose the epochs (epochs_for_budget). Every
    rank takes rank 0's choice. Returns the record config.json and last.pt keep."""
    saved = {"model": {k: v.detach().clone() for k, v in raw_model.state_dict().items()},
             "optimizer": copy.deepcopy(optimizer.state_dict()), "scaler": scaler.state_dict(),
             "ema": {k: v.detach().clone() for k, v in ema.module.state_dict().items()} if ema is not None else None,
             "rng": rng_state(device), "skipped": run.skipped_steps}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    may_be_empty = getattr(train_loader, "may_yield_empty", False)
    train_loader.set_epoch(0)
    train_loader.start_step = 0
    model.train()
    batches = iter(train_loader)
    t0 = now()
    first = next(batches)  # the loader's start-up (workers, pipelines), paid again every epoch
    startup = now() - t0
    warm = 2  # the first steps compile, autotune and fill the loader's queue: not timed
    step, t_warm = 0, now()
    for x, y in itertools.chain([first], batches):
        if may_be_empty and not all_ranks_nonempty(y.shape[0]):
            continue
        if step == warm:
            sync()
            t_timed = now()
        train_step(model, raw_model, ema, optimizer, scaler, run, x, y, 0, step)
        step += 1
        if step == warm + CALIBRATION_STEPS:
            break
    sync()
    timed = step - warm  # an epoch of `warm` steps or fewer: the warm-up steps are all there is to time
    step_seconds = (now() - t_timed) / timed if timed > 0 else (now() - t_warm) / max(1, step)
    del batches
    t0 = now()
    evaluate(eval_model, val_loader, device, args.amp)
    eval_seconds = now() - t0
    raw_model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scaler.load_state_dict(saved["scaler"])
    if ema is not None:
        ema.module.load_state_dict(saved["ema"])
    set_rng_state(saved["rng"], device)
    run.skipped_steps = saved["skipped"]
    t0 = now()
    save()  # the weights as they were, epoch 0 step 0: a checkpoint a resume can start from
    save_seconds = 2 * (now() - t0)  # last.pt and, when validation improves, best.pt, every epoch
    val_images = max(1, getattr(val_loader.sampler, "n", 1))
    final_seconds = eval_seconds * final_images / val_images
    epoch_seconds = startup + run.steps_per_epoch * step_seconds + save_seconds
    elapsed = now() - start
    record = {"budget_seconds": args.time_budget, "elapsed_seconds": round(elapsed, 3),
              "step_seconds": step_seconds, "timed_steps": max(timed, 0), "startup_seconds": round(startup, 3),
              "eval_seconds": round(eval_seconds, 3), "save_seconds": round(save_seconds, 3),
              "final_seconds": round(final_seconds, 3), "steps_per_epoch": run.steps_per_epoch,
              "images_per_second": round(args.batch_size / max(step_seconds, 1e-9), 1),
              "fits_epochs": epochs_for_budget(args.time_budget, elapsed, epoch_seconds, eval_seconds, final_seconds),
              "epochs": epochs_for_budget(args.time_budget, elapsed, epoch_seconds, eval_seconds, final_seconds,
                                          getattr(args, "epochs_cap", None))}
    if dist.is_initialized():  # the ranks timed slightly different steps: all follow rank 0
        shared = [record]
        dist.broadcast_object_list(shared, src=0)
        record = shared[0]
    return record


def budget_line(record):
    return (f"time budget {record['budget_seconds']:g} s: {record['images_per_second']:,.0f} img/s training "
            f"({1000 * record['step_seconds']:.1f} ms a step, {record['steps_per_epoch']} steps an epoch), "
            f"{record['eval_seconds']:.1f} s a validation pass, {record['elapsed_seconds']:.0f} s spent before "
            f"training, {record['final_seconds']:.0f} s of final predictions: {record['epochs']} epochs"
            + (f" (the budget holds {record['fits_epochs']}; --epochs caps them)"
               if record["fits_epochs"] != record["epochs"] else ""))


def update_config(out, record):
    """config.json gains the time budget's record: the budget, the measured times and the chosen epochs."""
    path = Path(out) / "config.json"
    config = json.loads(path.read_text())
    config["time_budget"] = record
    atomic_write_text(path, json.dumps(config, indent=2) + "\n")


# ----------------------------------------------------------------------------- the loop

def unwrap(model):
    """The plain nn.Module under torch.compile and DDP wrappers, in either order."""
    while hasattr(model, "_orig_mod") or isinstance(model, nn.parallel.DistributedDataParallel):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def fit(model, train_loader, val_loader, args, out, model_config, data_config, device, rank=0, world=1,
        param_groups=None, title="", phase="train", prior_history=(), clock=None, board_dir=None, final_images=0,
        budget_start=None):
    """Train `model` for args.epochs, resuming from OUT/last.pt with --resume. Returns a summary dict.

    The best model (by validation accuracy; the EMA weights with --ema) is in OUT/best.pt afterwards.
    `model_config` rebuilds the network (models.build_model), `data_config` the test-time preprocessing.
    Each metrics row is labelled with `phase` (train; for birds lp = linear probe, ft = fine-tuning), and
    `prior_history` (an earlier phase's rows) is written above this phase's rows in metrics.csv and the curves.
    A `WallClock` is saved with every last.pt, so a resumed run's wall time counts every process. With
    --tensorboard the epochs are logged to `board_dir` (default OUT) too. With --time-budget the epochs are chosen
    here (`fit_budget`), from `budget_start` (the now() the budget counts from; default: now) and the `final_images`
    the script evaluates after training; a resumed run keeps the epochs its checkpoint chose.
    """
    out = Path(out)
    main = is_main(rank)
    raw_model = model
    if args.sync_bn and world > 1:
        raw_model = model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = make_optimizer(param_groups or [{"params": list(model.parameters())}], args)
    use_scaler = args.amp and amp_dtype(device) == torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    ema = make_ema(raw_model, getattr(args, "ema", 0.0), getattr(args, "ema_warmup", False))
    run = Run(steps_per_epoch=len(train_loader), warmup=args.warmup, args=args, device=device,
              num_classes=model_config.get("num_classes"), rank=rank)
    history, best_val_acc, best_epoch, start_epoch, start_step = [], -1.0, 0, 0, 0
    partial, train_seconds, budget = None, 0.0, None
    budget_start = now() if budget_start is None else budget_start

    if args.resume and (out / "last.pt").exists():
        ckpt = load_checkpoint(out / "last.pt")  # to the CPU: load_state_dict places the weights
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.module.load_state_dict(ckpt["ema"])
        history, best_val_acc, best_epoch = ckpt["history"], ckpt["best_val_acc"], ckpt["best_epoch"]
        start_epoch, start_step, partial = ckpt["epoch"], ckpt["step_in_epoch"], ckpt.get("partial")
        train_seconds = ckpt.get("train_seconds", 0.0)
        set_rng_state(ckpt["rng"][rank] if isinstance(ckpt["rng"], list) else ckpt["rng"], device)
        budget = ckpt.get("budget")
        if budget is not None and getattr(args, "time_budget", None):  # the epochs the first process chose
            args.epochs = run.set_epochs(budget["epochs"])
        if main:
            where = f"epoch {start_epoch + 1} step {start_step}" if start_step else f"epoch {start_epoch + 1}"
            print(f"resuming {out} at {where}")

    board = None
    if main and getattr(args, "tensorboard", False):
        resumed = bool(history)
        first = len(prior_history) + (len(history) if resumed else 1)
        # a resumed run logs the checkpoint's last row again: logged or not before the kill, it is there once
        board = Board(board_dir or out, first, None if resumed else run_config_plain(args), phase,
                      history[-1] if resumed else None)
    if args.compile:
        model = torch.compile(model)
    if dist.is_initialized():  # around the compiled model: DDP's buffer broadcast would break the graph inside it
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    eval_model = ema.module if ema is not None else model

    def save_last(epoch, step_in_epoch, partial_sums=None):
        rngs = [rng_state(device)]
        if world > 1:  # every rank's RNG (dropout differs per rank) goes into rank 0's file
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_state(device))
        if main:
            atomic_torch_save({
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if use_scaler else None, "model_config": model_config,
                "ema": ema.module.state_dict() if ema is not None else None, "data_config": data_config,
                "config": run_config_plain(args), "epoch": epoch, "step_in_epoch": step_in_epoch,
                "history": history, "best_val_acc": best_val_acc, "best_epoch": best_epoch,
                "partial": partial_sums, "rng": rngs if world > 1 else rngs[0], "train_seconds": train_seconds,
                "budget": budget,
            }, out / "last.pt")
            if clock is not None:
                clock.save()

    if getattr(args, "time_budget", None) and budget is None:
        budget = fit_budget(model, raw_model, ema, optimizer, scaler, run, train_loader, val_loader, eval_model, args,
                            device, budget_start, final_images, lambda: save_last(0, 0))
        args.epochs = run.set_epochs(budget["epochs"])
        if main:
            line = budget_line(budget)
            print(line, flush=True)
            update_config(out, budget)
            if board is not None:
                board.note("time_budget", line)

    # Ctrl-C and SIGTERM only raise a flag; the loop stops at the next step boundary and saves there.
    def on_signal(signum, frame):
        run.interrupted = True

    old_handlers = {}
    if world == 1:
        old_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    show_bar = main and not args.quiet and sys.stderr.isatty()
    try:
        for epoch in range(start_epoch, args.epochs):
            train_loader.set_epoch(epoch)
            train_loader.start_step = start_step
            sums = EpochSums(run.steps_per_epoch, device, partial)
            partial = None
            t0 = time.perf_counter()
            try:
                train_one_epoch(model, raw_model, ema, optimizer, scaler, train_loader, run, epoch, start_step, sums,
                                show_bar)
            except KeyboardInterrupt:
                train_seconds += time.perf_counter() - t0
                save_last(epoch, sums.step, sums.state(time.perf_counter() - t0))
                if main:
                    print(f"\ninterrupted at epoch {epoch + 1} step {sums.step}; last.pt saved. Resume with the same "
                          f"command plus --resume", file=sys.stderr)
                raise
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            epoch_seconds = sums.seconds_before + time.perf_counter() - t0
            train_seconds += time.perf_counter() - t0
            start_step = 0
            train_loss, train_acc, n = sums.totals()
            t_eval = time.perf_counter()
            val_loss, val_acc = evaluate(eval_model, val_loader, device, args.amp)
            eval_seconds = time.perf_counter() - t_eval
            history.append({
                "epoch": epoch + 1, "phase": phase, "train_loss": round(train_loss, 6), "train_acc": round(train_acc, 6),
                "val_loss": round(val_loss, 6), "val_acc": round(val_acc, 6),
                "lr": round(args.lr * run.lr_factor(min((epoch + 1) * run.steps_per_epoch, run.total_steps) - 1), 8),
                "epoch_seconds": round(epoch_seconds, 3), "images_per_second": round(n / max(epoch_seconds, 1e-9), 1),
                "eval_seconds": round(eval_seconds, 3),
            })
            if val_acc > best_val_acc:
                best_val_acc, best_epoch = val_acc, epoch + 1
                if main:  # the weights that were validated: the EMA's with --ema
                    atomic_torch_save({"model": unwrap(eval_model).state_dict(), "model_config": model_config,
                                       "data_config": data_config, "config": run_config_plain(args),
                                       "epoch": epoch + 1, "val_acc": val_acc}, out / "best.pt")
            save_last(epoch + 1, 0)
            if main:
                write_metrics(out / "metrics.csv", [*prior_history, *history])
                if board is not None:
                    board.epoch(len(prior_history) + len(history), history[-1])
                plot_curves(out / "curves.png", [*prior_history, *history], title)
                h = history[-1]
                print(f"epoch {epoch + 1}/{args.epochs}  train loss {h['train_loss']:.4f} acc {h['train_acc']:.4f}  "
                      f"val loss {h['val_loss']:.4f} acc {h['val_acc']:.4f}  {h['epoch_seconds']:.1f}s "
                      f"({h['images_per_second']:.0f} img/s)", flush=True)
        if board is not None:  # a resumed run with no epoch left still logs its checkpoint's last row
            board.epoch()
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        if board is not None:
            board.close()
    if run.skipped_steps and main:
        print(f"fp16 loss scaling skipped {run.skipped_steps} steps with overflowing gradients")
    barrier()
    return {"best_val_acc": best_val_acc, "best_epoch": best_epoch, "train_seconds": round(train_seconds, 2),
            "first_step_seconds": run.first_step_seconds, "skipped_steps": int(run.skipped_steps), "history": history,
            "board": {"dir": str(board_dir or out), "flags": run_config_plain(args)} if board is not None else None}


class Board:
    """TensorBoard curves of one run (torch.utils.tensorboard), written by rank 0 after each epoch's last.pt: the
    metrics.csv row's loss, accuracy, lr and img/s at global step = the row's place in metrics.csv (an LP-FT
    run's fine-tuning continues its probe's steps). A resumed process purges the steps from its checkpoint's last
    row on (TensorBoard's purge_step) and logs that row again: a process killed between saving last.pt and
    logging leaves no gap, and one killed after logging leaves no duplicate. The event file is opened at the
    first epoch this process finishes, so a process that fails before it adds no file to the run folder."""

    TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "train_acc": "accuracy/train", "val_acc": "accuracy/val",
            "lr": "lr", "images_per_second": "images_per_second"}

    def __init__(self, log_dir, first_step, flags=None, phase="train", resumed_row=None):
        self.log_dir, self.first_step, self.flags, self.phase = log_dir, first_step, flags, phase
        self.pending = [(first_step, resumed_row)] if resumed_row is not None else []
        self.writer, self.notes = None, {}

    def _open(self):
        self.writer = summary_writer(self.log_dir, purge_step=self.first_step)  # hides older events from here on
        if self.writer is not None and self.flags is not None:  # each phase's own flags (an LP-FT probe runs with its own epochs, optimizer, lr)
            self.writer.add_text("flags" if self.phase == "train" else f"flags/{self.phase}",
                                 "\n".join(f"    {k} = {v!r}" for k, v in sorted(self.flags.items())), self.first_step)
        for tag, text in self.notes.items() if self.writer is not None else ():
            self.writer.add_text(tag, text, self.first_step)

    def note(self, tag, text):
        """A text entry (the time budget's calibration), written when the event file opens."""
        self.notes[tag] = text

    def epoch(self, step=None, row=None):
        """Log one finished epoch's row (after the resumed checkpoint's last row, if not logged yet); no row: only
        the latter."""
        if row is not None:
            self.pending.append((step, row))
        if not self.pending:
            return
        if self.writer is None:
            self._open()
        if self.writer is None:  # no tensorboard installed: summary_writer said so once
            self.pending = []
            return
        for at, r in self.pending:
            for key, tag in self.TAGS.items():
                self.writer.add_scalar(tag, r[key], at)
        self.pending = []
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


_TENSORBOARD_MISSING = []  # the warning below, once per process


def summary_writer(log_dir, **kw):
    """torch.utils.tensorboard's SummaryWriter on log_dir, or None where the tensorboard package does not import (the
    CUDA 12 install line once lacked it): one warning, and the run goes on without event files."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        if not _TENSORBOARD_MISSING:
            _TENSORBOARD_MISSING.append(e)
            print(f"warning: no TensorBoard event files: tensorboard does not import ({e}); pip install tensorboard, "
                  f"or pass --no-tensorboard", file=sys.stderr, flush=True)
        return None
    return SummaryWriter(str(log_dir), **kw)


def log_final(log_dir, flags, final):
    """The run's flags and final figures as TensorBoard hparams, beside its curves (one row per run in a sweep)."""
    writer = summary_writer(log_dir)
    if writer is None:
        return
    hparams = {k: ("none" if v is None else v) for k, v in flags.items() if k not in ("out", "resume", "force", "quiet")}
    metrics = {f"final/{k}": v for k, v in final.items()
               if k in ("best_val_acc", "test_acc", "val_acc_tta", "train_seconds") and isinstance(v, (int, float))}
    with writer:
        writer.add_hparams(hparams, metrics, run_name=".")


def make_ema(model, decay, warmup=False):
    """--ema DECAY: timm's ModelEmaV3, a copy of the model (weights and BatchNorm buffers) updated after every
    optimizer step as ema = d * ema + (1 - d) * weights, with foreach ops and no host sync. d = DECAY, or with
    warm-up d = min(DECAY, 1 - step^-0.75) at optimizer step `step` (counted from 1, so step 1 copies the
    weights): without it, 0.99^285 = 6% of the random initial weights are still in the average after a
    285-step run. The decay is a Python float from the step count, so the update stays free of host syncs."""
    if not decay:
        return None
    from timm.utils import ModelEmaV3
    return ModelEmaV3(model, decay=decay, use_warmup=warmup, warmup_power=0.75)


class Run:
    """What every step of a run needs besides the model: the schedule, the loss, mixing, and counters."""

    def __init__(self, steps_per_epoch, warmup, args, device, num_classes, rank):
        self.steps_per_epoch, self.args, self.device, self.rank = steps_per_epoch, args, device, rank
        self.total_steps = steps_per_epoch * args.epochs
        self.warmup_steps = int(round(warmup * steps_per_epoch))
        self.num_classes = num_classes
        self.mixing = bool(getattr(args, "mixup", 0) or getattr(args, "cutmix", 0))
        self.criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
        self.interrupted, self.first_step_seconds, self.skipped_steps = False, None, 0

    def set_epochs(self, epochs):
        """The run's length, chosen by --time-budget before the first step: the schedule is laid over all of it."""
        self.total_steps = self.steps_per_epoch * epochs
        return epochs

    def lr_factor(self, step):
        return lr_factor(step, self.total_steps, self.warmup_steps, self.args.schedule)

    def loss_and_hits(self, model, x, y, epoch, step):
        """(loss, correct count) of one training batch. With --mixup/--cutmix the batch is mixed per sample and
        the loss is cross-entropy against the soft targets (label smoothing folded in); a sample counts as
        correct when the prediction is its dominant label (the one with the larger share)."""
        target = None
        if self.mixing:
            from data import mix_batch
            a = self.args
            seed = a.seed * 1_000_003 + epoch * 7919 + step + self.rank * 104_729
            x, target = mix_batch(x, y, self.num_classes, seed, a.mixup, a.cutmix, a.mix_prob, a.label_smoothing)
        with autocast(self.device, self.args.amp):
            logits = model(x)
        if target is None:
            return self.criterion(logits.float(), y), (logits.detach().argmax(1) == y).sum()
        loss = torch.sum(-target * logits.float().log_softmax(1), 1).mean()
        return loss, (logits.detach().argmax(1) == target.argmax(1)).sum()


class EpochSums:
    """Per-step loss, correct and count of one epoch, kept on the device (the host reads them every 50 steps
    only) and saved with an interrupted epoch so a resumed one reports the same totals."""

    def __init__(self, steps, device, partial=None):
        self.loss = torch.zeros(steps, device=device)
        self.correct = torch.zeros(steps, device=device, dtype=torch.long)
        self.count = [0] * steps
        self.seconds_before, self.step = 0.0, 0
        if partial:
            self.loss.copy_(partial["step_loss"])
            self.correct.copy_(partial["step_correct"])
            self.count = list(partial["step_count"])
            self.seconds_before = partial["seconds"]

    def state(self, seconds):
        return {"step_loss": self.loss.cpu(), "step_correct": self.correct.cpu(), "step_count": self.count,
                "seconds": self.seconds_before + seconds}

    def totals(self):
        """(mean loss, accuracy, images) over the epoch, summed over processes; fp16-skipped steps left out."""
        counts = torch.tensor(self.count, device=self.loss.device, dtype=torch.float64)
        finite = torch.isfinite(self.loss)  # only fp16 loss scaling lets a non-finite step through
        loss_sum = (torch.where(finite, self.loss, 0).double() * counts).sum()
        correct, count = self.correct.sum(), (counts * finite).sum()
        reduce_sums(loss_sum, correct, count)
        n = max(1.0, count.item())
        return loss_sum.item() / n, correct.item() / n, n


def train_one_epoch(model, raw_model, ema, optimizer, scaler, loader, run, epoch, start_step, sums, show_bar):
    """One pass over the loader from start_step: schedule, forward, backward, step, EMA update. Raises
    KeyboardInterrupt at a step boundary after Ctrl-C/SIGTERM (sums.step says where)."""
    from tqdm import tqdm
    model.train()
    use_scaler = scaler.is_enabled()
    bar = tqdm(total=run.steps_per_epoch, initial=start_step, desc=f"epoch {epoch + 1}/{run.args.epochs}",
               disable=not show_bar, leave=False, unit="step")
    t0 = time.perf_counter()
    step = checked = sums.step = start_step
    may_be_empty = getattr(loader, "may_yield_empty", False)  # image loaders skip broken files
    try:
        for x, y in loader:
            if run.interrupted:
                raise KeyboardInterrupt
            if may_be_empty and not all_ranks_nonempty(y.shape[0]):  # every image of a rank's share was broken
                step = sums.step = step + 1
                continue
            t_step = time.perf_counter() if run.first_step_seconds is None else None
            loss, hits = train_step(model, raw_model, ema, optimizer, scaler, run, x, y, epoch, step)
            if t_step is not None:
                if run.device.type == "cuda":
                    torch.cuda.synchronize(run.device)
                run.first_step_seconds = time.perf_counter() - t_step
            sums.loss[step] = loss.detach()
            sums.correct[step] = hits
            sums.count[step] = y.shape[0]
            step = sums.step = step + 1
            if step % 50 == 0 or step == run.steps_per_epoch:
                check_finite(sums.loss, checked, step, epoch, use_scaler)
                checked = step
                if show_bar:
                    bar.set_postfix(loss=f"{epoch_mean(sums.loss, sums.count):.3f}",
                                    acc=f"{sums.correct[:step].sum().item() / max(1, sum(sums.count[:step])):.3f}",
                                    img_s=f"{sum(sums.count[start_step:step]) / max(time.perf_counter() - t0, 1e-9):.0f}")
                    bar.update(step - bar.n)
        check_finite(sums.loss, checked, step, epoch, use_scaler)
    finally:
        bar.close()


def train_step(model, raw_model, ema, optimizer, scaler, run, x, y, epoch, step):
    """One optimizer step on one batch, the whole of it: the learning rate of this step of the schedule, forward (mixed
    and autocast, Run.loss_and_hits), backward (loss-scaled under fp16), the optimizer, the EMA. Returns (loss, correct
    count) as device tensors (no host sync)."""
    run_step = epoch * run.steps_per_epoch + step  # optimizer steps taken in the run before this one
    factor = run.lr_factor(run_step)
    for group in optimizer.param_groups:
        group["lr"] = run.args.lr * group["lr_mult"] * factor
    loss, hits = run.loss_and_hits(model, x, y, epoch, step)
    optimizer.zero_grad(set_to_none=True)
    if scaler.is_enabled():
        scale = scaler.get_scale()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        run.skipped_steps += scaler.get_scale() < scale
    else:
        loss.backward()
        optimizer.step()
    if ema is not None:  # timm reads a step as "warm up" (step 1 copies) only when it is given one
        ema.update(raw_model, step=run_step + 1 if ema.use_warmup else None)
    return loss, hits


def check_finite(step_loss, start, stop, epoch, use_scaler):
    """Stop on the first non-finite loss of steps start..stop (one host sync). Under fp16 loss scaling
    such steps are skipped by the scaler and counted instead."""
    if use_scaler or stop <= start:
        return
    bad = ~torch.isfinite(step_loss[start:stop])
    if bad.any():
        first = start + int(bad.nonzero()[0].item()) + 1
        raise NonFiniteLoss(f"the training loss became non-finite at epoch {epoch + 1} step {first}; last.pt still "
                            f"holds the last good epoch (lower --lr, or add --warmup)")


def epoch_mean(step_loss, step_count):
    counts = torch.tensor(step_count, device=step_loss.device, dtype=step_loss.dtype)
    return ((step_loss * counts).sum() / counts.sum().clamp(min=1)).item()


def run_config_plain(args):
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}


def load_best(model, out):
    ckpt = load_checkpoint(Path(out) / "best.pt")  # to the CPU: load_state_dict copies onto the model's device
    unwrap(model).load_state_dict(ckpt["model"])
    return ckpt


def finish(out, summary, model, test_acc, extra=None):
    from models import count_parameters
    final = {"best_val_acc": summary["best_val_acc"], "best_epoch": summary["best_epoch"], "test_acc": test_acc,
             "train_seconds": summary["train_seconds"], "first_step_seconds": summary["first_step_seconds"],
             "parameters": count_parameters(unwrap(model)),
             "trainable_parameters": count_parameters(unwrap(model), trainable_only=True),
             "skipped_steps": summary["skipped_steps"], **(extra or {})}
    atomic_write_text(Path(out) / "final.json", json.dumps(final, indent=2) + "\n")
    if summary.get("board"):
        log_final(summary["board"]["dir"], summary["board"]["flags"], final)
    return final


def cli(run, argv=None):
    """Run a script's main; bad input ends in one sentence and a non-zero exit."""
    from data import DataError
    from models import WeightsMismatch
    try:
        return run(argv)
    except (UsageError, DataError, WeightsMismatch, NonFiniteLoss, WriteError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever a library's text held
        sys.exit(2 if isinstance(e, UsageError) else 1)
    except KeyboardInterrupt:
        sys.exit(130)
    except RuntimeError as e:
        if "does not have a deterministic implementation" not in str(e):
            raise
        op = str(e).split(" does not have")[0].strip()
        print(f"error: --deterministic: {op} has no deterministic kernel on this device; run without "
              f"--deterministic, or on the CPU", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
