"""Transfer learning on Caltech-UCSD Birds: an ImageNet backbone with a new dropout + linear head, as a frozen
feature extractor, frozen up to some depth, or fine-tuned whole after a linear probe (LP-FT, the default).

    python finetune_birds.py --freeze-backbone          # linear probe: the backbone once over the data, then the head
    python finetune_birds.py                            # LP-FT: that probe, then the whole network fine-tuned
    python finetune_birds.py --freeze-stages 2 --layer-decay 0.7   # stem + 2 stages frozen; lr x0.7 per stage down
    python finetune_birds.py --arch tf_efficientnet_lite0 --weights ../shared/weights/tf_efficientnet_lite0_in1k.pth \
        --data-dir ../shared/data/CUB_200_2011_subset100 --img-size 160
    torchrun --nproc_per_node=4 finetune_birds.py ...   # DistributedDataParallel

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
import checkpoints
import data
import devices
import engine
import flags
import models
import run_files

# ----------------------------------------------------------------------------- the recipe
# Every default of a training flag, in one table (as airbench's `hyp`): LP-FT, the study's winner (BENCHMARKS.md,
# "Birds: how to fine-tune"). A 10-epoch linear probe on cached features (PROBE below), then the whole network with
# BatchNorm statistics frozen, SGD lr 1e-3 for head and backbone alike, cosine, no warm-up, random-resized crops and
# flips at 224 px. Flags given on the command line override it.
RECIPE = dict(
    arch="resnet50", weights="imagenet", dropout=0.0, bn_mode="frozen", freeze_stages=0, backbone_lr_mult=1.0,
    layer_decay=1.0, lp_epochs=None,  # None: PROBE's epochs when fine-tuning, 0 with --freeze-backbone
    img_size=224, aug="rrc,flip", rrc_min_scale=0.25, val_frac=0.1, split_seed=0, tta="none",  # data
    epochs=15, batch_size=64, accum_steps=1, optimizer="sgd", lr=1e-3, momentum=0.9, nesterov=False, wd=1e-4,  # optimisation
    schedule="cosine", warmup=0.0, time_budget=None,
    label_smoothing=0.0, ema=0.0, ema_warmup=True, mixup=0.0, cutmix=0.0, mix_prob=1.0,  # regularisation
    cache_features=None,  # None: with --freeze-backbone
    out="runs/birds",
)
# The linear probe, as differences from RECIPE: the first phase of LP-FT, and what --freeze-backbone trains by default
# (SGD at the fine-tuning lr barely moves a new head). It trains on cached features: no compile, no budget of its own.
PROBE = dict(epochs=10, optimizer="adamw", lr=1e-3, cache_features=True)


def parse_args(argv=None):
    parser = flags.ArgumentParser(__doc__)
    d = parser.add_argument_group("data").add_argument
    d("--data-dir", default="data/CUB_200_2011", help="CUB_200_2011 root (or its parent), or a train/ test/ tree")
    d("--dataset", choices=["cub2011", "folder"], default="cub2011",
      help="cub2011: official text files; folder: ImageFolder-style train/ and test/ (e.g. CUB-200-2010)")
    d("--download", action="store_true", help="fetch the official CUB-200-2011 archive into --data-dir if missing")
    d("--crop-boxes", action="store_true", help="crop each image to its bounding_boxes.txt box")
    d("--val-frac", type=float, default=RECIPE["val_frac"], help="fraction of each class's training images kept for validation")
    d("--split-seed", type=int, default=RECIPE["split_seed"], help="seed of the train/validation split")
    d("--img-size", type=int, default=RECIPE["img_size"], help="training and evaluation crop size in pixels")
    d("--aug", type=bird_loaders.BIRD_AUG, default=RECIPE["aug"],
      help=f"training augmentation (rrc: random-resized crop): {bird_loaders.BIRD_AUG.help()}")
    d("--rrc-min-scale", type=float, default=RECIPE["rrc_min_scale"], help="smallest area fraction a random-resized crop keeps")
    d("--loader", choices=bird_loaders.LOADERS, default="auto", help=bird_loaders.LOADER_HELP)
    d("--workers", type=int, default=None,
      help="PIL decoding processes (torch) or DALI threads (dali) per process; on a CUDA device nvjpeg and dali "
           "also read the files in min(4, N) processes; unset: this process's share of the CPU cores, at most 16")
    d("--max-bad-frac", type=float, default=0.05, help="refuse the data when more than this fraction of images is broken")
    m = parser.add_argument_group("model and transfer").add_argument
    m("--arch", default=RECIPE["arch"],
      help="torchvision resnet18|resnet34|resnet50|resnet101, or a timm model name (timm:NAME or plain)")
    m("--weights", default=RECIPE["weights"],
      help="imagenet (torchvision/timm download and cache), none (random init), or a local state-dict file")
    m("--freeze-backbone", action="store_true",
      help=f"train the head only; backbone frozen, BatchNorm in eval mode. The defaults then become the linear "
           f"probe's: --epochs {PROBE['epochs']} --optimizer {PROBE['optimizer']} --lr {PROBE['lr']:g}, features "
           f"cached (flags given still win)")
    m("--cache-features", action=argparse.BooleanOptionalAction, default=RECIPE["cache_features"],
      help="with --freeze-backbone: run the backbone once over every image (no augmentation) and train the head on "
           "the stored features; --no-cache-features trains on augmented images, as slow as fine-tuning (unset: on "
           "with --freeze-backbone)")
    m("--freeze-stages", type=int, default=RECIPE["freeze_stages"], metavar="K",
      help="freeze the stem and the first K stages of the backbone (timm's stage grouping; torchvision ResNets: "
           "conv1/bn1, layer1..layer4) and fine-tune the rest; 0 fine-tunes everything")
    m("--backbone-lr-mult", type=float, default=RECIPE["backbone_lr_mult"], help="backbone lr = --lr times this")
    m("--bn-mode", choices=models.BN_MODES, default=RECIPE["bn_mode"],
      help="BatchNorm layers that train: train (batch statistics), frozen (ImageNet running statistics kept, "
           "affine weights train), frozen-affine (statistics and affine weights fixed)")
    m("--layer-decay", type=float, default=RECIPE["layer_decay"], metavar="D",
      help="layer-wise lr decay: each backbone stage's lr is D times the one above it (the last stage gets "
           "D x --backbone-lr-mult x --lr); 1 = off")
    m("--lp-epochs", type=int, default=RECIPE["lp_epochs"], metavar="N",
      help=f"LP-FT: first train the new head for N epochs on cached frozen features (one feature pass), then "
           f"fine-tune from that head for --epochs; both phases in one run folder. 0: fine-tune from a random "
           f"head (unset: {PROBE['epochs']} when fine-tuning, 0 with --freeze-backbone)")
    m("--lp-optimizer", choices=["sgd", "adamw"], default=PROBE["optimizer"], help="optimizer of the linear-probe phase")
    m("--lp-lr", type=float, default=PROBE["lr"], help="peak lr of the linear-probe phase (cosine schedule)")
    m("--dropout", type=float, default=RECIPE["dropout"], help="dropout before the new head")
    m("--tta", type=engine.TTA, nargs="?", const="flip", default=RECIPE["tta"],
      help="test-time augmentation for the CSV: none, flip, or flip,shift (softmax averaged over the views)")
    flags.add_training_args(parser, RECIPE)
    if parser.parse_known_args(argv)[0].freeze_backbone:  # a frozen run is a linear probe: the probe's defaults
        parser.set_defaults(**PROBE)
    return parser.parse_args(argv)


def resolve(args, argv=None):
    """Every setting derived from the flags, in one place (config.json records the result); returns the device."""
    if args.cache_features is None:
        args.cache_features = args.freeze_backbone
    if args.lp_epochs is None:
        args.lp_epochs = 0 if args.freeze_backbone else PROBE["epochs"]
    args.epochs_given = flags.given(argv, "--epochs")  # a resumed run keeps its length unless --epochs is given
    args.epochs_cap = flags.epochs_cap(args)  # an --epochs given with --time-budget caps its choice
    args.aug_set = sorted(bird_loaders.BIRD_AUG.names(args.aug))
    flags.require(0 < args.val_frac < 1, "--val-frac", args.val_frac, "between 0 and 1")
    flags.require(args.img_size >= 16, "--img-size", args.img_size, ">= 16")
    flags.require(args.backbone_lr_mult >= 0, "--backbone-lr-mult", args.backbone_lr_mult, ">= 0")
    flags.require(0 < args.rrc_min_scale <= 1, "--rrc-min-scale", args.rrc_min_scale, "in (0, 1]")
    flags.require(args.workers is None or args.workers >= 0, "--workers", args.workers, ">= 0")
    flags.require(args.freeze_stages >= 0, "--freeze-stages", args.freeze_stages, ">= 0")
    flags.require(args.lp_epochs >= 0, "--lp-epochs", args.lp_epochs, ">= 0")
    flags.require(0 < args.layer_decay <= 1, "--layer-decay", args.layer_decay, "in (0, 1]")
    flags.require(args.lp_lr > 0 and math.isfinite(args.lp_lr), "--lp-lr", args.lp_lr, "a positive number")
    if args.cache_features and not args.freeze_backbone:
        raise flags.UsageError("--cache-features needs --freeze-backbone (a training backbone changes its features)")
    if args.freeze_backbone and (args.freeze_stages or args.lp_epochs):
        raise flags.UsageError("--freeze-backbone already freezes every stage and trains only the head; drop "
                               "--freeze-stages/--lp-epochs, or drop --freeze-backbone to fine-tune")
    device = devices.pick_device(args.device)
    devices.device_defaults(args, device)  # --amp, --compile, --channels-last left unset: from the device
    return device


def describe(args):
    """How much of the backbone trains, in words (titles, the architecture file)."""
    if args.freeze_backbone:
        return "frozen backbone"
    what = f"stem + {args.freeze_stages} stages frozen" if args.freeze_stages else "fine-tuned whole"
    extras = [f"BatchNorm {args.bn_mode}" if args.bn_mode != "train" else "",
              f"layer decay {args.layer_decay}" if args.layer_decay != 1 else "",
              f"after a {args.lp_epochs}-epoch linear probe" if args.lp_epochs else ""]
    return ", ".join([what, *filter(None, extras)])


# ----------------------------------------------------------------------------- data and model

def load_splits(args):
    """{train, val, test: [(path, label, box)]}, the class names and the broken training files skipped."""
    if args.dataset == "cub2011":
        train_all, test, classes = bird_data.load_cub(data.find_or_download_cub(args.data_dir, args.download),
                                                      args.crop_boxes)
    elif args.download:
        raise flags.UsageError("--download fetches CUB-200-2011 only; use --dataset cub2011")
    else:
        train_all, test, classes = bird_data.load_image_folder(args.data_dir)
    train_all, skipped = bird_data.drop_bad_images(train_all, args.max_bad_frac, "training images")
    if not train_all:
        raise data.DataError(f"{args.data_dir} has no readable training images")
    train_idx, val_idx = data.stratified_split([s[1] for s in train_all], val_frac=args.val_frac, seed=args.split_seed)
    splits = {"train": [train_all[i] for i in train_idx], "val": [train_all[i] for i in val_idx], "test": test}
    return splits, classes, skipped


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


def image_loaders(args, model, device, splits, rank, world):
    """A function that makes a loader of one split's images (training: this rank's shard, augmented; evaluation: the
    centre crop, `whole` for every image on this rank), the loader kind, and the loaders of the three splits."""
    kind = bird_loaders.default_loader(device) if args.loader == "auto" else args.loader
    # evaluation in batches of at least 64; with --accum-steps in the training micro-batches (they fit)
    eval_batch = max(args.batch_size, 64 // world * world) if args.accum_steps == 1 else data.micro_batch(args, world)

    def loader(split, train=False, whole=False):
        return bird_loaders.bird_loader(
            kind, splits[split], args.img_size, args.batch_size if train else eval_batch, train,
            model.mean, model.std, device, aug=args.aug_set if train and not args.cache_features else (),
            seed=args.seed if train else 0, workers=args.workers, rank=0 if whole else rank, world=1 if whole else world,
            channels_last=args.channels_last, scale=(args.rrc_min_scale, 1.0), keep_broken=split == "test")
    return loader, kind, {"train": loader("train", train=True), "val": loader("val"), "test": loader("test", whole=True)}


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


def cache_features(model, args, device, make_loader, loaders, names):
    """The frozen backbone's features of each named split (centre crops, no augmentation) as device loaders, and the
    seconds it took. Training and validation features are taken from every image on each rank, then sharded like
    images; `val_all` keeps all of validation for rank 0's error analysis."""
    t0 = time.perf_counter()
    whole = {"train": make_loader("train", whole=True)}
    if loaders["val"].sampler.world > 1:  # each rank validates its share: the features of all of it, then sharded
        whole["val"] = make_loader("val", whole=True)
    sources = {**loaders, **whole}
    feats = {name: extract_features(model, sources[name], device, args.amp, not args.quiet, f"caching {name}")
             for name in names}
    for loader in whole.values():
        loader.close()
    seconds = time.perf_counter() - t0
    if devices.is_main():
        print(f"cached {sum(len(f[0]) for f in feats.values())} feature vectors in {seconds:.1f}s")
    val = loaders["val"].sampler  # validation sharded as the images are
    cached = {"test": data.DeviceLoader(*feats["test"], val.batch_size)} if "test" in names else {}
    cached["val"] = data.DeviceLoader(*feats["val"], val.batch_size, rank=val.rank, world=val.world)
    cached["val_all"] = data.DeviceLoader(*feats["val"], val.batch_size) if val.world > 1 else cached["val"]
    shard = loaders["train"].sampler  # the features train sharded as the images would
    cached["train"] = data.DeviceLoader(*feats["train"], args.batch_size, shuffle=True, seed=args.seed,
                                        drop_last=shard.n > args.batch_size, rank=shard.rank, world=shard.world)
    return cached, seconds


