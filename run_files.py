"""Everything a run writes besides its checkpoints, each file written to a temporary name and renamed into place
(`atomic_write`): what each epoch adds (`EpochLog`: metrics.csv, curves.png, the TensorBoard event files and the
printed line), the competition CSV, the error-analysis files and, at the end, final.json with the hparams
entry (`finish`). A disk that fills or a folder that is a file ends in one sentence (`WriteError`) and leaves the
files already there as they were. report.py imports the atomic writers alone. Not run directly.
"""
import csv
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

import data
from models import count_parameters, unwrap


class WriteError(Exception):
    """A file of the run could not be written (disk full, read-only, not a folder): one sentence for the user."""


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


# ----------------------------------------------------------------------------- the CSVs and the curves

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


def write_predictions(path, probs, labels):
    """The competition CSV from class probabilities; return the test accuracy, or None where the test labels
    are placeholders (all zero) and must not be scored."""
    preds = probs.argmax(1)
    write_submission(path, preds.tolist())
    return (preds == labels).float().mean().item() if data.labels_are_real(labels.numpy()) else None


# ----------------------------------------------------------------------------- error analysis

def write_error_analysis(out, classes, val, test):
    """What the report's error analysis reads, so it never re-runs a model. `val` and `test` are (probs, labels)
    of the final model (validation as validated: no TTA; test as submitted). Writes into OUT:

    per_class.csv       class, name, val_n, val_acc, test_n, test_acc (test columns empty without test labels)
    confusion_val.csv   counts, row = true class, column = predicted class (confusion_test.csv with test labels)
    predictions.csv     every test image: Id, label (empty without labels), top-5 classes and probabilities, then the
                        same classes by name (label_name, name1..name5)
    """
    out, k = Path(out), len(classes)
    per_class = {"class": list(range(k)), "name": [str(c) for c in classes]}
    for split, (probs, labels) in (("val", val), ("test", test)):
        real = data.labels_are_real(labels.numpy())
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
            ranks = range(1, top_c.shape[1] + 1)
            writer.writerow(["Id", "label", *[f"top{i}" for i in ranks], *[f"p{i}" for i in ranks], "label_name",
                             *[f"name{i}" for i in ranks]])
            for i, (c, pr) in enumerate(zip(top_c.tolist(), top_p.tolist(), strict=True)):
                writer.writerow([i, int(labels[i]) if real else "", *c, *(f"{v:.5f}" for v in pr),
                                 per_class["name"][int(labels[i])] if real else "", *(per_class["name"][j] for j in c)])
            atomic_write_text(out / "predictions.csv", buf.getvalue())
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(list(per_class))
    writer.writerows(zip(*per_class.values(), strict=True))
    atomic_write_text(out / "per_class.csv", buf.getvalue())


# ----------------------------------------------------------------------------- TensorBoard

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


