"""Train a CIFAR-100 classifier from scratch: the course's BaseNet by default, every improvement a flag.

    python train_cifar.py --data-dir data                       # the baseline recipe (BaseNet, SGD)
    python train_cifar.py --bn --depth 8 --aug flip,crop         # a real 8-conv-layer network with BatchNorm
    python train_cifar.py --preset cpu5 --data-dir data          # the best recipe for 5 minutes on a CPU
    python train_cifar.py --model resnet18 --normalize --aug flip,crop,cutout --schedule onecycle \
        --optimizer sgd --lr 0.1 --wd 5e-4 --label-smoothing 0.1 --epochs 30
    torchrun --nproc_per_node=4 train_cifar.py ...                # DistributedDataParallel

The 50k training images are split 45k train / 5k validation (450/50 per class, seeded); the best
epoch by validation accuracy is kept and predicts the 10k test images into OUT/submission.csv.
"""
import argparse

import torch

import checkpoints
import data
import devices
import engine
import flags
import models
import run_files

# ----------------------------------------------------------------------------- the recipe
# Every default of a training flag, in one table (as airbench's `hyp`): the course's baseline, BaseNet trained with
# SGD lr 0.01, momentum 0.9, batch 64, no augmentation, for 15 epochs. A preset below changes some of it; flags given
# on the command line override both. What each knob measured: BENCHMARKS.md.
RECIPE = dict(
    model=None,  # None: basenet, or convnet when --depth/--width/--bn/--norm/--residual is given
    depth=None, width=None, widen=10, norm=None, residual=False, dropout=0.0, init="auto",  # None: per model
    normalize=False, aug="none", cutout_size=8, val_per_class=50, split_seed=0,  # data
    epochs=15, batch_size=64, accum_steps=1, optimizer="sgd", lr=0.01, momentum=0.9, nesterov=False, wd=0.0,  # optimisation
    schedule="none", warmup=0.0, time_budget=None,
    label_smoothing=0.0, ema=0.0, ema_warmup=True, mixup=0.0, cutmix=0.0, mix_prob=1.0,  # regularisation
    tta="none", out="runs/cifar",
)

# Presets: differences from RECIPE (config.json records the resolved flags).
PRESETS = {
    "baseline": {},  # the course recipe: RECIPE as it is
    # run_all.sh's final model, built for >= 80% on CIFAR-100 within 10 minutes on one H100 (bf16, compile):
    # WRN-28-10 (36.5M parameters), CutMix, EMA of the weights, one-cycle SGD, flip+shift TTA, as many epochs as
    # the 10 minutes hold on the GPU it runs on.
    "final": dict(model="wrn", depth=28, widen=10, normalize=True, aug="flip,crop", cutmix=1.0, mix_prob=0.5,
                  ema=0.999, label_smoothing=0.1, nesterov=True, lr=0.2, wd=5e-4, schedule="onecycle",
                  batch_size=256, time_budget=600, tta="flip,shift"),
    # the most accurate recipe measured on about 3,000 32x32 images in 5 minutes on 2 CPU cores (the real-image
    # proxy): an 8-conv BatchNorm ConvNet with identity shortcuts, crop+flip, one-cycle SGD, label smoothing,
    # dropout, weight decay 1e-3, as many epochs as 300 s of wall time hold on the machine it runs on.
    "cpu5": dict(model="convnet", depth=8, width=32, norm="bn", residual=True, normalize=True, aug="flip,crop",
                 nesterov=True, lr=0.1, wd=1e-3, schedule="onecycle", label_smoothing=0.1, dropout=0.2,
                 time_budget=300, tta="flip"),
}