# ----------------------------------------------------------------------------- the two phases

def train_phase(model, args, device, out, meta, train, val, groups, start, *, title, phase, final_images=0, prior=(),
                clock=None, board_dir=None):
    """One phase of training (the probe in OUT/lp, or the main one in OUT), resumed from its own last.pt."""
    state = engine.build_state(model, args, device, meta["model_config"]["num_classes"], groups)
    progress = checkpoints.resume_or_start(out, state, args.resume, clock)
    log = run_files.EpochLog(out, title, phase, prior, board_dir=(board_dir or out) if args.tensorboard else None,
                             flags=run_files.flags_plain(args), history=progress.history)
    epochs = engine.choose_epochs(state, progress, train, val, args, out, meta, log, start, final_images)
    return engine.fit(state, progress, train, val, args, epochs, out, meta, log)


def linear_probe(model, args, device, make_loader, loaders, meta, clock):
    """LP-FT's first phase: the head alone on cached features of the frozen network, in OUT/lp/ (its own last.pt, so a
    run killed here resumes here), then the whole network with that head evaluated once. Returns the probe's figures."""
    out, lp_dir = Path(args.out), Path(args.out) / "lp"
    if not (lp_dir / "final.json").is_file():
        cached, seconds = cache_features(model, args, device, make_loader, loaders, ("train", "val"))
        lp_args = argparse.Namespace(**{**vars(args), "epochs": args.lp_epochs, "optimizer": args.lp_optimizer,
                                        "lr": args.lp_lr, "schedule": "cosine", "warmup": 0.0, "ema": 0.0,
                                        "mixup": 0.0, "cutmix": 0.0, "compile": False, "time_budget": None})
        head = [{"params": list(model.head.parameters()), "lr_mult": 1.0}]
        checkpoints.seed_everything(args.seed, loaders["train"].sampler.rank)
        with models.frozen(model.backbone):  # unused on cached features, and DDP wants every trainable one used
            summary = train_phase(model, lp_args, device, lp_dir, meta, cached["train"], cached["val"], head,
                                  engine.now(), title=f"birds {args.arch} linear probe", phase="lp", clock=clock,
                                  board_dir=out)
        if devices.is_main():
            run_files.atomic_write_text(lp_dir / "final.json", json.dumps(
                {"best_val_acc": summary["best_val_acc"], "best_epoch": summary["best_epoch"],
                 "train_seconds": summary["train_seconds"], "cache_seconds": seconds}, indent=2) + "\n")
        devices.barrier()
    info = json.loads((lp_dir / "final.json").read_text())
    info["history"] = checkpoints.load_checkpoint(lp_dir / "last.pt")["history"]
    if not (args.resume and (out / "last.pt").exists()):  # fine-tuning starts here: from the probe's best head
        checkpoints.load_best(model, lp_dir)
        loss, acc = engine.evaluate(model, loaders["val"], device, args.amp)
        if devices.is_main():
            print(f"linear probe: best val acc {info['best_val_acc']:.4f}; the whole network with that head: "
                  f"val acc {acc:.4f}; fine-tuning starts")
            run_files.atomic_write_text(lp_dir / "handover.json", json.dumps({"val_loss": loss, "val_acc": acc},
                                                                             indent=2) + "\n")
        devices.barrier()
    info["ft_start_val_acc"] = json.loads((lp_dir / "handover.json").read_text())["val_acc"]
    return info


