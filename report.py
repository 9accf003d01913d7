"""Write results/REPORT.md from the run folders that run_all.sh leaves, in the sections a reader looks for:
Method (data, split, augmented samples drawn by the project's own loaders, stage-level architecture tables,
recipe, machine, versions, seeds), Ablations (the CIFAR ladder with a delta per row and whether it exceeds
the seed spread), Transfer learning (the birds study: accuracy against trainable parameters and time),
Error analysis (best and worst classes, most-confused pairs, misclassified test images), Where the networks look
(Grad-CAM of six test birds under the frozen probe and LP-FT, and of the final CIFAR model on its most-confused pair)
and Reproduce (the commands and their times). Works on whatever runs exist: a missing part gets a one-line note. No
model is trained: everything comes from the files each run wrote (final.json, metrics.csv, per_class.csv, best.pt
for the Grad-CAM figures, ...).

    python report.py --results results            # results/REPORT.md (+ PNGs beside it)
    python report.py --results results --html     # also results/REPORT.html, one file with the images inside
    python report.py --results results --notebook # also results/lab2.ipynb: the notebook run on these results
    python report.py --results results --best-run birds   # prints the best birds run folder
"""
import argparse
import base64
import csv
import html
import json
import math
import re
import statistics
import sys
from pathlib import Path

from bird_data import run_samples
from run_files import atomic_write, atomic_write_text

STUDIES = (("cifar", "CIFAR-100 from scratch"), ("birds", "Birds by transfer learning"))


# ----------------------------------------------------------------------------- reading run folders

def read_runs(results):
    """{(study, name): [seed folders with metrics.csv]} plus the plan [(study, name, change)]."""
    results = Path(results)
    plan = []
    if (results / "plan.tsv").is_file():
        with open(results / "plan.tsv") as f:
            plan = [(r["study"], r["run"], r["change"]) for r in csv.DictReader(f, delimiter="\t")]
    runs = {}
    for metrics in sorted(results.glob("*/*/seed*/metrics.csv")):
        seed_dir = metrics.parent
        runs.setdefault((seed_dir.parent.parent.name, seed_dir.parent.name), []).append(seed_dir)
    return plan, runs


def load_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def read_metrics(seed_dir):
    """metrics.csv rows, numbers as floats (the phase column stays text)."""
    rows = []
    for row in read_csv(Path(seed_dir) / "metrics.csv"):
        rows.append({k: (v if k == "phase" else float(v)) for k, v in row.items() if v not in ("", None)})
    return rows


def mean_std(values):
    """(mean, std or None) of the values that exist, or (None, None)."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def fmt(mean, std=None, digits=4):
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def summarise(seed_dirs):
    """One table row's numbers from a run's seed folders."""
    finals = [f for f in (load_json(d / "final.json") for d in seed_dirs) if f]
    config = load_json(seed_dirs[0] / "config.json")
    first = finals[0] if finals else {}
    # a run's cost includes its feature pass and, for LP-FT, the probe
    seconds = [f.get("wall_seconds") or (f.get("train_seconds", 0) + (f.get("cache_seconds") or 0)
                                         + (f.get("lp_seconds") or 0)) for f in finals]
    return {
        "val": mean_std([f.get("best_val_acc") for f in finals]),
        "test": mean_std([f.get("test_acc") for f in finals]),
        "val_tta": mean_std([f.get("val_acc_tta") for f in finals]),
        "seconds": mean_std(seconds),
        "params": first.get("parameters"), "trainable": first.get("trainable_parameters"),
        "epochs": run_epochs(first, config), "finished": len(finals), "seeds": len(seed_dirs),
        "config": config, "final": first, "dirs": seed_dirs,
        "history": read_metrics(seed_dirs[0]) if (seed_dirs[0] / "metrics.csv").is_file() else [],
    }


def run_epochs(final, config):
    """The epochs a run trained: final.json's, else config.json's record (a time budget's choice, a resume's length),
    else its --epochs (folders written before either existed)."""
    return final.get("epochs") or config.get("epochs") or config.get("args", {}).get("epochs")


def best_run(results, study):
    """The seed-0 folder of the finished run in `study` with the best validation accuracy."""
    _, runs = read_runs(results)
    scored = [(load_json(dirs[0] / "final.json").get("best_val_acc", -1), str(dirs[0]), dirs[0])
              for (s, _), dirs in runs.items() if s == study and (dirs[0] / "final.json").is_file()]
    return max(scored)[2] if scored else None


def final_run(results, study, runs, order):
    """The run a study's error analysis and architecture describe: CIFAR's *_final row (else the last finished
    one), the birds run with the best validation accuracy."""
    if study == "birds":
        return best_run(results, study)
    finished = [runs[k][0] for k in order if (runs[k][0] / "final.json").is_file()]
    finals = [d for d in finished if d.parent.name.endswith("_final")]
    return (finals or finished or [None])[-1]


# ----------------------------------------------------------------------------- deltas and sentences

def delta(row, ref):
    """(difference of the mean validation accuracies, whether it exceeds the seed spread or None when either
    row has a single seed). 'Exceeds' means larger than the two rows' standard deviations added together."""
    (m1, s1), (m0, s0) = row["val"], ref["val"]
    if m1 is None or m0 is None:
        return None, None
    d = m1 - m0
    if s1 is None or s0 is None:
        return d, None
    return d, abs(d) > s1 + s0


