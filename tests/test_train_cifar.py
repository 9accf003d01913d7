"""train_cifar.py end to end on a learnable fixture in the official format, and predict.py."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import ROOT, run_inline, run_script, script_env

QUICK = ["--device", "cpu", "--val-per-class", "10", "--quiet"]
TINY = ["--device", "cpu", "--val-per-class", "4", "--quiet"]  # on tiny_cifar_dir
LEARN = ["--model", "convnet", "--depth", "3", "--width", "16", "--bn", "--normalize", "--optimizer", "adamw",
         "--lr", "0.01", "--batch-size", "100"]


@pytest.fixture(scope="module")
def trained(cifar_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    proc = run_script("train_cifar.py", "--data-dir", cifar_dir, "--epochs", "4", "--out", out, *QUICK, *LEARN,
                      "--aug", "flip,crop")
    return out, proc


def test_run_writes_every_file(trained):
    out, _ = trained
    for name in ("config.json", "metrics.csv", "best.pt", "last.pt", "final.json", "curves.png", "submission.csv",
                 "architecture.md"):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "config.json").read_text())
    assert config["args"]["depth"] == 3 and config["seed"] == 0 and "torch" in config["versions"]
    final = json.loads((out / "final.json").read_text())
    assert set(final) >= {"best_val_acc", "test_acc", "train_seconds", "parameters"}
    assert "| **total** |" in (out / "architecture.md").read_text()


def test_training_learns(trained):
    out, _ = trained
    m = pd.read_csv(out / "metrics.csv")
    assert list(m.columns[:9]) == ["epoch", "phase", "train_loss", "train_acc", "val_loss", "val_acc", "lr",
                                   "epoch_seconds", "images_per_second"]
    assert list(m.epoch) == [1, 2, 3, 4] and set(m.phase) == {"train"}
    assert m.train_loss.iloc[-1] < 0.6 * m.train_loss.iloc[0]
    final = json.loads((out / "final.json").read_text())
    assert final["best_val_acc"] > 0.3  # chance is 0.01
    assert final["test_acc"] > 0.3
    assert ((m.val_acc >= 0) & (m.val_acc <= 1)).all()


def test_submission_csv_is_byte_exact(trained):
    out, _ = trained
    text = (out / "submission.csv").read_bytes().decode()
    lines = text.split("\n")
    assert lines[0] == '"Id","Prediction1"' and text.endswith("\n") and "\r" not in text
    rows = lines[1:-1]
    assert len(rows) == 600
    for i, row in enumerate(rows):
        ident, pred = row.split(",")
        assert ident == f'"{i}"' and pred.startswith('"') and pred.endswith('"') and 0 <= int(pred[1:-1]) < 100


def test_predict_reproduces_the_submission(trained, cifar_dir, tmp_path):
    out, _ = trained
    run_inline("predict.py", out / "best.pt", "--data-dir", cifar_dir, "--out", tmp_path / "p.csv", "--device", "cpu")
    assert (tmp_path / "p.csv").read_bytes() == (out / "submission.csv").read_bytes()


def test_checkpoints_are_plain_tensors(trained):
    out, _ = trained
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(out / name, map_location="cpu", weights_only=True)
        assert ckpt["model_config"]["name"] == "convnet"


def test_baseline_defaults_are_basenet(tiny_cifar_dir, tmp_path):
    # as a new user types it: --download, pointed at the data set's own folder, which holds the data (offline here, so
    # a download would fail the run)
    proc = run_inline("train_cifar.py", "--data-dir", tiny_cifar_dir / "cifar-100-python", "--download", "--epochs", "1",
                      "--out", tmp_path / "b", *TINY)
    assert "basenet: 28,022 parameters" in proc.stdout
    config = json.loads((tmp_path / "b" / "config.json").read_text())["args"]
    assert config["optimizer"] == "sgd" and config["momentum"] == 0.9 and not config["nesterov"]
    assert config["aug"] == "none"
    assert not config["normalize"]


def test_design_card_command_builds_8_conv_layers(tiny_cifar_dir, tmp_path):
    run_inline("train_cifar.py", "--bn", "--depth", "8", "--aug", "flip,crop", "--width", "8", "--data-dir",
               tiny_cifar_dir, "--epochs", "1", "--out", tmp_path / "d8", *TINY)
    table = (tmp_path / "d8" / "architecture.md").read_text()
    assert table.count("| Conv2d |") == 8 and table.count("| BatchNorm2d |") == 8


def _deterministic_columns(path):
    return pd.read_csv(path).drop(columns=["epoch_seconds", "images_per_second", "eval_seconds"])


# Every resume test also covers the EMA (saved in last.pt) and per-sample MixUp/CutMix (drawn from the step's seed).
RESUME = ["--epochs", "4", "--deterministic", "--model", "convnet", "--depth", "2", "--width", "8", "--bn",
          "--dropout", "0.2", "--aug", "flip,crop,cutout", "--normalize", "--schedule", "cosine", "--batch-size", "50",
          "--ema", "0.9", "--mixup", "0.4", "--cutmix", "1.0", "--mix-prob", "0.8", *QUICK]


@pytest.fixture(scope="module")
def uninterrupted(cifar_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "r"
    run_script("train_cifar.py", "--data-dir", cifar_dir, "--out", out, *RESUME)
    return out


def _board(run_dir):
    """{tag: [(step, value)]} of the run's TensorBoard scalars, as TensorBoard shows them (purged steps hidden)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _same_run(a, b):
    pd.testing.assert_frame_equal(_deterministic_columns(a / "metrics.csv"), _deterministic_columns(b / "metrics.csv"))
    metrics, board = pd.read_csv(a / "metrics.csv"), _board(a)  # the resumed run's curves: every epoch once
    for column, tag in (("val_acc", "accuracy/val"), ("train_loss", "loss/train"), ("lr", "lr")):
        assert [s for s, _ in board[tag]] == list(metrics.epoch), tag
        assert [v for _, v in board[tag]] == pytest.approx(list(metrics[column]), rel=1e-6), tag
    assert {t: [s for s, _ in v] for t, v in board.items()} == {t: [s for s, _ in v] for t, v in _board(b).items()}
    wa = torch.load(a / "last.pt", weights_only=True)["model"]
    wb = torch.load(b / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "submission.csv").read_bytes() == (b / "submission.csv").read_bytes()