class EpochLog:
    """What each epoch's end writes on rank 0 besides the checkpoints: metrics.csv and curves.png (an earlier phase's
    rows, `prior`, above this phase's, labelled `phase`), the printed line (`echo`) and, with a `board_dir`,
    TensorBoard curves: each row's loss, accuracy, lr and img/s at global step = its place in metrics.csv (an LP-FT
    run's fine-tuning continues its probe's steps). A resumed phase (a `history` already) purges the steps from its
    checkpoint's last row on (TensorBoard's purge_step) and logs that row again: a process killed between saving
    last.pt and logging leaves no gap, one killed after logging no duplicate. The event file opens at the first epoch
    this process finishes, so a process that fails before adds none; a fresh phase logs its `flags` first."""

    TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "train_acc": "accuracy/train", "val_acc": "accuracy/val",
            "lr": "lr", "images_per_second": "images_per_second"}

    def __init__(self, out, title, phase="train", prior=(), echo=True, board_dir=None, flags=None, history=()):
        self.out, self.title, self.phase, self.prior, self.echo = Path(out), title, phase, list(prior), echo
        self.board_dir, self.flags, self.resumed = board_dir, flags, bool(history)
        self.first_step = len(self.prior) + (len(history) if history else 1)
        self.pending = [(self.first_step, history[-1])] if history else []
        self.writer, self.notes = None, {}

    def scratch(self, folder):
        """The same files into another folder, with no TensorBoard and nothing printed (what the time budget times)."""
        return EpochLog(folder, self.title, self.phase, self.prior, echo=False)

    def epoch(self, history, epochs):
        rows = [*self.prior, *history]
        write_metrics(self.out / "metrics.csv", rows)
        self.board(len(rows), rows[-1])
        plot_curves(self.out / "curves.png", rows, self.title)
        if self.echo:
            h = rows[-1]
            print(f"epoch {h['epoch']}/{epochs}  train loss {h['train_loss']:.4f} acc {h['train_acc']:.4f}  "
                  f"val loss {h['val_loss']:.4f} acc {h['val_acc']:.4f}  {h['epoch_seconds']:.1f}s "
                  f"({h['images_per_second']:.0f} img/s)", flush=True)

    def note(self, tag, text):
        """A TensorBoard text entry (the time budget's calibration), written when the event file opens."""
        self.notes[tag] = text

    def board(self, step=None, row=None):
        """Log one finished epoch's row to TensorBoard (after the resumed checkpoint's last row, if not logged yet)."""
        self.pending += [(step, row)] if row is not None else []
        if self.board_dir is None or not self.pending:
            return
        if self.writer is None:
            self.writer = summary_writer(self.board_dir, purge_step=self.first_step)  # hides older events from here
            if self.writer is None:  # no tensorboard installed: summary_writer said so once
                self.board_dir = None
                return
            if not self.resumed:  # a fresh phase's own flags (an LP-FT probe has its own lr)
                self.writer.add_text("flags" if self.phase == "train" else f"flags/{self.phase}",
                                     "\n".join(f"    {k} = {v!r}" for k, v in sorted(self.flags.items())),
                                     self.first_step)
            for tag, text in self.notes.items():
                self.writer.add_text(tag, text, self.first_step)
        for at, r in self.pending:
            for key, tag in self.TAGS.items():
                self.writer.add_scalar(tag, r[key], at)
        self.pending = []
        self.writer.flush()

    def board_summary(self):
        """Where the curves are and the flags logged with them, for finish's hparams entry (None without them)."""
        return None if self.board_dir is None else {"dir": str(self.board_dir), "flags": self.flags}

    def close(self, finished):
        """End the TensorBoard file; a finished phase first logs what is pending (a resumed run with no epoch left
        still logs its checkpoint's last row), a failed one adds nothing."""
        if finished:
            self.board()
        if self.writer is not None:
            self.writer.close()


def flags_plain(args):
    """The flags as plain types (what checkpoints and TensorBoard's hparams keep)."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}


def log_final(log_dir, flags, final):
    """The run's flags and final figures as TensorBoard hparams, beside its curves (one row per run in a sweep)."""
    writer = summary_writer(log_dir)
    if writer is None:
        return
    hparams = {k: ("none" if v is None else v) for k, v in flags.items() if k not in ("out", "resume", "force", "quiet")}
    hparams["epochs"] = final.get("epochs", hparams.get("epochs"))  # what the run trained (a time budget's choice)
    metrics = {f"final/{k}": v for k, v in final.items()
               if k in ("best_val_acc", "test_acc", "val_acc_tta", "train_seconds") and isinstance(v, (int, float))}
    with writer:
        writer.add_hparams(hparams, metrics, run_name=".")


# ----------------------------------------------------------------------------- end of run

def finish(out, summary, model, test_acc, extra=None):
    """final.json: the run's figures (the summary fit returned, the test accuracy, the parameters, the script's
    extras), and the same figures as TensorBoard hparams beside its curves."""
    final = {"best_val_acc": summary["best_val_acc"], "best_epoch": summary["best_epoch"], "epochs": summary["epochs"],
             "test_acc": test_acc,
             "train_seconds": summary["train_seconds"], "first_step_seconds": summary["first_step_seconds"],
             "parameters": count_parameters(unwrap(model)),
             "trainable_parameters": count_parameters(unwrap(model), trainable_only=True),
             "skipped_steps": summary["skipped_steps"], **(extra or {})}
    atomic_write_text(Path(out) / "final.json", json.dumps(final, indent=2) + "\n")
    if summary.get("board"):
        log_final(summary["board"]["dir"], summary["board"]["flags"], final)
    return final
