"""report.py on a fixture results tree, and the whole run_all.sh --smoke chain."""
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pytest
import torch

import fixtures
import report
import run_files
from conftest import ROOT


def fake_run(results, study, name, seed, val, test, frozen=None, epochs=3):
    d = results / study / name / f"seed{seed}"
    d.mkdir(parents=True)
    history = [{"epoch": e + 1, "train_loss": 4.0 - e, "train_acc": 0.1 * e, "val_loss": 3.0, "val_acc": val * (e + 1) / epochs,
                "lr": 0.1, "epoch_seconds": 1.0, "images_per_second": 100.0} for e in range(epochs)]
    run_files.write_metrics(d / "metrics.csv", history)
    args = {"epochs": epochs, **({"freeze_backbone": frozen} if frozen is not None else {})}
    (d / "config.json").write_text(json.dumps({"args": args}))
    (d / "final.json").write_text(json.dumps({"best_val_acc": val, "test_acc": test, "train_seconds": 12.5,
                                              "parameters": 1000, "trainable_parameters": 10 if frozen else 1000}))
    (d / "architecture.md").write_text(f"# {name}\n\n| layer | type | output shape | parameters |\n|---|---|---|---:|\n"
                                       f"| head.1 | Linear | 10 | 10 |\n| **total** | | | **1,000** |\n")
    (d / "submission.csv").write_text('"Id","Prediction1"\n"0","1"\n')


def test_report_tables_from_fixture_runs(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "plan.tsv").write_text("study\trun\tchange\tseeds\ncifar\t01_basenet\tBaseNet\t2\n"
                                      "cifar\t08_final\tResNet-18\t1\nbirds\tfrozen\tfrozen backbone\t1\n"
                                      "birds\tfinetune\tfine-tune all\t1\n")
    fake_run(results, "cifar", "01_basenet", 0, 0.20, 0.21)
    fake_run(results, "cifar", "01_basenet", 1, 0.24, 0.25)
    fake_run(results, "cifar", "08_final", 0, 0.70, 0.69)
    fake_run(results, "birds", "frozen", 0, 0.60, 0.58, frozen=True)
    text = report.make_report(results).read_text()
    for needle in ("## Method", "## Ablations", "## Transfer learning", "## Error analysis", "## Conclusions",
                   "## Reproduce", "**Missing runs**", "birds/finetune", "cifar_curves.png", "birds_tradeoff.png"):
        assert needle in text, needle
    assert "| 01_basenet (2/2 seeds) | BaseNet |  | 1,000 | 0.2200 ± 0.0283 |  | 0.2300 ± 0.0283 |" in text
    assert "| 08_final | ResNet-18 |  | 1,000 | 0.7000 | +0.4800 | 0.6900 |" in text
    assert "| frozen | frozen backbone | 10 / 1,000 | 0.6000 |  | 0.5800 |" in text
    assert report.best_run(results, "cifar").name == "seed0"


def test_report_on_an_empty_tree_says_so(tmp_path):
    text = report.make_report(tmp_path).read_text()
    assert "No CIFAR runs" in text and "No birds runs" in text


def test_never_learned_is_called_out_with_its_reason():
    flat = {"val": (0.01, None), "final": {}, "history": [{"train_loss": 4.61}, {"train_loss": 4.60}]}
    assert "never moved" in report.never_learned(flat, 100)
    overfit = {"val": (0.011, None), "final": {}, "history": [{"train_loss": 4.6}, {"train_loss": 1.0}]}
    assert "without generalising" in report.never_learned(overfit, 100)
    assert report.never_learned({"val": (0.3, None), "history": [], "final": {}}, 100) is None
    collapsed = {"val": (0.0167, None), "final": {"val_size": 300},  # 5 of 300: chance on a small split
                 "history": [{"phase": "lp", "train_loss": 0.25}, {"phase": "ft", "train_loss": 4.2},
                             {"phase": "ft", "train_loss": 4.5}]}
    assert "destroyed what the probe had learned" in report.never_learned(collapsed, 100)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One `bash run_all.sh --smoke --jobs 2` shared by the tests below (the whole chain, report and notebook
    included), two runs at a time with one CPU thread each."""
    results = tmp_path_factory.mktemp("smoke") / "results"
    env = {**os.environ, "RESULTS": str(results), "PYTHON": sys.executable, "THREADS": "1"}
    proc = subprocess.run(["bash", "run_all.sh", "--smoke", "--jobs", "2"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return results, env, proc.stdout


def _table(text, heading):
    """The first markdown table after `heading`, as lists of cells."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


