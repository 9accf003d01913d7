"""The training loop both scripts share: `fit()` trains any model on any loader that yields device batches.

SGD/AdamW, warm-up and none/step/cosine/onecycle schedules, bf16 autocast (fp16 + loss scaling where bf16 is missing),
torch.compile, channels-last, an EMA of the weights, DistributedDataParallel under torchrun, metrics accumulated on
the device (no host sync per step), a progress bar, a time budget that chooses the epochs (`--time-budget`), and the
run folder's checkpoints: `last.pt` holds model, optimizer, scaler, EMA, epoch, step and every RNG, so `--resume`
continues a killed run exactly, and Ctrl-C (or SIGTERM) saves it mid-epoch. Checkpoints hold only tensors and plain
types and are loaded with `weights_only=True`. One training step is `train_step`. What a run writes besides its
checkpoints (CSVs, curves, TensorBoard, final.json) is run_files.py. Not run directly.
"""
import copy
import itertools
import json
import math
import platform
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import data
import run_files
from flags import UsageError
from devices import DeviceError, all_ranks_nonempty, amp_dtype, autocast, barrier, is_main, reduce_sums
from models import unwrap
from run_files import atomic_torch_save, atomic_write_text


class NonFiniteLoss(Exception):
    pass


# ----------------------------------------------------------------------------- run folder, checkpoints, RNG state

RESUMABLE_CHANGES = {"epochs", "device", "quiet", "compile", "resume", "force", "workers", "loader", "out", "download",
                     "tensorboard", "epochs_cap"}


def run_config_plain(args):
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}


def run_config(args, extra=None):
    return {
        "args": {k: v for k, v in vars(args).items()},
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "numpy": np.__version__, "platform": platform.platform()},
        "seed": args.seed,
        **(extra or {}),
    }


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


def update_config(out, record):
    """config.json gains the time budget's record: the budget, the measured times and the chosen epochs."""
    path = Path(out) / "config.json"
    config = json.loads(path.read_text())
    config["time_budget"] = record
    atomic_write_text(path, json.dumps(config, indent=2) + "\n")


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


def load_best(model, out):
    ckpt = load_checkpoint(Path(out) / "best.pt")  # to the CPU: load_state_dict copies onto the model's device
    unwrap(model).load_state_dict(ckpt["model"])
    return ckpt


# ----------------------------------------------------------------------------- optimisation, EMA

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


# ----------------------------------------------------------------------------- evaluation, test-time augmentation

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


TTA = data.ListFlag(("flip", "shift"), "--tta view")  # the test-time views: none, flip, shift or flip,shift


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


def tta_view_count(tta):
    """How many views tta_views makes of a batch."""
    return (5 if "shift" in tta else 1) * (2 if "flip" in tta else 1)


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


# ----------------------------------------------------------------------------- one training step, one epoch

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
            a = self.args
            seed = data.stream_seed(a.seed, epoch, step, salt=self.rank * 104_729)
            x, target = data.mix_batch(x, y, self.num_classes, seed, a.mixup, a.cutmix, a.mix_prob, a.label_smoothing)
        with autocast(self.device, self.args.amp):
            logits = model(x)
        if target is None:
            return self.criterion(logits.float(), y), (logits.detach().argmax(1) == y).sum()
        loss = torch.sum(-target * logits.float().log_softmax(1), 1).mean()
        return loss, (logits.detach().argmax(1) == target.argmax(1)).sum()


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


# ----------------------------------------------------------------------------- time budget