def never_learned(row, num_classes):
    """A reason in words when a run's validation accuracy stayed at chance level, read from its metrics, else
    None. Chance level: at most 1.5 / classes, or within two binomial standard errors of 1 / classes on a small
    validation split."""
    val = row["val"][0]
    if val is None or not num_classes:
        return None
    chance, n = 1 / num_classes, row["final"].get("val_size") or 10 ** 6
    if val > max(1.5 * chance, chance + 2 * math.sqrt(chance * (1 - chance) / n)):
        return None
    history = row["history"]
    phase = history[-1].get("phase") if history else None
    losses = [h["train_loss"] for h in history if "train_loss" in h and h.get("phase") == phase]
    before = [h["train_loss"] for h in history if "train_loss" in h and h.get("phase") != phase]
    uniform = math.log(num_classes)
    if not losses:
        return "it stayed at chance level"
    if any(math.isnan(x) or math.isinf(x) for x in losses):
        return "its training loss became non-finite: the learning rate is too high for it"
    start, end = (before[-1] if before else losses[0]), losses[-1]
    if before and end > start and end > 0.9 * uniform:
        return (f"fine-tuning destroyed what the probe had learned: the training loss rose from the probe's "
                f"{start:.3f} to {end:.3f} (ln {num_classes} = {uniform:.3f} is a uniform guess), so the learning "
                f"rate is too high for the pretrained weights")
    if abs(start - end) < 0.02 * start:
        return (f"its training loss never moved ({start:.3f} → {end:.3f}; ln {num_classes} = {uniform:.3f} is a "
                f"uniform guess): the signal does not get through the network, typically the initialisation (a "
                f"deep plain network) or a learning rate far off")
    if end > start:
        return f"its training loss rose from {start:.3f} to {end:.3f}: the learning rate is too high"
    if end < 0.7 * start:
        return (f"its training loss fell from {start:.3f} to {end:.3f}, so it fits the training images without "
                f"generalising: too few images or epochs for this model")
    return f"its training loss fell only from {start:.3f} to {end:.3f}: too few epochs or too small a learning rate"


def effect_sentence(name, change, row, ref, ref_name, num_classes):
    reason = never_learned(row, num_classes)
    if reason:
        return f"**{name}** ({change}) **never learned**: validation accuracy {fmt(*row['val'])} is chance level " \
               f"(1/{num_classes} = {1 / num_classes:.3f}); {reason}."
    d, exceeds = delta(row, ref)
    if d is None:
        return f"**{name}** ({change}): no finished run to compare."
    effect = f"raised validation accuracy by {d:.4f}" if d > 0 else \
        f"lowered validation accuracy by {-d:.4f}" if d < 0 else "left validation accuracy unchanged"
    noise = ("larger than the seed spread" if exceeds else "**within noise** (the seed spread is as large)") \
        if exceeds is not None else "one seed each, so the seed spread is unknown"
    return f"**{name}** ({change}) {effect} against {ref_name} " \
           f"({fmt(row['val'][0])} vs {fmt(ref['val'][0])}): {noise}."


# ----------------------------------------------------------------------------- pictures

def _plt():
    import matplotlib
    if "ipykernel" not in sys.modules:  # files only; in a notebook keep its inline backend
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    """Write the figure to path (PNG) and close it; with path None return it (a notebook shows it inline)."""
    fig.tight_layout()
    if path is None:
        return fig
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    _plt().close(fig)
    return None


