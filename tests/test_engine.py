"""Schedules, atomic writes and the fast-path flags of the shared loop."""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

import checkpoints
import devices
import engine
import flags
import run_files
from conftest import ROOT, SHARED_CUB, run_script


def test_lr_schedules():
    f = engine.lr_factor
    assert [f(s, 100, 0, "none") for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    assert [f(s, 100, 0, "step") for s in (0, 49, 50, 74, 75, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert f(0, 100, 0, "cosine") == 1.0 and f(50, 100, 0, "cosine") == pytest.approx(0.5)
    assert f(99, 100, 0, "cosine") < 0.001
    assert [f(s, 100, 10, "cosine") for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])  # linear warm-up
    one = [f(s, 100, 0, "onecycle") for s in range(100)]
    assert one.index(max(one)) == 24 and one[0] < 0.1 and one[-1] < 0.02  # up for 25%, then down to 0
    assert all(math.isfinite(v) and v >= 0 for v in one)


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "metrics.csv"
    run_files.atomic_write_text(path, "old\n")

    def explode(f):
        f.write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run_files.atomic_write(path, explode)
    assert path.read_text() == "old\n" and list(tmp_path.iterdir()) == [path]


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    run_files.atomic_torch_save({"rng": checkpoints.rng_state(torch.device("cpu"))}, tmp_path / "s.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    checkpoints.set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"], torch.device("cpu"))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_fast_path_flags_run_on_cpu(tiny_cifar_dir, tmp_path):
    """bf16 autocast + channels-last + torch.compile (the GPU default) also run on CPU, and the compiled
    model's checkpoint loads into a plain model (predict.py reproduces the run's CSV)."""
    out, cifar_dir = tmp_path / "fast", tiny_cifar_dir
    run_script("train_cifar.py", "--data-dir", cifar_dir, "--out", out, "--device", "cpu", "--val-per-class", "4",
               "--quiet", "--epochs", "1", "--amp", "--channels-last", "--compile", "--aug", "flip,crop,cutout",
               "--normalize", "--batch-size", "100")
    keys = torch.load(out / "best.pt", weights_only=True)["model"].keys()
    assert not any(k.startswith(("_orig_mod", "module.")) for k in keys)
    run_script("predict.py", out / "best.pt", "--data-dir", cifar_dir, "--out", tmp_path / "p.csv", "--device", "cpu",
               "--amp")
    assert (tmp_path / "p.csv").read_bytes() == (out / "submission.csv").read_bytes()


# ----------------------------------------------------------------------------- the GPU path, pinned on a CPU

def test_cpu_run_on_a_gpu_machine_uses_gloo_and_no_cuda_state(monkeypatch):
    """torchrun ... --device cpu on a machine with GPUs: gloo (NCCL cannot carry CPU tensors), and no CUDA RNG
    state is read; a CUDA device gets NCCL bound to its GPU."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("CUDA RNG read on a CPU run"))
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *a: pytest.fail("CUDA RNG read on a CPU run"))
    monkeypatch.setattr(engine.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(engine.dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    monkeypatch.setattr(engine.dist, "get_rank", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")  # as torchrun sets it
    assert devices.setup_distributed(torch.device("cpu")) == (1, 2)
    assert calls == [("gloo", {})]
    assert checkpoints.rng_state(torch.device("cpu"))["cuda"] == []
    gpu = torch.device("cuda", 0)
    devices.setup_distributed(gpu)
    assert calls[-1] == ("nccl", {"device_id": gpu})


def test_checkpoints_load_to_the_cpu_whatever_the_device(cifar_dir, tmp_path, monkeypatch):
    """Resume (last.pt), best.pt and predict.py load to the CPU: on a GPU, RNG states mapped to the device break
    torch.set_rng_state, and load_state_dict places the weights anyway."""
    import predict
    import train_cifar
    seen = []
    real_load = torch.load

    def spy(*args, **kw):
        seen.append(kw.get("map_location"))
        return real_load(*args, **kw)

    monkeypatch.setattr(checkpoints.torch, "load", spy)
    common = ["--data-dir", str(cifar_dir), "--out", str(tmp_path / "run"), "--device", "cpu", "--val-per-class", "10",
              "--quiet", "--batch-size", "200"]
    train_cifar.main(common + ["--epochs", "1"])
    train_cifar.main(common + ["--epochs", "2", "--resume"])
    predict.main([str(tmp_path / "run" / "best.pt"), "--data-dir", str(cifar_dir), "--out", str(tmp_path / "p.csv"),
                 "--device", "cpu"])
    assert len(seen) >= 4 and all(m == "cpu" for m in seen), seen


def test_deterministic_flag_is_strict(monkeypatch):
    """--deterministic: cuBLAS workspace fixed, TF32 off, deterministic cuDNN, and ops without a deterministic
    kernel raise (not warn)."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        devices.set_determinism(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
        devices.set_determinism(False)


def test_gpu_check_needs_cuda_and_says_so():
    proc = run_script("tools/gpu_check.py", check=False, env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 1 and "needs a CUDA GPU" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flag, value", [("epochs", 0), ("lr", -0.1), ("batch_size", 0), ("wd", -1.0),
                                         ("warmup", -1.0), ("label_smoothing", 1.0), ("momentum", 1.5),
                                         ("ema", 1.0), ("mixup", -1.0), ("cutmix", -0.5), ("mix_prob", 2.0),
                                         ("dropout", 1.0), ("accum_steps", 0), ("accum_steps", 9)])
