"""Transfer learning on Caltech-UCSD Birds: an ImageNet backbone with a new dropout + linear head, as a
frozen feature extractor, frozen up to some depth, or fine-tuned whole, optionally after a linear probe.

    python finetune_birds.py --freeze-backbone                   # linear probe: ResNet-50 run once over the data,
                                                                 # then the head alone (AdamW 1e-3, 10 epochs)
    python finetune_birds.py --freeze-backbone --no-cache-features  # the same head on augmented images (slow)
    python finetune_birds.py --freeze-stages 2                   # stem + first 2 stages frozen, rest fine-tuned
    python finetune_birds.py --lp-epochs 5                       # LP-FT: probe the head on cached features, then fine-tune
    python finetune_birds.py --bn-mode frozen --layer-decay 0.7  # BatchNorm statistics fixed; lr x0.7 per stage down
    python finetune_birds.py --arch tf_efficientnet_lite0 --weights ../shared/weights/tf_efficientnet_lite0_in1k.pth \
        --data-dir ../shared/data/CUB_200_2011_subset100 --device cpu --img-size 224
    torchrun --nproc_per_node=4 finetune_birds.py ...            # DistributedDataParallel

Validation is carved from the official training split (--val-frac, stratified, seeded); the official
test split is scored where labels exist and predicted into OUT/submission.csv in images.txt order.
"""
import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

import bird_data
import bird_loaders
import data
import devices
import engine
import flags
import run_files
import models

# The default fine-tuning recipe (LP-FT): a 10-epoch linear probe on cached features (AdamW 1e-3), then the whole
# network with BatchNorm statistics frozen, SGD lr 1e-3 for head and backbone alike, cosine, no warm-up. Chosen
# from the measured study on real CUB birds in BENCHMARKS.md ("Birds: how to fine-tune"), where the previous
# default (random head, BatchNorm in train mode, lr 0.01 with the backbone at x0.1) lost to the linear probe.
RECIPE = dict(epochs=15, batch_size=64, optimizer="sgd", lr=1e-3, wd=1e-4, schedule="cosine", out="runs/birds")
# The linear probe: the study's best frozen-backbone recipe. It is both the first phase of LP-FT and what
# --freeze-backbone trains by default: SGD at the fine-tuning lr barely moves a new head (0.213 test in 3 epochs
# against the probe's 0.869, BENCHMARKS.md "Birds: the frozen defaults").
PROBE = dict(epochs=10, optimizer="adamw", lr=1e-3, cache_features=True)
LP_EPOCHS = PROBE["epochs"]