def _start(cifar_dir, out, *extra):
    return subprocess.Popen([sys.executable, "train_cifar.py", "--data-dir", str(cifar_dir), "--out", str(out), *RESUME,
                             *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=script_env())


def test_sigkill_then_resume_equals_uninterrupted(cifar_dir, tmp_path, uninterrupted):
    out = tmp_path / "r"
    proc = _start(cifar_dir, out)
    deadline = time.time() + 300
    while not (out / "metrics.csv").exists() or len((out / "metrics.csv").read_text().splitlines()) < 3:
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-epoch 3: no chance to save anything
    proc.wait()
    assert len(pd.read_csv(out / "metrics.csv")) == 2
    torch.load(out / "last.pt", weights_only=True)  # every file under its own name is whole ...
    # ... though a kill inside a write (epoch 2's plot, say) may leave its temporary file: the resume removes it
    (out / ".curves.png.planted.tmp").write_bytes(b"half")
    run_script("train_cifar.py", "--data-dir", cifar_dir, "--out", out, *RESUME, "--resume")
    assert not list(out.glob(".*.tmp"))
    assert list(pd.read_csv(out / "metrics.csv").epoch) == [1, 2, 3, 4]
    _same_run(out, uninterrupted)


def test_ctrl_c_saves_mid_epoch_and_resumes_exactly(cifar_dir, tmp_path, uninterrupted):
    out = tmp_path / "r"
    proc = _start(cifar_dir, out)
    deadline = time.time() + 300
    while not (out / "metrics.csv").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "--resume" in err
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] >= 1
    run_script("train_cifar.py", "--data-dir", cifar_dir, "--out", out, *RESUME, "--resume")
    _same_run(out, uninterrupted)


