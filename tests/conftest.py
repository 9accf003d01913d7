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

SHARED = ROOT.parent / "shared"
SHARED_CUB = SHARED / "data" / "CUB_200_2011_subset100"
SHARED_WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0_in1k.pth"


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    """100 classes, 40 train + 6 test images each; 10 per class go to validation."""
    return fixtures.write_cifar100(tmp_path_factory.mktemp("cifar"), per_class_train=40, per_class_test=6)


@pytest.fixture(scope="session")
def cub_dir(tmp_path_factory):
    return fixtures.write_cub(tmp_path_factory.mktemp("cub"), num_classes=3, per_class=10)


@pytest.fixture(scope="session")
def clean_cub_dir(tmp_path_factory):
    return fixtures.write_cub(tmp_path_factory.mktemp("cleancub"), num_classes=3, per_class=10, broken=False)


def run_script(*args, check=True, timeout=600, env=None, **kw):
    """Run a repo script in a fresh interpreter (as a user would) and return the CompletedProcess."""
    cmd = [sys.executable, *map(str, args)]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
                **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
