"""Write the competition CSV ("Id","Prediction1") for the test set from saved checkpoints: one, or an
ensemble of several (their softmax averaged), each with optional test-time augmentation.

    python predict.py runs/cifar/best.pt --data-dir data --out submission.csv --tta flip,shift
    python predict.py runs/final/seed*/best.pt --data-dir data --out ensemble.csv --tta flip
    python predict.py runs/birds/best.pt --data-dir data/CUB_200_2011 --out birds.csv
    python predict.py runs/basenet/best.pt runs/d8/best.pt --data-dir data --out mixed.csv  # any two CIFAR models

Each checkpoint says which network and which preprocessing it needs (CIFAR-100 or birds; its normalisation and
image size), and each member of an ensemble is evaluated through its own; they must share the data set and its
classes. Checkpoints are loaded with weights_only=True, to the CPU. Test accuracy is printed where the test labels are real.
"""
import argparse
import json

import torch

import bird_data
import bird_loaders
import checkpoints
import data
import devices
import engine
import flags
import run_files
import models


def parse_args(argv=None):
    parser = flags.ArgumentParser(__doc__)
    parser.add_argument("checkpoints", nargs="+", metavar="checkpoint",
                        help="best.pt (or last.pt) written by train_cifar.py or finetune_birds.py; several: an ensemble "
                             "(same data set and classes; each through its own preprocessing: normalisation, image "
                             "size), softmax averaged")
    parser.add_argument("--data-dir", required=True, help="the data set the checkpoint was trained for")
    parser.add_argument("--out", required=True, help="CSV file to write")
    parser.add_argument("--tta", type=engine.TTA, nargs="?", const="flip", default="none",
                        help="test-time augmentation: none, flip, or flip,shift (mirror and one-pixel shifts)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    parser.add_argument("--loader", choices=bird_loaders.LOADERS, default="auto", help="bird image loader; " + bird_loaders.LOADER_HELP)
    parser.add_argument("--workers", type=int, default=None,
                        help="decoding workers for bird images; default: this process's share of the CPU cores, at most 16")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: on for CUDA)")
    return parser.parse_args(argv)


DATASETS = {"cifar100": "CIFAR-100", "cub2011": "CUB-200-2011", "folder": "an image folder"}


class TestSets:
    """Each checkpoint's own test-time preprocessing over the test split of --data-dir. The data set is read
    once; a loader is built once per distinct preprocessing (normalisation, image size, crop boxes), so the
    members of an ensemble may differ in all of those but must share the data set."""

    def __init__(self, args, device):
        self.args, self.device, self.loaders, self.dataset, self.first = args, device, {}, None, None
        self._cifar, self._birds = None, {}

    def loader(self, ckpt, path):
        """(loader, number of classes) for this checkpoint's data_config."""
        cfg = ckpt.get("data_config") or {}
        dataset = cfg.get("dataset")
        if dataset not in DATASETS:
            raise flags.UsageError(f"{path} does not say which data set it was trained on")
        if self.dataset is None:
            self.dataset, self.first = dataset, path
        elif dataset != self.dataset:
            raise flags.UsageError(f"{path} was trained on {DATASETS[dataset]} but {self.first} on "
                                    f"{DATASETS[self.dataset]}: an ensemble needs one data set")
        key = json.dumps(cfg, sort_keys=True)
        if key not in self.loaders:
            self.loaders[key] = self._build(cfg)
        return self.loaders[key]

    def _build(self, cfg):
        args, device = self.args, self.device
        if cfg["dataset"] == "cifar100":
            if self._cifar is None:
                cifar = data.load_cifar100(args.data_dir)
                self._cifar = (torch.from_numpy(cifar["test_x"]).to(device), torch.from_numpy(cifar["test_y"]).to(device),
                               len(cifar["classes"]))
            x, y, num_classes = self._cifar
            return data.DeviceLoader(x, y, args.batch_size, mean=cfg["mean"], std=cfg["std"]), num_classes
        boxes = cfg.get("crop_boxes", False)
        if boxes not in self._birds:
            if cfg["dataset"] == "cub2011":
                _, test, classes = bird_data.load_cub(args.data_dir, boxes)
            else:
                _, test, classes = bird_data.load_image_folder(args.data_dir)
            self._birds[boxes] = (test, len(classes))
        test, num_classes = self._birds[boxes]
        loader = bird_loaders.bird_loader(args.loader, test, cfg["img_size"], args.batch_size, False, cfg["mean"], cfg["std"],
                                  device, workers=args.workers, keep_broken=True)
        return loader, num_classes


def load_model(ckpt, path, device, num_classes, data_dir):
    """The checkpoint's network on the device (checkpoints are loaded to the CPU; load_state_dict moves them)."""
    if ckpt["model_config"].get("num_classes") != num_classes:
        raise flags.UsageError(f"{path} predicts {ckpt['model_config'].get('num_classes')} classes but "
                                f"{data_dir} has {num_classes}: checkpoint and data set do not match")
    model = models.build_model(ckpt["model_config"]).to(device)
    weights, note = checkpoints.eval_weights(ckpt)
    if note:
        print(f"{path}: predicting with {note}")
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1:2] or [""]
        raise flags.UsageError(f"{path} holds weights of a different model than its config "
                                f"describes ({first[0].strip()})") from None
    return model


def main(argv=None):
    args = parse_args(argv)
    flags.require(args.batch_size >= 1, "--batch-size", args.batch_size, "at least 1")
    flags.require(args.workers is None or args.workers >= 0, "--workers", args.workers, ">= 0")
    tta = engine.TTA.names(args.tta)
    device = devices.pick_device(args.device)
    amp = device.type == "cuda" if args.amp is None else args.amp
    sets = TestSets(args, device)
    probs, labels = None, None
    for path in args.checkpoints:  # one at a time: only one network is in memory
        ckpt = checkpoints.load_checkpoint(path)
        loader, n = sets.loader(ckpt, path)
        model = load_model(ckpt, path, device, n, args.data_dir)  # refuses a class count unlike the data set's
        p, y = engine.predict_probs(model, loader, device, amp, tta)
        if labels is not None and not torch.equal(y, labels):  # every loader lists the test split in one order
            raise flags.UsageError(f"{path} sees the test images in another order than {sets.first}")
        probs, labels = (p, y) if probs is None else (probs + p, labels)
    for loader, _ in sets.loaders.values():
        loader.close()
    test_acc = run_files.write_predictions(args.out, probs / len(args.checkpoints), labels)
    what = f"an ensemble of {len(args.checkpoints)} checkpoints" if len(args.checkpoints) > 1 else "one checkpoint"
    print(f"wrote {len(labels)} predictions from {what} to {args.out}"
          + ("" if test_acc is None else f"; test accuracy {test_acc:.4f}"))


if __name__ == "__main__":
    engine.cli(main)