def test_a_range_error_names_the_one_flag_that_is_wrong(flag, value):
    import argparse
    good = dict(epochs=1, lr=0.1, batch_size=8, wd=0.0, warmup=0.0, label_smoothing=0.0, momentum=0.9, ema=0.0,
                mixup=0.0, cutmix=0.0, mix_prob=1.0, dropout=0.0, accum_steps=1)
    flags.check_training_args(argparse.Namespace(**good), 100)
    with pytest.raises(flags.UsageError) as e:
        flags.check_training_args(argparse.Namespace(**{**good, flag: value}), 100)
    name = "--" + flag.replace("_", "-")
    assert str(e.value).startswith(f"{name} must be ") and str(e.value).endswith(f", got {value}")
    assert str(e.value).count("--") == 1  # no other flag named


def test_wall_clock_adds_the_earlier_processes(tmp_path):
    first = checkpoints.WallClock(tmp_path, resume=False, start=0.0)  # as if this process started at perf_counter 0
    first.save()
    saved = json.loads((tmp_path / "wall.json").read_text())["seconds"]
    assert saved > 0
    resumed = checkpoints.WallClock(tmp_path, resume=True)
    assert resumed.before == saved and resumed.seconds() >= saved
    assert checkpoints.WallClock(tmp_path, resume=False).before == 0.0  # a fresh run starts from zero


def test_gpu_check_loader_checks_run_on_the_cpu(clean_cub_dir, tmp_path):
    """The GPU check is run rarely: its loader checks run here on the CPU, on the generated tree (with its PNG named
    .jpg, grayscale and CMYK files), so a broken check is found before a GPU session is spent on it."""
    import argparse
    sys.path.insert(0, str(ROOT / "tools"))
    import gpu_check
    ctx = gpu_check.Context(argparse.Namespace(cub_dir=str(clean_cub_dir), weights=None, out=str(tmp_path / "out")),
                            tmp_path, device="cpu")
    pixels = gpu_check.check_loader_pixels(ctx)
    assert "nvjpeg: mean 0.0" in pixels
    decode = gpu_check.check_gpu_decode(ctx)
    assert "to PIL at scan time: " in decode and "not a JPEG" in decode and "grayscale" in decode
    assert "EXIF orientation 6" in decode and "progressive JPEGs" in decode


def test_gpu_check_decode_under_load_runs_every_row_on_the_cpu_and_puts_everything_back(clean_cub_dir, tmp_path):
    """The decode-under-load check's own code on the CPU: every row of DECODE_ROWS runs (each planted fault put in and
    taken out again), and on a CPU, where nothing races, every row must pass."""
    import argparse

    import device_images
    sys.path.insert(0, str(ROOT / "tools"))
    import gpu_check
    ctx = gpu_check.Context(argparse.Namespace(cub_dir=str(clean_cub_dir), weights=None, out=str(tmp_path / "out")),
                            tmp_path, device="cpu")
    before = (torch.Tensor.record_stream, torch.cuda.Stream.wait_stream, device_images.jpeg_decoder,
              device_images.DECODE_ORDER, torch.are_deterministic_algorithms_enabled())
    figure = gpu_check.check_decode_under_load(ctx, batch_size=6, trials=1)
    assert figure.startswith("dry run") and all(f"{name} [" in figure for name, _, _ in gpu_check.DECODE_ROWS)
    assert "[torchvision]: pass" in figure  # the unordered row is forced onto torchvision's decoder
    after = (torch.Tensor.record_stream, torch.cuda.Stream.wait_stream, device_images.jpeg_decoder,
             device_images.DECODE_ORDER, torch.are_deterministic_algorithms_enabled())
    assert after == before
    with gpu_check.planted(("no-record-stream", "no-wait-stream", "unordered"), torch.device("cpu")) as decoder:
        assert decoder == "torchvision" and device_images.DECODE_ORDER == "none"
        assert torch.Tensor.record_stream is not before[0] and torch.cuda.Stream.wait_stream is not before[1]


