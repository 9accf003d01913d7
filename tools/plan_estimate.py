"""run_all.sh's plan with a time estimate: each run's epochs, images and measured img/s, and the wall time they imply
with --jobs runs at once. run_all.sh calls it before its runs (and stops there with --plan-only):

    python tools/plan_estimate.py results/plan.tsv --jobs 2 --gpus 0 --times times.tsv

The rate of each distinct network is measured with bench.train_rate: the project's own training step
(engine.train_one_epoch) on random data.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import devices  # noqa: E402
import flags  # noqa: E402
import models  # noqa: E402
from bench import train_rate  # noqa: E402


def schedule_seconds(seconds, jobs, units):
    """Wall time of running jobs with these durations (each measured alone on one device) `jobs` at a time, in
    order, each starting when a slot frees (run_all.sh --jobs). `units` runs fit side by side at full speed (the
    GPUs; 1 for a CPU, whose cores the jobs share): more at once slow each by jobs / units."""
    slow = max(1.0, jobs / max(1, units))
    slots = [0.0] * jobs
    for s in seconds:
        i = slots.index(min(slots))
        slots[i] += s * slow
    return max(slots, default=0.0)


def estimate_plan(plan_path, device_name=None, jobs=1, gpus=0, times_path=None):
    """Print run_all.sh's plan (one row per run: epochs, images, measured img/s) and the time it implies with
    `jobs` runs at once on `gpus` GPUs (0: the CPU); with times_path, write each run's seconds per seed there.

    Each distinct network is timed for a few training steps on random data on the run's device (bf16 on CUDA,
    no compile, so a compiled GPU run is likely faster); a run's time is its epochs x training images at that
    rate, plus validation and test passes at 3x it (forward only). A frozen, cached run costs one forward
    pass over its images. Several runs at once: the longest chain of the schedule, each run slowed by its share
    of a GPU, or of the CPU cores (assumed to scale with them, which small CPU runs beat)."""
    import shlex

    import finetune_birds
    import train_cifar
    device = devices.pick_device(device_name)
    rows, rates, sizes = [], {}, {}
    for line in Path(plan_path).read_text().splitlines()[1:]:
        study, name, change, seeds, command = line.split("\t")
        argv = shlex.split(command)
        script, argv = argv[0], argv[1:]
        if script == "train_cifar.py":
            args = train_cifar.parse_args(argv)
            args.device = args.device or str(device)  # the device the estimate measures on (run_all.sh's DEVICE)
            train_cifar.resolve(args, argv)
            if args.data_dir not in sizes:
                cifar = data.load_cifar100(args.data_dir)
                sizes[args.data_dir] = (len(cifar["train_y"]), len(cifar["test_y"]), len(cifar["classes"]))
            n_all, n_test, classes = sizes[args.data_dir]
            n_val = args.val_per_class * classes
            n_train, size, frozen = n_all - n_val, 32, False
            key = ("cifar", args.model, args.depth, args.width, args.norm, args.batch_size)
            make = lambda a=args, c=classes: models.build_model(train_cifar.model_config(a, c))  # noqa: E731
        else:
            args = finetune_birds.parse_args(argv)
            args.device = args.device or str(device)
            finetune_birds.resolve(args, argv)
            if args.data_dir not in sizes:
                splits, classes, _ = finetune_birds.load_splits(args)
                sizes[args.data_dir] = (len(splits["train"]) + len(splits["val"]), len(splits["test"]), len(classes))
            n_all, n_test, classes = sizes[args.data_dir]
            n_val = round(n_all * args.val_frac)
            n_train, size, frozen = n_all - n_val, args.img_size, args.freeze_backbone
            key = ("birds", args.arch, args.img_size, frozen, args.batch_size)
            make = lambda a=args, c=classes: models.TransferNet(a.arch, c, a.dropout, a.freeze_backbone)  # noqa: E731
        if key not in rates:
            gpu = device.type == "cuda"  # a CPU times a small batch, once warmed up: an estimate, quickly
            rates[key] = train_rate(make(), device, min(args.batch_size, 256 if gpu else 8), size, 2 if gpu else 1,
                                    gpu, True, False, classes, warmup_steps=2 if gpu else 1)[0]
        rate = rates[key]
        epochs = args.epochs
        if frozen and getattr(args, "cache_features", False):
            seconds = (n_all + n_test) / (3 * rate)  # the one feature pass; the head's epochs cost next to nothing
        else:
            seconds = args.epochs * (n_train / rate + n_val / (3 * rate)) + n_test / (3 * rate)
        if args.time_budget:  # the run chooses its epochs to end within its budget: the budget is its time
            seconds, epochs = args.time_budget, f"{args.time_budget:g}s"
        rows.append((f"{study}/{name}", epochs, n_train, rate, seconds * int(seeds), change, seconds, int(seeds)))
    total = sum(r[4] for r in rows)
    wall = schedule_seconds([r[6] for r in rows for _ in range(r[7])], jobs, gpus)
    if times_path:
        Path(times_path).write_text("".join(f"{r[0]}\t{r[6]:.0f}\n" for r in rows))
    print(f"plan on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}):")
    print(f"  {'run':34s} {'epochs':>6s} {'train':>7s} {'img/s':>8s} {'minutes':>8s}  change (epochs Ns: as many as "
          f"N seconds hold)")
    for name, epochs, n, rate, seconds, change, *_ in rows:
        print(f"  {name:34s} {epochs!s:>6s} {n:7d} {rate:8.0f} {seconds / 60:8.1f}  {change}")
    print(f"estimated total: {total / 3600:.1f} hours ({total / 60:.0f} minutes), from a short measured step per network")
    if jobs > 1:
        where = f"{gpus} GPUs" if gpus else "the CPU cores, shared"
        print(f"with --jobs {jobs} on {where}: about {wall / 3600:.1f} hours ({wall / 60:.0f} minutes) of wall time, "
              f"the longest chain of the schedule")
    if device.type == "cpu" and total > 3600:
        print("this is GPU work: on this CPU it would take the hours above; `bash run_all.sh --smoke` runs the whole "
              "chain on small generated data in minutes, and --epochs-scale F (e.g. 0.1) shortens every run")
    return total


def main():
    parser = argparse.ArgumentParser(description="Time run_all.sh's plan: each run's measured img/s and the wall time.")
    parser.add_argument("plan", help="run_all.sh's plan file (study, run, change, seeds, command per line)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (run_all.sh --jobs)")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs the runs are spread over (0: the CPU)")
    parser.add_argument("--times", default=None, help="write each run's estimated seconds per seed here")
    parser.add_argument("--machine", action="store_true",
                        help="first the machine in three lines (python devices.py --short), above the plan")
    args = parser.parse_args()
    if args.machine:
        import devices
        devices.main(["--short"])
    try:
        estimate_plan(args.plan, args.device, max(1, args.jobs), args.gpus, args.times)
    except (flags.UsageError, data.DataError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
