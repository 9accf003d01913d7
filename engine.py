"""The training loop both scripts share, in the order it runs: `build_state` (the model as a step calls it, the plain
module under it, optimizer, loss scaler, EMA), `choose_epochs` (--epochs, or what --time-budget holds on this
machine), then `fit`: epochs of `train_one_epoch`, whose one step reads top to bottom (learning rate, MixUp/CutMix,
forward under autocast, loss, backward, optimizer step, EMA update), each ended by `end_epoch` (validation, best.pt,
last.pt, metrics.csv, curves, the printed line). Ctrl-C or SIGTERM saves last.pt at the next step boundary, and
--resume continues exactly. What last.pt holds is checkpoints.py; the other files a run writes, run_files.py.
Evaluation and test-time augmentation (`evaluate`, `predict_probs`) and the scripts' error handling (`cli`) are here
too. Not run directly.
"""
import contextlib
import copy
import math
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

import checkpoints
import data
import run_files
from devices import (DeviceError, OutOfMemory, amp_dtype, autocast, barrier, evaluation_memory, is_main, reduce_sums,
                     synchronize, training_oom)
from flags import UsageError
from models import unwrap


class NonFiniteLoss(Exception):
    pass


# ----------------------------------------------------------------------------- the training state

@dataclass
class TrainState:
    """What the training steps change, built in one place (build_state)."""
    model: nn.Module  # what a step calls: `raw`, compiled with --compile and wrapped in DDP under torchrun
    raw: nn.Module  # the plain network: what checkpoints hold
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # loss scaling under fp16 autocast; elsewhere disabled, a pass-through
    ema: object  # timm's ModelEmaV3 with --ema, else None
    eval_model: nn.Module  # what is validated and saved as best.pt: the EMA's weights with --ema, else `model`
    device: torch.device  # the device the run resolved
    num_classes: int


def build_state(model, args, device, num_classes, param_groups=None):
    """The training state of `model` (on `device` already): param_groups ([{'params', 'lr_mult'}], default: every
    parameter at the full rate) under --optimizer, the loss scaler, the EMA, then torch.compile and DDP around it."""
    raw = model
    if args.sync_bn and dist.is_initialized() and dist.get_world_size() > 1:
        raw = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # the same Parameter objects, so param_groups hold
    optimizer = make_optimizer(param_groups or [{"params": list(raw.parameters())}], args, no_weight_decay_params(raw))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and amp_dtype(device) == torch.float16)
    ema = make_ema(raw, args.ema, args.ema_warmup)
    model = torch.compile(raw) if args.compile else raw
    if dist.is_initialized():  # around the compiled model: DDP's buffer broadcast would break the graph inside it
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return TrainState(model, raw, optimizer, scaler, ema, model if ema is None else ema.module, device, num_classes)


def make_optimizer(param_groups, args, no_decay_params=frozenset()):
    """SGD (momentum, optional Nesterov) or AdamW over param_groups; weight decay on weights, none on biases and norm
    layers (ndim <= 1) nor on the parameters whose ids are in `no_decay_params` (no_weight_decay_params). Split here
    rather than by timm's param_groups_weight_decay, which splits a whole model: these groups are already split by
    learning rate (the per-stage rates of --layer-decay)."""
    groups = []
    for g in param_groups:
        params = [p for p in g["params"] if p.requires_grad]
        decay = [p for p in params if p.ndim > 1 and id(p) not in no_decay_params]
        no_decay = [p for p in params if p.ndim <= 1 or id(p) in no_decay_params]
        for ps, wd in ((decay, args.wd), (no_decay, 0.0)):
            if ps:
                groups.append({"params": ps, "weight_decay": wd, "lr": args.lr * g.get("lr_mult", 1.0),
                               "lr_mult": g.get("lr_mult", 1.0)})
    if not groups:
        raise UsageError("the model has no trainable parameters")
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov and args.momentum > 0)
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.momentum, 0.999))


def no_weight_decay_params(model):
    """The parameters that `model`, or any module inside it (a timm backbone), names in its no_weight_decay(): a ViT's
    pos_embed and cls_token, say, as a set of ids. timm's optimizer factory exempts them from weight decay, matching the
    names as fnmatch patterns; so does this repo."""
    from fnmatch import fnmatch
    skip = set()
    for module in model.modules():
        names = module.no_weight_decay() if callable(getattr(module, "no_weight_decay", None)) else ()
        skip.update(id(p) for name, p in module.named_parameters() if any(fnmatch(name, pattern) for pattern in names))
    return skip


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