def test_decode_verdict_fails_on_a_planted_row_that_passes_and_a_shipped_row_that_fails():
    """On a GPU every row must have its outcome: a planted fault the check did not see fails it (it would measure
    nothing), as does a shipped row that differs from the idle decode; on a CPU only failing rows fail it."""
    sys.path.insert(0, str(ROOT / "tools"))
    import gpu_check
    right = [(name, expected, expected, int(expected == "fail"), 100.0, "torchcodec")
             for name, _, expected in gpu_check.DECODE_ROWS]
    assert gpu_check.decode_verdict(right, 1, on_gpu=True).startswith("every planted fault seen failing")
    unseen = [r if r[1] == "pass" or "record_stream" not in r[0] else (*r[:2], "pass", 0, *r[4:]) for r in right]
    with pytest.raises(gpu_check.CheckFailed, match="record_stream a no-op: passed: the check cannot see this fault"):
        gpu_check.decode_verdict(unseen, 1, on_gpu=True)
    broken = [(*right[0][:2], "fail", 1, *right[0][4:]), *right[1:]]
    with pytest.raises(gpu_check.CheckFailed, match="shipped: differs from the idle decode: the ordering does not hold"):
        gpu_check.decode_verdict(broken, 1, on_gpu=True)
    calm = [(*r[:2], "pass", 0, *r[4:]) for r in right]
    assert gpu_check.decode_verdict(calm, 1, on_gpu=False).startswith("dry run")
    with pytest.raises(gpu_check.CheckFailed, match="on a CPU"):
        gpu_check.decode_verdict(right, 1, on_gpu=False)


def test_gpu_check_default_set_fits_its_slot():
    """--list prints every default check with its estimated seconds; they sum to at most 420 s, and --quick is a
    subset of the checks that exist."""
    proc = run_script("tools/gpu_check.py", "--list", env={"CUDA_VISIBLE_DEVICES": ""})
    sys.path.insert(0, str(ROOT / "tools"))
    import gpu_check
    listed = {line.split()[0]: int(line.split()[1]) for line in proc.stdout.splitlines()
              if line.startswith("  ") and not line.strip().startswith("total")}
    assert listed == gpu_check.ESTIMATES and list(listed) == gpu_check.CHECKS
    assert sum(listed.values()) <= 420 and f"{sum(listed.values())} s" in proc.stdout
    assert set(gpu_check.QUICK) <= set(gpu_check.CHECKS + gpu_check.OPTIONAL)
    assert "cpu-tests" not in gpu_check.CHECKS  # the device-path tests pin the CPU: not a GPU check
    for name, _, expected in gpu_check.DECODE_ROWS:  # each planted row with the outcome it must have
        assert f"- {name}: must {expected}" in proc.stdout and (expected == "fail") == name.startswith("planted")


def test_every_difference_check_fails_on_a_shifted_image(clean_cub_dir):
    """Each pixel limit of gpu_check passes an image against itself and fails it against the image shifted by one
    pixel: a check that cannot fail would measure nothing."""
    from PIL import Image
    sys.path.insert(0, str(ROOT / "tools"))
    import gpu_check
    real = sorted(SHARED_CUB.glob("images/*/*.jpg"))[:4] if SHARED_CUB.is_dir() else []
    paths = real or sorted(clean_cub_dir.glob("images/*/*.jpg"))[4:8]
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((64, 64))).copy())
                          for p in paths]).permute(0, 3, 1, 2)
    shifted = images.roll(1, dims=3)
    for name, limits in gpu_check.LIMITS.items():
        if "mean" not in limits:
            continue
        assert gpu_check.compare_images(name, images, images, limits)[0] == 0
        with pytest.raises(gpu_check.CheckFailed, match="over the limit"):
            gpu_check.compare_images(name, shifted, images, limits)


