"""The command-line flags both training scripts share, in --help sections as timm's train.py has them
(`add_training_args`, each recipe default from the script's own RECIPE table), their range checks (`require`,
`check_training_args`: one sentence naming the one flag that is wrong), and a parser whose usage errors are one line
and whose --help opens with the script docstring's first paragraph (`ArgumentParser`). Not run directly.
"""
import argparse
import math
import sys


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default after its help, where it has one (an unset default is described in the help itself)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, its usage errors on one line (exit 2) like every other bad input of this repo, and each
    flag's default shown in --help. `doc`: the script's docstring, whose first paragraph opens --help."""

    def __init__(self, doc, **kw):
        super().__init__(description=" ".join(doc.split("\n\n")[0].split()),
                         formatter_class=DefaultsHelp, **kw)

    def error(self, message):
        self.exit(2, f"error: {' '.join(message.split())}\n")


class UsageError(Exception):
    """A flag value that cannot work: the message is one sentence for the user."""


def add_training_args(parser, recipe):
    """Flags both scripts share, in --help sections; `recipe`: the script's table of defaults."""
    opt = parser.add_argument_group("optimisation").add_argument
    opt("--epochs", type=int, default=recipe["epochs"],
        help="passes over the training split; a --resume without it keeps the length the run was started with "
             "(config.json's epochs), with it the schedule is laid over the new length from where the run stands")
    opt("--batch-size", type=int, default=recipe["batch_size"],
        help="global batch size (split over torchrun processes)")
    opt("--accum-steps", type=int, default=recipe["accum_steps"], metavar="N",
        help="run each batch as N micro-batches and take one optimizer step for them (gradient accumulation): the "
             "recipe is the same (images per step, lr schedule counted in optimizer steps, EMA), in less GPU memory; "
             "what differs: BatchNorm normalises each micro-batch with its own statistics. Evaluation runs in "
             "micro-batches too. A --resume may change it (out of memory: the error says which N fits)")
    opt("--optimizer", choices=["sgd", "adamw"], default=recipe["optimizer"], help="optimizer")
    opt("--lr", type=float, default=recipe["lr"], help="peak learning rate")
    opt("--momentum", type=float, default=recipe["momentum"], help="SGD momentum (AdamW beta1)")
    opt("--nesterov", action=argparse.BooleanOptionalAction, default=recipe["nesterov"], help="Nesterov momentum for SGD")
    opt("--wd", type=float, default=recipe["wd"], help="weight decay (not applied to biases and norm layers)")
    opt("--schedule", choices=["none", "step", "cosine", "onecycle"], default=recipe["schedule"],
        help="learning-rate schedule over the run: step divides by 10 at 50%% and 75%% of it; onecycle warms up "
             "over its first 25%% (or --warmup) and decays linearly to 0")
    opt("--warmup", type=float, default=recipe["warmup"], help="epochs of linear warm-up from 0 to --lr")
    opt("--time-budget", type=float, default=recipe["time_budget"], metavar="SECONDS",
        help="choose the epochs for the machine this runs on: time 30 real training steps (compiled where "
             "--compile) and one real epoch's end first, then train as many epochs as end, with their evaluation "
             "and the final predictions, within SECONDS of the command's start; the schedule and warm-up are laid "
             "over those epochs. --epochs given too is the most it may choose. config.json records the budget, the "
             "measured times and the chosen epochs, and --resume keeps them (0 or unset: off, --epochs decides)")
    reg = parser.add_argument_group("regularisation").add_argument
    reg("--label-smoothing", type=float, default=recipe["label_smoothing"], help="label smoothing of the cross-entropy")
    reg("--ema", type=float, default=recipe["ema"], metavar="DECAY",
        help="keep an exponential moving average of the weights and BatchNorm buffers (e.g. 0.999), updated every "
             "step; it is what is validated, saved in best.pt and predicts the CSV (0: off)")
    reg("--ema-warmup", action=argparse.BooleanOptionalAction, default=recipe["ema_warmup"],
        help="ramp the EMA decay up as min(DECAY, 1 - step^-0.75) at optimizer step 1, 2, ... (timm's warm-up; "
             "step 1 copies the weights); --no-ema-warmup: DECAY from the first step")
    reg("--mixup", type=float, default=recipe["mixup"], metavar="ALPHA",
        help="MixUp per sample with lam ~ Beta(ALPHA, ALPHA) (0: off)")
    reg("--cutmix", type=float, default=recipe["cutmix"], metavar="ALPHA",
        help="CutMix per sample with lam ~ Beta(ALPHA, ALPHA) (0: off); with --mixup too, each mixed sample takes one "
             "of the two at random")
    reg("--mix-prob", type=float, default=recipe["mix_prob"],
        help="probability that a sample is mixed at all; with mixing, train_acc counts a prediction correct when "
             "it is the sample's dominant label")
    dev = parser.add_argument_group("speed and device").add_argument
    dev("--amp", action=argparse.BooleanOptionalAction, default=None,
        help="bf16 autocast (fp16 with loss scaling on a GPU without bf16 in hardware: T4, V100); unset: on for CUDA, "
             "off on a CPU")
    dev("--compile", action=argparse.BooleanOptionalAction, default=None,
        help="torch.compile the model (the first step's time, compilation included, is in final.json); unset: on "
             "for CUDA, off on a CPU")
    dev("--channels-last", action=argparse.BooleanOptionalAction, default=None,
        help="channels-last memory format; unset: on (on GPUs and CPUs alike)")
    dev("--device", default=None, help="cuda, cuda:N or cpu; unset: cuda where a GPU is visible")
    dev("--deterministic", action="store_true",
        help="bit-identical reruns on the same machine and software (exact resume); on CUDA: fixed cuBLAS "
             "workspace, no TF32, deterministic cuDNN, and an op with no deterministic kernel stops the run")
    dev("--sync-bn", action="store_true", help="synchronise BatchNorm statistics across torchrun processes")
    folder = parser.add_argument_group("run folder").add_argument
    folder("--out", default=recipe["out"], help="run folder for checkpoints, metrics, plots and the CSV")
    folder("--resume", action="store_true", help="continue the run in --out from last.pt (starts fresh if none)")
    folder("--force", action="store_true", help="overwrite a run already in --out")
    folder("--seed", type=int, default=0, help="seed for initialisation, shuffling, augmentation, mixing and dropout")
    folder("--quiet", action="store_true", help="no progress bar")
    folder("--tensorboard", action=argparse.BooleanOptionalAction, default=True,
           help="TensorBoard event files in the run folder: loss, accuracy, lr and img/s per epoch, the final figures "
                "as hparams, the flags as text (`tensorboard --logdir results` shows a whole sweep, live)")


