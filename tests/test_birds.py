"""finetune_birds.py on a generated CUB tree, and a real transfer-learning check on ../shared."""
import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

import bird_data
import bird_loaders
import data
import fixtures
import models
from conftest import SHARED_CUB, SHARED_WEIGHTS, run_inline, run_script

QUICK = ["--device", "cpu", "--arch", "resnet18", "--img-size", "32", "--batch-size", "4", "--val-frac", "0.25",
         "--max-bad-frac", "0.2", "--epochs", "2", "--quiet", "--workers", "0"]


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory):
    torch.manual_seed(0)
    backbone, *_ = models.make_backbone("resnet18")
    path = tmp_path_factory.mktemp("w") / "resnet18.pth"
    torch.save(backbone.state_dict(), path)
    return path


def backbone_state(run_dir):
    state = torch.load(run_dir / "last.pt", weights_only=True)["model"]
    return {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}


@pytest.fixture(scope="module")
def probe32(cub_dir, tmp_path_factory, resnet18_weights):
    """A linear probe at 32 px (the default loader), shared by the frozen-backbone and ensemble tests."""
    out = tmp_path_factory.mktemp("probe") / "s32"
    proc = run_script("finetune_birds.py", "--data-dir", cub_dir, "--weights", resnet18_weights, "--freeze-backbone",
                      "--out", out, *QUICK)
    return out, proc


@pytest.fixture(scope="module")
def finetuned(cub_dir, tmp_path_factory, resnet18_weights):
    """A whole-network fine-tune on the PIL (torch) loader, shared by the backbone and submission tests."""
    out = tmp_path_factory.mktemp("ft") / "r"
    run_script("finetune_birds.py", "--data-dir", cub_dir, "--weights", resnet18_weights, "--out", out, *QUICK,
               "--loader", "torch")
    return out


def test_frozen_backbone_stays_bit_identical(probe32, resnet18_weights):
    out, proc = probe32
    assert "skipping" in proc.stderr and "truncated" in proc.stderr  # the broken file is named, not fatal
    original = torch.load(resnet18_weights, weights_only=True)
    after = backbone_state(out)
    assert set(after) == set(original)
    assert all(torch.equal(after[k], original[k]) for k in original)  # BatchNorm running stats included
    for name in ("config.json", "metrics.csv", "best.pt", "last.pt", "final.json", "curves.png", "submission.csv",
                 "architecture.md"):
        assert (out / name).is_file(), name
    final = json.loads((out / "final.json").read_text())
    assert final["trainable_parameters"] == 512 * 3 + 3 and final["freeze_backbone"]


def test_fine_tuning_changes_the_backbone(finetuned, resnet18_weights):
    out = finetuned
    original = torch.load(resnet18_weights, weights_only=True)
    after = backbone_state(out)
    assert not torch.equal(after["conv1.weight"], original["conv1.weight"])
    assert not torch.equal(after["layer4.1.conv2.weight"], original["layer4.1.conv2.weight"])