def parse_args(argv=None):
    parser = flags.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--data-dir", default="data/CUB_200_2011", help="CUB_200_2011 root (or its parent), or a train/ test/ tree")
    add("--dataset", choices=["cub2011", "folder"], default="cub2011",
        help="cub2011: official text files; folder: ImageFolder-style train/ and test/ (e.g. CUB-200-2010)")
    add("--download", action="store_true", help="fetch the official CUB-200-2011 archive into --data-dir if missing")
    add("--crop-boxes", action="store_true", help="crop each image to its bounding_boxes.txt box")
    add("--val-frac", type=float, default=0.1, help="fraction of each class's training images kept for validation")
    add("--split-seed", type=int, default=0, help="seed of the train/validation split")
    add("--arch", default="resnet50",
        help="torchvision resnet18|resnet34|resnet50|resnet101, or a timm model name (timm:NAME or plain)")
    add("--weights", default="imagenet",
        help="imagenet (torchvision/timm download and cache), none (random init), or a local state-dict file")
    add("--freeze-backbone", action="store_true",
        help=f"train the head only; backbone frozen, BatchNorm in eval mode. The defaults then become the linear "
             f"probe's: --epochs {PROBE['epochs']} --optimizer {PROBE['optimizer']} --lr {PROBE['lr']:g}, features "
             f"cached (flags given still win)")
    add("--cache-features", action=argparse.BooleanOptionalAction, default=None,
        help="with --freeze-backbone: run the backbone once over every image (no augmentation) and train the head "
             "on the stored features (default with --freeze-backbone; --no-cache-features trains on augmented "
             "images, as slow as fine-tuning)")
    add("--freeze-stages", type=int, default=0, metavar="K",
        help="freeze the stem and the first K stages of the backbone (timm's stage grouping; torchvision ResNets: "
             "conv1/bn1, layer1..layer4) and fine-tune the rest; 0 fine-tunes everything")
    add("--bn-mode", choices=models.BN_MODES, default="frozen",
        help="BatchNorm layers that train: train (batch statistics), frozen (ImageNet running statistics kept, "
             "affine weights train), frozen-affine (statistics and affine weights fixed)")
    add("--backbone-lr-mult", type=float, default=1.0, help="backbone lr = --lr times this, when fine-tuning")
    add("--layer-decay", type=float, default=1.0, metavar="D",
        help="layer-wise lr decay: each backbone stage's lr is D times the one above it (the last stage gets "
             "D x --backbone-lr-mult x --lr); 1 = off")
    add("--lp-epochs", type=int, default=None, metavar="N",
        help=f"LP-FT: first train the new head for N epochs on cached frozen features (one feature pass), then "
             f"fine-tune from that head for --epochs; both phases in one run folder. 0: fine-tune from a random "
             f"head, which at the fine-tuning lr measured 0.355 test in 3 epochs against LP-FT's 0.881 (BENCHMARKS.md) "
             f"(default: {LP_EPOCHS} when fine-tuning)")
    add("--lp-optimizer", choices=["sgd", "adamw"], default=PROBE["optimizer"], help="optimizer of the linear-probe phase")
    add("--lp-lr", type=float, default=PROBE["lr"], help="peak lr of the linear-probe phase (cosine schedule)")
    add("--dropout", type=float, default=0.0, help="dropout before the new head")
    add("--img-size", type=int, default=224, help="training and evaluation crop size in pixels")
    add("--aug", type=bird_loaders.BIRD_AUG, default="rrc,flip",
        help=f"training augmentation (rrc: random-resized crop): {bird_loaders.BIRD_AUG.help()}")
    add("--rrc-min-scale", type=float, default=0.25, help="smallest area fraction a random-resized crop keeps")
    add("--loader", choices=bird_loaders.LOADERS, default="auto", help=bird_loaders.LOADER_HELP)
    add("--workers", type=int, default=None,
        help="PIL decoding processes (torch) or DALI threads (dali) per process; on a CUDA device nvjpeg and dali "
             "also read the files in min(4, N) processes; default: this process's share of the CPU cores, at most 16")
    add("--max-bad-frac", type=float, default=0.05, help="refuse the data when more than this fraction of images is broken")
    add("--tta", type=engine.TTA, nargs="?", const="flip", default="none",
        help="test-time augmentation for the CSV: none, flip, or flip,shift (softmax averaged over the views)")
    flags.add_training_args(parser, RECIPE)
    if parser.parse_known_args(argv)[0].freeze_backbone:  # a frozen run is a linear probe: the probe's defaults
        parser.set_defaults(**PROBE)
    args = parser.parse_args(argv)
    if args.cache_features is None:
        args.cache_features = args.freeze_backbone
    args.epochs_cap = flags.epochs_cap(args, argv)
    return args


def load_samples(args):
    if args.dataset == "cub2011":
        return bird_data.load_cub(data.find_or_download_cub(args.data_dir, args.download), args.crop_boxes)
    if args.download:
        raise flags.UsageError("--download fetches CUB-200-2011 only; use --dataset cub2011")
    return bird_data.load_image_folder(args.data_dir)


def build_model(args, num_classes):
    pretrained = args.weights == "imagenet"
    try:
        model = models.TransferNet(args.arch, num_classes, args.dropout, args.freeze_backbone, pretrained,
                                   args.freeze_stages, args.bn_mode)
    except ValueError as e:
        raise flags.UsageError(str(e)) from None
    except (OSError, RuntimeError) as e:  # hub/download failures when offline
        if not pretrained:
            raise
        raise flags.UsageError(f"could not fetch ImageNet weights for {args.arch} ({type(e).__name__}); "
                                f"connect to the internet once, or pass --weights PATH to a local state dict") from None
    if args.weights not in ("imagenet", "none"):
        if not Path(args.weights).is_file():
            raise flags.UsageError(f"--weights {args.weights} is neither imagenet, none, nor an existing file")
        models.load_backbone_weights(model.backbone, args.weights)
    return model