def test_smoke_chain_writes_a_complete_report(smoke):
    results, env, _ = smoke
    text = (results / "REPORT.md").read_text()
    assert "Missing runs" not in text
    for section in ("## Method", "## Ablations: CIFAR-100", "## Transfer learning: birds", "## Error analysis",
                    "## Where the networks look", "## Conclusions", "## Reproduce"):
        assert section in text, section
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    for name in ("cifar_augmentations.png", "birds_augmentations.png", "cifar_curves.png", "birds_curves.png",
                 "birds_tradeoff.png", "cifar_misclassified.png", "birds_misclassified.png", "birds_gradcam.png",
                 "cifar_gradcam.png"):
        assert name in images, name
    for name in images:  # every picture the report links exists and is a PNG
        assert (results / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "| stem |" in text and "| stage 1 |" in text and "| head |" in text  # stage-level architecture tables
    for name in ("cifar_submission.csv", "birds_submission.csv"):
        assert (results / name).read_text().startswith('"Id","Prediction1"\n"0",')
    page = (results / "REPORT.html").read_text()
    assert page.count("data:image/png;base64,") == len(images) and "<img alt" in page and 'src="' not in \
        page.replace('src="data:', "")  # self-contained
    # a second invocation skips every finished run and redoes nothing
    again = subprocess.run(["bash", "run_all.sh", "--smoke", "--only", "birds"], cwd=ROOT, env={**env, "NOTEBOOK": "0"},
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("done, skipped") == 10 and "epoch 1/" not in again.stdout
    assert "nothing to run" in again.stdout  # and no estimate of nothing


def test_smoke_chain_runs_in_parallel_with_logs_and_tensorboard(smoke):
    """--jobs 2: one console line per start and finish with the progress, each run's output in its log.txt, and
    TensorBoard curves, flags and final hparams in every run folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    results, _, stdout = smoke
    runs = sorted(p.parent for p in results.glob("*/*/seed0/final.json"))
    assert len(runs) == 22 and "2 at a time, on the CPU" in stdout and "1 thread(s) per run" in stdout
    for run in runs:
        key = run.relative_to(results).as_posix()
        assert f"start {key} on 1 CPU thread(s)" in stdout and f"done  {key} in " in stdout
        assert "best val acc" in (run / "log.txt").read_text()
        board = EventAccumulator(str(run))
        board.Reload()
        metrics = pd.read_csv(run / "metrics.csv")
        assert [e.step for e in board.Scalars("accuracy/val")] == list(range(1, len(metrics) + 1)), key
        assert [e.value for e in board.Scalars("accuracy/val")] == pytest.approx(list(metrics.val_acc), rel=1e-6)
        assert {"lr", "loss/train", "images_per_second"} <= set(board.Tags()["scalars"])
        assert any(t.startswith("flags") for t in board.Tags()["tensors"])  # the flags as text
    assert re.search(r"\[22 of 22 done, \dh\d\dm\d\ds elapsed", stdout)
    hparams = EventAccumulator(str(results / "cifar" / "12_final" / "seed0"))
    hparams.Reload()
    assert [e.value for e in hparams.Scalars("final/best_val_acc")] == pytest.approx(
        [json.loads((results / "cifar" / "12_final" / "seed0" / "final.json").read_text())["best_val_acc"]])


def test_printed_commands_rebuild_the_same_runs_whatever_the_jobs(smoke, tmp_path):
    """`--print-commands` prints one self-contained line per pending run (all 12 on an empty tree, only the
    unfinished ones on a partial tree); run with bash -c two at a time (what `--jobs 1` runs, what a scheduler
    would run), they give the same metrics as the smoke chain's `--jobs 2` (timing columns aside); `--report-only`
    then writes the report from them. Two runs are rebuilt: the first, and CutMix with EMA (random draws per step)."""
    env = {**smoke[1], "RESULTS": str(tmp_path / "empty")}
    printed = subprocess.run(["bash", "run_all.sh", "--smoke", "--only", "cifar", "--print-commands"], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=600)
    lines = printed.stdout.splitlines()
    assert printed.returncode == 0 and len(lines) == 12 and all(" --resume " in line for line in lines)
    assert all(line.startswith(f"cd {ROOT} && mkdir -p ") and "OMP_NUM_THREADS=1 " in line for line in lines)
    results = tmp_path / "results"
    for part in ("smoke_data", "cifar"):  # the smoke chain's CIFAR runs, without its report
        shutil.copytree(smoke[0] / part, results / part)
    rebuilt = ["cifar/01_basenet/seed0", "cifar/10_cutmix/seed0"]
    for key in rebuilt:
        shutil.rmtree(results / key)
    env["RESULTS"] = str(results)
    printed = subprocess.run(["bash", "run_all.sh", "--smoke", "--only", "cifar", "--print-commands"], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=600)
    lines = printed.stdout.splitlines()
    assert printed.returncode == 0 and [line.split(" && mkdir -p ")[1].split(" ")[0] for line in lines] == \
        [str(results / key) for key in rebuilt]  # only the pending runs
    with ThreadPoolExecutor(2) as pool:  # each line is self-contained: no OMP_NUM_THREADS of ours in its environment
        done = pool.map(lambda line: subprocess.run(
            ["bash", "-c", line], env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}, timeout=600), lines)
        assert all(p.returncode == 0 for p in done)
    timing = ["epoch_seconds", "images_per_second", "eval_seconds"]
    for key in rebuilt:
        mine, theirs = results / key / "metrics.csv", smoke[0] / key / "metrics.csv"
        pd.testing.assert_frame_equal(pd.read_csv(mine).drop(columns=timing), pd.read_csv(theirs).drop(columns=timing))
        assert (mine.parent / "submission.csv").read_bytes() == (theirs.parent / "submission.csv").read_bytes()
    again = subprocess.run(["bash", "run_all.sh", "--smoke", "--only", "cifar", "--print-commands"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout == ""  # nothing pending
    report = subprocess.run(["bash", "run_all.sh", "--smoke", "--only", "cifar", "--report-only"], cwd=ROOT,
                            env={**env, "NOTEBOOK": "0"},
                            capture_output=True, text=True, timeout=600)
    assert report.returncode == 0, report.stderr
    text = (results / "REPORT.md").read_text()
    assert "Missing runs" not in text and "12_final" in text and (results / "cifar_submission.csv").is_file()


def test_a_failed_run_does_not_stop_the_others_and_is_retried_alone(smoke, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(smoke[0], results)
    broken, redo = results / "cifar" / "02_normalize" / "seed0", results / "cifar" / "01_basenet" / "seed0"
    shutil.rmtree(redo)
    (broken / "final.json").unlink()
    (broken / "config.json").write_text("{not json")  # the run refuses its folder: exit 2, one sentence
    env = {**smoke[1], "RESULTS": str(results), "NOTEBOOK": "0"}  # the notebook has tests of its own
    proc = subprocess.run(["bash", "run_all.sh", "--smoke", "--only", "cifar", "--jobs", "2"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert proc.stdout.count(" start ") == 2 and proc.stdout.count("done, skipped") == 10
    assert "1 runs failed" in proc.stderr and "cifar/02_normalize/seed0 (exit 2): error:" in proc.stderr
    assert "not a readable config" in proc.stderr.splitlines()[-1]
    assert (redo / "final.json").is_file() and (results / "REPORT.md").is_file()  # the others ran; the report too
    (broken / "config.json").unlink()
    again = subprocess.run(["bash", "run_all.sh", "--smoke", "--only", "cifar", "--jobs", "2"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count(" start ") == 1 and "start cifar/02_normalize/seed0" in again.stdout


def test_report_deltas_are_the_differences_of_its_own_numbers(smoke):
    text = (smoke[0] / "REPORT.md").read_text()
    ladder = _table(text, "## Ablations: CIFAR-100")
    vals = [float(r[4].split()[0]) for r in ladder]
    deltas = [r[5].split()[0] if r[5] else "" for r in ladder]
    assert deltas[0] == "" and len(ladder) == 12
    inits = {r[0]: r[2] for r in ladder}  # the init each row resolved: He until BatchNorm, then PyTorch's default
    assert inits["05_kaiming"] == inits["06_bn"] == "kaiming" and inits["07_bn_init"] == inits["11_width"] == "default"
    assert inits["01_basenet"] == inits["04_depth"] == "default" and inits["12_final"] == "kaiming"
    for i in range(1, len(ladder)):  # both shown to 4 decimals: they agree to the last digit's rounding
        assert abs(float(deltas[i]) - (vals[i] - vals[i - 1])) <= 1.01e-4, ladder[i]
    birds = _table(text, "## Transfer learning: birds")
    ref = next(float(r[3].split()[0]) for r in birds if r[0] == "frozen")
    for r in birds:
        if r[0] != "frozen":
            assert abs(float(r[4].split()[0]) - (float(r[3].split()[0]) - ref)) <= 1.01e-4, r


def test_per_class_accuracy_averages_to_the_run_accuracy(smoke):
    for run in (smoke[0] / "cifar" / "12_final" / "seed0", smoke[0] / "birds" / "lpft" / "seed0"):
        final = json.loads((run / "final.json").read_text())
        per_class = pd.read_csv(run / "per_class.csv")
        for split, key in (("val", "best_val_acc"), ("test", "test_acc")):
            weighted = (per_class[f"{split}_acc"] * per_class[f"{split}_n"]).sum() / per_class[f"{split}_n"].sum()
            assert weighted == pytest.approx(final[key], abs=1e-5), (run, split)
        confusion = pd.read_csv(run / "confusion_test.csv", index_col=0)
        assert confusion.values.sum() == final["test_size"]
        preds = pd.read_csv(run / "predictions.csv")
        assert len(preds) == final["test_size"] and (preds.p1 >= preds.p2).all()
        assert (preds.top1 == preds.label).mean() == pytest.approx(final["test_acc"], abs=1e-6)


def test_misclassified_grid_shows_only_wrong_predictions(smoke):
    run = smoke[0] / "cifar" / "12_final" / "seed0"
    preds = pd.read_csv(run / "predictions.csv")
    shown = report.misclassified(run / "predictions.csv")
    assert shown and all(r["label"] != r["top1"] for r in shown)
    assert len(shown) == min(16, int((preds.label != preds.top1).sum()))


def _executed(results, run=True):
    """The notebook as executed on `results` (run here in a fresh kernel, or as run_all.sh left it): no cell raised;
    returns it and its number of figures."""
    import nbformat
    if run:
        report.execute_notebook(results)
    nb = nbformat.read(results / "lab2.ipynb", as_version=4)
    assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code" and c.source.strip())
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    return nb, sum("image/png" in o.get("data", {}) for o in outputs)


def test_notebook_runs_top_to_bottom_on_smoke_and_partial_results(smoke, tmp_path):
    notebook = json.loads((ROOT / "lab2.ipynb").read_text())
    code = "\n".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code")
    assert not any(word in code for word in ("fit(", "backward", "optimizer.step", "train_cifar"))  # reads only
    nb, figures = _executed(smoke[0], run=False)  # as run_all.sh ran it, in its own kernel
    assert figures >= 10  # the two Grad-CAM figures among them
    partial = tmp_path / "partial"
    shutil.copytree(smoke[0] / "cifar", partial / "cifar")
    nb, figures = _executed(partial)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert figures >= 3 and "birds: no run yet" in text


OFFLINE = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}  # every fetch refused at once


def test_run_all_without_data_offline_stops_before_any_run(tmp_path):
    """Data and weights absent, network unreachable: one sentence per missing piece, exit 1, no results/ at all."""
    env = {**os.environ, **OFFLINE, "RESULTS": str(tmp_path / "results"), "PYTHON": sys.executable,
           "CIFAR_DATA": str(tmp_path / "data"), "BIRDS_DATA": str(tmp_path / "data" / "CUB_200_2011"),
           "BIRDS_ARCH": "resnet18", "TORCH_HOME": str(tmp_path / "torch")}
    proc = subprocess.run(["bash", "run_all.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1, proc.stderr
    assert len(errors) == 3 and "CIFAR-100" in errors[0] and "CUB-200-2011" in errors[1] and "resnet18" in errors[2]
    assert "Traceback" not in proc.stderr and "== cifar" not in proc.stdout
    assert not (tmp_path / "results").exists()


def test_run_all_with_data_present_skips_the_download_and_plans(cifar_dir, clean_cub_dir, tmp_path):
    """With DEVICE=cpu the plan comes, with the machine's three lines above it, also beside an NVIDIA driver too old
    for torch's CUDA build (a stand-in nvidia-smi: the CPU on purpose)."""
    env = {**os.environ, **OFFLINE, "RESULTS": str(tmp_path / "results"), "PYTHON": sys.executable,
           "PATH": fixtures.stand_in_nvidia_smi(tmp_path / "bin"),
           "CIFAR_DATA": str(cifar_dir), "BIRDS_DATA": str(clean_cub_dir), "BIRDS_ARCH": "resnet18",
           "BIRDS_WEIGHTS": "none", "BIRDS_IMG": "32", "DEVICE": "cpu", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(["bash", "run_all.sh", "--plan-only"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"torch {torch.__version__}" in proc.stdout.split("plan on")[0]  # devices.py --short, above the plan
    assert "cifar/12_final" in proc.stdout and "birds/lpft" in proc.stdout and "birds/stages3" in proc.stdout
    assert "estimated total:" in proc.stdout
    assert "download" not in proc.stderr and not (tmp_path / "results").exists()


def test_run_all_without_the_requirements_says_how_to_get_them(tmp_path):
    """A PYTHON that lacks torch (here the suite's own interpreter without site-packages): one sentence naming the
    venv, before anything runs."""
    bare = tmp_path / "python"
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    bare.chmod(0o755)
    proc = subprocess.run(["bash", "run_all.sh", "--smoke"], cwd=ROOT, env={**os.environ, "PYTHON": str(bare),
                          "RESULTS": str(tmp_path / "results")}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "cannot import torch" in proc.stderr and ". .venv/bin/activate" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and not (tmp_path / "results").exists()


def test_run_all_rejects_unknown_options():
    proc = subprocess.run(["bash", "run_all.sh", "--bogus"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown option --bogus" in proc.stderr


def test_plan_estimate_with_jobs_is_the_longest_chain():
    sys.path.insert(0, str(ROOT / "tools"))
    import plan_estimate as bench
    assert bench.schedule_seconds([10, 10, 10, 10], jobs=1, units=1) == 40  # one at a time: the sum
    assert bench.schedule_seconds([10, 10, 10, 10], jobs=2, units=2) == 20  # two GPUs: half
    assert bench.schedule_seconds([30, 10, 10, 10], jobs=2, units=2) == 30  # the longest chain, not the sum / 2
    assert bench.schedule_seconds([10, 10, 10, 10], jobs=4, units=1) == 40  # 4 runs sharing one GPU (or the CPU)
    assert bench.schedule_seconds([], jobs=3, units=3) == 0


def test_run_all_rejects_bad_jobs():
    for bad in ("0", "two"):
        proc = subprocess.run(["bash", "run_all.sh", "--jobs", bad], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 2 and "--jobs takes a positive integer" in proc.stderr


def test_a_budgeted_runs_epochs_are_the_epochs_it_trained(tmp_path):
    """config.json's args keep the unused default (15) in folders written before the run's length was recorded;
    final.json's epochs (the budget's choice) are what the table and the recipe line state."""
    results = tmp_path / "results"
    results.mkdir()
    (results / "plan.tsv").write_text("study\trun\tchange\tseeds\ncifar\t12_final\tbudgeted\t1\n")
    fake_run(results, "cifar", "12_final", 0, 0.5, 0.5, epochs=7)
    d = results / "cifar" / "12_final" / "seed0"
    (d / "config.json").write_text(json.dumps({"args": {"epochs": 15, "time_budget": 600, "optimizer": "sgd"}}))
    final = json.loads((d / "final.json").read_text())
    (d / "final.json").write_text(json.dumps({**final, "epochs": 7}))
    text = report.make_report(results).read_text()
    assert "| 7 |" in text.split("## Ablations")[1].split("##")[0] and "epochs 7" in text and "epochs 15" not in text
