"""Fuzz the data readers with seeded random corruptions and print counts by outcome.

    python tools/fuzz.py --cases 2000            # 2,000 cases per format
    python tools/fuzz.py --cases 300 --formats cifar,cub --seed 3

Formats: cifar (the train, test and meta pickles, read by load_cifar100), cub (images.txt, the labels, split,
classes and bounding-box files, read by load_cub with --crop-boxes and the broken-image check) and images (bird
JPEG/PNG files through the byte check and the PIL loader's decode + augmentation, then every corrupted file
through the nvjpeg loader's CPU path (scan, batched decode, fallback, resampling; it must skip what it cannot
read); with DALI installed, also through the DALI CPU loader). Corruptions: truncation, bit flips and byte splices (a run of bytes copied from
elsewhere in the file, or random bytes, written over or inserted), placed near the start, the end or anywhere.

Every case must end in one of two outcomes: `ok` (the reader returned data that passes its own checks) or
`refused` (the project's one-sentence DataError). Anything else is counted as `crash` (another exception: a
traceback for the user) or `hang` (over --timeout seconds), printed with its seed, and makes the exit code 1.
Files outside the fuzz's own temporary folder are never written; the run checks that the repository is unchanged.
"""
import argparse
import io
import random
import signal
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402

import bird_data  # noqa: E402
import bird_loaders  # noqa: E402
import data  # noqa: E402
import fixtures  # noqa: E402

FORMATS = ("cifar", "cub", "images")


class Hang(Exception):
    pass


def mutate(blob, rng):
    """One seeded corruption of a byte string: ('kind', new bytes)."""
    n = len(blob)
    where = rng.choice(["start", "end", "anywhere"])
    span = {"start": (0, min(n, 512)), "end": (max(0, n - 256), n), "anywhere": (0, n)}[where]
    pos = rng.randrange(span[0], max(span[0] + 1, span[1]))
    kind = rng.choice(["truncate", "bitflip", "splice-over", "splice-insert", "random-over"])
    b = bytearray(blob)
    if kind == "truncate":
        return kind, bytes(b[:pos])
    if kind == "bitflip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(span[0], max(span[0] + 1, span[1])) if n else 0
            if i < n:
                b[i] ^= 1 << rng.randrange(8)
        return kind, bytes(b)
    length = rng.randint(1, 64)
    if kind == "random-over":
        chunk = bytes(rng.randrange(256) for _ in range(length))
    else:
        src = rng.randrange(0, max(1, n - length))
        chunk = bytes(b[src:src + length])
    if kind == "splice-insert":
        return kind, bytes(b[:pos] + chunk + b[pos:])
    return kind, bytes(b[:pos] + chunk + b[pos + len(chunk):])


def with_time_limit(seconds, fn):
    def on_alarm(signum, frame):
        raise Hang()
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ----------------------------------------------------------------------------- what each format's reader must do

def read_cifar(root):
    cifar = data.load_cifar100(root)
    for split in ("train", "test"):  # the reader's own promises
        x, y = cifar[f"{split}_x"], cifar[f"{split}_y"]
        assert x.dtype == np.uint8 and x.shape[1:] == (3, 32, 32) and len(x) == len(y)
        assert len(y) == 0 or (y.min() >= 0 and y.max() < len(cifar["classes"]))


def read_cub(root):
    train, test, classes = bird_data.load_cub(root, crop_boxes=True)
    for samples in (train, test):
        for path, label, box in samples:
            assert 0 <= label < len(classes) and isinstance(path, str)
            assert box is None or (len(box) == 4 and all(np.isfinite(box)) and box[2] > 0 and box[3] > 0)
        bird_data.drop_bad_images(samples, 1.0, "images")  # names missing files instead of failing later


def read_image(path, size=32):
    """The torch loader's path for one training image: byte check, then PIL decode + random crop + mirror."""
    reason = bird_data.check_image_file(path)
    if reason:
        raise data.DataError(f"{path}: {reason}")
    item = bird_loaders.BirdImages([(str(path), 0, None)], size, aug={"rrc", "flip"})[(0, 7)]
    if item is None:  # decode failed: the loader skips it with a warning naming the file
        raise data.DataError(f"{path}: cannot decode")
    image, label = item
    assert image.shape == (3, size, size) and image.dtype.is_floating_point is False and label == 0


# ----------------------------------------------------------------------------- one format at a time

def pristine(kind, tmp):
    if kind == "cifar":
        root = fixtures.write_cifar100(tmp / "pristine", per_class_train=2, per_class_test=1)
        return root, [root / "cifar-100-python" / n for n in ("train", "test", "meta")]
    if kind == "cub":
        root = fixtures.write_cub(tmp / "pristine", num_classes=3, per_class=4, size=16, broken=False)
        names = ["images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt", "bounding_boxes.txt"]
        return root, [root / n for n in names]
    root = fixtures.write_cub(tmp / "pristine", num_classes=2, per_class=3, size=40, broken=False)
    files = sorted((root / "images").rglob("*.jpg"))
    return root, files  # plain JPEGs, a grayscale and a CMYK one, and a PNG under a .jpg name