# Timed training steps, after 2 warm-up steps (compilation, cuDNN's autotuning, the loader's start): 30, because 8
# timed steps measured cpu5's epochs 8% short of what they took (BENCHMARKS.md, "cpu5 in 300 s").
CALIBRATION_STEPS = 30


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
    its precision, its optimizer and EMA), one validation pass and one epoch's end (`save`), then put the weights, the
    optimizer, the scaler, the EMA and every RNG back as they were, and choose the epochs (epochs_for_budget). Every
    rank takes rank 0's choice. Returns the record config.json and last.pt keep. With --epochs 1 there is nothing to
    choose (at least one epoch, at most one), so nothing is measured."""
    if getattr(args, "epochs_cap", None) == 1:
        return {"budget_seconds": args.time_budget, "epochs": 1, "fits_epochs": None, "measured": False}
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
    # Steps 0 and 1 compile, autotune and fill the loader's queue: not timed. Then up to CALIBRATION_STEPS steps in
    # blocks of 10, and the median block's time a step: a stray process or a slow first block moves a mean by 10%
    # on a shared 2-core host (BENCHMARKS.md, "cpu5 in 300 s").
    warm, block, blocks, counts, step, t_warm, t0 = 2, 10, [], [], 0, now(), None
    for x, y in itertools.chain([first], batches):
        if may_be_empty and not all_ranks_nonempty(y.shape[0]):
            continue
        if step >= warm and (step - warm) % block == 0:
            if t0 is not None:
                sync()
                blocks.append(now() - t0)
                counts.append(block)
            if sum(counts) >= CALIBRATION_STEPS:
                break
            sync()
            t0 = now()
        train_step(model, raw_model, ema, optimizer, scaler, run, x, y, 0, step)
        step += 1
    if t0 is not None and step - warm > sum(counts):  # the epoch ended inside a block: it counts as far as it went
        sync()
        blocks.append(now() - t0)
        counts.append(step - warm - sum(counts))
    timed = sum(counts)  # 0: an epoch of two steps or fewer, whose warm-up steps are all there is to time
    step_seconds = statistics.median(t / c for t, c in zip(blocks, counts, strict=True)) if timed else \
        (now() - t_warm) / max(1, step)
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
    save()  # the end of an epoch (last.pt, best.pt, metrics.csv, curves.png): once to load what it needs (matplotlib),
    t0 = now()  # then timed
    save()
    save_seconds = now() - t0
    val_images = max(1, getattr(val_loader.sampler, "n", 1))
    final_seconds = eval_seconds * final_images / val_images
    epoch_seconds = startup + run.steps_per_epoch * step_seconds + save_seconds
    elapsed = now() - start
    record = {"budget_seconds": args.time_budget, "elapsed_seconds": round(elapsed, 3),
              "step_seconds": step_seconds, "timed_steps": timed, "startup_seconds": round(startup, 3),
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
    if not record.get("measured", True):
        return f"time budget {record['budget_seconds']:g} s: --epochs 1 leaves nothing to choose; 1 epoch, not measured"
    return (f"time budget {record['budget_seconds']:g} s: {record['images_per_second']:,.0f} img/s training "
            f"({1000 * record['step_seconds']:.1f} ms a step, {record['steps_per_epoch']} steps an epoch), "
            f"{record['eval_seconds']:.1f} s a validation pass, {record['elapsed_seconds']:.0f} s spent before "
            f"training, {record['final_seconds']:.0f} s of final predictions: {record['epochs']} epochs"
            + (f" (the budget holds {record['fits_epochs']}; --epochs caps them)"
               if record["fits_epochs"] != record["epochs"] else ""))


# ----------------------------------------------------------------------------- the loop

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
        board = run_files.Board(board_dir or out, first, None if resumed else run_config_plain(args), phase,
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
        def epoch_end():  # what each epoch ends with, timed by fit_budget: a checkpoint, best.pt, the csv and plot
            with tempfile.TemporaryDirectory() as scratch:
                row = {"epoch": 1, "phase": phase, "train_loss": 1.0, "train_acc": 0.0, "val_loss": 1.0, "val_acc": 0.0,
                       "lr": 0.0, "epoch_seconds": 0.0, "images_per_second": 0.0, "eval_seconds": 0.0}
                save_last(0, 0)
                if main:
                    atomic_torch_save({"model": unwrap(eval_model).state_dict()}, Path(scratch) / "best.pt")
                    run_files.write_metrics(Path(scratch) / "metrics.csv", [row])
                    run_files.plot_curves(Path(scratch) / "curves.png", [row], title)
        budget = fit_budget(model, raw_model, ema, optimizer, scaler, run, train_loader, val_loader, eval_model, args,
                            device, budget_start, final_images, epoch_end)
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
                run_files.write_metrics(out / "metrics.csv", [*prior_history, *history])
                if board is not None:
                    board.epoch(len(prior_history) + len(history), history[-1])
                run_files.plot_curves(out / "curves.png", [*prior_history, *history], title)
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


# ----------------------------------------------------------------------------- the command line's end

def cli(run, argv=None):
    """Run a script's main; bad input ends in one sentence and a non-zero exit."""
    from models import WeightsMismatch
    try:
        return run(argv)
    except (UsageError, DeviceError, data.DataError, WeightsMismatch, NonFiniteLoss, run_files.WriteError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever a library's text held
        sys.exit(2 if isinstance(e, (UsageError, DeviceError)) else 1)
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