def main(argv=None):
    t_start, start = time.perf_counter(), engine.now()  # the run's wall clock; --time-budget counts from here
    args = parse_args(argv)
    device = resolve(args, argv)
    devices.set_determinism(args.deterministic)  # the process-wide cuDNN, TF32 and deterministic-kernel flags
    rank, world = devices.setup_distributed(device)
    splits, classes, skipped = load_splits(args)
    flags.check_training_args(args, len(splits["train"]))
    out = Path(args.out)
    checkpoints.prepare_run_dir(out, checkpoints.run_config(args, {"data": args.dataset, "classes": len(classes)}),
                                args.resume, args.force)
    if args.force and devices.is_main() and (out / "lp").exists():
        shutil.rmtree(out / "lp")
    devices.barrier()
    clock = checkpoints.WallClock(out, args.resume, start=t_start)  # wall time over every process of this run

    checkpoints.seed_everything(args.seed, rank=0)  # same initial weights on every rank
    model = build_model(args, len(classes)).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    make_loader, kind, loaders = image_loaders(args, model, device, splits, rank, world)
    if devices.is_main():
        run_files.atomic_write_text(out / "architecture.md", models.architecture_markdown(
            model, f"{args.arch} ({describe(args)})", (1, 3, args.img_size, args.img_size)))
        trainable, total = models.count_parameters(model, trainable_only=True), models.count_parameters(model)
        print(f"{args.arch}, {describe(args)}: {trainable:,} of {total:,} parameters train "
              f"({100 * trainable / total:.1f}%) on {device}; loader {kind}; {len(classes)} classes, "
              f"{', '.join(f'{k} {len(v)}' for k, v in splits.items())}"
              f"{f', skipped {len(skipped)} broken' if skipped else ''}; amp={args.amp} compile={args.compile}")
    meta = {"model_config": {"kind": "transfer", "arch": args.arch, "num_classes": len(classes), "dropout": args.dropout,
                             "freeze_backbone": args.freeze_backbone, "freeze_stages": args.freeze_stages,
                             "bn_mode": args.bn_mode},
            "data_config": {"dataset": args.dataset, "img_size": args.img_size, "mean": list(model.mean),
                            "std": list(model.std), "crop_boxes": args.crop_boxes,
                            "classes": [bird_data.display_name(c) for c in classes]},  # names, in label order
            "config": run_files.flags_plain(args)}
    lp = linear_probe(model, args, device, make_loader, loaders, meta, clock) if args.lp_epochs else {}
    cache_seconds = lp.get("cache_seconds")
    if args.cache_features:
        images, (loaders, cache_seconds) = loaders, cache_features(model, args, device, make_loader, loaders,
                                                                   ("train", "val", "test"))
        for loader in images.values():
            loader.close()
    groups = ([{"params": list(model.head.parameters()), "lr_mult": 1.0}] if args.freeze_backbone
              else model.param_groups(args.backbone_lr_mult, args.layer_decay))
    checkpoints.seed_everything(args.seed, rank)
    tta = () if args.cache_features else engine.TTA.names(args.tta)  # the test CSV's views (cached features: none)
    summary = train_phase(model, args, device, out, meta, loaders["train"], loaders["val"], groups, start,
                          title=f"birds {args.arch}: {describe(args)}", phase="lp" if args.freeze_backbone else "ft",
                          final_images=len(splits["test"]) * engine.tta_view_count(tta) + len(splits["val"]),
                          prior=lp.get("history", ()), clock=clock)
    loaders["train"].close()
    if devices.is_main():
        predict_and_finish(args, model, device, make_loader, loaders, splits, classes, summary, tta, world,
                           {**lp, "cache_seconds": cache_seconds, "kind": kind, "skipped": skipped, "clock": clock})