@torch.inference_mode()
def extract_features(model, loader, device, amp, progress=False, desc="features"):
    from tqdm import tqdm
    model.eval()
    feats, labels = [], []
    for x, y in tqdm(loader, desc=desc, disable=not (progress and sys.stderr.isatty()), leave=False, unit="batch"):
        with devices.autocast(device, amp):
            feats.append(model.features(x).float())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def check_args(args):
    flags.require(0 < args.val_frac < 1, "--val-frac", args.val_frac, "between 0 and 1")
    flags.require(args.img_size >= 16, "--img-size", args.img_size, ">= 16")
    flags.require(args.backbone_lr_mult >= 0, "--backbone-lr-mult", args.backbone_lr_mult, ">= 0")
    flags.require(0 < args.rrc_min_scale <= 1, "--rrc-min-scale", args.rrc_min_scale, "in (0, 1]")
    flags.require(args.workers is None or args.workers >= 0, "--workers", args.workers, ">= 0")
    if args.cache_features and not args.freeze_backbone:
        raise flags.UsageError("--cache-features needs --freeze-backbone (a training backbone changes its features)")
    if args.lp_epochs is None:
        args.lp_epochs = 0 if args.freeze_backbone else LP_EPOCHS
    flags.require(args.freeze_stages >= 0, "--freeze-stages", args.freeze_stages, ">= 0")
    flags.require(args.lp_epochs >= 0, "--lp-epochs", args.lp_epochs, ">= 0")
    flags.require(0 < args.layer_decay <= 1, "--layer-decay", args.layer_decay, "in (0, 1]")
    flags.require(args.lp_lr > 0 and math.isfinite(args.lp_lr), "--lp-lr", args.lp_lr, "a positive number")
    if args.freeze_backbone and (args.freeze_stages or args.lp_epochs):
        raise flags.UsageError("--freeze-backbone already freezes every stage and trains only the head; drop "
                                "--freeze-stages/--lp-epochs, or drop --freeze-backbone to fine-tune")
    args.aug_set = sorted(bird_loaders.BIRD_AUG.names(args.aug))


def describe(args):
    """How much of the backbone trains, in words (titles, the architecture file)."""
    if args.freeze_backbone:
        return "frozen backbone"
    what = f"stem + {args.freeze_stages} stages frozen" if args.freeze_stages else "fine-tuned whole"
    extras = [f"BatchNorm {args.bn_mode}" if args.bn_mode != "train" else "",
              f"layer decay {args.layer_decay}" if args.layer_decay != 1 else "",
              f"after a {args.lp_epochs}-epoch linear probe" if args.lp_epochs else ""]
    return ", ".join([what, *filter(None, extras)])


