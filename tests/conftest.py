"""Shared pytest fixtures: generated data in the official layouts, and a helper to run the scripts."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fixtures  # noqa: E402

# pytest-xdist (pytest.ini: -n auto) runs the suite on every core. Each worker's tests get their share of the cores,
# so that two workers on two cores do not each start two spinning OpenMP threads per process.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, len(os.sched_getaffinity(0)) // WORKERS)
if WORKERS > 1:
    import torch
    torch.set_num_threads(THREADS)

# Each test file goes to one worker (--dist loadfile), so a module fixture's run (the smoke chain, a trained model) is
# trained once. The files are handed out longest first, test_report's smoke chain before all; each worker takes the
# next file when it is nearly done with its own.
LONGEST_FIRST = ("test_report.py", "test_train_cifar.py", "test_birds.py", "test_ddp.py", "test_data.py", "test_engine.py")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


SHARED = ROOT.parent / "shared"
SHARED_CUB = SHARED / "data" / "CUB_200_2011_subset100"
SHARED_WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0_in1k.pth"


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    """100 classes, 40 train + 6 test images each; 10 per class go to validation."""
    return fixtures.write_cifar100(tmp_path_factory.mktemp("cifar"), per_class_train=40, per_class_test=6)


@pytest.fixture(scope="session")
def tiny_cifar_dir(tmp_path_factory):
    """100 classes, 12 train + 2 test images each, for the runs that show plumbing (flags, presets, files written):
    with --val-per-class 4, 800 training images, 400 for validation."""
    return fixtures.write_cifar100(tmp_path_factory.mktemp("tinycifar"), per_class_train=12, per_class_test=2)


@pytest.fixture(scope="session")
def cub_dir(tmp_path_factory):
    return fixtures.write_cub(tmp_path_factory.mktemp("cub"), num_classes=3, per_class=10)


@pytest.fixture(scope="session")
def clean_cub_dir(tmp_path_factory):
    return fixtures.write_cub(tmp_path_factory.mktemp("cleancub"), num_classes=3, per_class=10, broken=False)


def script_env(env=None):
    """The environment of every script a test starts: this worker's share of the cores as OpenMP threads, the same
    for an uninterrupted run and the resumed one it is compared with bit for bit."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(THREADS)),
            **(env or {})}


def run_script(*args, check=True, timeout=600, env=None, **kw):
    """Run a repo script in a fresh interpreter (as a user would) and return the CompletedProcess."""
    cmd = [sys.executable, *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=script_env(env), **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_inline(script, *args, check=True):
    """A script's command line run in this interpreter, as `python SCRIPT ARGS` runs it (engine.cli on its run): each
    saves a fresh interpreter's start-up (5-8 s of CPU for torch, timm and torch._dynamo's imports). For runs that
    need no process of their own (no signals, no DDP, no once-per-process warning about a shared file). Returns what
    run_script does (returncode, stdout, stderr); an uncaught exception fails the test itself."""
    import contextlib
    import importlib
    import io

    import torch

    import bird_data
    import engine
    module = importlib.import_module(Path(script).stem)
    out, err, code = io.StringIO(), io.StringIO(), 0
    # what a fresh process starts without: the broken files already warned about, a run's process-wide torch flags
    bird_data._WARNED_BROKEN.clear()
    deterministic, precision = torch.are_deterministic_algorithms_enabled(), torch.get_float32_matmul_precision()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            engine.cli(module.main, [str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            torch.use_deterministic_algorithms(deterministic)
            torch.set_float32_matmul_precision(precision)
    if check and code != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed ({code}):\n{out.getvalue()}\n{err.getvalue()}")
    return subprocess.CompletedProcess([script, *map(str, args)], code, out.getvalue(), err.getvalue())