def lr_factor_at(args, step, steps_per_epoch, epochs):
    """lr_factor at optimizer step `step` of a run of `epochs` epochs, its warm-up from --warmup (nanoGPT's get_lr):
    what each training step and each metrics row read."""
    total = steps_per_epoch * epochs
    return lr_factor(min(step, total - 1), total, round(args.warmup * steps_per_epoch), args.schedule)


# ----------------------------------------------------------------------------- one epoch

STOP = threading.Event()  # set by Ctrl-C or SIGTERM (fit's handlers): the epoch stops at the next step boundary


def train_one_epoch(state, loader, args, progress, sums):
    """Epoch `progress.epoch` of `progress.epochs`, from step sums.step on; each step inline. Loss and hits stay on the
    device (the host reads them every 50 steps). Raises KeyboardInterrupt at a step boundary once STOP is set."""
    from tqdm import tqdm
    steps, epoch = len(loader), progress.epoch
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    ddp, rank = dist.is_initialized(), dist.get_rank() if dist.is_initialized() else 0
    scale = state.scaler.get_scale()
    bar = tqdm(total=steps, initial=sums.step, desc=f"epoch {epoch + 1}/{progress.epochs}", unit="step", leave=False,
               disable=args.quiet or not is_main() or not sys.stderr.isatty())
    state.model.train()
    t0, checked = time.perf_counter(), sums.step
    for x, y in loader:
        if STOP.is_set():
            raise KeyboardInterrupt
        if not len(y) and not ddp:  # every image of the batch failed to decode: nothing to learn from
            sums.step += 1
            continue
        step, t_step = epoch * steps + sums.step, time.perf_counter()  # optimizer steps the run took before this one
        # 1. this step's learning rate
        for group in state.optimizer.param_groups:
            group["lr"] = args.lr * group["lr_mult"] * lr_factor_at(args, step, steps, progress.epochs)
        # 2. MixUp/CutMix: soft targets (label smoothing folded in), drawn from this step's own seed
        target = None
        if args.mixup or args.cutmix:
            seed = data.stream_seed(args.seed, epoch, sums.step, salt=rank * 104_729)
            x, target = data.mix_batch(x, y, state.num_classes, seed, args.mixup, args.cutmix, args.mix_prob,
                                       args.label_smoothing)
        # 3-4. forward under autocast (the loss in float32) and backward through the loss scaler, in --accum-steps
        # micro-batches, each loss weighted by its share of the batch (their gradients add up to the batch's); then one
        # optimizer step (the scaler skips one whose fp16 gradients overflowed)
        state.optimizer.zero_grad(set_to_none=True)
        parts, loss, logits = micro_batches(x, y, target, args.accum_steps), 0.0, []
        for k, (xs, ys, ts) in enumerate(parts):
            # under DDP the gradients are all-reduced once, after the last micro-batch
            with state.model.no_sync() if ddp and k < len(parts) - 1 else contextlib.nullcontext():
                with autocast(state.device, args.amp):
                    out = state.model(xs)
                if ts is None:
                    part = criterion(out.float(), ys)
                else:
                    part = torch.sum(-ts * out.float().log_softmax(1), 1).mean()
                if not len(y):  # under DDP: this rank's images all failed to decode; its zero gradient joins the all-reduce
                    part = out.sum() * 0.0
                part = part * (len(ys) / max(1, len(y)))
                state.scaler.scale(part).backward()
            loss, logits = loss + part.detach(), logits + [out.detach()]
        logits = torch.cat(logits)
        state.scaler.step(state.optimizer)
        state.scaler.update()
        # 5. the EMA of the weights (timm warms the decay up only when given the step: step 1 copies the weights)
        if state.ema is not None:
            state.ema.update(state.raw, step=step + 1 if state.ema.use_warmup else None)
        # bookkeeping
        scale, before = state.scaler.get_scale(), scale  # 1.0 unless fp16, whose GradScaler.step synced already
        hits = (logits.argmax(1) == (y if target is None else target.argmax(1))).sum()
        sums.add(loss, hits, len(y), skipped=scale < before)
        if progress.first_step_seconds is None:  # compilation and autotuning: reported apart in final.json
            synchronize(state.device)
            progress.first_step_seconds = time.perf_counter() - t_step
        if sums.step % 50 == 0 or sums.step == steps:
            sums.check_finite(checked, epoch, state.scaler.is_enabled())
            checked = sums.step
            if not bar.disable:
                bar.set_postfix(sums.postfix(t0))
                bar.update(sums.step - bar.n)
    sums.check_finite(checked, epoch, state.scaler.is_enabled())
    bar.close()


