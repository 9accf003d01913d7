"""First contact with the GPUs people have: a driver older than torch's CUDA build (a stand-in nvidia-smi of the 550
series on PATH, torch seeing no GPU) is one sentence before any work in every script and in run_all.sh, and
`python devices.py` shows it with its fix; out of GPU memory (planted) is one sentence and `--resume --accum-steps`
goes on; `--accum-steps` trains as the whole batch does."""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

import devices
import fixtures
from conftest import ROOT, run_inline

TINY = ["--device", "cpu", "--val-per-class", "4", "--quiet"]


@pytest.fixture
def old_driver(tmp_path, monkeypatch):
    """A Tesla T4 on driver 550.54.15 (CUDA 12.4) as nvidia-smi reports it, and a torch that sees no GPU: PATH for
    the processes a test starts, and this one's torch told so. Yields PATH's environment."""
    path = fixtures.stand_in_nvidia_smi(tmp_path / "bin")
    monkeypatch.setenv("PATH", path)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    devices.nvidia_driver.cache_clear()
    yield {**os.environ, "PATH": path}
    devices.nvidia_driver.cache_clear()


def said_old_driver(text):
    return ("Tesla T4 (driver 550.54.15, which runs up to CUDA 12.4)" in text and "download.pytorch.org/whl/cu126" in text
            and "nvidia-dali-cuda120" in text and (f"built for CUDA {torch.version.cuda}" in text
                                                   if torch.version.cuda else "built without CUDA" in text))


def test_every_script_stops_before_any_work_on_a_driver_older_than_torch(old_driver, tiny_cifar_dir, cub_dir, tmp_path):
    runs = [("train_cifar.py", "--data-dir", tiny_cifar_dir, "--out", tmp_path / "c", "--quiet"),
            ("finetune_birds.py", "--data-dir", cub_dir, "--out", tmp_path / "b", "--quiet"),
            ("predict.py", tmp_path / "none.pt", "--images", tmp_path),
            ("train_cifar.py", "--data-dir", tiny_cifar_dir, "--out", tmp_path / "d", "--device", "cuda")]
    for script, *argv in runs:
        proc = run_inline(script, *argv, check=False)
        errors = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(errors) == 1 and said_old_driver(errors[0]), (script, proc.stderr)
    assert not any((tmp_path / d).exists() for d in "cbd")  # nothing written: no work began


def test_gpus_hidden_on_purpose_are_not_a_mismatch(old_driver, monkeypatch):
    assert devices.unusable_gpu() is not None
    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert devices.unusable_gpu() is None and devices.pick_device() == torch.device("cpu")


def test_device_cpu_runs_on_purpose_beside_an_old_driver(old_driver, tiny_cifar_dir, tmp_path):
    run_inline("train_cifar.py", "--data-dir", tiny_cifar_dir, "--out", tmp_path / "r", "--epochs", "1",
               "--batch-size", "100", "--no-tensorboard", *TINY)
    assert len(pd.read_csv(tmp_path / "r" / "metrics.csv")) == 1


def test_devices_py_shows_the_mismatch_and_its_fix(old_driver):
    if subprocess.run([sys.executable, "-c", "import torch; exit(torch.cuda.is_available())"]).returncode:
        pytest.skip("this machine's torch sees a GPU: the stand-in driver cannot hide it")
    proc = subprocess.run([sys.executable, "devices.py"], cwd=ROOT, env=old_driver, capture_output=True, text=True)
    assert proc.returncode == 2
    mismatches = [line for line in proc.stdout.splitlines() if line.startswith("mismatch: ")]
    assert said_old_driver(mismatches[0]), proc.stdout
    assert "NVIDIA driver: 550.54.15, runs CUDA up to 12.4" in proc.stdout
    if devices.dali_build():  # a CUDA 13 DALI beside a CUDA 12.4 driver is a mismatch of its own, with its fix
        assert any("pip install nvidia-dali-cuda120" in line for line in mismatches[1:]), proc.stdout


