"""torchrun with 2 CPU processes (gloo) trains like one process with the same global batch."""
import json

import pandas as pd
import pytest
import torch

from conftest import run_script

# Two ranks of 32 and one process of 64 round differently (~1e-6); a gentle lr keeps training from amplifying
# that into visible differences, so what is compared is the sharding, batching and gradient averaging.
COMMON = ["--epochs", "2", "--batch-size", "64", "--val-per-class", "10", "--device", "cpu", "--quiet", "--deterministic",
          "--normalize", "--aug", "flip,crop,cutout", "--lr", "0.005"]


def test_two_processes_match_one(cifar_dir, tmp_path):
    # The one process gets the threads of both ranks together: oneDNN splits a batch between threads, so each thread
    # sums the gradients of the 32 samples one rank does, rounding alike. With one thread for 64 samples the sums
    # round differently (~1e-8), enough to flip a near-tie of a max-pool in epoch 2 (measured: 2.4e-4 on a weight).
    run_script("train_cifar.py", "--data-dir", cifar_dir, "--out", tmp_path / "one", *COMMON, env={"OMP_NUM_THREADS": "2"})
    run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_cifar.py",
               "--data-dir", cifar_dir, "--out", tmp_path / "two", *COMMON, env={"OMP_NUM_THREADS": "1"})
    one, two = pd.read_csv(tmp_path / "one" / "metrics.csv"), pd.read_csv(tmp_path / "two" / "metrics.csv")
    for column in ("train_loss", "val_loss", "train_acc", "val_acc"):
        pd.testing.assert_series_equal(one[column], two[column], rtol=1e-4, atol=1e-4)
    wa = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "two" / "last.pt", weights_only=True)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=1e-4)
    assert len((tmp_path / "two" / "submission.csv").read_text().splitlines()) == 601
    assert json.loads((tmp_path / "two" / "final.json").read_text())["best_val_acc"] > 0


@pytest.mark.parametrize("loader", ["auto", "nvjpeg"])
def test_birds_two_processes_match_one(clean_cub_dir, tmp_path, loader):
    backbone_weights = tmp_path / "r18.pth"
    torch.manual_seed(0)
    import models
    torch.save(models.make_backbone("resnet18")[0].state_dict(), backbone_weights)
    common = ["--data-dir", clean_cub_dir, "--arch", "resnet18", "--weights", backbone_weights, "--freeze-backbone",
              "--no-cache-features", "--aug", "none", "--img-size", "32", "--batch-size", "4", "--val-frac", "0.25", "--epochs", "2",
              "--device", "cpu", "--quiet", "--workers", "0", "--deterministic", "--loader", loader]
    run_script("finetune_birds.py", *common, "--out", tmp_path / "one")
    run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "finetune_birds.py", *common,
               "--out", tmp_path / "two", env={"OMP_NUM_THREADS": "1"})
    one, two = pd.read_csv(tmp_path / "one" / "metrics.csv"), pd.read_csv(tmp_path / "two" / "metrics.csv")
    for column in ("train_loss", "val_loss", "val_acc"):
        pd.testing.assert_series_equal(one[column], two[column], rtol=1e-4, atol=1e-4)
    assert (tmp_path / "one" / "submission.csv").read_bytes() == (tmp_path / "two" / "submission.csv").read_bytes()


def test_ranks_skip_a_step_together_when_one_rank_has_only_broken_images(tmp_path):
    """With one image per rank and step, a rank whose image does not decode has nothing to train on; it used to skip
    the step alone while the other waited in the gradient all-reduce, forever. Now both skip it and the run ends."""
    import bird_data
    import fixtures
    root = fixtures.write_cub(tmp_path, num_classes=2, per_class=16, broken=False)
    train, _, _ = bird_data.load_cub(root)
    for path, label, _ in train:
        if label == 0:  # passes the byte check, fails to decode: skipped by the loader, not by drop_bad_images
            with open(path, "wb") as f:
                f.write(b"\xff\xd8\xff" + bytes(100) + b"\xff\xd9")
    common = ["--data-dir", root, "--arch", "resnet18", "--weights", "none", "--freeze-backbone", "--no-cache-features",
              "--aug", "none", "--img-size", "32", "--batch-size", "2", "--val-frac", "0.25", "--epochs", "2",
              "--device", "cpu", "--quiet", "--workers", "0", "--loader", "torch", "--out", tmp_path / "two"]
    run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "finetune_birds.py", *common,
               env={"OMP_NUM_THREADS": "1"}, timeout=120)  # the old code hung here
    assert len(pd.read_csv(tmp_path / "two" / "metrics.csv")) == 2