def predict_and_finish(args, model, device, make_loader, loaders, splits, classes, summary, tta, world, extra):
    """The best model (best.pt) predicts the test CSV and all of validation (the error analysis); final.json."""
    out = Path(args.out)
    checkpoints.load_best(model, out)
    test_probs = engine.predict_probs(model, loaders["test"], device, args.amp, tta, not args.quiet, "test")
    test_acc = run_files.write_predictions(out / "submission.csv", *test_probs)
    val = (loaders["val"] if world == 1 else loaders["val_all"] if "val_all" in loaders  # all of validation
           else make_loader("val", whole=True))
    names = [bird_data.display_name(c) for c in classes]
    run_files.write_error_analysis(out, names, engine.predict_probs(model, val, device, args.amp, progress=not args.quiet,
                                                                    desc="val"), test_probs)
    for loader in (val, *loaders.values()):
        loader.close()
    final = run_files.finish(out, summary, model, test_acc, {
        "arch": args.arch, "freeze_backbone": args.freeze_backbone, "freeze_stages": args.freeze_stages,
        "bn_mode": args.bn_mode, "layer_decay": args.layer_decay, "lp_epochs": args.lp_epochs,
        "lp_val_acc": extra.get("best_val_acc"), "ft_start_val_acc": extra.get("ft_start_val_acc"),
        "lp_seconds": extra.get("train_seconds"), "loader": extra["kind"], "cache_seconds": extra["cache_seconds"],
        "wall_seconds": round(extra["clock"].seconds(), 2), "skipped_images": extra["skipped"],
        "device": devices.device_name(device), "world": world, "train_size": len(splits["train"]),
        "val_size": len(splits["val"]), "test_size": len(splits["test"]), "num_classes": len(classes)})
    print(f"best val acc {final['best_val_acc']:.4f} (epoch {final['best_epoch']}), test acc "
          f"{'n/a' if test_acc is None else f'{test_acc:.4f}'}; wrote {out}/submission.csv")


if __name__ == "__main__":
    engine.cli(main)
