"""Train a CIFAR-100 classifier from scratch: the course's BaseNet by default, every improvement a flag.

    python train_cifar.py --data-dir data                       # the baseline recipe (BaseNet, SGD)
    python train_cifar.py --bn --depth 8 --aug flip,crop         # a real 8-conv-layer network with BatchNorm
    python train_cifar.py --model resnet18 --normalize --aug flip,crop,cutout --schedule onecycle \
        --optimizer sgd --lr 0.1 --wd 5e-4 --label-smoothing 0.1 --epochs 30
    torchrun --nproc_per_node=4 train_cifar.py ...                # DistributedDataParallel

The 50k training images are split 45k train / 5k validation (450/50 per class, seeded); the best
epoch by validation accuracy is kept and predicts the 10k test images into OUT/submission.csv.
"""
import argparse

import torch

import data
import engine
import models

BASELINE = dict(epochs=15, batch_size=64, optimizer="sgd", lr=0.01, wd=0.0, schedule="none", out="runs/cifar")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--data-dir", default="data", help="folder holding cifar-100-python/{train,test,meta}")
    add("--download", action="store_true", help="fetch the official CIFAR-100 tarball into --data-dir if missing")
    add("--model", choices=["basenet", "convnet", "resnet18"], default=None,
        help="network; default basenet, or convnet when --depth/--width/--bn/--norm/--residual is given")
    add("--depth", type=int, default=None, help="conv layers of the convnet (default 8)")
    add("--width", type=int, default=None, help="base channels of the convnet (default 32; resnet18: 64)")
    add("--bn", action="store_true", help="BatchNorm after every conv (same as --norm bn)")
    add("--norm", choices=["bn", "gn", "none"], default=None, help="normalisation layer of the convnet")
    add("--residual", action="store_true", help="identity shortcuts around pairs of convs (convnet)")
    add("--dropout", type=float, default=0.0, help="dropout before the classifier")
    add("--aug", default="none", help="training augmentations, comma-separated: flip,crop,cutout (or none)")
    add("--cutout-size", type=int, default=8, help="side of the cutout square in pixels")
    add("--normalize", action="store_true", help="subtract the training split's per-channel mean, divide by std")
    add("--val-per-class", type=int, default=50, help="validation images per class carved from the training set")
    add("--split-seed", type=int, default=0, help="seed of the train/validation split (kept apart from --seed)")
    add("--tta", action="store_true", help="average predictions with the mirrored image for the test CSV")
    engine.add_training_args(parser, BASELINE)
    args = parser.parse_args(argv)
    if args.bn and args.norm not in (None, "bn"):
        parser.error("--bn conflicts with --norm " + args.norm)
    if args.bn:
        args.norm = "bn"
    if args.model is None:
        wants_convnet = any(v is not None for v in (args.depth, args.width, args.norm)) or args.residual
        args.model = "convnet" if wants_convnet else "basenet"
    args.depth = 8 if args.depth is None else args.depth
    args.width = 32 if args.width is None else args.width
    args.norm = args.norm or "none"
    return args


def check_args(args):
    try:
        data.parse_aug(args.aug)
    except data.DataError as e:
        raise engine.UsageError(str(e)) from None
    if args.depth < 1 or args.width < 1:
        raise engine.UsageError(f"--depth and --width must be at least 1, got {args.depth} and {args.width}")
    if args.model == "basenet" and (args.norm != "none" or args.residual):
        raise engine.UsageError("BaseNet has no normalisation layers or residuals; pick --model convnet")


def model_config(args, num_classes):
    return {"kind": "cifar", "name": args.model, "num_classes": num_classes, "depth": args.depth,
            "width": args.width, "norm": args.norm, "dropout": args.dropout, "residual": args.residual}


def run(argv=None):
    args = parse_args(argv)
    check_args(args)
    device = engine.resolve_device(args)
    rank, world = engine.setup_distributed(device)
    cifar = data.load_cifar100(args.data_dir, download_if_missing=args.download)
    split = data.stratified_split(cifar["train_y"], val_per_class=args.val_per_class, seed=args.split_seed)
    engine.check_training_args(args, len(split[0]))
    engine.prepare_run_dir(args.out, engine.run_config(args, {"data": "cifar100"}), args.resume, args.force, rank, world)

    engine.seed_everything(args.seed, rank=0)  # same initial weights on every rank
    train, val, test, info = data.cifar_loaders(cifar, args, device, rank, world, split)
    config = model_config(args, len(cifar["classes"]))
    model = models.build_model(config).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if engine.is_main(rank):
        engine.atomic_write_text(f"{args.out}/architecture.md", f"# {args.model}\n\n"
                                 + models.architecture_table(model, (1, 3, 32, 32)) + "\n")
        print(f"{args.model}: {models.count_parameters(model):,} parameters on {device}; "
              f"train {info['train_size']}, val {info['val_size']}, test {len(cifar['test_y'])}; "
              f"amp={args.amp} compile={args.compile} channels_last={args.channels_last}")
    engine.seed_everything(args.seed, rank)
    data_config = {"dataset": "cifar100", "mean": info["mean"], "std": info["std"]}
    summary = engine.fit(model, train, val, args, args.out, config, data_config, device, rank, world,
                         title=f"CIFAR-100 {args.model}")

    if engine.is_main(rank):
        engine.load_best(model, args.out)
        test_acc = engine.predict_to_csv(model, test, device, args.amp, f"{args.out}/submission.csv", args.tta)
        final = engine.finish(args.out, summary, model, test_acc, {"model": args.model})
        print(f"best val acc {final['best_val_acc']:.4f} (epoch {final['best_epoch']}), test acc "
              f"{'n/a (no test labels)' if test_acc is None else f'{test_acc:.4f}'}; wrote {args.out}/submission.csv")


if __name__ == "__main__":
    engine.cli(run)
