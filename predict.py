"""Write the competition CSV ("Id","Prediction1") for the test set from saved checkpoints: one, or an
ensemble of several (their softmax averaged), each with optional test-time augmentation.

    python predict.py runs/cifar/best.pt --data-dir data --out submission.csv --tta flip,shift
    python predict.py runs/final/seed*/best.pt --data-dir data --out ensemble.csv --tta flip
    python predict.py runs/birds/best.pt --data-dir data/CUB_200_2011 --out birds.csv

Each checkpoint says which network and which preprocessing it needs (CIFAR-100 or birds); it is loaded
with weights_only=True, to the CPU. Test accuracy is printed where the test labels are real.
"""
import argparse

import torch

import data
import engine
import models


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+", metavar="checkpoint",
                        help="best.pt (or last.pt) written by train_cifar.py or finetune_birds.py; several: an ensemble "
                             "(same data set and preprocessing), softmax averaged")
    parser.add_argument("--data-dir", required=True, help="the data set the checkpoint was trained for")
    parser.add_argument("--out", required=True, help="CSV file to write")
    parser.add_argument("--tta", nargs="?", const="flip", default="none",
                        help="test-time augmentation: none, flip, or flip,shift (mirror and one-pixel shifts)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    parser.add_argument("--loader", choices=["auto", "dali", "torch"], default="auto", help="bird image loader")
    parser.add_argument("--workers", type=int, default=2, help="decoding workers for bird images")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: on for CUDA)")
    return parser.parse_args(argv)


def test_loader(ckpt, args, device):
    """The checkpoint's own test-time preprocessing over the test split of --data-dir; returns (loader, classes)."""
    cfg = ckpt.get("data_config") or {}
    if cfg.get("dataset") == "cifar100":
        cifar = data.load_cifar100(args.data_dir)
        x = torch.from_numpy(cifar["test_x"]).to(device)
        y = torch.from_numpy(cifar["test_y"]).to(device)
        return data.DeviceLoader(x, y, args.batch_size, mean=cfg["mean"], std=cfg["std"]), len(cifar["classes"])
    if cfg.get("dataset") in ("cub2011", "folder"):
        if cfg["dataset"] == "cub2011":
            _, test, classes = data.load_cub(args.data_dir, cfg.get("crop_boxes", False))
        else:
            _, test, classes = data.load_image_folder(args.data_dir)
        loader = data.bird_loader(args.loader, test, cfg["img_size"], args.batch_size, False, cfg["mean"], cfg["std"],
                                  device, workers=args.workers, keep_broken=True)
        return loader, len(classes)
    raise engine.UsageError(f"{args.checkpoints[0]} does not say which data set it was trained on")


def load_model(ckpt, path, device, num_classes, data_dir):
    """The checkpoint's network on the device (checkpoints are loaded to the CPU; load_state_dict moves them)."""
    if ckpt["model_config"].get("num_classes") != num_classes:
        raise engine.UsageError(f"{path} predicts {ckpt['model_config'].get('num_classes')} classes but "
                                f"{data_dir} has {num_classes}: checkpoint and data set do not match")
    model = models.build_model(ckpt["model_config"]).to(device)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1:2] or [""]
        raise engine.UsageError(f"{path} holds weights of a different model than its config "
                                f"describes ({first[0].strip()})") from None
    return model


def run(argv=None):
    args = parse_args(argv)
    if args.batch_size < 1:
        raise engine.UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    tta = engine.parse_tta(args.tta)
    device = engine.pick_device(args.device)
    amp = device.type == "cuda" if args.amp is None else args.amp
    first = engine.load_checkpoint(args.checkpoints[0])
    loader, num_classes = test_loader(first, args, device)
    probs, labels = None, None
    for i, path in enumerate(args.checkpoints):
        ckpt = first if i == 0 else engine.load_checkpoint(path)
        if ckpt.get("data_config") != first.get("data_config"):
            raise engine.UsageError(f"{path} was trained with other preprocessing than {args.checkpoints[0]}; "
                                    f"an ensemble needs the same data set and normalisation")
        model = load_model(ckpt, path, device, num_classes, args.data_dir)
        p, labels = engine.predict_probs(model, loader, device, amp, tta)
        probs = p if probs is None else probs + p
    test_acc = engine.write_predictions(args.out, probs / len(args.checkpoints), labels)
    what = f"an ensemble of {len(args.checkpoints)} checkpoints" if len(args.checkpoints) > 1 else "one checkpoint"
    print(f"wrote {loader.sampler.n} predictions from {what} to {args.out}"
          + ("" if test_acc is None else f"; test accuracy {test_acc:.4f}"))


if __name__ == "__main__":
    engine.cli(run)