def test_devices_py_on_this_machine_shows_the_cpu_threads_and_loader():
    proc = subprocess.run([sys.executable, "devices.py"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"torch {torch.__version__}" in proc.stdout and "torch threads" in proc.stdout
    assert "--loader auto on " in proc.stdout and "torch.compile on " in proc.stdout
    if not torch.cuda.is_available():
        assert "GPU: none that torch sees" in proc.stdout and "--loader auto on cpu: " in proc.stdout


def test_run_all_says_the_old_driver_before_its_plan_and_stops(old_driver, tmp_path):
    if subprocess.run([sys.executable, "-c", "import torch; exit(torch.cuda.is_available())"]).returncode:
        pytest.skip("this machine's torch sees a GPU: the stand-in driver cannot hide it")
    env = {**old_driver, "PYTHON": sys.executable, "RESULTS": str(tmp_path / "results")}
    proc = subprocess.run(["bash", "run_all.sh", "--smoke"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and said_old_driver(proc.stdout), proc.stdout + proc.stderr
    assert "DEVICE=cpu" in proc.stderr and "plan on" not in proc.stdout and not (tmp_path / "results").exists()


# ----------------------------------------------------------------------------- --accum-steps, out of memory

def test_accum_steps_trains_as_the_whole_batch(tiny_cifar_dir, tmp_path):
    """BaseNet, no augmentation, one epoch: each batch of 128 as 2 micro-batches of 64 gives the weights and the
    metrics of the batch of 128 at once, within float noise."""
    argv = ["--data-dir", tiny_cifar_dir, "--epochs", "1", "--batch-size", "128", "--aug", "none", "--no-tensorboard",
            *TINY]
    run_inline("train_cifar.py", *argv, "--out", tmp_path / "whole")
    run_inline("train_cifar.py", *argv, "--accum-steps", "2", "--out", tmp_path / "accum")
    whole, accum = (torch.load(tmp_path / d / "best.pt", map_location="cpu", weights_only=True)["model"]
                    for d in ("whole", "accum"))
    for k in whole:
        torch.testing.assert_close(accum[k], whole[k], rtol=1e-4, atol=1e-6)
    a, b = (pd.read_csv(tmp_path / d / "metrics.csv").iloc[0] for d in ("whole", "accum"))
    assert a.train_loss == pytest.approx(b.train_loss, rel=1e-5) and a.val_acc == b.val_acc


def test_out_of_memory_is_one_sentence_and_resume_with_accum_steps_goes_on(tiny_cifar_dir, tmp_path, monkeypatch):
    """A planted CUDA out-of-memory error for any training forward pass of more than 64 images, from the third step:
    one sentence (the batch, the memory, the --accum-steps that fits, where last.pt stands), exit 1; the same command
    with --resume --accum-steps 2 finishes the run."""
    import models
    real, calls = models.BaseNet.forward, []

    def forward(self, x):
        calls.extend([len(x)] if self.training else [])
        if self.training and len(x) > 64 and len(calls) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, x)
    monkeypatch.setattr(models.BaseNet, "forward", forward)
    argv = ["--data-dir", tiny_cifar_dir, "--epochs", "2", "--batch-size", "128", "--no-tensorboard", *TINY,
            "--out", tmp_path / "r"]
    proc = run_inline("train_cifar.py", *argv, check=False)
    assert proc.returncode == 1, proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: out of GPU memory in a training step: the batch of 128 (at once) does not fit")
    assert "--accum-steps 2 keeps the batch of 128 as 2 x 64" in error and "epoch 1 step 2" in error, error
    assert "Traceback" not in proc.stderr and (tmp_path / "r" / "last.pt").is_file()
    run_inline("train_cifar.py", *argv, "--resume", "--accum-steps", "2")
    assert len(pd.read_csv(tmp_path / "r" / "metrics.csv")) == 2
    assert json.loads((tmp_path / "r" / "final.json").read_text())["epochs"] == 2


def test_a_gpu_without_bf16_in_hardware_gets_fp16(monkeypatch):
    """A T4 or V100 (compute capability 7.x) autocasts in fp16 (engine.build_state's GradScaler then scales the loss);
    an A100 or H100 (8.0, 9.0) in bf16. torch.cuda.is_bf16_supported() says yes to both (emulation): the run's device's
    capability decides."""
    cuda = torch.device("cuda", 0)
    for capability, dtype in (((7, 5), torch.float16), ((7, 0), torch.float16), ((8, 0), torch.bfloat16),
                              ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert devices.amp_dtype(cuda) == dtype, capability
    assert devices.amp_dtype(torch.device("cpu")) == torch.bfloat16


def test_loader_auto_passes_over_a_dali_the_driver_cannot_run(monkeypatch, capsys):
    """On a GPU whose driver runs CUDA 12.4, a CUDA 13 DALI is passed over for nvjpeg, said in one line; --loader dali
    is one sentence. Where the driver runs it (or on the CPU) auto stays DALI."""
    import bird_loaders
    import data
    if not bird_loaders.dali_available():
        pytest.skip("nvidia-dali is not installed")
    monkeypatch.setattr(devices, "dali_build", lambda: ("nvidia-dali-cuda130", "2.4.0", 13))
    monkeypatch.setattr(devices, "nvidia_driver", lambda: {"version": "550.54.15", "cuda": "12.4", "gpus": []})
    assert bird_loaders.default_loader("cuda") == "nvjpeg"
    assert "--loader auto: nvjpeg, not DALI: nvidia-dali-cuda130 2.4.0 is built for CUDA 13" in capsys.readouterr().err
    assert bird_loaders.default_loader("cpu") == "dali"
    with pytest.raises(data.DataError, match="--loader dali: nvidia-dali-cuda130 2.4.0 is built for CUDA 13, which "
                                             "driver 550.54.15"):
        bird_loaders.bird_loader("dali", [], 32, 4, False, (0.5,) * 3, (0.5,) * 3, "cuda")
    monkeypatch.setattr(devices, "nvidia_driver", lambda: {"version": "580.65.06", "cuda": "13.0", "gpus": []})
    assert bird_loaders.default_loader("cuda") == "dali"


def test_a_driver_seen_only_in_proc_gets_the_cuda_it_runs():
    """Without nvidia-smi (a container), /proc/driver/nvidia/version names the driver; NVIDIA's table the CUDA."""
    text = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n"
            "GCC version:  gcc version 12.3.0 (Ubuntu 12.3.0-1ubuntu1~22.04)\n")
    assert devices.proc_driver(text) == {"version": "550.54.15", "cuda": "12.4", "gpus": []}
    open_kernel = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build\n"
    assert devices.proc_driver(open_kernel)["cuda"] == "13.0"
    assert devices.driver_cuda("470.82.01") == "11.0" and devices.driver_cuda("390.1") is None


def test_out_of_memory_in_prediction_is_one_sentence_with_a_smaller_batch(tiny_cifar_dir, tmp_path, monkeypatch):
    """A planted CUDA out-of-memory error for any evaluation pass of more than 50 images: predict.py ends in one
    sentence naming the batch and the --batch-size that halves it, exit 1, no CSV."""
    import models
    run_inline("train_cifar.py", "--data-dir", tiny_cifar_dir, "--epochs", "1", "--batch-size", "100",
               "--no-tensorboard", *TINY, "--out", tmp_path / "r")
    real = models.BaseNet.forward

    def forward(self, x):
        if not self.training and len(x) > 50:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real(self, x)
    monkeypatch.setattr(models.BaseNet, "forward", forward)
    proc = run_inline("predict.py", tmp_path / "r" / "best.pt", "--data-dir", tiny_cifar_dir, "--batch-size", "100",
                      "--out", tmp_path / "p.csv", check=False)
    errors = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr
    assert errors[0].startswith("error: out of GPU memory evaluating a batch of 100 images") and \
        "--batch-size 50 halves it" in errors[0] and not (tmp_path / "p.csv").exists()