def micro_batches(x, y, target, accum_steps):
    """A batch as --accum-steps micro-batches [(x, y, soft targets or None)] of (nearly) equal size; one (the batch)
    without accumulation, or for an empty batch."""
    k = max(1, min(accum_steps, len(y)))
    if k == 1:
        return [(x, y, target)]
    ts = target.tensor_split(k) if target is not None else [None] * k
    return list(zip(x.tensor_split(k), y.tensor_split(k), ts, strict=True))


class EpochSums:
    """Per-step loss, hits and images of one epoch, kept on the device, and saved with an interrupted epoch
    (`state`, in last.pt) so that a resumed one reports the same totals."""

    def __init__(self, steps, device, start_step=0, partial=None):
        self.loss = torch.zeros(steps, device=device)
        self.correct = torch.zeros(steps, device=device, dtype=torch.long)
        self.count = [0] * steps
        self.step, self.start_step, self.seconds_before, self.skipped = start_step, start_step, 0.0, 0
        if partial:
            self.loss.copy_(partial["step_loss"])
            self.correct.copy_(partial["step_correct"])
            self.count = list(partial["step_count"])
            self.seconds_before, self.skipped = partial["seconds"], partial.get("skipped", 0)

    def add(self, loss, hits, images, skipped=False):
        self.loss[self.step], self.correct[self.step], self.count[self.step] = loss, hits, images
        self.skipped += bool(skipped)
        self.step += 1

    def state(self, seconds):
        return {"step_loss": self.loss.cpu(), "step_correct": self.correct.cpu(), "step_count": self.count,
                "seconds": self.seconds_before + seconds, "skipped": self.skipped}

    def check_finite(self, start, epoch, use_scaler):
        """Stop on the first non-finite loss of the steps since `start` (one host sync). Under fp16 loss scaling
        such steps are skipped by the scaler and counted instead."""
        if use_scaler or self.step <= start:
            return
        bad = ~torch.isfinite(self.loss[start:self.step])
        if bad.any():
            first = start + int(bad.nonzero()[0].item()) + 1
            raise NonFiniteLoss(f"the training loss became non-finite at epoch {epoch + 1} step {first}; last.pt still "
                                f"holds the last good epoch (lower --lr, or add --warmup)")

    def postfix(self, t0):
        """The progress bar's loss, accuracy and img/s of the epoch so far (this process's steps since t0)."""
        counts = torch.tensor(self.count, device=self.loss.device, dtype=self.loss.dtype)
        loss = ((self.loss * counts).sum() / counts.sum().clamp(min=1)).item()
        images = sum(self.count[self.start_step:self.step])
        return {"loss": f"{loss:.3f}", "acc": f"{self.correct.sum().item() / max(1, sum(self.count)):.3f}",
                "img_s": f"{images / max(time.perf_counter() - t0, 1e-9):.0f}"}

    def totals(self):
        """(mean loss, accuracy, images) over the epoch, summed over processes; fp16-skipped steps left out."""
        counts = torch.tensor(self.count, device=self.loss.device, dtype=torch.float64)
        finite = torch.isfinite(self.loss)  # only fp16 loss scaling lets a non-finite step through
        loss_sum = (torch.where(finite, self.loss, 0).double() * counts).sum()
        correct, count = self.correct.sum(), (counts * finite).sum()
        reduce_sums(loss_sum, correct, count)
        n = max(1.0, count.item())
        return loss_sum.item() / n, correct.item() / n, n