def test_existing_run_is_not_overwritten(trained, cifar_dir):
    out, _ = trained
    before = (out / "last.pt").read_bytes()
    proc = run_inline("train_cifar.py", "--data-dir", cifar_dir, "--out", out, *QUICK, check=False)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr
    proc = run_inline("train_cifar.py", "--data-dir", cifar_dir, "--out", out, "--resume", *QUICK, check=False)
    assert proc.returncode == 2 and "different config" in proc.stderr
    assert (out / "last.pt").read_bytes() == before


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "-1"], "--epochs must be at least 1"),
    (["--lr", "-0.1"], "--lr must be a positive number"),
    (["--batch-size", "100000"], "larger than the 3000 training images"),
    (["--aug", "flip,rotate"], "unknown augmentation rotate"),
    (["--depth", "0"], "--depth must be at least 1, got 0"),
    (["--mixup", "-1"], "--mixup must be >= 0, got -1.0"),
])
def test_nonsense_flags_are_refused(cifar_dir, tmp_path, flags, message):
    proc = run_inline("train_cifar.py", "--data-dir", cifar_dir, "--out", tmp_path / "x", *QUICK, *flags, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == proc.stderr.strip() and message in proc.stderr
    assert not (tmp_path / "x" / "last.pt").exists()


def test_missing_data_dir_is_one_sentence(tmp_path):
    proc = run_inline("train_cifar.py", "--data-dir", tmp_path / "nope", "--out", tmp_path / "x", *QUICK, check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("error:") and "does not exist" in proc.stderr


def test_non_finite_loss_stops_with_epoch_and_step(tiny_cifar_dir, tmp_path):
    proc = run_inline("train_cifar.py", "--data-dir", tiny_cifar_dir, "--out", tmp_path / "x", *TINY, "--lr", "1e12",
                      "--epochs", "2", check=False)
    assert proc.returncode == 1 and "non-finite at epoch 1 step" in proc.stderr


def test_predict_refuses_foreign_checkpoints(trained, cifar_dir, cub_dir, tmp_path):
    out, _ = trained
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    proc = run_inline("predict.py", bad, "--data-dir", cifar_dir, "--out", tmp_path / "p.csv", check=False)
    assert proc.returncode == 2 and "not a checkpoint" in proc.stderr
    ckpt = torch.load(out / "best.pt", weights_only=True)
    ckpt["model_config"]["name"] = "basenet"  # weights of one model, config of another
    torch.save(ckpt, tmp_path / "other.pt")
    proc = run_inline("predict.py", tmp_path / "other.pt", "--data-dir", cifar_dir, "--out", tmp_path / "p.csv", check=False)
    assert proc.returncode == 2 and "weights of a different model" in proc.stderr
    proc = run_inline("predict.py", out / "best.pt", "--data-dir", cub_dir, "--out", tmp_path / "p.csv", check=False)
    assert proc.returncode == 1 and "does not hold cifar-100-python" in proc.stderr
    assert not (tmp_path / "p.csv").exists()


def test_chaos_five_sigkills_then_resume_equals_uninterrupted(cifar_dir, tmp_path, uninterrupted):
    """SIGKILL at five moments (during evaluation, half-way through a checkpoint write, and at random times
    mid-step), resuming after each: the run ends as if never interrupted, with no half-written file left."""
    import random
    rng = random.Random(14)
    out, mark = tmp_path / "r", tmp_path / "mark"
    mark.mkdir()
    moments = ["eval", "save", "step", "step", "step"]
    rng.shuffle(moments)
    env = script_env({"CHAOS_MARK": str(mark)})
    killed = []
    for moment in moments:
        for m in mark.iterdir():
            m.unlink()
        proc = subprocess.Popen([sys.executable, "tests/chaos_run.py", "--data-dir", str(cifar_dir), "--out", str(out),
                                 *RESUME, "--resume"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        delay = rng.uniform(0.5, 2.5)
        while proc.poll() is None and time.time() < deadline:
            if moment == "step" and (out / "config.json").exists():
                time.sleep(delay)  # imports done and the run folder checked: somewhere in training
                break
            if moment != "step" and (mark / moment).exists():
                break
            time.sleep(0.01)
        if proc.poll() is not None:  # finished (or failed) before this moment came
            assert proc.returncode == 0, proc.stderr.read()
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        killed.append(moment)
    assert {"eval", "save", "step"} <= set(killed) and len(killed) >= 4, killed
    run_script("train_cifar.py", "--data-dir", cifar_dir, "--out", out, *RESUME, "--resume")
    _same_run(out, uninterrupted)
    assert not list(out.glob(".*.tmp"))


def test_out_below_a_file_is_one_sentence(cifar_dir, tmp_path):
    (tmp_path / "plain.txt").write_text("not a folder\n")
    proc = run_inline("train_cifar.py", "--data-dir", cifar_dir, "--out", tmp_path / "plain.txt" / "run", *QUICK, check=False)
    assert proc.returncode == 2 and "is a file" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "plain.txt").read_text() == "not a folder\n"


def test_disk_full_during_a_checkpoint_write_keeps_everything(cifar_dir, tmp_path, monkeypatch, capsys):
    """ENOSPC half-way through writing a checkpoint: one sentence, exit 1, and every file already in the run
    folder (last.pt, best.pt, metrics.csv, ...) byte for byte as it was, with no temporary file left."""
    import errno

    import engine
    import train_cifar
    out = tmp_path / "r"
    argv = ["--data-dir", str(cifar_dir), "--out", str(out), *map(str, QUICK), "--batch-size", "200"]
    engine.cli(train_cifar.main, argv + ["--epochs", "1"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_save = torch.save

    def disk_full(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(engine.torch, "save", disk_full)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        engine.cli(train_cifar.main, argv + ["--epochs", "2", "--resume"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and "No space left on device" in err and len(err.splitlines()) == 1
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {k: v for k, v in after.items() if k != "config.json"} == {k: v for k, v in before.items() if k != "config.json"}


@pytest.mark.parametrize("preset", sorted(__import__("train_cifar").PRESETS))
def test_every_preset_parses_and_runs_a_step(preset, tiny_cifar_dir, tmp_path):
    """--preset fills the recipe, later flags override it, config.json records the resolved flags."""
    import train_cifar
    args = train_cifar.parse_args(["--preset", preset, "--lr", "0.123"])
    assert args.lr == 0.123 and all(getattr(args, k) == v for k, v in train_cifar.PRESETS[preset].items() if k != "lr")
    off = train_cifar.parse_args(["--preset", preset, "--no-normalize", "--no-nesterov", "--no-residual"])
    assert not (off.normalize or off.nesterov or off.residual)  # a preset's switches can be turned off too
    small = {"final": ["--depth", "10", "--widen", "1"], "cpu5": ["--width", "8"], "baseline": []}[preset]
    out = tmp_path / preset
    run_inline("train_cifar.py", "--data-dir", tiny_cifar_dir, "--out", out, "--preset", preset, "--epochs", "1",
               "--batch-size", "100", *small, *TINY)
    config = json.loads((out / "config.json").read_text())["args"]
    assert config["preset"] == preset and config["epochs"] == 1
    assert config["model"] == ({**train_cifar.RECIPE, **train_cifar.PRESETS[preset]}["model"] or "basenet")
    assert (out / "submission.csv").is_file()
    final = json.loads((out / "final.json").read_text())  # presets with TTA measure it on validation too
    assert (final["val_acc_tta"] is None) == (train_cifar.PRESETS[preset].get("tta", "none") == "none")
    assert final["val_acc_tta"] is None or 0 <= final["val_acc_tta"] <= 1


def test_predict_averages_an_ensemble_across_preprocessing(trained, cifar_dir, tmp_path):
    """predict.py with a normalised ConvNet and a BaseNet on raw pixels writes the argmax of their averaged softmax,
    each network seeing its own preprocessing (computed here by hand)."""
    import checkpoints
    import data
    import models
    out, _ = trained
    other = tmp_path / "basenet"
    run_inline("train_cifar.py", "--data-dir", cifar_dir, "--out", other, "--epochs", "1", "--seed", "7",
               "--batch-size", "100", *QUICK)
    run_inline("predict.py", out / "best.pt", other / "best.pt", "--data-dir", cifar_dir, "--out", tmp_path / "e.csv",
               "--device", "cpu", "--tta", "flip")
    cifar = data.load_cifar100(cifar_dir)
    x_test, y_test = torch.from_numpy(cifar["test_x"]), torch.from_numpy(cifar["test_y"])
    probs, configs = 0, []
    for ckpt_path in (out / "best.pt", other / "best.pt"):
        ckpt = checkpoints.load_checkpoint(ckpt_path)
        net = models.build_model(ckpt["model_config"])
        net.load_state_dict(ckpt["model"])
        net.eval()
        cfg = ckpt["data_config"]
        configs.append((ckpt["model_config"]["name"], cfg["mean"]))
        loader = data.DeviceLoader(x_test, y_test, 256, mean=cfg["mean"], std=cfg["std"])
        with torch.no_grad():  # each network: the mean of its softmax over (image, mirror)
            probs = probs + torch.cat([sum(net(v).softmax(1) for v in (x, x.flip(3))) / 2 for x, _ in loader])
    assert configs[0][0] == "convnet" and configs[1][0] == "basenet" and configs[0][1] != configs[1][1]  # mixed
    expected = probs.argmax(1).tolist()
    got = [int(line.split(",")[1].strip('"')) for line in (tmp_path / "e.csv").read_text().splitlines()[1:]]
    assert got == expected


def fake_clock(dt):
    """engine.now for the time budget: each call is dt seconds after the one before, so each interval the budget
    measures between two readings (a block of steps, a validation pass) lasts dt."""
    t = [0.0]

    def now():
        t[0] += dt
        return t[0]
    return now


class Crash(Exception):
    pass


def test_time_budget_chooses_the_epochs_from_the_measured_steps(cifar_dir, tmp_path, monkeypatch):
    """The epochs come from the measured step time (a fake clock: the timed steps take dt seconds), the schedule is laid
    over them from the start, config.json records it all, and a resumed budgeted run, on a clock twice as fast, keeps
    the chosen epochs and ends as the uninterrupted run does."""
    import engine
    import fixtures
    import run_files
    import train_cifar
    small = fixtures.write_cifar100(tmp_path / "data", per_class_train=15, per_class_test=2)  # 10 steps an epoch
    argv = ["--data-dir", str(small), "--device", "cpu", "--val-per-class", "5", "--quiet", "--batch-size", "100",
            "--schedule", "onecycle", "--lr", "0.05", "--time-budget", "30", "--deterministic"]
    chosen = {}
    for dt in (1.0, 0.7):
        monkeypatch.setattr(engine, "now", fake_clock(dt))
        engine.cli(train_cifar.main, [*argv, "--out", str(tmp_path / f"dt{dt}")])
        record = json.loads((tmp_path / f"dt{dt}" / "config.json").read_text())["time_budget"]
        assert record["timed_steps"] == min(engine.CALIBRATION_STEPS, 10 - 2)  # 2 warm-up steps, then the epoch's rest
        assert record["step_seconds"] == pytest.approx(dt / record["timed_steps"])
        assert (record["eval_seconds"], record["startup_seconds"]) == (dt, dt)
        assert record["end_seconds"] == pytest.approx(3 * dt)  # the real end_epoch: its clock ticks around validation
        assert record["final_seconds"] == pytest.approx(dt * (200 + 500) / 500)  # test + validation images
        epoch = dt + record["steps_per_epoch"] * record["step_seconds"] + 3 * dt
        assert record["epoch_seconds"] == pytest.approx(epoch)
        assert record["epochs"] == engine.epochs_for_budget(30, record["elapsed_seconds"], epoch,
                                                            record["final_seconds"]) >= 2
        rows = pd.read_csv(tmp_path / f"dt{dt}" / "metrics.csv")
        assert len(rows) == record["epochs"] and rows["lr"].iloc[-1] < 0.05 * 0.1  # one-cycle over all of them
        chosen[dt] = record["epochs"]
    assert chosen[0.7] > chosen[1.0]  # a faster step, more epochs
    calls, real = [0], run_files.write_metrics

    def write_then_crash(path, *a, **kw):  # after the run's first epoch (the budget's timing writes a scratch copy)
        real(path, *a, **kw)
        calls[0] += Path(path).parent == tmp_path / "cut"
        if calls[0] == 1:
            raise Crash
    monkeypatch.setattr(engine, "now", fake_clock(1.0))
    monkeypatch.setattr(run_files, "write_metrics", write_then_crash)
    with pytest.raises(Crash):
        engine.cli(train_cifar.main, [*argv, "--out", str(tmp_path / "cut")])
    monkeypatch.setattr(run_files, "write_metrics", real)
    monkeypatch.setattr(engine, "now", fake_clock(0.25))  # a resume does not measure again
    engine.cli(train_cifar.main, [*argv, "--out", str(tmp_path / "cut"), "--resume"])
    config = json.loads((tmp_path / "cut" / "config.json").read_text())  # the resume kept the budget's record
    assert config["time_budget"]["epochs"] == config["epochs"] == chosen[1.0] != 15
    assert json.loads((tmp_path / "cut" / "final.json").read_text())["epochs"] == chosen[1.0]
    cols = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr"]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "cut" / "metrics.csv")[cols],
                                  pd.read_csv(tmp_path / "dt1.0" / "metrics.csv")[cols])
    assert (tmp_path / "cut" / "submission.csv").read_bytes() == (tmp_path / "dt1.0" / "submission.csv").read_bytes()


def test_a_budget_that_cannot_hold_one_epoch_says_so(tiny_cifar_dir, tmp_path):
    """--time-budget 0.01: not even one epoch fits after the start-up and the timing; one warning with the time an
    epoch takes, then one epoch (at least one, over the budget), recorded as holding none."""
    proc = run_inline("train_cifar.py", "--data-dir", tiny_cifar_dir, "--out", tmp_path / "r", "--time-budget", "0.01",
                      "--batch-size", "100", *TINY)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: --time-budget 0.01 s")]
    assert len(warnings) == 1 and "cannot hold one epoch here: one takes about" in warnings[0], proc.stderr
    said = float(warnings[0].split("one takes about ")[1].split(" s")[0])  # with the digits it needs: not "0 s"
    assert said > 0
    record = json.loads((tmp_path / "r" / "config.json").read_text())["time_budget"]
    assert record["fits_epochs"] == 0 and record["epochs"] == 1 and record["epoch_seconds"] > 0
    assert len(pd.read_csv(tmp_path / "r" / "metrics.csv")) == 1
    run_inline("train_cifar.py", "--data-dir", tiny_cifar_dir, "--out", tmp_path / "r", "--time-budget", "0.01",
               "--batch-size", "100", *TINY, "--epochs", "5", "--resume")  # a record of 0 epochs caps --epochs 5 too
    assert len(pd.read_csv(tmp_path / "r" / "metrics.csv")) == 1


def test_time_budget_with_epochs_caps_and_help_says_so():
    import engine
    import train_cifar
    def resolved(argv):
        args = train_cifar.parse_args(argv)
        train_cifar.resolve(args, argv)
        return args
    assert resolved(["--time-budget", "60", "--epochs", "3"]).epochs_cap == 3
    assert resolved(["--time-budget", "60"]).epochs_cap is None  # the default's 15 does not cap
    assert resolved(["--preset", "cpu5"]).time_budget == 300
    assert engine.epochs_for_budget(100, 10, 25, 15) == 3 and engine.epochs_for_budget(10, 10, 25, 15) == 0
    text = run_script("train_cifar.py", "--help").stdout
    assert "--epochs given too is the most it may choose" in " ".join(text.split())


def sigterm_after(monkeypatch, epochs):
    """SIGTERM this process once metrics.csv holds `epochs` rows, as a scheduler's kill would: fit's handler saves
    last.pt at the next step and the script exits 130."""
    import os

    import run_files
    real = run_files.write_metrics

    def write(path, history):
        real(path, history)
        if len(history) == epochs:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(run_files, "write_metrics", write)
    return real


def test_resume_keeps_the_runs_length(tiny_cifar_dir, tmp_path, monkeypatch):
    """A 40-epoch cosine run, SIGTERMed after 2 epochs and resumed without --epochs (default 15), trains 40 epochs on
    the 40-epoch schedule; config.json and final.json say 40."""
    import engine
    import run_files
    out, argv = tmp_path / "r", ["--data-dir", tiny_cifar_dir, "--schedule", "cosine", "--lr", "0.05", "--batch-size",
                                 "200", "--no-tensorboard", *TINY]
    real = sigterm_after(monkeypatch, 2)
    assert run_inline("train_cifar.py", *argv, "--epochs", "40", "--out", out, check=False).returncode == 130
    monkeypatch.setattr(run_files, "write_metrics", real)
    assert "now trains" not in run_inline("train_cifar.py", *argv, "--out", out, "--resume").stdout
    rows = pd.read_csv(out / "metrics.csv")
    assert list(rows.epoch) == list(range(1, 41))
    steps = 800 // 200
    expected = [round(0.05 * engine.lr_factor(e * steps - 1, 40 * steps, 0, "cosine"), 8) for e in rows.epoch]
    assert list(rows.lr) == pytest.approx(expected, abs=1e-8)
    config, final = (json.loads((out / name).read_text()) for name in ("config.json", "final.json"))
    assert config["epochs"] == config["args"]["epochs"] == final["epochs"] == 40


def test_resume_with_other_epochs_says_how_the_schedule_changes(tiny_cifar_dir, tmp_path, monkeypatch):
    import run_files
    out, argv = tmp_path / "r", ["--data-dir", tiny_cifar_dir, "--schedule", "cosine", "--lr", "0.05", "--batch-size",
                                 "200", "--no-tensorboard", *TINY, "--out", tmp_path / "r"]
    real = sigterm_after(monkeypatch, 2)
    assert run_inline("train_cifar.py", *argv, "--epochs", "6", check=False).returncode == 130
    monkeypatch.setattr(run_files, "write_metrics", real)
    said = run_inline("train_cifar.py", *argv, "--epochs", "4", "--resume").stdout
    assert ("--epochs 4: this run was started with 6 epochs and now trains 4; the cosine schedule is laid over 4 from "
            "here (the next step's lr: 0.5 of --lr, 0.75 before)") in said, said
    assert len(pd.read_csv(out / "metrics.csv")) == 4
    assert json.loads((out / "config.json").read_text())["epochs"] == 4
    said = run_inline("train_cifar.py", *argv, "--epochs", "3", "--resume").stdout  # shorter than what it trained
    assert "it has trained 4 epochs already, so it stops here" in said, said
    config, final = (json.loads((out / name).read_text()) for name in ("config.json", "final.json"))
    assert config["epochs"] == final["epochs"] == 4  # the epochs it trained, not the smaller --epochs


def test_predict_on_last_pt_uses_the_ema_weights(tiny_cifar_dir, tmp_path):
    """last.pt of an --ema run predicts with the EMA's weights: after one epoch, best.pt's (the EMA's, validated)."""
    import checkpoints
    import predict
    out = tmp_path / "r"
    run_inline("train_cifar.py", "--data-dir", tiny_cifar_dir, "--out", out, "--epochs", "1", "--ema", "0.5",
               "--bn", "--depth", "2", "--width", "8", "--batch-size", "100", "--no-tensorboard", *TINY)
    last, best = checkpoints.load_checkpoint(out / "last.pt"), checkpoints.load_checkpoint(out / "best.pt")
    assert any(not torch.equal(last["model"][k], best["model"][k]) for k in best["model"])  # raw weights differ
    model = predict.load_model(last, out / "last.pt", torch.device("cpu"), 100, tiny_cifar_dir)
    assert all(torch.equal(v, best["model"][k]) for k, v in model.state_dict().items())
    for name in ("last", "best"):
        run_inline("predict.py", out / f"{name}.pt", "--data-dir", tiny_cifar_dir, "--out", tmp_path / f"{name}.csv")
    assert (tmp_path / "last.csv").read_bytes() == (tmp_path / "best.csv").read_bytes()
    from PIL import Image
    Image.new("RGB", (40, 30), (200, 90, 30)).save(tmp_path / "photo.png")
    said = run_inline("predict.py", out / "last.pt", "--images", tmp_path / "photo.png", "--explain", tmp_path / "cam")
    assert said.stdout.count("predicting with the EMA's weights") == 1, said.stdout  # once, though loaded twice


def test_predict_images_names_cifar_classes_and_matches_the_test_split(trained, cifar_dir, tmp_path, monkeypatch):
    """A CIFAR checkpoint on pictures: a CIFAR test image saved as PNG gets the class --data-dir gives it, by name; a
    larger photo is centre-cropped and resized to 32 px. A checkpoint without class names prints indices and says so;
    a missing path is one sentence with nothing written. Over Pillow's decompression-bomb limit a JPEG is predicted
    (decoded at a fraction of its size) and any other image is skipped with a warning naming it."""
    import checkpoints
    import data
    from PIL import Image
    out, _ = trained
    test_x = data.load_cifar100(cifar_dir)["test_x"]
    submitted = pd.read_csv(out / "submission.csv").Prediction1
    (tmp_path / "photos").mkdir()
    for i in range(3):
        Image.fromarray(test_x[i].transpose(1, 2, 0)).save(tmp_path / "photos" / f"test{i}.png")
    Image.fromarray(test_x[3].transpose(1, 2, 0)).resize((96, 64)).save(tmp_path / "photos" / "wide.jpg")
    proc = run_inline("predict.py", out / "best.pt", "--images", tmp_path / "photos", "--top", "2",
                      "--out", tmp_path / "top.json")
    rows = {Path(r["path"]).name: r["top"] for r in json.loads((tmp_path / "top.json").read_text())}
    assert len(rows) == 4 and all(len(top) == 2 for top in rows.values())
    for i in range(3):
        assert rows[f"test{i}.png"][0]["name"] == f"class_{submitted[i]}"
        assert f"test{i}.png  class_{submitted[i]} " in proc.stdout
    old = checkpoints.load_checkpoint(out / "best.pt")
    del old["data_config"]["classes"]
    torch.save(old, tmp_path / "old.pt")
    proc = run_inline("predict.py", tmp_path / "old.pt", "--images", tmp_path / "photos" / "test0.png")
    assert "holds no class names" in proc.stdout and f"test0.png  {submitted[0]} " in proc.stdout
    proc = run_inline("predict.py", out / "best.pt", "--images", tmp_path / "nowhere", "--out", tmp_path / "x.csv",
                      check=False)
    assert proc.returncode == 2 and "no such file or folder" in proc.stderr and not (tmp_path / "x.csv").exists()
    Image.fromarray(test_x[4].transpose(1, 2, 0)).resize((96, 64)).save(tmp_path / "photos" / "wide.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 32 * 32 * 4)
    proc = run_inline("predict.py", out / "best.pt", "--images", tmp_path / "photos", "--out", tmp_path / "x.csv")
    assert "skipping" in proc.stderr and "wide.png: 96x64 is more pixels than Pillow's decompression-bomb" in proc.stderr
    assert "wide.jpg" not in proc.stderr and "predicted 4 images" in proc.stdout
