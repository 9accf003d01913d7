"""Write results/REPORT.md from the run folders that run_all.sh leaves: training-loss and
validation-accuracy curves (one figure per study, runs overlaid), the architecture tables of
the final networks, the CIFAR ablation table, the frozen vs fine-tuned birds comparison and
the prediction CSVs. Works on whatever runs exist and lists the planned ones that are missing.

    python report.py --results results
    python report.py --results results --best-run birds   # prints the best birds run folder
"""
import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

from engine import atomic_write, atomic_write_text


def read_runs(results):
    """{(study, name): [seed folders with final.json or metrics.csv]} plus the plan (study, name, change)."""
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


def read_metrics(seed_dir):
    with open(seed_dir / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def mean_std(values, digits=4):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def plot_study(path, study, runs):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (s, name), seed_dirs in sorted(runs.items()):
        if s != study:
            continue
        history = read_metrics(seed_dirs[0])
        epochs = [h["epoch"] for h in history]
        ax1.plot(epochs, [h["train_loss"] for h in history], marker=".", label=name)
        ax2.plot(epochs, [h["val_acc"] for h in history], marker=".", label=name)
    ax1.set(xlabel="epoch", ylabel="training loss", title=f"{study}: training loss")
    ax2.set(xlabel="epoch", ylabel="validation accuracy", title=f"{study}: validation accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def summary_row(seed_dirs):
    finals = [load_json(d / "final.json") for d in seed_dirs]
    finals = [f for f in finals if f]
    config = load_json(seed_dirs[0] / "config.json").get("args", {})
    return {
        "params": finals[0]["parameters"] if finals else None,
        "trainable": finals[0].get("trainable_parameters") if finals else None,
        "val": mean_std([f.get("best_val_acc") for f in finals]),
        "test": mean_std([f.get("test_acc") for f in finals]),
        # a frozen run's one feature pass is part of its cost: count it with the training time
        "time": mean_std([f.get("train_seconds", 0) + (f.get("cache_seconds") or 0) for f in finals], digits=1),
        "epochs": config.get("epochs"),
        "finished": len(finals),
        "seeds": len(seed_dirs),
        "config": config,
    }


def best_run(results, study):
    """The seed-0 folder of the finished run in `study` with the best validation accuracy."""
    _, runs = read_runs(results)
    scored = [(load_json(dirs[0] / "final.json").get("best_val_acc", -1), dirs[0])
              for (s, _), dirs in runs.items() if s == study and (dirs[0] / "final.json").is_file()]
    return max(scored)[1] if scored else None


def make_report(results):
    results = Path(results)
    plan, runs = read_runs(results)
    lines = ["# Results", "",
             "Written by `report.py` from the run folders under this directory "
             "(each has config.json, metrics.csv, final.json, curves.png, architecture.md).", ""]
    planned = [(s, n) for s, n, _ in plan]
    missing = [f"{s}/{n}" for s, n in planned if (s, n) not in runs or
               not any((d / "final.json").is_file() for d in runs[(s, n)])]
    changes = {(s, n): c for s, n, c in plan}
    if missing:
        lines += ["**Missing runs** (planned by run_all.sh, not finished): " + ", ".join(missing), ""]

    for study, title in (("cifar", "CIFAR-100 from scratch"), ("birds", "Birds by transfer learning")):
        study_runs = {k: v for k, v in runs.items() if k[0] == study}
        lines += [f"## {title}", ""]
        if not study_runs:
            lines += [f"No {study} runs yet.", ""]
            continue
        plot_study(results / f"{study}_curves.png", study, runs)
        lines += [f"![{study} curves]({study}_curves.png)", ""]
        if study == "cifar":
            lines += ["### Ablation ladder", "", "Each row adds one change to the row above it.", "",
                      "| run | change | params | best val acc | test acc | train time (s) | epochs |",
                      "|---|---|---:|---:|---:|---:|---:|"]
        else:
            lines += ["### Frozen feature extractor vs full fine-tuning", "",
                      "| run | change | frozen | trainable / total params | best val acc | test acc | time (s, with feature cache) | epochs |",
                      "|---|---|---|---:|---:|---:|---:|---:|"]
        order = [k for k in planned if k in study_runs] + sorted(k for k in study_runs if k not in planned)
        for key in order:
            r = summary_row(study_runs[key])
            seeds = f" ({r['finished']}/{r['seeds']} seeds)" if r["seeds"] > 1 else ""
            params = f"{r['params']:,}" if r["params"] else "n/a"
            if study == "cifar":
                lines.append(f"| {key[1]}{seeds} | {changes.get(key, '')} | {params} | {r['val']} | {r['test']} | "
                             f"{r['time']} | {r['epochs']} |")
            else:
                frozen = "yes" if r["config"].get("freeze_backbone") else "no"
                trainable = f"{r['trainable']:,} / {params}" if r["trainable"] else params
                lines.append(f"| {key[1]}{seeds} | {changes.get(key, '')} | {frozen} | {trainable} | {r['val']} | "
                             f"{r['test']} | {r['time']} | {r['epochs']} |")
        lines.append("")
        final_dir = best_run(results, study) if study == "birds" else \
            (next((study_runs[k] for k in order if k[1].endswith("_final")), None) or study_runs[order[-1]])[0]
        if final_dir and (final_dir / "architecture.md").is_file():
            table = (final_dir / "architecture.md").read_text().split("\n", 2)[-1].strip()
            if study == "birds":  # a ResNet-50 lists hundreds of layers: keep the head and the total
                rows = table.splitlines()
                table = "\n".join(rows[:2] + [r for r in rows[2:] if r.startswith("| head") or "**total**" in r])
            lines += [f"### Architecture of the final network ({final_dir.relative_to(results)})", "", table, ""]

    lines += ["## Prediction CSVs", ""]
    csvs = sorted(results.glob("*.csv")) + sorted(results.glob("*/*/seed*/submission.csv"))
    lines += [f"- `{p.relative_to(results)}`" for p in csvs] or ["None yet."]
    lines.append("")
    atomic_write_text(results / "REPORT.md", "\n".join(lines))
    return results / "REPORT.md"


def main():
    parser = argparse.ArgumentParser(description="Write REPORT.md from run folders.")
    parser.add_argument("--results", default="results", help="folder holding <study>/<run>/seed<k>/ run folders")
    parser.add_argument("--best-run", choices=["cifar", "birds"], help="print the best finished run folder of a study")
    args = parser.parse_args()
    if not Path(args.results).is_dir():
        sys.exit(f"error: {args.results} does not exist; run bash run_all.sh first")
    if args.best_run:
        best = best_run(args.results, args.best_run)
        print(best or "")
        return
    print(make_report(args.results))


if __name__ == "__main__":
    main()