def test_a_run_without_tensorboard_warns_once_and_finishes(cub_dir, tmp_path):
    """tensorboard missing (the CUDA 12 install line once lacked it): one warning, every other file of the run, and
    no event files; on the nvjpeg loader with --deterministic, on the CPU."""
    blocker = tmp_path / "site" / "tensorboard"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('tensorboard is blocked for this test')\n")
    out = tmp_path / "run"
    proc = run_script("finetune_birds.py", "--data-dir", cub_dir, "--weights", "none", "--arch", "resnet18",
                      "--device", "cpu", "--img-size", "32", "--batch-size", "4", "--val-frac", "0.25", "--epochs", "1",
                      "--lp-epochs", "1", "--max-bad-frac", "0.2", "--quiet", "--workers", "0", "--loader", "nvjpeg",
                      "--deterministic", "--out", out, env={"PYTHONPATH": str(tmp_path / "site")})
    mentions = [line for line in proc.stderr.splitlines() if "tensorboard" in line.lower()]
    assert len(mentions) == 1 and mentions[0].startswith("warning: no TensorBoard event files"), proc.stderr
    assert (out / "final.json").is_file() and (out / "submission.csv").is_file()
    assert not list(out.rglob("events.out.tfevents.*"))


def test_weight_decay_skips_what_a_timm_model_names_in_no_weight_decay():
    """A timm ViT names pos_embed and cls_token in no_weight_decay(): they get none, as timm's optimizer factory
    gives them, inside a transfer network too; biases and norms none; weights the flag's."""
    import argparse

    import engine
    import models
    model = models.TransferNet("vit_tiny_patch16_224", 5)
    args = argparse.Namespace(lr=0.1, wd=0.05, optimizer="sgd", momentum=0.9, nesterov=False)
    optimizer = engine.make_optimizer(model.param_groups(), args, engine.no_weight_decay_params(model))
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert decay[id(named["backbone.pos_embed"])] == decay[id(named["backbone.cls_token"])] == 0.0
    assert decay[id(named["backbone.blocks.0.norm1.weight"])] == 0.0
    assert decay[id(named["backbone.blocks.0.attn.qkv.weight"])] == decay[id(named["head.1.weight"])] == 0.05


def test_prediction_streams_keep_the_loaders_order_and_errors():
    """predict_probs in several streams (predict.py's default on a CPU with two or more threads): the loader's order,
    the one-stream probabilities, no autograd, torch's thread count back afterwards; an error in a stream's loading
    ends the call with that error, the other stream stopping after its batch."""
    import argparse

    import data
    import predict
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 5))
    batches = [(torch.randn(n, 3, 12, 12), torch.arange(k * 10, k * 10 + n)) for k, n in enumerate((256, 3, 4, 1, 4, 2))]
    cpu, threads = torch.device("cpu"), torch.get_num_threads()
    one = engine.predict_probs(model, batches, cpu, False, ("flip",))
    for streams in (2, 3):
        p, y = engine.predict_probs(model, batches, cpu, False, ("flip",), streams=streams)
        assert torch.equal(y, one[1]) and torch.allclose(p, one[0], atol=1e-6)
        assert not p.requires_grad and torch.get_num_threads() == threads

    def failing():
        yield from batches[:3]
        raise data.DataError("the fourth batch does not decode")
    with pytest.raises(data.DataError, match="fourth batch"):
        engine.predict_probs(model, failing(), cpu, False, streams=2)
    assert torch.get_num_threads() == threads
    # bench's reference times the model alone the same way: every stream forwarding at once
    import bench
    rates = bench.model_alone(model, cpu, 12, (2, 4), seconds=0.05, streams=2)
    assert set(rates) == {2, 4} and min(rates.values()) > 0 and torch.get_num_threads() == threads
    # the default: two streams on a CPU with two or more torch threads, one on a single thread or a GPU; --streams wins
    default = argparse.Namespace(streams=None)
    try:
        torch.set_num_threads(2)
        assert predict.streams(default, cpu) == 2 and predict.streams(default, torch.device("cuda")) == 1
        torch.set_num_threads(1)
        assert predict.streams(default, cpu) == 1 and predict.streams(argparse.Namespace(streams=3), cpu) == 3
    finally:
        torch.set_num_threads(threads)