def test_ema_under_ddp_validates_rank_0s_model_and_the_budget_counts_rank_0s_predictions(tiny_cifar_dir, tmp_path):
    """Under torchrun with --ema, every rank validates the model best.pt holds (rank 0's EMA, BatchNorm buffers
    included): the validation loss of metrics.csv is best.pt's over the whole split. The time budget times the final
    predictions at the rate rank 0 validated its own half of the split."""
    import checkpoints
    import data
    import engine
    import predict
    out = tmp_path / "two"
    run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_cifar.py",
               "--data-dir", tiny_cifar_dir, "--out", out, "--device", "cpu", "--quiet", "--val-per-class", "4",
               "--bn", "--depth", "2", "--width", "8", "--batch-size", "100", "--lr", "0.05", "--ema", "0.5",
               "--time-budget", "600",
               "--epochs", "2", "--no-tensorboard", "--no-compile", env={"OMP_NUM_THREADS": "1"})
    record = json.loads((out / "config.json").read_text())["time_budget"]
    assert record["final_seconds"] == pytest.approx(record["eval_seconds"] * (200 + 400) / 200, rel=1e-3)
    best = checkpoints.load_checkpoint(out / "best.pt")
    cifar = data.load_cifar100(tiny_cifar_dir)
    _, val_idx = data.stratified_split(cifar["train_y"], val_per_class=4, seed=0)
    cfg = best["data_config"]
    val = data.DeviceLoader(torch.from_numpy(cifar["train_x"][val_idx]), torch.from_numpy(cifar["train_y"][val_idx]),
                            400, mean=cfg["mean"], std=cfg["std"])
    model = predict.load_model(best, out / "best.pt", torch.device("cpu"), 100, tiny_cifar_dir)
    loss, _ = engine.evaluate(model, val, torch.device("cpu"), False)
    rows = pd.read_csv(out / "metrics.csv")
    assert rows.val_loss[rows.epoch == best["epoch"]].item() == pytest.approx(loss, abs=1e-6)


def test_cached_features_under_ddp_analyse_all_of_validation(clean_cub_dir, tmp_path):
    """--freeze-backbone caches features; under torchrun the error analysis still covers the whole validation split."""
    out = tmp_path / "two"
    run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "finetune_birds.py",
               "--data-dir", clean_cub_dir, "--arch", "resnet18", "--weights", "none", "--freeze-backbone",
               "--img-size", "32", "--batch-size", "4", "--val-frac", "0.5", "--epochs", "1", "--device", "cpu",
               "--quiet", "--workers", "0", "--loader", "torch", "--no-tensorboard", "--out", out,
               env={"OMP_NUM_THREADS": "1"})
    val_size = json.loads((out / "final.json").read_text())["val_size"]
    assert pd.read_csv(out / "per_class.csv").val_n.sum() == val_size > 2
    assert pd.read_csv(out / "confusion_val.csv", index_col=0).to_numpy().sum() == val_size


def test_out_of_memory_on_one_rank_is_its_sentence_and_torchrun_ends_the_other(tiny_cifar_dir, tmp_path):
    """A CUDA out-of-memory error planted in one rank's third training step (tests/chaos_run.py): that rank says its
    sentence and exits, without the collective save_last would start while the other rank waits in the step's
    all-reduce (the old code hung there until killed); torchrun then ends the run, non-zero."""
    proc = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tests/chaos_run.py",
                      "--data-dir", tiny_cifar_dir, "--epochs", "2", "--batch-size", "64", "--val-per-class", "4",
                      "--device", "cpu", "--quiet", "--no-tensorboard", "--out", tmp_path / "r",
                      env={"OMP_NUM_THREADS": "1", "CHAOS_OOM_RANK": "1"}, check=False, timeout=120)
    assert proc.returncode != 0
    said = [line for line in proc.stderr.splitlines() if line.startswith("error: out of GPU memory in a training step")]
    assert len(said) == 1, proc.stderr
    assert "--accum-steps 2 keeps the batch of 64" in said[0] and "no rank saves at this step" in said[0], said[0]
    assert not (tmp_path / "r" / "last.pt").exists()  # nothing half-gathered was written
    assert "[rank0]: Traceback" not in proc.stderr  # rank 0 stops in one line (or by torchrun's signal, silently)
