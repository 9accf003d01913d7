"""finetune_birds.py on a generated CUB tree, and a real transfer-learning check on ../shared."""
import json
import os

import pandas as pd
import pytest
import torch

import data
import models
from conftest import SHARED_CUB, SHARED_WEIGHTS, run_script

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


def test_frozen_backbone_stays_bit_identical(cub_dir, tmp_path, resnet18_weights):
    out = tmp_path / "frozen"
    proc = run_script("finetune_birds.py", "--data-dir", cub_dir, "--weights", resnet18_weights, "--freeze-backbone",
                      "--out", out, *QUICK)
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


def test_fine_tuning_changes_the_backbone(cub_dir, tmp_path, resnet18_weights):
    out = tmp_path / "ft"
    run_script("finetune_birds.py", "--data-dir", cub_dir, "--weights", resnet18_weights, "--out", out, *QUICK)
    original = torch.load(resnet18_weights, weights_only=True)
    after = backbone_state(out)
    assert not torch.equal(after["conv1.weight"], original["conv1.weight"])
    assert not torch.equal(after["layer4.1.conv2.weight"], original["layer4.1.conv2.weight"])


def test_feature_cache_trains_the_same_head(clean_cub_dir, tmp_path, resnet18_weights):
    common = ["--data-dir", clean_cub_dir, "--weights", resnet18_weights, "--freeze-backbone", "--aug", "none",
              "--dropout", "0.3", "--epochs", "3", *QUICK]
    run_script("finetune_birds.py", *common, "--out", tmp_path / "plain")
    run_script("finetune_birds.py", *common, "--out", tmp_path / "cached", "--cache-features")
    a = torch.load(tmp_path / "plain" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cached" / "last.pt", weights_only=True)["model"]
    for k in ("head.1.weight", "head.1.bias"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    ma, mb = pd.read_csv(tmp_path / "plain" / "metrics.csv"), pd.read_csv(tmp_path / "cached" / "metrics.csv")
    pd.testing.assert_series_equal(ma.train_loss, mb.train_loss, rtol=1e-4)
    pd.testing.assert_series_equal(ma.val_acc, mb.val_acc)


def test_submission_follows_images_txt(cub_dir, tmp_path, resnet18_weights):
    out = tmp_path / "r"
    run_script("finetune_birds.py", "--data-dir", cub_dir, "--weights", resnet18_weights, "--out", out, *QUICK)
    _, test, _ = data.load_cub(cub_dir)
    ckpt = torch.load(out / "best.pt", weights_only=True)
    model = models.build_model(ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    cfg = ckpt["data_config"]
    images = data.BirdImages(test, cfg["img_size"], keep_broken=True)
    mean, std = torch.tensor(cfg["mean"]).view(3, 1, 1) * 255, torch.tensor(cfg["std"]).view(3, 1, 1) * 255
    with torch.no_grad():  # one image at a time, in images.txt order
        expected = [model(((images[(i, 0)][0].float() - mean) / std)[None]).argmax(1).item() for i in range(len(test))]
    rows = (out / "submission.csv").read_text().splitlines()
    assert rows[0] == '"Id","Prediction1"'
    assert rows[1:] == [f'"{i}","{p}"' for i, p in enumerate(expected)]
    # predict.py alone reproduces it
    run_script("predict.py", out / "best.pt", "--data-dir", cub_dir, "--out", tmp_path / "p.csv", "--device", "cpu",
               "--workers", "0")
    assert (tmp_path / "p.csv").read_bytes() == (out / "submission.csv").read_bytes()


def test_dali_loader_trains_end_to_end(cub_dir, tmp_path, resnet18_weights):
    if not data.dali_available():
        pytest.skip("nvidia-dali is not installed")
    out = tmp_path / "dali"
    proc = run_script("finetune_birds.py", "--data-dir", cub_dir, "--weights", resnet18_weights, "--out", out,
                      "--loader", "dali", *QUICK)
    assert "loader dali" in proc.stdout and len((out / "submission.csv").read_text().splitlines()) == 13


def test_image_folder_dataset(tmp_path):
    from PIL import Image
    for split in ("train", "test"):
        for c, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
            (tmp_path / "birds" / split / f"class{c}").mkdir(parents=True)
            for k in range(6):
                Image.new("RGB", (40, 36), colour).save(tmp_path / "birds" / split / f"class{c}" / f"{k}.jpg")
    out = tmp_path / "r"
    run_script("finetune_birds.py", "--dataset", "folder", "--data-dir", tmp_path / "birds", "--weights", "none",
               "--out", out, *QUICK)
    assert len((out / "submission.csv").read_text().splitlines()) == 13


def test_weights_for_another_architecture_name_the_keys(cub_dir, tmp_path):
    backbone, *_ = models.make_backbone("resnet34")
    torch.save(backbone.state_dict(), tmp_path / "r34.pth")
    proc = run_script("finetune_birds.py", "--data-dir", cub_dir, "--weights", tmp_path / "r34.pth",
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
])
def test_bad_bird_flags(cub_dir, tmp_path, flags, message):
    proc = run_script("finetune_birds.py", "--data-dir", cub_dir, "--weights", "none", "--out", tmp_path / "r", *QUICK,
                      *flags, check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def _real_subset(tmp_path, num_classes):
    """The first classes of the shared real CUB subset, re-listed in the official layout."""
    root = tmp_path / "CUB_200_2011"
    (root / "images").mkdir(parents=True)
    classes = (SHARED_CUB / "classes.txt").read_text().split("\n")[:num_classes]
    keep = {line.split()[0] for line in classes}
    labels = dict(l.split() for l in (SHARED_CUB / "image_class_labels.txt").read_text().split("\n") if l)
    ids = {i for i, c in labels.items() if c in keep}
    for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt"):
        lines = [l for l in (SHARED_CUB / name).read_text().split("\n") if l and l.split()[0] in ids]
        (root / name).write_text("\n".join(lines) + "\n")
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    for line in classes:
        os.symlink(SHARED_CUB / "images" / line.split()[1], root / "images" / line.split()[1])
    return root


@pytest.mark.skipif(not (SHARED_CUB.is_dir() and SHARED_WEIGHTS.is_file()), reason="../shared is absent")
def test_real_birds_transfer_beats_random_weights(tmp_path):
    root = _real_subset(tmp_path, num_classes=10)
    common = ["--data-dir", root, "--arch", "tf_efficientnet_lite0", "--freeze-backbone", "--cache-features",
              "--img-size", "160", "--epochs", "8", "--optimizer", "adamw", "--lr", "3e-3", "--batch-size", "32",
              "--device", "cpu", "--quiet"]
    run_script("finetune_birds.py", *common, "--weights", SHARED_WEIGHTS, "--out", tmp_path / "pretrained")
    run_script("finetune_birds.py", *common, "--weights", "none", "--out", tmp_path / "random")
    pretrained = json.loads((tmp_path / "pretrained" / "final.json").read_text())
    random_init = json.loads((tmp_path / "random" / "final.json").read_text())
    chance = 1 / 10
    assert pretrained["test_acc"] > 5 * chance  # far above chance
    assert pretrained["test_acc"] > random_init["test_acc"] + 0.3  # and far above the same run without ImageNet


def test_crop_boxes_use_the_torch_loader(cub_dir, tmp_path):
    proc = run_script("finetune_birds.py", "--data-dir", cub_dir, "--weights", "none", "--crop-boxes",
                      "--out", tmp_path / "r", *QUICK)
    assert "loader torch" in proc.stdout
    train, _, _ = data.load_cub(cub_dir, crop_boxes=True)
    assert train[0][2] == (2.0, 2.0, 44.0, 44.0)