def plot_study(path, study, runs):
    """Training loss and validation accuracy per epoch, every run of the study overlaid (seed 0)."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    study_runs = [(name, seed_dirs) for (s, name), seed_dirs in sorted(runs.items()) if s == study]
    for i, (name, seed_dirs) in enumerate(study_runs):
        history = read_metrics(seed_dirs[0])
        x = list(range(1, len(history) + 1))
        style = {"marker": ".", "label": name, "linestyle": ("-", "--", ":")[i // 10 % 3]}  # 10 colours, then dashes
        ax1.plot(x, [h.get("train_loss", float("nan")) for h in history], **style)
        ax2.plot(x, [h.get("val_acc", float("nan")) for h in history], **style)
    ax1.set(xlabel="epoch (LP-FT: probe epochs, then fine-tuning)" if study == "birds" else "epoch",
            ylabel="training loss", title=f"{study}: training loss")
    ax2.set(xlabel="epoch", ylabel="validation accuracy", title=f"{study}: validation accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=7, loc="lower right", ncol=2)
    return save_figure(fig, path)


def plot_tradeoff(path, rows):
    """Birds: test (else validation) accuracy against trainable parameters and against time, one point a run."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in rows:
        acc = r["test"][0] if r["test"][0] is not None else r["val"][0]
        if acc is None or not r["trainable"]:
            continue
        for ax, x in ((ax1, r["trainable"]), (ax2, r["seconds"][0])):
            ax.scatter(x, acc)
            ax.annotate(name, (x, acc), fontsize=7, xytext=(3, 3), textcoords="offset points")
    metric = "test" if any(r["test"][0] is not None for _, r in rows) else "validation"
    ax1.set(xscale="log", xlabel="trainable parameters", ylabel=f"{metric} accuracy", title="accuracy vs trainable parameters")
    ax1.xaxis.set_minor_formatter(_plt().NullFormatter())  # log-axis minor labels (2x10^5, 3x10^5, ...) overlap
    ax2.set(xlabel="seconds (with feature cache and probe)", ylabel=f"{metric} accuracy", title="accuracy vs time")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def _image_grid(path, images, captions, title, cols=8):
    plt = _plt()
    rows = max(1, math.ceil(len(images) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 2.1 + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, cap in zip(axes.flat, images, captions, strict=False):
        ax.imshow(img)
        ax.set_title(cap, fontsize=6)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def _to_image(x, mean, std):
    """A normalised CHW float tensor back to an HWC array in [0, 1]."""
    import torch
    mean = torch.tensor(mean if mean is not None else [0.0] * 3).view(3, 1, 1)
    std = torch.tensor(std if std is not None else [1.0] * 3).view(3, 1, 1)
    return (x.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def cifar_augmentation_grid(path, config, n=8):
    """Training images as the run saw them: each original, then three draws of its augmentation from the
    project's own loader (data.DeviceLoader with the run's --aug), for three epochs."""
    import torch

    import data
    args = config["args"]
    cifar = data.load_cifar100(args["data_dir"])
    x = torch.from_numpy(cifar["train_x"][:n])
    y = torch.from_numpy(cifar["train_y"][:n])
    aug = data.AUG.names(args.get("aug", "none"))
    images, captions = [], []
    loader = data.DeviceLoader(x, y, n, shuffle=False, aug=aug, seed=0, cutout=args.get("cutout_size", 8))
    draws = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        draws.append(next(iter(loader))[0])
    for i in range(n):
        images.append(x[i].permute(1, 2, 0).numpy())
        captions.append(f"{cifar['classes'][int(y[i])]}")
        for k, batch in enumerate(draws):
            images.append(_to_image(batch[i], None, None))
            captions.append(f"epoch {k + 1}")
    return _image_grid(path, images, captions, f"CIFAR-100 training augmentation: --aug {args.get('aug')}", cols=8)


def birds_augmentation_grid(path, config, n=4):
    """Bird training images through the project's torch loader with the run's crop and flip settings."""
    import torch

    import bird_loaders
    args = config["args"]
    train, _, classes = run_samples(args)
    samples = train[:: max(1, len(train) // n)][:n]
    aug = bird_loaders.BIRD_AUG.names(args.get("aug", "rrc,flip"))
    common = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), device=torch.device("cpu"), workers=0,
                  scale=(args.get("rrc_min_scale", 0.25), 1.0))
    plain = bird_loaders.bird_loader("torch", samples, args["img_size"], len(samples), False, **common)
    images, captions = [], []
    originals = next(iter(plain))[0]
    draws = []
    for epoch in range(3):
        loader = bird_loaders.bird_loader("torch", samples, args["img_size"], len(samples), True, aug=aug, seed=0, **common)
        loader.set_epoch(epoch)
        draws.append(next(iter(loader))[0])
    for i in range(len(samples)):
        images.append(_to_image(originals[i], None, None))
        captions.append(classes[samples[i][1]].split(".")[-1][:18] + " (eval)")
        for k, batch in enumerate(draws):
            images.append(_to_image(batch[i], None, None))
            captions.append(f"epoch {k + 1}")
    return _image_grid(path, images, captions, f"Birds training augmentation: --aug {args.get('aug')}", cols=8)


def misclassified(predictions_csv, limit=16):
    """Rows of predictions.csv whose top-1 class differs from the label (test labels must be real)."""
    rows = read_csv(predictions_csv)
    return [r for r in rows if r["label"] != "" and r["label"] != r["top1"]][:limit]


def misclassified_grid(path, study, run_dir, rows, classes):
    """Thumbnails of misclassified test images, read from the data (not stored twice), with true and
    predicted names."""
    import bird_data
    args = load_json(run_dir / "config.json").get("args", {})
    if study == "cifar":
        import data
        test_x = data.load_cifar100(args["data_dir"])["test_x"]
        images = [test_x[int(r["Id"])].transpose(1, 2, 0) for r in rows]
    else:
        from PIL import Image
        _, test, _ = run_samples(args)
        images = []
        for r in rows:
            file, _, box = test[int(r["Id"])]
            try:  # as the run saw it: upright, on its crop box where it trained on boxes
                with Image.open(file) as im:
                    im = bird_data.to_rgb(bird_data.oriented(im))
                if box is not None:
                    im = im.crop((int(box[0]), int(box[1]), int(box[0] + box[2]), int(box[1] + box[3])))
                images.append(im.resize((96, 96)))
            except OSError:
                images.append(Image.new("RGB", (96, 96)))
    short = [bird_data.display_name(c)[:16] for c in classes]
    captions = [f"true: {short[int(r['label'])]}\npred: {short[int(r['top1'])]} ({float(r['p1']):.2f})" for r in rows]
    return _image_grid(path, images, captions, f"{study}: misclassified test images ({run_dir.parent.name})", cols=8)


# ----------------------------------------------------------------------------- sections

def section_method(results, runs, finals, notes):
    lines = ["## Method", ""]
    for study, title in STUDIES:
        run_dir = finals.get(study)
        if run_dir is None:
            lines += [f"*{title}: no finished run yet.*", ""]
            continue
        config, final = load_json(run_dir / "config.json"), load_json(run_dir / "final.json")
        args = {**config.get("args", {}), "epochs": run_epochs(final, config)}
        lines += [f"### {title}", ""]
        if study == "cifar":
            lines += [f"- **Data**: CIFAR-100 (`{args.get('data_dir')}`), 32x32 colour images of "
                      f"{final.get('num_classes', 100)} classes. Validation: {args.get('val_per_class')} training "
                      f"images per class held out (stratified, seed {args.get('split_seed')}): "
                      f"{final.get('train_size', '?')} train / {final.get('val_size', '?')} validation / "
                      f"{final.get('test_size', '?')} test. Runs are chosen on validation accuracy only.",
                      f"- **Preprocessing**: pixels scaled to [0, 1]"
                      f"{', normalised per channel with the training split mean/std' if args.get('normalize') else ''}; "
                      f"training augmentation `--aug {args.get('aug')}`"
                      + (f", MixUp {args.get('mixup')} / CutMix {args.get('cutmix')} on {args.get('mix_prob')} of "
                         f"the samples" if args.get("mixup") or args.get("cutmix") else "") + "."]
        else:
            lines += [f"- **Data**: `{args.get('data_dir')}` ({args.get('dataset')}), {final.get('num_classes', '?')} "
                      f"classes; the official train/test split, {args.get('val_frac')} of each class's training images "
                      f"held out for validation (seed {args.get('split_seed')}): {final.get('train_size', '?')} train "
                      f"/ {final.get('val_size', '?')} validation / {final.get('test_size', '?')} test.",
                      f"- **Preprocessing**: resized and centre-cropped to {args.get('img_size')} px for evaluation, "
                      f"normalised with the backbone's ImageNet mean/std; training augmentation `--aug {args.get('aug')}` "
                      f"(random-resized crops keep at least {args.get('rrc_min_scale')} of the area)."]
        pic = f"{study}_augmentations.png"
        try:
            (cifar_augmentation_grid if study == "cifar" else birds_augmentation_grid)(results / pic, config)
            lines += ["", f"![{study} augmented training samples]({pic})", ""]
        except Exception as e:  # the data folder moved or is gone: the report still comes out
            notes.append(f"{study} augmentation samples not drawn: {type(e).__name__}: {e}")
            lines += ["", f"*Augmented samples not drawn: the data at `{args.get('data_dir')}` is not readable "
                          f"here.*", ""]
        arch = (run_dir / "architecture.md").read_text() if (run_dir / "architecture.md").is_file() else ""
        stages = arch.split("## Stages", 1)[1].split("## Every layer", 1)[0].strip() if "## Stages" in arch else ""
        title_line = arch.splitlines()[0].lstrip("# ") if arch else "?"
        lines += [f"- **Model** of the final run `{run_dir.parent.name}`: {title_line}; "
                  f"{final.get('parameters', 0):,} parameters ({final.get('trainable_parameters', 0):,} trainable). "
                  f"Stages (every layer: `{run_dir.relative_to(results)}/architecture.md`):", "",
                  stages or "*No stage table in this run's architecture.md.*", ""]
        recipe = ", ".join(f"{k} {args[k]}" for k in ("optimizer", "lr", "momentum", "nesterov", "wd", "schedule",
                                                      "warmup", "epochs", "batch_size", "label_smoothing", "dropout",
                                                      "ema", "tta", "lp_epochs", "lp_lr", "bn_mode", "freeze_stages",
                                                      "backbone_lr_mult", "layer_decay")
                           if k in args and args[k] not in (None, False, 0, 0.0, "none"))
        lines += [f"- **Recipe**: {recipe}.", f"- **Command**: `{config.get('command', '?')}`", ""]
    machines = sorted({load_json(d / "final.json").get("device") for dirs in runs.values() for d in dirs} - {None})
    versions = next((load_json(d / "config.json").get("versions") for dirs in runs.values() for d in dirs), {}) or {}
    seeds = sorted({load_json(d / "config.json").get("seed") for dirs in runs.values() for d in dirs} - {None})
    lines += ["### Machine, versions, seeds", "",
              f"- Machine: {', '.join(machines) or 'n/a'}",
              f"- Versions: {', '.join(f'{k} {v}' for k, v in versions.items()) or 'n/a'}",
              f"- Seeds: {', '.join(map(str, seeds)) or 'n/a'} (mean ± std over seeds where there are several)", ""]
    return lines


def study_keys(study, plan, runs):
    """The study's run keys: the planned ones in plan order, then any others by name."""
    planned = [(s, n) for s, n, _ in plan if s == study]
    return [k for k in planned if k in runs] + sorted(k for k in runs if k[0] == study and k not in planned)


def study_rows(study, plan, runs):
    return [(k[1], summarise(runs[k])) for k in study_keys(study, plan, runs)]


def delta_cells(r, ref):
    """(the run-name suffix with its seed count, the Δ val cell) of one table row against `ref` (None: blank)."""
    d, exceeds = delta(r, ref) if ref is not None else (None, None)
    mark = "" if exceeds is None else (" *" if exceeds else " (noise)")
    seeds = f" ({r['finished']}/{r['seeds']} seeds)" if r["seeds"] > 1 else ""
    return seeds, "" if d is None else f"{d:+.4f}{mark}"


def section_ablations(results, plan, runs, changes):
    lines = ["## Ablations: CIFAR-100 from scratch", ""]
    rows = study_rows("cifar", plan, runs)
    if not rows:
        return lines + ["*No CIFAR runs in this results folder.*", ""]
    plot_study(results / "cifar_curves.png", "cifar", runs)
    num_classes = rows[0][1]["final"].get("num_classes", 100)
    lines += ["![cifar curves](cifar_curves.png)", "",
              "Each row adds one change to the row above it. Δ val is the change in mean validation accuracy from the "
              "row above; it exceeds noise when larger than the two rows' seed standard deviations added.", "",
              "The init column is each row's convolution initialisation as the run resolved it: He (kaiming) or "
              "PyTorch's default (`--init auto` picks He only where no normalisation follows the convs).", "",
              "| run | change | init | params | best val acc | Δ val | test acc | time (s) | epochs |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    sentences = []
    for i, (name, r) in enumerate(rows):
        seeds, d = delta_cells(r, rows[i - 1][1] if i else None)
        init = r["config"].get("args", {}).get("init", "")
        lines.append(f"| {name}{seeds} | {changes.get(('cifar', name), '')} | {init} | {r['params'] or 0:,} | {fmt(*r['val'])} | "
                     f"{d} | {fmt(*r['test'])} | {fmt(*r['seconds'], digits=1)} | {r['epochs']} |")
        if i:
            sentences.append("- " + effect_sentence(name, changes.get(("cifar", name), ""), r, rows[i - 1][1],
                                                    rows[i - 1][0], num_classes))
        elif never_learned(r, num_classes):
            sentences.append("- " + effect_sentence(name, changes.get(("cifar", name), ""), r, r, name, num_classes))
        if r["val_tta"][0] is not None:
            sentences.append(f"- {name}: its test-time augmentation (--tta {r['final'].get('tta')}) scores "
                             f"{fmt(*r['val_tta'])} on validation against {fmt(*r['val'])} without "
                             f"({r['val_tta'][0] - r['val'][0]:+.4f}); the table's val column is without TTA.")
    lines += ["", "\\* exceeds the seed spread; (noise) within it; blank: one seed, spread unknown.", "", *sentences, ""]
    return lines


def section_transfer(results, plan, runs, changes):
    lines = ["## Transfer learning: birds", ""]
    rows = study_rows("birds", plan, runs)
    if not rows:
        return lines + ["*No birds runs in this results folder.*", ""]
    plot_study(results / "birds_curves.png", "birds", runs)
    plot_tradeoff(results / "birds_tradeoff.png", rows)
    ref_name, ref = next(((n, r) for n, r in rows if n == "frozen"), rows[0])
    num_classes = rows[0][1]["final"].get("num_classes")
    lines += ["Frozen feature extractor, frozen up to a depth, fine-tuned whole, and LP-FT (a linear probe, then "
              f"fine-tuning from its head). Δ val is against `{ref_name}` (the linear probe); the time includes the "
              "feature pass and the probe.", "",
              "![birds accuracy vs trainable parameters and time](birds_tradeoff.png)", "",
              "![birds curves](birds_curves.png)", "",
              "| run | change | trainable / total params | best val acc | Δ val | test acc | time (s) | epochs |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    sentences = []
    for name, r in rows:
        seeds, d = delta_cells(r, ref if name != ref_name else None)
        params = f"{r['trainable'] or 0:,} / {r['params'] or 0:,}"
        lines.append(f"| {name}{seeds} | {changes.get(('birds', name), '')} | {params} | {fmt(*r['val'])} | "
                     f"{d} | {fmt(*r['test'])} | {fmt(*r['seconds'], digits=1)} | {r['epochs']} |")
        if name != ref_name:
            sentences.append("- " + effect_sentence(name, changes.get(("birds", name), ""), r, ref, ref_name,
                                                    num_classes))
        f = r["final"]
        if f.get("lp_val_acc") is not None:
            sentences.append(f"  - its probe reached {f['lp_val_acc']:.4f}; fine-tuning started there "
                             f"({f.get('ft_start_val_acc', float('nan')):.4f}) and ended at {f['best_val_acc']:.4f}.")
    lines += ["", "\\* exceeds the seed spread; (noise) within it; blank: one seed, spread unknown.", "", *sentences, ""]
    return lines


def section_errors(results, finals, notes):
    lines = ["## Error analysis", ""]
    for study, title in STUDIES:
        run_dir = finals.get(study)
        if run_dir is None or not (run_dir / "per_class.csv").is_file():
            lines += [f"*{title}: no final run with per_class.csv yet.*", ""]
            continue
        per_class = read_csv(run_dir / "per_class.csv")
        split = "test" if per_class and per_class[0]["test_acc"] != "" else "val"
        scored = sorted(((float(r[f"{split}_acc"]), r["name"], int(r[f"{split}_n"])) for r in per_class
                         if r[f"{split}_acc"] != ""), key=lambda t: (t[0], t[1]))
        lines += [f"### {title}: `{run_dir.relative_to(results)}` ({split} split)", ""]
        if split == "val":
            lines += ["The test labels are placeholders (a competition file): the analysis uses validation.", ""]
        lines += ["| best classes | acc | | worst classes | acc |", "|---|---:|---|---|---:|"]
        k = min(5, len(scored) // 2)
        best, worst = scored[::-1][:k], scored[:k]
        for (ba, bn, bc), (wa, wn, wc) in zip(best, worst, strict=False):
            lines.append(f"| {bn} | {ba:.3f} ({bc}) | | {wn} | {wa:.3f} ({wc}) |")
        confusion_path = run_dir / f"confusion_{split}.csv"
        if confusion_path.is_file():
            names = [r["name"] for r in per_class]
            matrix = [[int(v) for v in row[1:]] for row in csv.reader(confusion_path.read_text().splitlines()[1:])]
            pairs = sorted(((matrix[t][p], t, p) for t in range(len(matrix)) for p in range(len(matrix))
                            if t != p and matrix[t][p]), reverse=True)[:5]
            lines += ["", "Most-confused pairs (true → predicted: images, share of the true class):", ""]
            lines += [f"- {names[t]} → {names[p]}: {n} ({n / max(1, sum(matrix[t])):.0%})" for n, t, p in pairs] \
                or ["- none"]
        rows = misclassified(run_dir / "predictions.csv") if (run_dir / "predictions.csv").is_file() else []
        if rows:
            pic = f"{study}_misclassified.png"
            try:
                misclassified_grid(results / pic, study, run_dir, rows, [r["name"] for r in per_class])
                lines += ["", f"![{study} misclassified test images]({pic})"]
            except Exception as e:
                notes.append(f"{study} misclassified grid not drawn: {type(e).__name__}: {e}")
                lines += ["", "*Misclassified images not drawn: the data is not readable here.*"]
        lines.append("")
    return lines


# ----------------------------------------------------------------------------- where the networks look

def section_gradcam(results, runs, finals, notes):
    lines = ["## Where the networks look", "",
             "Grad-CAM (Selvaraju et al. 2017, by captum's LayerGradCam) on each network's last convolutional stage: "
             "red is where the evidence for the model's top class lies. `python predict.py CKPT --images PHOTOS "
             "--explain DIR` draws the same for any picture.", ""]
    import explain
    try:
        figures = explain.gradcam_figures(results, runs, finals)
    except Exception as e:  # a data folder moved, a checkpoint unreadable here: the report still comes out
        notes.append(f"Grad-CAM figures not drawn: {type(e).__name__}: {e}")
        figures = []
    for png, text in figures:
        lines += [f"![{png}]({png})", "", text, ""]
    return lines + ([] if figures else ["*No Grad-CAM figure: it needs the birds `frozen` and `lpft` runs, or a "
                                        "final CIFAR run, with their best.pt and data readable here.*", ""])


def conclusions(results):
    """The story in a few sentences, every number read from the run folders."""
    plan, runs = read_runs(results)
    out = []
    rows = [(n, r) for n, r in study_rows("cifar", plan, runs) if r["val"][0] is not None]
    if rows:
        (first, r0), (last, r1) = rows[0], rows[-1]
        out.append(f"CIFAR-100: from `{first}` (val {fmt(r0['val'][0])}, test {fmt(r0['test'][0])}) to `{last}` "
                   f"(val {fmt(r1['val'][0])}, test {fmt(r1['test'][0])}).")
        gains = [(delta(r, rows[i - 1][1])[0], n) for i, (n, r) in enumerate(rows) if i]
        if gains:
            d, n = max(gains)
            out.append(f"The largest single step of the ladder is `{n}` ({d:+.4f} validation accuracy).")
        dead = [n for n, r in rows if never_learned(r, r["final"].get("num_classes", 100))]
        if dead:
            out.append(f"Never learned (chance level): {', '.join(f'`{n}`' for n in dead)}.")
    else:
        out.append("CIFAR-100: no finished runs yet.")
    rows = [(n, r) for n, r in study_rows("birds", plan, runs) if r["val"][0] is not None]
    if rows:
        best_name, best = max(rows, key=lambda nr: nr[1]["val"][0])
        probe = next((r for n, r in rows if n == "frozen"), None)
        out.append(f"Birds: the best run by validation is `{best_name}` (val {fmt(best['val'][0])}, test "
                   f"{fmt(best['test'][0])}, {best['trainable'] or 0:,} trainable parameters).")
        if probe is not None and best_name != "frozen":
            d, exceeds = delta(best, probe)
            out.append(f"Against the linear probe on frozen features (val {fmt(probe['val'][0])}, test "
                       f"{fmt(probe['test'][0])}) it gains {d:+.4f} validation accuracy"
                       + ("" if exceeds is None else " (larger than the seed spread)" if exceeds else " (within noise)")
                       + f", at {best['seconds'][0] / max(probe['seconds'][0] or 1, 1e-9):.0f}x the time.")
    else:
        out.append("Birds: no finished runs yet.")
    return out


def section_reproduce(results, plan, runs):
    lines = ["## Reproduce", ""]
    invocation = results / "invocation.txt"
    if invocation.is_file():
        lines += ["Everything above came from:", "", "```", invocation.read_text().strip(), "```", ""]
    lines += ["Each run alone (run_all.sh adds `--seed`, `--out` and `--resume`):", "",
              "| run | seconds | command |", "|---|---:|---|"]
    totals = {}
    for (study, name), dirs in sorted(runs.items(), key=lambda kv: ([k[:2] for k in plan].index(kv[0])
                                                                      if kv[0] in [k[:2] for k in plan] else 1e9)):
        r = summarise(dirs)
        seconds = sum(x for x in [r["seconds"][0]] if x is not None) * r["finished"]
        totals[study] = totals.get(study, 0) + seconds
        cmd = r["config"].get("command", "?")
        lines.append(f"| {study}/{name} | {fmt(*r['seconds'], digits=0)} | `python {cmd}` |")
    lines += ["", "Time per part: " + ", ".join(f"{s} {t / 60:.1f} min" for s, t in totals.items()) + ".", ""]
    return lines


def make_report(results, html_too=False):
    results = Path(results)
    plan, runs = read_runs(results)
    changes = {(s, n): c for s, n, c in plan}
    finals = {}
    for study, _ in STUDIES:
        finals[study] = final_run(results, study, runs, study_keys(study, plan, runs))
    notes = []
    lines = ["# Lab 2 report", "",
             "Generated by `report.py` from the run folders under this directory; nothing here is typed by hand.", ""]
    missing = [f"{s}/{n}" for s, n, _ in plan if (s, n) not in runs or
               not any((d / "final.json").is_file() for d in runs[(s, n)])]
    if missing:
        lines += ["**Missing runs** (planned by run_all.sh, not finished): " + ", ".join(missing), ""]
    lines += section_method(results, runs, finals, notes)
    lines += section_ablations(results, plan, runs, changes)
    lines += section_transfer(results, plan, runs, changes)
    lines += section_errors(results, finals, notes)
    lines += section_gradcam(results, runs, finals, notes)
    lines += ["## Conclusions", "", *[f"- {c}" for c in conclusions(results)], ""]
    lines += section_reproduce(results, plan, runs)
    lines += ["## Prediction CSVs", ""]
    csvs = sorted(results.glob("*.csv")) + sorted(results.glob("*/*/seed*/submission.csv"))
    lines += [f"- `{p.relative_to(results)}`" for p in csvs] or ["None yet."]
    lines.append("")
    for note in notes:
        print(f"report: {note}", file=sys.stderr)
    text = "\n".join(lines)
    atomic_write_text(results / "REPORT.md", text)
    if html_too:
        atomic_write_text(results / "REPORT.html", to_html(text, results))
    return results / "REPORT.md"


# ----------------------------------------------------------------------------- --html

def to_html(text, folder):
    """REPORT.md as one self-contained HTML page: the `markdown` package (tables, fenced code; tensorboard installs it)
    renders it, and each image is embedded as a data URI."""
    import markdown

    def embed(match):
        path = Path(folder) / html.unescape(match.group(1))
        if not path.is_file():
            return f'src="data:image/png;base64," title="missing image {match.group(1)}"'
        return f'src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}" style="max-width:100%"'

    body = re.sub(r'src="([^"]+)"', embed, markdown.markdown(text, extensions=["tables", "fenced_code"]))
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}table{border-collapse:collapse;"
             "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}code{background:#f3f3f3}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>Lab 2 report</title><style>{style}</style>" \
           f"</head><body>{body}</body></html>\n"


NOTEBOOK = Path(__file__).resolve().parent / "lab2.ipynb"


def execute_notebook(results, notebook=NOTEBOOK):
    """Run lab2.ipynb top to bottom in a fresh kernel against `results` (nbclient) and save the executed copy,
    outputs and figures included, as RESULTS/lab2.ipynb."""
    import os

    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(notebook, as_version=4)
    old = os.environ.get("RESULTS")
    os.environ["RESULTS"] = str(Path(results).resolve())  # the kernel inherits it
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(Path(notebook).parent)}}).execute()
    finally:
        if old is None:
            os.environ.pop("RESULTS", None)
        else:
            os.environ["RESULTS"] = old
    atomic_write_text(Path(results) / "lab2.ipynb", nbformat.writes(nb))
    return nb


def main():
    parser = argparse.ArgumentParser(description="Write REPORT.md (and optionally REPORT.html) from run folders.")
    parser.add_argument("--results", default="results", help="folder holding <study>/<run>/seed<k>/ run folders")
    parser.add_argument("--html", action="store_true", help="also write REPORT.html, one file with the images inside")
    parser.add_argument("--notebook", action="store_true",
                        help="also run lab2.ipynb against these results into RESULTS/lab2.ipynb (outputs included)")
    parser.add_argument("--best-run", choices=["cifar", "birds"], help="print the best finished run folder of a study")
    args = parser.parse_args()
    if not Path(args.results).is_dir():
        sys.exit(f"error: {args.results} does not exist; run bash run_all.sh first")
    if args.best_run:
        best = best_run(args.results, args.best_run)
        print(best or "")
        return
    print(make_report(args.results, args.html))
    if args.notebook:
        execute_notebook(args.results)
        print(Path(args.results) / "lab2.ipynb")


if __name__ == "__main__":
    main()