def fuzz_format(kind, cases, seed, timeout, log=print):
    counts, failures = Counter(), []
    dali_files = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root, targets = pristine(kind, tmp)
        originals = {t: t.read_bytes() for t in targets}
        reader = {"cifar": lambda: read_cifar(root), "cub": lambda: read_cub(root)}.get(kind)
        for case in range(cases):
            rng = random.Random(f"{seed}:{kind}:{case}")
            target = rng.choice(targets)
            how, blob = mutate(originals[target], rng)
            victim = target
            if kind == "images":  # each case its own file (the DALI pass reads them all at the end)
                victim = tmp / "cases" / f"{case}{target.suffix}"
                victim.parent.mkdir(exist_ok=True)
            victim.write_bytes(blob)
            try:
                with warnings.catch_warnings(), io.StringIO() as sink:
                    warnings.simplefilter("ignore")
                    stderr, sys.stderr = sys.stderr, sink  # readers warn on stderr: expected, not shown
                    try:
                        with_time_limit(timeout, reader or (lambda v=victim: read_image(v)))
                    finally:
                        sys.stderr = stderr
                outcome = "ok"
                if kind == "images":
                    dali_files.append(victim)
            except data.DataError as e:
                outcome = "refused" if len(str(e).strip().splitlines()) == 1 else "crash"
            except Hang:
                outcome = "hang"
            except Exception as e:  # noqa: BLE001 - a traceback for the user is exactly what is being counted
                outcome = "crash"
                failures.append(f"{kind} case {case} (seed {seed}, {how} of {target.name}): {type(e).__name__}: {e}"[:300])
            counts[outcome] += 1
            if kind != "images":
                target.write_bytes(originals[target])
        if kind == "images":
            counts.update(fuzz_nvjpeg(sorted((tmp / "cases").iterdir()), timeout, failures))
        if kind == "images" and bird_loaders.dali_available() and dali_files:
            counts.update(fuzz_dali(dali_files, timeout, failures))
    for f in failures[:10]:
        log(f"  {f}")
    return counts, failures


def fuzz_nvjpeg(files, timeout, failures):
    """The nvjpeg loader (on the CPU: the same scan, batched decode, per-file fallback and resampling) over every
    corrupted file, accepted by the torch path or not, in batches of 16: each batch must come out whole, as images
    of the right shape, with the files it could not read skipped (training) or black (keep_broken)."""
    import torch
    counts = Counter()
    for start in range(0, len(files), 16):
        samples = [(str(f), 0, None) for f in files[start:start + 16]]
        for keep in (False, True):
            try:
                with warnings.catch_warnings(), io.StringIO() as sink:
                    warnings.simplefilter("ignore")
                    stderr, sys.stderr = sys.stderr, sink  # skipped files are named on stderr: expected
                    try:
                        loader = bird_loaders.NvjpegImageLoader(samples, 32, 16, not keep, [0.5] * 3, [0.5] * 3,
                                                        torch.device("cpu"), aug=() if keep else {"rrc", "flip"},
                                                        workers=0, keep_broken=keep)
                        batches = with_time_limit(timeout * 4, lambda ld=loader: list(ld))
                    finally:
                        sys.stderr = stderr
                images = torch.cat([x for x, _ in batches])
                assert images.shape[1:] == (3, 32, 32) and (len(images) == len(samples) if keep else True)
                counts["nvjpeg-ok"] += 1
            except Hang:
                counts["nvjpeg-hang"] += 1
            except Exception as e:  # noqa: BLE001 - any exception is a failure here: broken files are skipped
                counts["nvjpeg-crash"] += 1
                failures.append(f"nvjpeg batch from {Path(samples[0][0]).name}: {type(e).__name__}: {str(e)[:200]}")
    return counts


def fuzz_dali(files, timeout, failures):
    """The DALI CPU loader over every corrupted file that the torch path accepted, in batches of 16: each batch
    decodes (ok) or stops with the one-sentence DataError (refused)."""
    import torch
    counts = Counter()
    for start in range(0, len(files), 16):
        samples = [(str(f), 0, None) for f in files[start:start + 16]]
        try:
            loader = bird_loaders.DaliImageLoader(samples, 32, 16, True, [0.5] * 3, [0.5] * 3, torch.device("cpu"),
                                          aug={"rrc", "flip"}, workers=1)
            with_time_limit(timeout * 4, lambda ld=loader: [None for _ in ld])
            counts["dali-ok"] += 1
        except data.DataError:
            counts["dali-refused"] += 1
        except Hang:
            counts["dali-hang"] += 1
        except Exception as e:  # noqa: BLE001
            counts["dali-crash"] += 1
            failures.append(f"DALI batch from {Path(samples[0][0]).name}: {type(e).__name__}: {str(e)[:200]}")
    return counts


def repo_snapshot():
    return {p: p.stat().st_mtime_ns for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts
            and "__pycache__" not in p.parts and ".venv" not in p.parts and ".pytest_cache" not in p.parts}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=500, help="cases per format")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated: {', '.join(FORMATS)}")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corruptions")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds a case may take before it counts as a hang")
    args = parser.parse_args()
    formats = args.formats.split(",")
    if any(f not in FORMATS for f in formats) or args.cases < 1:
        parser.error(f"--formats takes {', '.join(FORMATS)}; --cases at least 1")
    before = repo_snapshot()
    bad = False
    for kind in formats:
        t0 = time.perf_counter()
        counts, failures = fuzz_format(kind, args.cases, args.seed, args.timeout)
        print(f"{kind:7s} {args.cases} cases in {time.perf_counter() - t0:.1f}s: "
              + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), flush=True)
        bad |= any(k.endswith(("crash", "hang")) for k in counts)
    if repo_snapshot() != before:
        print("the repository changed during the fuzz run")
        bad = True
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