def end_epoch(state, progress, sums, seconds, val_loader, args, out, meta, log):
    """The end of an epoch: validation, the metrics row, best.pt where validation improved, last.pt, then `log`
    (metrics.csv, curves.png, TensorBoard, the printed line). `meta`: what every checkpoint carries besides the
    weights (model_config, data_config, the flags). Every rank calls it. Returns the row."""
    if state.ema is not None and dist.is_initialized():  # each rank's EMA averaged its own BatchNorm statistics:
        for buffer in state.ema.module.buffers():      # every rank validates rank 0's, which best.pt holds (the
            dist.broadcast(buffer, 0)                  # weights agree already: DDP averaged their gradients)
    t0 = now()
    val_loss, val_acc = evaluate(state.eval_model, val_loader, state.device, args.amp)
    eval_seconds = now() - t0
    train_loss, train_acc, images = sums.totals()
    progress.epoch, progress.step_in_epoch, progress.partial = progress.epoch + 1, 0, None
    progress.skipped_steps += sums.skipped
    steps = len(sums.count)
    lr = args.lr * lr_factor_at(args, progress.epoch * steps - 1, steps, progress.epochs)  # the last step's rate
    row = {"epoch": progress.epoch, "phase": log.phase, "train_loss": round(train_loss, 6),
           "train_acc": round(train_acc, 6), "val_loss": round(val_loss, 6), "val_acc": round(val_acc, 6),
           "lr": round(lr, 8), "epoch_seconds": round(seconds, 3),
           "images_per_second": round(images / max(seconds, 1e-9), 1), "eval_seconds": round(eval_seconds, 3)}
    progress.history.append(row)
    if val_acc > progress.best_val_acc:
        progress.best_val_acc, progress.best_epoch = val_acc, progress.epoch
        if is_main():
            checkpoints.save_best(out, unwrap(state.eval_model), meta, progress.epoch, val_acc)
    checkpoints.save_last(out, state, progress, meta)
    if is_main():
        log.epoch(progress.history, progress.epochs)
    return row


# ----------------------------------------------------------------------------- the loop