def parse_args(argv=None):
    parser = flags.ArgumentParser(__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="start from a whole recipe (PRESETS in this file); flags given too override it")
    d = parser.add_argument_group("data").add_argument
    d("--data-dir", default="data", help="folder holding cifar-100-python/{train,test,meta}")
    d("--download", action="store_true", help="fetch the official CIFAR-100 tarball into --data-dir if missing")
    d("--val-per-class", type=int, default=RECIPE["val_per_class"],
      help="validation images per class carved from the training set")
    d("--split-seed", type=int, default=RECIPE["split_seed"], help="seed of the train/validation split (not --seed)")
    d("--normalize", action=argparse.BooleanOptionalAction, default=RECIPE["normalize"],
      help="subtract the training split's per-channel mean, divide by std")
    d("--aug", type=data.AUG, default=RECIPE["aug"], help=f"training augmentations: {data.AUG.help()}")
    d("--cutout-size", type=int, default=RECIPE["cutout_size"], help="side of the cutout square in pixels")
    m = parser.add_argument_group("model").add_argument
    m("--model", choices=models.CIFAR_MODELS, default=RECIPE["model"],
      help="network; unset: basenet, or convnet when --depth/--width/--bn/--norm/--residual is given; "
           "preact18: pre-activation ResNet-18; wrn: Wide ResNet WRN-<depth>-<widen>")
    m("--depth", type=int, default=RECIPE["depth"],
      help="conv layers of the convnet (unset: 8), or the WRN depth (unset: 28)")
    m("--width", type=int, default=RECIPE["width"], help="base channels of the convnet (unset: 32; resnet18/preact18: 64)")
    m("--widen", type=int, default=RECIPE["widen"], help="widen factor k of the Wide ResNet")
    m("--bn", action="store_true", help="BatchNorm after every conv (same as --norm bn)")
    m("--norm", choices=["bn", "gn", "none"], default=RECIPE["norm"],
      help="normalisation layer of the convnet (unset: none)")
    m("--residual", action=argparse.BooleanOptionalAction, default=RECIPE["residual"],
      help="identity shortcuts around pairs of convs (convnet)")
    m("--dropout", type=float, default=RECIPE["dropout"], help="dropout before the classifier (inside the blocks for wrn)")
    m("--init", choices=models.INITS, default=RECIPE["init"],
      help="conv initialisation: kaiming (He, fan-out, ReLU gain, as torchvision's ResNets), PyTorch's default, or "
           "auto: He where no normalisation follows the convs (a plain convnet, resnet18, preact18, wrn), PyTorch's "
           "default where BatchNorm/GroupNorm does; BaseNet always keeps PyTorch's default (the course recipe)")
    t = parser.add_argument_group("test time").add_argument
    t("--tta", type=engine.TTA, nargs="?", const="flip", default=RECIPE["tta"],
      help="test-time augmentation for the CSV: none, flip, or flip,shift (mirror and one-pixel shifts, softmax "
           "averaged)")
    flags.add_training_args(parser, RECIPE)
    preset, _ = parser.parse_known_args(argv)
    if preset.preset:
        parser.set_defaults(**PRESETS[preset.preset])
    return parser.parse_args(argv)


def resolve(args, argv=None):
    """Every setting derived from the flags, in one place (config.json records the result); returns the device."""
    if args.bn and args.norm not in (None, "bn"):
        raise flags.UsageError(f"--bn conflicts with --norm {args.norm}")
    args.norm = "bn" if args.bn else args.norm
    if args.model is None:  # the course's BaseNet unless a convnet knob is given
        wants_convnet = any(v is not None for v in (args.depth, args.width, args.norm)) or args.residual
        args.model = "convnet" if wants_convnet else "basenet"
    args.depth = (28 if args.model == "wrn" else 8) if args.depth is None else args.depth
    args.width = 32 if args.width is None else args.width
    args.norm = args.norm or "none"
    args.init = models.resolve_init(args.init, args.model, args.norm)  # auto: per family (models.resolve_init)
    args.epochs_given = flags.given(argv, "--epochs")  # a resumed run keeps its length unless --epochs is given
    args.epochs_cap = flags.epochs_cap(args)  # an --epochs given with --time-budget caps its choice
    args.tta_views = sorted(engine.TTA.names(args.tta))
    if args.model == "wrn" and ((args.depth - 4) % 6 or args.depth < 10 or args.widen < 1):
        raise flags.UsageError(f"a Wide ResNet needs --depth 6n+4 (10, 16, 22, 28, ...) and --widen >= 1, got "
                               f"{args.depth} and {args.widen}")
    flags.require(args.depth >= 1, "--depth", args.depth, "at least 1")
    flags.require(args.width >= 1, "--width", args.width, "at least 1")
    if args.model == "basenet" and (args.norm != "none" or args.residual):
        raise flags.UsageError("BaseNet has no normalisation layers or residuals; pick --model convnet")
    device = devices.pick_device(args.device)
    devices.device_defaults(args, device)  # --amp, --compile, --channels-last left unset: from the device
    return device


