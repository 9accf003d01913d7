"""train_cifar.py with landmarks for the chaos test, or a planted fault (not a test itself).

With $CHAOS_MARK: while it evaluates it holds the file $CHAOS_MARK/eval, and half-way through writing a checkpoint (the
bytes written, not yet renamed into place) it holds $CHAOS_MARK/save; it lingers at each so that a SIGKILL sent on
seeing the file lands exactly there. With $CHAOS_OOM_RANK: that torchrun rank's third training forward pass raises
CUDA's out-of-memory error (the others train on). Everything else is train_cifar.py, run as __main__.
"""
import os
import runpy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

import engine  # noqa: E402
import models  # noqa: E402
import run_files  # noqa: E402

MARK = Path(os.environ.get("CHAOS_MARK", "."))
real_evaluate, real_write = engine.evaluate, run_files.atomic_write


def evaluate(*args, **kw):
    (MARK / "eval").touch()
    time.sleep(0.3)
    result = real_evaluate(*args, **kw)
    (MARK / "eval").unlink()
    return result


def atomic_write(path, write):
    if Path(path).suffix != ".pt":
        return real_write(path, write)

    def lingering(f):
        write(f)
        f.flush()
        (MARK / "save").touch()
        time.sleep(0.3)
    real_write(path, lingering)
    (MARK / "save").unlink()


CALLS = []  # training forward passes so far


def oom_forward(real):
    """`real` forward, except that the third training pass runs out of CUDA memory."""
    def forward(self, x):
        CALLS.extend([1] if self.training else [])
        if self.training and len(CALLS) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (planted)")
        return real(self, x)
    return forward


if "CHAOS_MARK" in os.environ:
    engine.evaluate, run_files.atomic_write = evaluate, atomic_write
if os.environ.get("CHAOS_OOM_RANK") == os.environ.get("RANK", "0"):
    models.BaseNet.forward = oom_forward(models.BaseNet.forward)
sys.argv = [str(ROOT / "train_cifar.py"), *sys.argv[1:]]
runpy.run_path(str(ROOT / "train_cifar.py"), run_name="__main__")
