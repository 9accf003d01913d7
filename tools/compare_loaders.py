"""Compare the bird loaders' pixels: each loader's batches against the PIL loader's (`--loader torch`), in grey levels.

    python tools/compare_loaders.py --cub-dir ../shared/data/CUB_200_2011_subset100 --size 160 --images 96
    python tools/compare_loaders.py --device cuda --size 224          # nvJPEG and DALI on a GPU against PIL

For eval (shorter side to size / 0.875, centre crop) and training (random-resized crop + flip, seed 5) it runs
every loader over the same training images and prints, per loader, the mean absolute difference to the PIL
loader, the share of values that differ and the largest difference, plus each loader's seconds.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bird_data  # noqa: E402
import bird_loaders  # noqa: E402

SHARED_CUB = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "CUB_200_2011_subset100"


def compare(samples, size, device, workers, train, batch=32):
    """Every loader over the same samples (training: rrc + flip, seed 5): {loader: (pixels in grey levels, seconds)},
    and [(loader, mean, share of values off, max)] of each against the PIL loader ('torch')."""
    kinds = ["torch", "nvjpeg"] + (["dali"] if bird_loaders.dali_available() else [])
    grey = dict(mean=[0.0] * 3, std=[1 / 255] * 3)  # normalised values are grey levels
    kw = dict(aug={"rrc", "flip"}, seed=5) if train else {}
    out = {}
    for kind in kinds:
        loader = bird_loaders.bird_loader(kind, samples, size, batch, train, device=device, workers=workers, **grey, **kw)
        loader.set_epoch(0)
        t0 = time.perf_counter()
        out[kind] = (torch.cat([x for x, _ in loader]).float().cpu(), time.perf_counter() - t0)
    diffs = []
    for kind in kinds[1:]:
        diff = (out[kind][0] - out["torch"][0]).abs()
        diffs.append((kind, diff.mean().item(), (diff > 0.5).float().mean().item(), diff.max().item()))
    return out, diffs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cub-dir", default=str(SHARED_CUB), help="CUB_200_2011-layout birds")
    parser.add_argument("--size", type=int, default=160, help="image size in pixels")
    parser.add_argument("--images", type=int, default=96, help="training images to compare")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--workers", type=int, default=2, help="--workers of every loader")
    args = parser.parse_args()
    samples = bird_data.load_cub(args.cub_dir)[0][:args.images]
    for train in (False, True):
        what = f"{'train' if train else 'eval'} {args.size} px"
        out, diffs = compare(samples, args.size, args.device, args.workers, train)
        for kind, (_, seconds) in out.items():
            print(f"{what}, {kind}: {seconds:.2f} s", flush=True)
        for kind, mean, off, most in diffs:
            print(f"{what}, |{kind} - torch (PIL)|: mean {mean:.4f}, {off:.2%} of values off, max {most:.0f}", flush=True)


if __name__ == "__main__":
    main()