def require(ok, flag, value, what):
    """A flag's range check: one sentence naming the one flag that is wrong and its value."""
    if not ok:
        raise UsageError(f"{flag} must be {what}, got {value}")


def given(argv, flag):
    """Whether `flag` is on the command line (argv; None: sys.argv[1:]), as FLAG VALUE or FLAG=VALUE."""
    argv = sys.argv[1:] if argv is None else argv
    return any(str(a) == flag or str(a).startswith(flag + "=") for a in argv)


def epochs_cap(args):
    """With --time-budget, an --epochs given on the command line (args.epochs_given) caps the epochs the budget
    chooses (a default or a preset's epochs do not)."""
    return args.epochs if args.time_budget and args.epochs_given else None


def check_training_args(args, train_size):
    require(args.epochs >= 1, "--epochs", args.epochs, "at least 1")
    budget = getattr(args, "time_budget", None)
    require(budget is None or budget >= 0, "--time-budget", budget, ">= 0 (0: off)")
    require(args.lr > 0 and math.isfinite(args.lr), "--lr", args.lr, "a positive number")
    require(args.batch_size >= 1, "--batch-size", args.batch_size, "at least 1")
    require(1 <= args.accum_steps <= args.batch_size, "--accum-steps", args.accum_steps,
            f"in [1, {args.batch_size}] (at least one image per micro-batch of the batch size)")
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