def fit(state, progress, train_loader, val_loader, args, epochs, out, meta, log):
    """Train from where `progress` stands (a fresh run, or last.pt's point after checkpoints.load_last) until
    `epochs` epochs are done. Ctrl-C or SIGTERM stops at the next step boundary and saves last.pt there (--resume
    continues exactly); under torchrun the launcher ends every rank. Returns the summary final.json takes."""
    progress.epochs = epochs
    STOP.clear()
    handlers, finished = {}, False
    if not dist.is_initialized():
        handlers = {sig: signal.signal(sig, lambda *_: STOP.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while progress.epoch < epochs:
            train_loader.set_epoch(progress.epoch)
            train_loader.start_step = progress.step_in_epoch
            sums = EpochSums(len(train_loader), state.device, progress.step_in_epoch, progress.partial)
            t0, oom = time.perf_counter(), False
            try:
                train_one_epoch(state, train_loader, args, progress, sums)
            except KeyboardInterrupt:
                progress.train_seconds += time.perf_counter() - t0
                progress.step_in_epoch, progress.partial = sums.step, sums.state(time.perf_counter() - t0)
                checkpoints.save_last(out, state, progress, meta)
                if is_main():
                    print(f"\ninterrupted at epoch {progress.epoch + 1} step {sums.step}; last.pt saved. Resume with "
                          f"the same command plus --resume", file=sys.stderr)
                raise
            except torch.OutOfMemoryError:  # the step that did not fit: its activations go with the exception
                oom = True
            if oom:  # last.pt at this step boundary (the failed step not taken), as an interruption saves it
                progress.train_seconds += time.perf_counter() - t0
                progress.step_in_epoch, progress.partial = sums.step, sums.state(time.perf_counter() - t0)
                state.optimizer.zero_grad(set_to_none=True)
                # under DDP the other ranks may wait in this step's all-reduce, and save_last gathers every rank's
                # RNG: a collective that would never complete. This rank exits; torchrun ends the others
                distributed = dist.is_initialized() and dist.get_world_size() > 1
                if not distributed:
                    checkpoints.save_last(out, state, progress, meta)
                raise OutOfMemory(training_oom(state.device, args.batch_size, args.accum_steps, progress.epoch,
                                               None if distributed else sums.step))
            synchronize(state.device)
            progress.train_seconds += time.perf_counter() - t0
            end_epoch(state, progress, sums, sums.seconds_before + time.perf_counter() - t0, val_loader, args, out,
                      meta, log)
        finished = True
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        log.close(finished)
    if progress.skipped_steps and is_main():
        print(f"fp16 loss scaling skipped {progress.skipped_steps} steps with overflowing gradients")
    barrier()
    return {"best_val_acc": progress.best_val_acc, "best_epoch": progress.best_epoch, "epochs": epochs,
            "train_seconds": round(progress.train_seconds, 2), "first_step_seconds": progress.first_step_seconds,
            "skipped_steps": int(progress.skipped_steps), "history": progress.history, "board": log.board_summary()}


# ----------------------------------------------------------------------------- the run's length

def choose_epochs(state, progress, train_loader, val_loader, args, out, meta, log, start, final_images):
    """The run's length in epochs, chosen before fit, and recorded in config.json (`epochs`, with the time budget's
    record): a resumed run keeps the length it was started with (resumed_epochs: an --epochs given on the command line
    changes it, and says how); with --time-budget, as many as the budget holds on this machine (budget_epochs, also
    kept in last.pt); else --epochs. `start`: the now() the budget counts from; `final_images`: what the script
    predicts after training (test and validation, TTA views counted)."""
    if progress.epochs is not None:
        epochs = resumed_epochs(progress, args, len(train_loader))
    elif args.time_budget:
        progress.budget = budget_epochs(state, train_loader, val_loader, args, meta, log, start, final_images)
        line = budget_line(progress.budget)
        if is_main():
            print(line, flush=True)
            if progress.budget.get("fits_epochs") == 0:
                print(f"warning: --time-budget {args.time_budget:g} s cannot hold one epoch here: one takes about "
                      f"{seconds_text(progress.budget['epoch_seconds'])}, and "
                      f"{seconds_text(progress.budget['elapsed_seconds'])} went before training; training 1 epoch, "
                      f"over the budget", file=sys.stderr, flush=True)
        log.note("time_budget", line)
        epochs = progress.budget["epochs"]
    else:
        epochs = args.epochs
    if is_main():
        checkpoints.record_length(out, epochs, progress.budget)
    return epochs


def resumed_epochs(progress, args, steps_per_epoch):
    """A resumed run's length: the one it was started with (progress.epochs, from last.pt), unless --epochs is given on
    the command line (with --time-budget, as the cap of the budget's choice); a change is said in one line, with the
    learning rate it moves the next step to. Never fewer than the epochs it has trained: it stops there."""
    started = progress.epochs
    if not args.epochs_given:
        return started
    fits = (progress.budget or {}).get("fits_epochs")  # 0: the budget held less than one epoch, which caps it too
    epochs = max(1, min(args.epochs, fits)) if args.time_budget and fits is not None else args.epochs
    if epochs != started and is_main():
        step = progress.epoch * steps_per_epoch + progress.step_in_epoch
        before, after = (lr_factor_at(args, step, steps_per_epoch, n) for n in (started, epochs))
        done = f"{progress.epoch} epochs" + (f" and {progress.step_in_epoch} steps" if progress.step_in_epoch else "")
        print(f"--epochs {args.epochs}: this run was started with {started} epochs and now trains {epochs}; "
              + (f"it has trained {done} already, so it stops here" if progress.epoch >= epochs else
                 f"the {args.schedule} schedule is laid over {epochs} from here (the next step's lr: {after:.3g} of "
                 f"--lr, {before:.3g} before)"), flush=True)
    return max(epochs, progress.epoch)  # what it stops at records the epochs it trained, not a smaller --epochs


def seconds_text(seconds):
    """A duration with the precision it needs: 0.43 s, 4.3 s, 43 s."""
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.2g} s"


# Timed training steps, after 2 warm-up steps (compilation, cuDNN's autotuning, the loader's start): 30, because 8
# timed steps measured cpu5's epochs 8% short of what they took (BENCHMARKS.md, "cpu5 in 300 s").
CALIBRATION_STEPS = 30


def now():
    """The clock the time budget measures with: a function, so that a test can hand it a fake clock."""
    return time.perf_counter()


class TimedBatches:
    """The training loader as the time budget reads it: 2 untimed warm-up batches, then up to CALIBRATION_STEPS in
    blocks of 10, the clock read at each block's edges once the device has caught up (`marks`: steps done, time)."""

    def __init__(self, loader, device, warm=2, block=10):
        self.loader, self.device, self.warm, self.block = loader, device, warm, block
        self.marks, self.startup, self.first = [], 0.0, None

    def __len__(self):
        return len(self.loader)  # the schedule's steps per epoch

    def __iter__(self):
        t0, i = now(), -1
        for i, batch in enumerate(self.loader):
            if i == 0:  # the loader's start-up (workers, pipelines), paid again every epoch
                self.first = now()
                self.startup = self.first - t0
            if i >= self.warm and (i - self.warm) % self.block == 0:
                synchronize(self.device)
                self.marks.append((i, now()))
                if i - self.warm >= CALIBRATION_STEPS:
                    return
            yield batch
        synchronize(self.device)  # the epoch ended first: its last block counts as far as it went
        self.marks.append((i + 1, now()))

    def step_seconds(self):
        """(seconds a step, steps timed): the median block's; an epoch of 2 steps or fewer, all of them."""
        edges = zip(self.marks, self.marks[1:], strict=False)
        blocks = [((t - t0) / (n - n0), n - n0) for (n0, t0), (n, t) in edges if n > n0]
        if not blocks:
            steps, end = self.marks[-1]
            return (end - self.first) / max(1, steps), 0
        return statistics.median(seconds for seconds, _ in blocks), sum(n for _, n in blocks)


def budget_epochs(state, train_loader, val_loader, args, meta, log, start, final_images):
    """--time-budget: time this run's own steps (train_one_epoch over TimedBatches: its model, compiled where --compile,
    loader, precision, optimizer and EMA) and its own end of an epoch (end_epoch into a scratch folder, timed after an
    untimed first one that loads matplotlib), put weights, optimizer, scaler, EMA and every RNG back, and choose the
    epochs (epochs_for_budget). Every rank takes rank 0's record. With --epochs 1 there is nothing to choose."""
    if args.epochs_cap == 1:
        return {"budget_seconds": args.time_budget, "epochs": 1, "fits_epochs": None, "measured": False}
    saved = copy.deepcopy(checkpoints.training_state(state))
    train_loader.set_epoch(0)
    train_loader.start_step = 0
    timed, sums = TimedBatches(train_loader, state.device), EpochSums(len(train_loader), state.device)
    train_one_epoch(state, timed, args, checkpoints.Progress(epochs=args.epochs), sums)
    with tempfile.TemporaryDirectory() as scratch:
        end_seconds = []
        for _ in range(2):
            t0 = now()
            row = end_epoch(state, checkpoints.Progress(epochs=args.epochs), sums, 1.0, val_loader, args, scratch, meta,
                            log.scratch(scratch))
            end_seconds.append(now() - t0)
    checkpoints.load_training_state(state, saved)
    step_seconds, timed_steps = timed.step_seconds()
    eval_seconds, end = row["eval_seconds"], end_seconds[-1]
    # rank 0 alone makes the final predictions, at the rate it validated its own share of the validation split
    final_seconds = eval_seconds * final_images / max(1, val_loader.sampler.local_count())
    epoch_seconds = timed.startup + len(train_loader) * step_seconds + end
    elapsed = now() - start
    fits = epochs_for_budget(args.time_budget, elapsed, epoch_seconds, final_seconds)
    record = {"budget_seconds": args.time_budget, "elapsed_seconds": round(elapsed, 3), "step_seconds": step_seconds,
              "timed_steps": timed_steps, "startup_seconds": round(timed.startup, 3), "eval_seconds": eval_seconds,
              "end_seconds": round(end, 3), "epoch_seconds": round(epoch_seconds, 3),
              "final_seconds": round(final_seconds, 3), "steps_per_epoch": len(train_loader),
              "images_per_second": round(args.batch_size / max(step_seconds, 1e-9), 1), "fits_epochs": fits,
              "epochs": max(1, min(fits, args.epochs_cap or fits))}
    if dist.is_initialized():  # the ranks timed slightly different steps: all follow rank 0
        shared = [record]
        dist.broadcast_object_list(shared, src=0)
        record = shared[0]
    return record


def epochs_for_budget(budget, elapsed, epoch_seconds, final_seconds):
    """How many epochs (training, then its end: validation and checkpoints) fit in `budget` seconds after `elapsed`
    seconds already spent, with the final predictions after them; 0 where not even one does."""
    return max(0, int((budget - elapsed - final_seconds) // epoch_seconds))


def budget_line(record):
    if not record.get("measured", True):
        return f"time budget {record['budget_seconds']:g} s: --epochs 1 leaves nothing to choose; 1 epoch, not measured"
    return (f"time budget {record['budget_seconds']:g} s: {record['images_per_second']:,.0f} img/s training "
            f"({1000 * record['step_seconds']:.1f} ms a step, {record['steps_per_epoch']} steps an epoch), "
            f"{record['eval_seconds']:.1f} s a validation pass, {record['elapsed_seconds']:.0f} s spent before "
            f"training, {record['final_seconds']:.0f} s of final predictions: {record['epochs']} epochs"
            + (f" (the budget holds {record['fits_epochs']}; --epochs caps them)"
               if record["fits_epochs"] > record["epochs"] else ""))


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
        with evaluation_memory(device, len(x)), autocast(device, amp):
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


@contextlib.contextmanager
def threads_per_stream(streams):
    """torch's threads shared out among `streams` threads that run the model at once (each on threads // streams,
    at least one), and given back afterwards: predict_probs' streams, and bench's model alone timed the same way."""
    threads = torch.get_num_threads()
    if streams > 1:
        torch.set_num_threads(max(1, threads // streams))
    try:
        yield
    finally:
        if streams > 1:
            torch.set_num_threads(threads)


def predict_probs(model, loader, device, amp, tta=(), progress=False, desc="predict", streams=1):
    """Softmax probabilities (float32, CPU) in loader order, averaged over the TTA views, and the labels. With
    streams > 1 (predict.py on a CPU), that many threads each take the loader's next batch, load it and run it on
    their share of torch's threads, so that one stream's loading overlaps another's forward pass."""
    from tqdm import tqdm
    model.eval()
    batches = enumerate(tqdm(loader, desc=desc, disable=not (progress and sys.stderr.isatty()), leave=False,
                             unit="batch"))
    taking, out, failed = threading.Lock(), {}, []

    @torch.inference_mode()  # per thread, as autocast is
    def stream():
        while not failed:
            with taking:  # one batch at a time out of the loader, in its order
                k, (x, y) = next(batches, (None, (None, None)))
            if k is None:
                return
            views = tta_views(x, tta) if x.ndim == 4 else [x]  # cached features have no views
            with evaluation_memory(device, len(x)), autocast(device, amp):
                p = sum(model(v).float().softmax(1) for v in views) / len(views)
            out[k] = p.cpu(), y.cpu()

    def helper():
        try:
            stream()
        except BaseException as e:  # handed to the main thread, which raises it
            failed.append(e)

    helpers = [threading.Thread(target=helper, daemon=True) for _ in range(streams - 1)]
    with threads_per_stream(streams):
        try:
            for h in helpers:
                h.start()
            stream()
        except BaseException as e:
            failed.append(e)  # the helpers stop after their batch
        finally:
            for h in helpers:
                h.join()
    if failed:
        raise failed[0]
    parts = [out[k] for k in sorted(out)]
    return torch.cat([p for p, _ in parts]), torch.cat([y for _, y in parts])


# ----------------------------------------------------------------------------- the command line's end

# what a collective raises when another rank's process has ended (gloo's sockets; NCCL's watchdog)
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote process exited")


def cli(main, argv=None):
    """Run a script's main; bad input ends in one sentence and a non-zero exit."""
    from models import WeightsMismatch
    try:
        return main(argv)
    except (UsageError, DeviceError, data.DataError, WeightsMismatch, NonFiniteLoss, run_files.WriteError,
            OutOfMemory) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever a library's text held
        sys.exit(2 if isinstance(e, (UsageError, DeviceError)) else 1)
    except KeyboardInterrupt:
        sys.exit(130)
    except RuntimeError as e:
        if dist.is_initialized() and any(m in str(e) for m in PEER_GONE):
            print(f"error: rank {dist.get_rank()} stops: another process of this run stopped first (its error is "
                  f"above)", file=sys.stderr)
            sys.exit(1)
        if "does not have a deterministic implementation" not in str(e):
            raise
        op = str(e).split(" does not have")[0].strip()
        print(f"error: --deterministic: {op} has no deterministic kernel on this device; run without "
              f"--deterministic, or on the CPU", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
