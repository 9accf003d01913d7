"""What a run folder holds, and how a run picks up from it. last.pt is written and read side by side here
(`save_last`, `load_last`), so a reader can check that they mirror each other: the training state (weights,
optimizer, loss scaler, EMA, every RNG: `training_state`), where the run stands (`Progress`) and what rebuilds the
network and its preprocessing. Also best.pt, config.json (`prepare_run_dir` refuses to mix two runs in one folder),
the wall clock over every process of a run (`WallClock`), and the one loader every checkpoint goes through
(`load_checkpoint`: weights_only=True, to the CPU, so load_state_dict places the weights). Not run directly.
"""
import json
import platform
import random
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from devices import barrier, is_main
from flags import UsageError
from run_files import atomic_torch_save, atomic_write_text

# Flags a resumed run may change: where and how it runs, not what it computes.
RESUMABLE_CHANGES = {"epochs", "epochs_given", "device", "quiet", "compile", "resume", "force", "workers", "loader",
                     "out", "download", "tensorboard", "epochs_cap", "accum_steps"}


@dataclass
class Progress:
    """Where a run stands, all of it kept in last.pt (bar the clock)."""
    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0  # steps of the next epoch already taken (an interrupted epoch)
    partial: dict | None = None  # that epoch's per-step sums so far (engine.EpochSums.state)
    epochs: int | None = None  # the run's length, chosen before training (--epochs, or --time-budget)
    budget: dict | None = None  # the time budget's record: measured times and the epochs it chose
    history: list = field(default_factory=list)  # this phase's metrics.csv rows
    best_val_acc: float = -1.0
    best_epoch: int = 0
    train_seconds: float = 0.0
    skipped_steps: int = 0  # fp16 steps the loss scaler skipped (overflowing gradients)
    first_step_seconds: float | None = None  # this process's first training step (compilation included)
    clock: object = None  # the run's WallClock, saved beside each last.pt (birds); not in last.pt


# ----------------------------------------------------------------------------- last.pt

def training_state(state):
    """What a training step changes, as state dicts and CPU tensors: references to the live tensors, to be saved or
    deep-copied at once. load_training_state puts it back."""
    return {"model": state.raw.state_dict(), "optimizer": state.optimizer.state_dict(),
            "scaler": state.scaler.state_dict() if state.scaler.is_enabled() else None,
            "ema": state.ema.module.state_dict() if state.ema is not None else None, "rng": rng_state(state.device)}


def load_training_state(state, saved):
    state.raw.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    if saved["scaler"]:
        state.scaler.load_state_dict(saved["scaler"])
    if state.ema is not None and saved["ema"] is not None:
        state.ema.module.load_state_dict(saved["ema"])
    set_rng_state(saved["rng"], state.device)


def save_last(out, state, progress, meta):
    """OUT/last.pt: everything --resume needs (load_last reads it back). `meta`: what rebuilds the network and its
    preprocessing (model_config, data_config) and the flags. Every rank calls it: each one's RNG goes into the file."""
    saved = training_state(state)
    if dist.is_initialized() and dist.get_world_size() > 1:  # dropout and mixing differ per rank: every rank's RNG
        saved["rng"] = [None] * dist.get_world_size()
        dist.all_gather_object(saved["rng"], rng_state(state.device))
    else:
        saved["rng"] = [saved["rng"]]
    if is_main():
        progress_now = {f.name: getattr(progress, f.name) for f in fields(progress)
                        if f.name not in ("clock", "first_step_seconds")}
        atomic_torch_save({**saved, **progress_now, **meta}, Path(out) / "last.pt")
        if progress.clock is not None:
            progress.clock.save()


def load_last(out, state, progress):
    """The inverse of save_last: the training state back into `state`, where the run stood into `progress`. Returns
    whether there was a last.pt to resume from."""
    path = Path(out) / "last.pt"
    if not path.exists():
        return False
    ckpt = load_checkpoint(path)
    rng = ckpt["rng"]
    rank = dist.get_rank() if dist.is_initialized() else 0
    load_training_state(state, {**ckpt, "rng": rng[rank] if isinstance(rng, list) else rng})
    for name in ("epoch", "step_in_epoch", "partial", "epochs", "budget", "history", "best_val_acc", "best_epoch",
                 "train_seconds", "skipped_steps"):
        if name in ckpt:  # a last.pt from before a field existed keeps the field's default
            setattr(progress, name, ckpt[name])
    return True


def resume_or_start(out, state, resume, clock=None):
    """The run's Progress: with --resume and a last.pt in OUT, where that run stood (its training state loaded into
    `state`), else a fresh start."""
    progress = Progress(clock=clock)
    if resume and load_last(out, state, progress) and is_main():
        where = f"epoch {progress.epoch + 1}" + (f" step {progress.step_in_epoch}" if progress.step_in_epoch else "")
        print(f"resuming {out} at {where}")
    return progress


def save_best(out, model, meta, epoch, val_acc):
    """OUT/best.pt: the weights that were validated (the EMA's with --ema), what predict.py needs to rebuild them."""
    atomic_torch_save({"model": model.state_dict(), **meta, "epoch": epoch, "val_acc": val_acc}, Path(out) / "best.pt")


def load_best(model, out):
    ckpt = load_checkpoint(Path(out) / "best.pt")  # to the CPU: load_state_dict copies onto the model's device
    model.load_state_dict(ckpt["model"])
    return ckpt


def eval_weights(ckpt):
    """The weights a checkpoint predicts with: its model's, or in last.pt of an --ema run the EMA's (what the run
    validated and saves as best.pt), with a note saying so (None for the model's own)."""
    if ckpt.get("ema") is not None:
        return ckpt["ema"], "the EMA's weights (what the run validated and saved as best.pt)"
    return ckpt["model"], None


def load_checkpoint(path):
    """Checkpoints are only ever loaded with weights_only=True (tensors and plain types), and always to the CPU:
    load_state_dict copies weights onto the model's device, and RNG states must stay CPU tensors."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"checkpoint {path} does not exist") from None
    except Exception as e:
        raise UsageError(f"{path} is not a checkpoint this repo can load safely ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise UsageError(f"{path} is not a checkpoint written by this repo (no model/model_config)")
    return ckpt


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


# ----------------------------------------------------------------------------- the run folder

def run_config(args, extra=None):
    """config.json: the resolved flags, the command line, the versions and the seed."""
    return {
        "args": dict(vars(args)),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "numpy": np.__version__, "platform": platform.platform()},
        "seed": args.seed,
        **(extra or {}),
    }


def prepare_run_dir(out, config, resume, force):
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
    if is_main():
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


def record_length(out, epochs, budget):
    """config.json states the run's length as chosen before training (engine.choose_epochs): `epochs`, also as the
    flag's resolved value, and the time budget's record (the budget, the measured times, the chosen epochs), which a
    resume keeps. A phase folder without a config.json (LP-FT's lp/) has nothing to update."""
    path = Path(out) / "config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    config["epochs"] = config["args"]["epochs"] = epochs
    if budget is not None:
        config["time_budget"] = budget
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