def run(argv=None):
    t_start, budget_start = time.perf_counter(), engine.now()  # the run's wall clock; --time-budget counts from here
    args = parse_args(argv)
    check_args(args)
    device = devices.pick_device(args.device)
    devices.device_defaults(args, device)  # --amp, --compile, --channels-last left unset: from the device
    devices.set_determinism(args.deterministic)  # the process-wide cuDNN, TF32 and deterministic-kernel flags
    rank, world = devices.setup_distributed(device)
    train_all, test_samples, classes = load_samples(args)
    train_all, skipped = bird_data.drop_bad_images(train_all, args.max_bad_frac, "training images")
    if not train_all:
        raise data.DataError(f"{args.data_dir} has no readable training images")
    train_idx, val_idx = data.stratified_split([s[1] for s in train_all], val_frac=args.val_frac, seed=args.split_seed)
    train_samples, val_samples = [train_all[i] for i in train_idx], [train_all[i] for i in val_idx]
    flags.check_training_args(args, len(train_samples))
    out, lp_dir = Path(args.out), Path(args.out) / "lp"
    engine.prepare_run_dir(out, engine.run_config(args, {"data": args.dataset, "classes": len(classes)}),
                           args.resume, args.force, rank)
    if args.force and devices.is_main(rank) and lp_dir.exists():
        shutil.rmtree(lp_dir)
    devices.barrier()
    clock = engine.WallClock(out, args.resume, start=t_start)  # wall time over every process of this run

    engine.seed_everything(args.seed, rank=0)
    model = build_model(args, len(classes)).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    mean, std = model.mean, model.std
    loader_kind = bird_loaders.default_loader(device) if args.loader == "auto" else args.loader
    common = dict(mean=mean, std=std, device=device, workers=args.workers, rank=rank, world=world,
                  channels_last=args.channels_last, scale=(args.rrc_min_scale, 1.0))
    eval_batch = max(args.batch_size, 64 // world * world)
    train_aug = () if args.cache_features else args.aug_set
    train = bird_loaders.bird_loader(loader_kind, train_samples, args.img_size, args.batch_size, True, aug=train_aug,
                             seed=args.seed, **common)
    val = bird_loaders.bird_loader(loader_kind, val_samples, args.img_size, eval_batch, False, **common)
    test = bird_loaders.bird_loader(loader_kind, test_samples, args.img_size, eval_batch, False, keep_broken=True,
                            **{**common, "rank": 0, "world": 1})
    trainable, total = models.count_parameters(model, trainable_only=True), models.count_parameters(model)
    if devices.is_main(rank):
        run_files.atomic_write_text(out / "architecture.md", models.architecture_markdown(
            model, f"{args.arch} ({describe(args)})", (1, 3, args.img_size, args.img_size)))
        print(f"{args.arch}, {describe(args)}: {trainable:,} of {total:,} parameters train "
              f"({100 * trainable / total:.1f}%) on {device}; loader {loader_kind}; "
              f"{len(classes)} classes, train {len(train_samples)}, val {len(val_samples)}, test {len(test_samples)}"
              f"{f', skipped {len(skipped)} broken' if skipped else ''}; amp={args.amp} compile={args.compile}")

    def cache(splits):
        """The frozen backbone's features of each split (centre crops, no augmentation), as device loaders."""
        t0 = time.perf_counter()
        sources = {"train": bird_loaders.bird_loader(loader_kind, train_samples, args.img_size, eval_batch, False,
                                             **{**common, "rank": 0, "world": 1}), "val": val, "test": test}
        feats = {name: extract_features(model, sources[name], device, args.amp, not args.quiet, f"caching {name}")
                 for name in splits}
        seconds = time.perf_counter() - t0
        if devices.is_main(rank):
            print(f"cached {sum(len(f[0]) for f in feats.values())} feature vectors in {seconds:.1f}s")
        loaders = {name: data.DeviceLoader(*feats[name], eval_batch) for name in splits if name != "train"}
        loaders["train"] = data.DeviceLoader(*feats["train"], args.batch_size, shuffle=True, seed=args.seed,
                                             drop_last=len(train_samples) > args.batch_size, rank=rank, world=world)
        return loaders, seconds

    model_config = {"kind": "transfer", "arch": args.arch, "num_classes": len(classes), "dropout": args.dropout,
                    "freeze_backbone": args.freeze_backbone, "freeze_stages": args.freeze_stages,
                    "bn_mode": args.bn_mode}
    data_config = {"dataset": args.dataset, "img_size": args.img_size, "mean": list(mean), "std": list(std),
                   "crop_boxes": args.crop_boxes}
    head_only = [{"params": list(model.head.parameters()), "lr_mult": 1.0}]
    cache_seconds, prior, lp_info = None, [], {}

    # ----------------------------------------------------------------------------- phase 1: linear probe (LP-FT)
    # The head alone on cached features of the frozen network, in OUT/lp/ (its own last.pt, so a run killed here
    # resumes here); then the fine-tuning below starts from its best head.
    if args.lp_epochs:
        if not (lp_dir / "final.json").is_file():
            loaders, cache_seconds = cache(("train", "val"))
            lp_args = argparse.Namespace(**{**vars(args), "epochs": args.lp_epochs, "optimizer": args.lp_optimizer,
                                            "lr": args.lp_lr, "schedule": "cosine", "warmup": 0.0, "ema": 0.0,
                                            "mixup": 0.0, "cutmix": 0.0, "compile": False, "time_budget": None})
            grads = {p: p.requires_grad for p in model.backbone.parameters()}
            model.backbone.requires_grad_(False)  # unused by cached features; DDP requires every trainable one used
            engine.seed_everything(args.seed, rank)
            summary = engine.fit(model, loaders["train"], loaders["val"], lp_args, lp_dir, model_config, data_config,
                                 device, rank, world, param_groups=head_only, title=f"birds {args.arch} linear probe",
                                 phase="lp", clock=clock, board_dir=out)
            for p, flag in grads.items():
                p.requires_grad_(flag)
            if devices.is_main(rank):
                run_files.atomic_write_text(lp_dir / "final.json", json.dumps(
                    {"best_val_acc": summary["best_val_acc"], "best_epoch": summary["best_epoch"],
                     "train_seconds": summary["train_seconds"], "cache_seconds": cache_seconds}, indent=2) + "\n")
            devices.barrier()
        lp_info = json.loads((lp_dir / "final.json").read_text())
        prior = engine.load_checkpoint(lp_dir / "last.pt")["history"]
        if not (args.resume and (out / "last.pt").exists()):  # fine-tuning starts here: from the probe's best head
            model.load_state_dict(engine.load_checkpoint(lp_dir / "best.pt")["model"])
            start_loss, start_acc = engine.evaluate(model, val, device, args.amp)
            if devices.is_main(rank):
                print(f"linear probe: best val acc {lp_info['best_val_acc']:.4f}; the whole network with that head: "
                      f"val acc {start_acc:.4f}; fine-tuning starts")
                run_files.atomic_write_text(lp_dir / "handover.json", json.dumps(
                    {"val_loss": start_loss, "val_acc": start_acc}, indent=2) + "\n")
            devices.barrier()
        lp_info["ft_start_val_acc"] = json.loads((lp_dir / "handover.json").read_text())["val_acc"]

    # ----------------------------------------------------------------------------- phase 2: train (head, or fine-tune)
    if args.cache_features:
        loaders, cache_seconds = cache(("train", "val", "test"))
        train, val, test = loaders["train"], loaders["val"], loaders["test"]
    param_groups = head_only if args.freeze_backbone else model.param_groups(args.backbone_lr_mult, args.layer_decay)
    engine.seed_everything(args.seed, rank)
    tta = () if args.cache_features else engine.TTA.names(args.tta)  # the test CSV's views (cached features: none)
    views = engine.tta_view_count(tta)
    summary = engine.fit(model, train, val, args, out, model_config, data_config, device, rank, world,
                         param_groups=param_groups, title=f"birds {args.arch}: {describe(args)}",
                         phase="lp" if args.freeze_backbone else "ft", prior_history=prior, clock=clock,
                         final_images=len(test_samples) * views + len(val_samples), budget_start=budget_start)

    if devices.is_main(rank):
        engine.load_best(model, out)
        test_probs = engine.predict_probs(model, test, device, args.amp, tta, not args.quiet, "test")
        test_acc = run_files.write_predictions(out / "submission.csv", *test_probs)
        if world > 1 and not args.cache_features:  # rank 0 analyses all of validation, not its shard
            val = bird_loaders.bird_loader(loader_kind, val_samples, args.img_size, eval_batch, False,
                                   **{**common, "rank": 0, "world": 1})
        run_files.write_error_analysis(out, classes, engine.predict_probs(model, val, device, args.amp,
                                                                       progress=not args.quiet, desc="val"), test_probs)
        final = run_files.finish(out, summary, model, test_acc, {
            "arch": args.arch, "freeze_backbone": args.freeze_backbone, "freeze_stages": args.freeze_stages,
            "bn_mode": args.bn_mode, "layer_decay": args.layer_decay, "lp_epochs": args.lp_epochs,
            "lp_val_acc": lp_info.get("best_val_acc"), "ft_start_val_acc": lp_info.get("ft_start_val_acc"),
            "lp_seconds": lp_info.get("train_seconds"), "loader": loader_kind,
            "cache_seconds": cache_seconds if cache_seconds is not None else lp_info.get("cache_seconds"),
            "wall_seconds": round(clock.seconds(), 2), "skipped_images": skipped,
            "device": devices.device_name(device), "world": world, "train_size": len(train_samples),
            "val_size": len(val_samples), "test_size": len(test_samples), "num_classes": len(classes)})
        print(f"best val acc {final['best_val_acc']:.4f} (epoch {final['best_epoch']}), test acc "
              f"{'n/a' if test_acc is None else f'{test_acc:.4f}'}; wrote {out}/submission.csv")


if __name__ == "__main__":
    engine.cli(run)