def test_feature_cache_trains_the_same_head(clean_cub_dir, tmp_path, resnet18_weights):
    common = ["--data-dir", clean_cub_dir, "--weights", resnet18_weights, "--freeze-backbone", "--aug", "none",
              "--dropout", "0.3", "--epochs", "3", *QUICK]
    run_inline("finetune_birds.py", *common, "--out", tmp_path / "plain", "--no-cache-features")
    run_inline("finetune_birds.py", *common, "--out", tmp_path / "cached")  # the frozen default caches
    a = torch.load(tmp_path / "plain" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cached" / "last.pt", weights_only=True)["model"]
    for k in ("head.1.weight", "head.1.bias"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    ma, mb = pd.read_csv(tmp_path / "plain" / "metrics.csv"), pd.read_csv(tmp_path / "cached" / "metrics.csv")
    pd.testing.assert_series_equal(ma.train_loss, mb.train_loss, rtol=1e-4)
    pd.testing.assert_series_equal(ma.val_acc, mb.val_acc)


def _pil_logits(checkpoint, test):
    """The checkpoint's logits for the test samples, decoded with PIL one image at a time in images.txt order and
    preprocessed by hand from its data_config (image size, mean, std)."""
    ckpt = torch.load(checkpoint, weights_only=True)
    model = models.build_model(ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    cfg = ckpt["data_config"]
    images = bird_loaders.BirdImages(test, cfg["img_size"], keep_broken=True)
    mean, std = torch.tensor(cfg["mean"]).view(3, 1, 1) * 255, torch.tensor(cfg["std"]).view(3, 1, 1) * 255
    with torch.no_grad():
        return torch.cat([model(((images[(i, 0)][0].float() - mean) / std)[None]) for i in range(len(test))])


def test_submission_follows_images_txt(finetuned, cub_dir, tmp_path):
    """The CSV's rows follow images.txt; checked against PIL decoding image by image, so the run uses the PIL
    (torch) loader too: DALI's decoder differs by a few pixel levels, enough to flip a near tie."""
    out = finetuned
    _, test, _ = bird_data.load_cub(cub_dir)
    expected = _pil_logits(out / "best.pt", test).argmax(1).tolist()
    rows = (out / "submission.csv").read_text().splitlines()
    assert rows[0] == '"Id","Prediction1"'
    assert rows[1:] == [f'"{i}","{p}"' for i, p in enumerate(expected)]
    # predict.py alone reproduces it
    run_inline("predict.py", out / "best.pt", "--data-dir", cub_dir, "--out", tmp_path / "p.csv", "--device", "cpu",
               "--workers", "0", "--loader", "torch")
    assert (tmp_path / "p.csv").read_bytes() == (out / "submission.csv").read_bytes()


def test_a_broken_test_image_gets_one_warning_and_keeps_its_row(tmp_path):
    """A zero-byte test image: one warning, which says it becomes black, and its row in the CSV; a broken training
    image: one warning, which says it is skipped."""
    from fixtures import write_cub
    root = write_cub(tmp_path, num_classes=2, per_class=6, broken=False)
    train, test, _ = bird_data.load_cub(root)
    Path(test[1][0]).write_bytes(b"")
    Path(train[6][0]).write_bytes(b"")
    out = tmp_path / "r"
    proc = run_inline("finetune_birds.py", "--data-dir", root, "--download", "--weights", "none", "--out", out, *QUICK,
                      "--epochs", "1", "--lp-epochs", "1", "--max-bad-frac", "0.5")  # --download: the data is there
    for path, what in ((test[1][0], "black image for"), (train[6][0], "skipping")):
        lines = [line for line in proc.stderr.splitlines() if path in line]
        assert len(lines) == 1 and lines[0].startswith(f"warning: {what} {path}: "), proc.stderr
    assert len((out / "submission.csv").read_text().splitlines()) == 1 + len(test)


def test_predict_ensembles_birds_models_of_different_sizes(probe32, cub_dir, tmp_path, resnet18_weights):
    """Two probes at 32 and 48 px: the ensemble CSV is the argmax of their softmax averaged, each model fed its own
    image size (computed here image by image with PIL); a checkpoint of another data set is refused."""
    run_inline("finetune_birds.py", "--data-dir", cub_dir, "--weights", resnet18_weights, "--out", tmp_path / "s48",
               "--freeze-backbone", *QUICK, "--img-size", "48")
    ckpts = [probe32[0] / "best.pt", tmp_path / "s48" / "best.pt"]
    run_inline("predict.py", *ckpts, "--data-dir", cub_dir, "--out", tmp_path / "e.csv", "--device", "cpu",
               "--workers", "0", "--loader", "torch")
    _, test, _ = bird_data.load_cub(cub_dir)
    probs = sum(_pil_logits(path, test).softmax(1) for path in ckpts)
    rows = (tmp_path / "e.csv").read_text().splitlines()
    assert rows[1:] == [f'"{i}","{p}"' for i, p in enumerate(probs.argmax(1).tolist())]
    foreign = torch.load(ckpts[0], weights_only=True)
    foreign["data_config"] = {"dataset": "cifar100", "mean": None, "std": None}
    torch.save(foreign, tmp_path / "cifar.pt")
    proc = run_inline("predict.py", ckpts[0], tmp_path / "cifar.pt", "--data-dir", cub_dir, "--out", tmp_path / "x.csv",
                      "--device", "cpu", check=False)
    assert proc.returncode == 2 and "an ensemble needs one data set" in proc.stderr and "Traceback" not in proc.stderr
    other = torch.load(ckpts[1], weights_only=True)
    other["model_config"]["num_classes"] = 7  # another class count, same data set and preprocessing
    torch.save(other, tmp_path / "seven.pt")
    proc = run_inline("predict.py", ckpts[0], tmp_path / "seven.pt", "--data-dir", cub_dir, "--out", tmp_path / "x.csv",
                      "--device", "cpu", check=False)
    assert proc.returncode == 2 and "predicts 7 classes" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.csv").exists()


def test_frozen_defaults_are_the_linear_probe():
    """`--freeze-backbone` alone trains the study's best probe (BENCHMARKS.md: AdamW 1e-3, 10 epochs, cached
    features), the same recipe as LP-FT's probe phase; flags given still win, and fine-tuning keeps its recipe."""
    import finetune_birds as fb
    frozen = fb.parse_args(["--freeze-backbone"])
    assert (frozen.epochs, frozen.optimizer, frozen.lr, frozen.cache_features) == (10, "adamw", 1e-3, True)
    assert (frozen.epochs, frozen.optimizer, frozen.lr) == (fb.PROBE["epochs"], frozen.lp_optimizer, frozen.lp_lr)
    assert frozen.wd == fb.RECIPE["wd"] and frozen.schedule == "cosine" and frozen.batch_size == 64
    mine = fb.parse_args(["--freeze-backbone", "--lr", "0.01", "--epochs", "3", "--no-cache-features"])
    assert (mine.lr, mine.epochs, mine.cache_features, mine.optimizer) == (0.01, 3, False, "adamw")
    ft = fb.parse_args([])
    fb.resolve(ft, [])
    assert (ft.epochs, ft.optimizer, ft.lr, ft.cache_features) == (15, "sgd", 1e-3, False)


def test_dali_loader_trains_end_to_end(cub_dir, tmp_path, resnet18_weights):
    if not bird_loaders.dali_available():
        pytest.skip("nvidia-dali is not installed")
    out = tmp_path / "dali"
    proc = run_script("finetune_birds.py", "--data-dir", cub_dir, "--weights", resnet18_weights, "--out", out,
                      "--loader", "dali", *QUICK)
    assert "loader dali" in proc.stdout and len((out / "submission.csv").read_text().splitlines()) == 13


def test_nvjpeg_loader_resumes_exactly(cub_dir, tmp_path, resnet18_weights, monkeypatch):
    """Killed after its first epoch and resumed, a run on the nvjpeg loader ends where the uninterrupted one does."""
    import engine
    import finetune_birds
    import run_files
    argv = [str(a) for a in ["--data-dir", cub_dir, "--weights", resnet18_weights, "--loader", "nvjpeg",
                             "--deterministic", "--freeze-stages", "3", *QUICK]]
    engine.cli(finetune_birds.main, argv + ["--out", str(tmp_path / "whole")])
    calls, real = [0], run_files.write_metrics

    def write_then_crash(*a, **kw):
        real(*a, **kw)
        calls[0] += 1
        if calls[0] == 1:
            raise Crash
    monkeypatch.setattr(run_files, "write_metrics", write_then_crash)
    with pytest.raises(Crash):
        engine.cli(finetune_birds.main, argv + ["--out", str(tmp_path / "cut")])
    monkeypatch.setattr(run_files, "write_metrics", real)
    engine.cli(finetune_birds.main, argv + ["--out", str(tmp_path / "cut"), "--resume"])
    cols = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc"]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "cut" / "metrics.csv")[cols],
                                  pd.read_csv(tmp_path / "whole" / "metrics.csv")[cols])
    assert (tmp_path / "cut" / "submission.csv").read_bytes() == (tmp_path / "whole" / "submission.csv").read_bytes()


def test_image_folder_dataset(tmp_path):
    from PIL import Image
    for split in ("train", "test"):
        for c, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
            (tmp_path / "birds" / split / f"class{c}").mkdir(parents=True)
            for k in range(6):
                Image.new("RGB", (40, 36), colour).save(tmp_path / "birds" / split / f"class{c}" / f"{k}.jpg")
    out = tmp_path / "r"
    run_inline("finetune_birds.py", "--dataset", "folder", "--data-dir", tmp_path / "birds", "--weights", "none",
               "--out", out, *QUICK)
    assert len((out / "submission.csv").read_text().splitlines()) == 13


def test_weights_for_another_architecture_name_the_keys(cub_dir, tmp_path):
    backbone, *_ = models.make_backbone("resnet34")
    torch.save(backbone.state_dict(), tmp_path / "r34.pth")
    proc = run_inline("finetune_birds.py", "--data-dir", cub_dir, "--weights", tmp_path / "r34.pth",
                      "--out", tmp_path / "r", *QUICK, check=False)
    assert proc.returncode == 1 and "does not fit this architecture" in proc.stderr and "unexpected" in proc.stderr
    assert "layer1.2" in proc.stderr


def test_malicious_weights_file_is_refused(cub_dir, tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Exploit()}, tmp_path / "evil.pth")
    proc = run_script("finetune_birds.py", "--data-dir", cub_dir, "--weights", tmp_path / "evil.pth",
                      "--out", tmp_path / "r", *QUICK, check=False)
    assert proc.returncode != 0 and not marker.exists() and "Traceback" not in proc.stderr


@pytest.mark.parametrize("flags, message", [
    (["--arch", "resnet7"], "unknown --arch 'resnet7'"),
    (["--val-frac", "1.5"], "--val-frac must be between 0 and 1"),
    (["--cache-features"], "--cache-features needs --freeze-backbone"),
    (["--aug", "rrc,rotate"], "unknown augmentation rotate"),
    (["--weights", "/no/such/file.pth"], "neither imagenet, none, nor an existing file"),
    (["--freeze-stages", "5"], "resnet18 has 4 stages after its stem"),
    (["--freeze-backbone", "--lp-epochs", "2"], "--freeze-backbone already freezes every stage"),
    (["--layer-decay", "1.5"], "--layer-decay must be in (0, 1], got 1.5"),
    (["--lp-epochs", "-2"], "--lp-epochs must be >= 0, got -2"),
    (["--workers", "-1"], "--workers must be >= 0, got -1"),
])
def test_bad_bird_flags(cub_dir, tmp_path, flags, message):
    proc = run_inline("finetune_birds.py", "--data-dir", cub_dir, "--weights", "none", "--out", tmp_path / "r", *QUICK,
                      *flags, check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(not (SHARED_CUB.is_dir() and SHARED_WEIGHTS.is_file()), reason="../shared is absent")
def test_real_birds_transfer_beats_random_weights(tmp_path):
    root = fixtures.real_cub_subset(SHARED_CUB, tmp_path, num_classes=10)
    common = ["--data-dir", root, "--arch", "tf_efficientnet_lite0", "--freeze-backbone", "--cache-features",
              "--img-size", "128", "--epochs", "8", "--optimizer", "adamw", "--lr", "3e-3", "--batch-size", "32",
              "--device", "cpu", "--quiet"]
    run_script("finetune_birds.py", *common, "--weights", SHARED_WEIGHTS, "--out", tmp_path / "pretrained")
    run_script("finetune_birds.py", *common, "--weights", "none", "--out", tmp_path / "random")
    pretrained = json.loads((tmp_path / "pretrained" / "final.json").read_text())
    random_init = json.loads((tmp_path / "random" / "final.json").read_text())
    chance = 1 / 10
    assert pretrained["test_acc"] > 5 * chance  # far above chance
    assert pretrained["test_acc"] > random_init["test_acc"] + 0.3  # and far above the same run without ImageNet


def test_crop_boxes_work_in_every_loader(cub_dir, tmp_path):
    proc = run_inline("finetune_birds.py", "--data-dir", cub_dir, "--weights", "none", "--crop-boxes", "--loader", "nvjpeg",
                      "--out", tmp_path / "r", *QUICK)
    assert "loader nvjpeg" in proc.stdout
    train, _, _ = bird_data.load_cub(cub_dir, crop_boxes=True)
    assert train[0][2] == (2.0, 2.0, 44.0, 44.0)
    train, _ = bird_data.drop_bad_images(train, 0.5)
    kinds = ["torch", "nvjpeg"] + (["dali"] if bird_loaders.dali_available() else [])
    views = {k: torch.cat([x for x, _ in bird_loaders.bird_loader(k, train, 24, 4, False, (0.5,) * 3, (0.25,) * 3, "cpu",
                                                           workers=0)]) for k in kinds}
    for k in kinds[1:]:  # the box is cut out the same way (DALI's filter reaches a pixel past the box's edge)
        assert (views[k] - views["torch"]).abs().mean() * 0.25 * 255 < 2, k


# ----------------------------------------------------------------------------- freezing depth, BatchNorm, LP-FT

def _frozen_prefixes(arch, k):
    """What --freeze-stages K must freeze, written out by hand from each architecture's module names."""
    if arch == "resnet18":  # torchvision: conv1/bn1 stem, then layer1..layer4
        return ("conv1.", "bn1.", *[f"layer{i}." for i in range(1, k + 1)])
    stages = [f"blocks.{i}." for i in range(k)]  # timm EfficientNet: conv_stem/bn1, blocks.0..6 (+ conv_head)
    return ("conv_stem.", "bn1.", *stages, *(("conv_head.", "bn2.") if k == 7 else ()))


@pytest.mark.parametrize("arch, stages", [("resnet18", 4), ("tf_efficientnet_lite0", 7)])
def test_freeze_stages_freezes_exactly_the_named_stages(arch, stages):
    for k in range(stages + 1):
        model = models.TransferNet(arch, 5, freeze_stages=k).train()
        frozen = _frozen_prefixes(arch, k) if k else ()
        for name, p in model.backbone.named_parameters():
            assert p.requires_grad == (not name.startswith(frozen)), (k, name)
        for name, m in model.backbone.named_modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                assert m.training == (not name.startswith(tuple(f.rstrip(".") for f in frozen))), (k, name)
        assert all(p.requires_grad for p in model.head.parameters())
    with pytest.raises(ValueError, match=f"has {stages} stages"):
        models.TransferNet(arch, 5, freeze_stages=stages + 1)


def test_bn_mode_frozen_keeps_running_statistics_and_trains_affine():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    for mode, stats_move, affine_trains in (("train", True, True), ("frozen", False, True), ("frozen-affine", False, False)):
        model = models.TransferNet("resnet18", 5, bn_mode=mode).train()
        before = model.backbone.layer4[1].bn2.running_mean.clone()
        model(x).sum().backward()
        assert (not torch.equal(before, model.backbone.layer4[1].bn2.running_mean)) == stats_move, mode
        assert model.backbone.layer4[1].bn2.weight.requires_grad == affine_trains, mode
        assert model.backbone.layer4[1].conv2.weight.grad is not None  # the convolutions train in every mode


def test_sync_bn_keeps_frozen_batchnorm_frozen():
    """--sync-bn replaces every BatchNorm with a SyncBatchNorm; with --bn-mode frozen (the default) and with frozen
    stages, the new layers must stay in eval mode too, or a multi-GPU fine-tune overwrites the ImageNet statistics."""
    import torch.nn as nn
    for kw in ({"bn_mode": "frozen"}, {"bn_mode": "train", "freeze_stages": 2}, {"freeze_backbone": True}):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(models.TransferNet("resnet18", 5, **kw)).train()
        sync = {n: m for n, m in model.backbone.named_modules() if isinstance(m, nn.SyncBatchNorm)}
        assert len(sync) == 20, kw
        frozen = {n for n, m in sync.items() if not m.training}
        if kw.get("bn_mode") == "frozen" or kw.get("freeze_backbone"):
            assert frozen == set(sync), kw
        else:  # the stem and layer1..2 frozen: their BatchNorms stay in eval mode, layer3..4's train
            assert frozen == {n for n in sync if n == "bn1" or n.startswith(("layer1.", "layer2."))}, kw


def test_layer_decay_groups_follow_the_stages():
    model = models.TransferNet("resnet18", 5, freeze_stages=1)
    groups = model.param_groups(backbone_lr_mult=0.5, layer_decay=0.7)
    assert groups[0]["lr_mult"] == 1.0 and groups[0]["params"] == list(model.head.parameters())
    mult = {id(p): g["lr_mult"] for g in groups for p in g["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(mult) == len(trainable) == sum(len(g["params"]) for g in groups)  # each trainable param once
    bb = model.backbone
    assert mult[id(bb.layer4[0].conv1.weight)] == pytest.approx(0.5 * 0.7)
    assert mult[id(bb.layer3[1].bn1.bias)] == pytest.approx(0.5 * 0.7 ** 2)
    assert mult[id(bb.layer2[0].conv1.weight)] == pytest.approx(0.5 * 0.7 ** 3)
    assert id(bb.layer1[0].conv1.weight) not in mult and id(bb.conv1.weight) not in mult  # frozen


def test_freeze_stages_run_keeps_frozen_stages_bit_identical(clean_cub_dir, tmp_path, resnet18_weights):
    out = tmp_path / "fs"
    proc = run_inline("finetune_birds.py", "--data-dir", clean_cub_dir, "--weights", resnet18_weights, "--out", out,
                      "--freeze-stages", "2", "--bn-mode", "frozen", "--layer-decay", "0.7", "--lr", "0.1", *QUICK)
    original, after = torch.load(resnet18_weights, weights_only=True), backbone_state(out)
    frozen = _frozen_prefixes("resnet18", 2)
    for k in original:
        if k.startswith(frozen) or "running_" in k or "num_batches" in k:  # frozen stages, and every BN statistic
            assert torch.equal(after[k], original[k]), k
    for k in ("layer3.0.conv1.weight", "layer4.1.conv2.weight", "layer4.1.bn2.weight"):
        assert not torch.equal(after[k], original[k]), k
    final = json.loads((out / "final.json").read_text())
    expected = sum(v.numel() for k, v in original.items() if not k.startswith(frozen) and "running_" not in k
                   and "num_batches" not in k) + 512 * 3 + 3
    assert final["trainable_parameters"] == expected and f"{expected:,} of" in proc.stdout


class Crash(Exception):
    pass


LPFT = ["--data-dir", None, "--lp-epochs", "2", "--epochs", "2", "--freeze-stages", "1", "--deterministic",
        "--loader", "torch", "--dropout", "0.2", *QUICK]


def _lpft(cub, weights, out, crash_at=None, monkeypatch=None):
    """One LP-FT run in this process; with crash_at, the n-th metrics.csv write (after that epoch's last.pt) raises."""
    import engine
    import finetune_birds
    import run_files
    argv = [str(a) for a in LPFT]
    argv[1] = str(cub)
    argv += ["--weights", str(weights), "--out", str(out)]
    if crash_at:
        calls, real = [0], run_files.write_metrics

        def write_then_crash(*a, **kw):
            real(*a, **kw)
            calls[0] += 1
            if calls[0] == crash_at:
                raise Crash
        monkeypatch.setattr(run_files, "write_metrics", write_then_crash)
        with pytest.raises(Crash):
            engine.cli(finetune_birds.main, argv)
        monkeypatch.setattr(run_files, "write_metrics", real)
        argv.append("--resume")
        crashed_wall = json.loads((Path(out) / "wall.json").read_text())["seconds"]
    engine.cli(finetune_birds.main, argv)
    return crashed_wall if crash_at else None


@pytest.fixture(scope="module")
def lpft_run(clean_cub_dir, resnet18_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("lpft") / "r"
    _lpft(clean_cub_dir, resnet18_weights, out)
    return out


def test_lpft_fine_tunes_from_the_probed_head(lpft_run):
    final = json.loads((lpft_run / "final.json").read_text())
    assert final["ft_start_val_acc"] == final["lp_val_acc"]  # the whole network with the probe's head = the probe
    m = pd.read_csv(lpft_run / "metrics.csv")
    assert list(m.phase) == ["lp", "lp", "ft", "ft"] and list(m.epoch) == [1, 2, 1, 2]
    probe = torch.load(lpft_run / "lp" / "best.pt", weights_only=True)["model"]
    assert torch.equal(probe["backbone.layer4.1.conv2.weight"],
                       torch.load(lpft_run / "lp" / "last.pt", weights_only=True)["model"]["backbone.layer4.1.conv2.weight"])


@pytest.mark.parametrize("crash_at, phase", [(1, "lp"), (3, "ft")])
def test_lpft_resume_in_each_phase_equals_uninterrupted(crash_at, phase, clean_cub_dir, resnet18_weights, lpft_run,
                                                        tmp_path, monkeypatch):
    out = tmp_path / "r"
    crashed_wall = _lpft(clean_cub_dir, resnet18_weights, out, crash_at, monkeypatch)
    final = json.loads((out / "final.json").read_text())
    assert crashed_wall > 0 and final["wall_seconds"] > crashed_wall  # the first process's time is counted too
    cols = ["epoch", "phase", "train_loss", "train_acc", "val_loss", "val_acc", "lr"]
    pd.testing.assert_frame_equal(pd.read_csv(out / "metrics.csv")[cols], pd.read_csv(lpft_run / "metrics.csv")[cols])
    a = torch.load(out / "last.pt", weights_only=True)["model"]
    b = torch.load(lpft_run / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in b), phase
    assert (out / "submission.csv").read_bytes() == (lpft_run / "submission.csv").read_bytes()


def test_proxy32_writes_the_training_split_and_on_request_the_labelled_test_split(clean_cub_dir, tmp_path):
    train, test, classes = bird_data.load_cub(clean_cub_dir)
    run_script("tools/make_proxy32.py", clean_cub_dir, tmp_path / "p")
    run_script("tools/make_proxy32.py", clean_cub_dir, tmp_path / "t", "--test-split")
    plain, labelled = data.load_cifar100(tmp_path / "p"), data.load_cifar100(tmp_path / "t")
    assert (plain["train_x"] == labelled["train_x"]).all() and list(plain["train_y"]) == [s[1] for s in train]
    assert not plain["test_y"].any() and not plain["test_x"].any()  # the never-scored placeholder
    assert list(labelled["test_y"]) == [s[1] for s in test] and labelled["test_x"].shape == (len(test), 3, 32, 32)


def informative(maps):
    """Grad-CAM maps that say something: none constant, and no two alike."""
    flat = maps.flatten(1)
    distinct = all(not torch.allclose(flat[i], flat[j], atol=1e-3) for i in range(len(flat)) for j in range(i))
    return bool((flat.std(1) > 0.01).all()) and distinct


def test_explain_draws_where_each_model_looked(probe32, finetuned, cub_dir, tmp_path, monkeypatch):
    """--explain (default loader) writes one PNG per image, titled with the checkpoint as given; the maps differ
    between images and between the frozen probe and the fine-tuned network (a constant map fails the check)."""
    import checkpoints
    import explain
    import predict
    _, test, _ = bird_data.load_cub(cub_dir)
    images = [p for p, _, _ in test if bird_data.check_image_file(p) is None][:3]
    titles, draw = [], explain.draw
    monkeypatch.setattr(explain, "draw", lambda path, *a: titles.append(a[-1]) or draw(path, *a))
    given = os.path.relpath(finetuned / "best.pt")  # as a user types it, relative to where predict.py runs
    proc = run_inline("predict.py", given, "--images", *images, "--explain", tmp_path / "cams")
    assert sorted(p.name for p in (tmp_path / "cams").iterdir()) == [f"{i:05d}_{Path(p).stem}.png"
                                                                     for i, p in enumerate(images, 1)]
    assert len(titles) == 3 and all(t.split("\n")[1].startswith(f"{given}, Grad-CAM on ") for t in titles), titles
    assert "Bird " in proc.stdout  # class names, not indices
    maps = {}
    for name, run in (("frozen", probe32[0]), ("fine-tuned", finetuned)):
        ckpt = checkpoints.load_checkpoint(run / "best.pt")
        model = predict.load_model(ckpt, run / "best.pt", torch.device("cpu"))
        args = predict.parse_args([str(run / "best.pt"), "--images", *images, "--loader", "torch", "--workers", "0"])
        x, _ = next(iter(predict.image_loader(ckpt, run, images, args, torch.device("cpu"))))
        _, layer = explain.last_conv_stage(model, (1, *x.shape[1:]))
        maps[name] = explain.grad_cam(model, layer, x, model.eval()(x).argmax(1))
    assert informative(maps["frozen"]) and informative(maps["fine-tuned"])
    assert informative(torch.stack([maps["frozen"][0], maps["fine-tuned"][0]]))
    assert not informative(torch.stack([maps["frozen"][0], torch.full_like(maps["frozen"][0], 0.5)]))  # constant


def test_the_reports_grad_cam_of_a_crop_box_run_is_on_its_boxes(finetuned, cub_dir):
    """explain.gradcam_column (the report's figure) shows a --crop-boxes run's test birds as it saw them: the eval view
    of each bounding box, which differs from the whole image's."""
    import explain
    _, test, _ = bird_data.load_cub(cub_dir, crop_boxes=True)
    samples = [s for s in test if bird_data.check_image_file(s[0]) is None][:2]
    assert all(box is not None for _, _, box in samples)
    labels = [y for _, y, _ in samples]
    boxed, _ = explain.gradcam_column(finetuned, samples, labels)
    whole, _ = explain.gradcam_column(finetuned, [(p, y, None) for p, y, _ in samples], labels)
    cfg = torch.load(finetuned / "best.pt", map_location="cpu", weights_only=True)["data_config"]
    x, _ = next(iter(bird_loaders.bird_loader("torch", samples, cfg["img_size"], 2, False, cfg["mean"], cfg["std"],
                                              "cpu", workers=0)))
    for picture, seen, other in zip(boxed, x, whole, strict=True):
        assert (picture == explain.to_picture(seen, cfg["mean"], cfg["std"])).all() and not (picture == other).all()