def model_config(args, num_classes):
    return {"kind": "cifar", "name": args.model, "num_classes": num_classes, "depth": args.depth,
            "width": args.width, "norm": args.norm, "dropout": args.dropout, "residual": args.residual,
            "init": args.init, "widen": args.widen}


def main(argv=None):
    start = engine.now()  # --time-budget counts from here
    args = parse_args(argv)
    device = resolve(args, argv)
    devices.set_determinism(args.deterministic)  # the process-wide cuDNN, TF32 and deterministic-kernel flags
    rank, world = devices.setup_distributed(device)
    cifar = data.load_cifar100(args.data_dir, download_if_missing=args.download)
    split = data.stratified_split(cifar["train_y"], val_per_class=args.val_per_class, seed=args.split_seed)
    flags.check_training_args(args, len(split[0]))
    checkpoints.prepare_run_dir(args.out, checkpoints.run_config(args, {"data": "cifar100"}), args.resume, args.force)

    checkpoints.seed_everything(args.seed, rank=0)  # same initial weights on every rank
    train, val, test, info = data.cifar_loaders(cifar, args, device, rank, world, split)
    config = model_config(args, len(cifar["classes"]))
    model = models.build_model(config).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if devices.is_main():
        run_files.atomic_write_text(f"{args.out}/architecture.md", models.architecture_markdown(model, args.model))
        print(f"{args.model}: {models.count_parameters(model):,} parameters on {device}; "
              f"train {info['train_size']}, val {info['val_size']}, test {len(cifar['test_y'])}; "
              f"amp={args.amp} compile={args.compile} channels_last={args.channels_last}")
    checkpoints.seed_everything(args.seed, rank)
    meta = {"model_config": config, "data_config": {"dataset": "cifar100", "mean": info["mean"], "std": info["std"],
                                                    "classes": [str(c) for c in cifar["classes"]]},  # names, in order
            "config": run_files.flags_plain(args)}

    state = engine.build_state(model, args, device, config["num_classes"])
    progress = checkpoints.resume_or_start(args.out, state, args.resume)
    log = run_files.EpochLog(args.out, f"CIFAR-100 {args.model}", board_dir=args.out if args.tensorboard else None,
                             flags=meta["config"], history=progress.history)
    views = engine.tta_view_count(args.tta_views)  # what predicts after training: test and validation, with TTA
    final_images = len(cifar["test_y"]) * views + info["val_size"] * (1 + (views if args.tta_views else 0))
    epochs = engine.choose_epochs(state, progress, train, val, args, args.out, meta, log, start, final_images)
    summary = engine.fit(state, progress, train, val, args, epochs, args.out, meta, log)
    if devices.is_main():
        predict_and_finish(args, model, test, info, cifar, summary, device, world)


def predict_and_finish(args, model, test, info, cifar, summary, device, world):
    """The best model (best.pt) predicts the test CSV and validation (the error analysis, and TTA's effect where the
    labels are real); final.json gathers the figures."""
    checkpoints.load_best(model, args.out)
    test_probs = engine.predict_probs(model, test, device, args.amp, args.tta_views, not args.quiet, "test")
    test_acc = run_files.write_predictions(f"{args.out}/submission.csv", *test_probs)
    val_probs = engine.predict_probs(model, info["val_all"], device, args.amp, progress=not args.quiet, desc="val")
    run_files.write_error_analysis(args.out, cifar["classes"], val_probs, test_probs)
    val_acc_tta = None
    if args.tta_views:
        probs, labels = engine.predict_probs(model, info["val_all"], device, args.amp, args.tta_views, not args.quiet,
                                             "val+tta")
        val_acc_tta = round((probs.argmax(1) == labels).float().mean().item(), 4)
    final = run_files.finish(args.out, summary, model, test_acc, {
        "val_acc_tta": val_acc_tta, "tta": ",".join(args.tta_views) or "none", "model": args.model,
        "device": devices.device_name(device), "world": world, "train_size": info["train_size"],
        "val_size": info["val_size"], "test_size": len(cifar["test_y"]), "num_classes": len(cifar["classes"])})
    tta = "" if val_acc_tta is None else f" ({val_acc_tta:.4f} with --tta {final['tta']})"
    print(f"best val acc {final['best_val_acc']:.4f} (epoch {final['best_epoch']}){tta}, test acc "
          f"{'n/a (no test labels)' if test_acc is None else f'{test_acc:.4f}'}; wrote {args.out}/submission.csv")


if __name__ == "__main__":
    engine.cli(main)
