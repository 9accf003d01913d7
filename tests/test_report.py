"""report.py on a fixture results tree, and the whole run_all.sh --smoke chain."""
import json
import os
import subprocess
import sys


import engine
import report
from conftest import ROOT


def fake_run(results, study, name, seed, val, test, frozen=None, epochs=3):
    d = results / study / name / f"seed{seed}"
    d.mkdir(parents=True)
    history = [{"epoch": e + 1, "train_loss": 4.0 - e, "train_acc": 0.1 * e, "val_loss": 3.0, "val_acc": val * (e + 1) / epochs,
                "lr": 0.1, "epoch_seconds": 1.0, "images_per_second": 100.0} for e in range(epochs)]
    engine.write_metrics(d / "metrics.csv", history)
    args = {"epochs": epochs, **({"freeze_backbone": frozen} if frozen is not None else {})}
    (d / "config.json").write_text(json.dumps({"args": args}))
    (d / "final.json").write_text(json.dumps({"best_val_acc": val, "test_acc": test, "train_seconds": 12.5,
                                              "parameters": 1000, "trainable_parameters": 10 if frozen else 1000}))
    (d / "architecture.md").write_text(f"# {name}\n\n| layer | type | output shape | parameters |\n|---|---|---|---:|\n"
                                       f"| head.1 | Linear | 10 | 10 |\n| **total** | | | **1,000** |\n")
    (d / "submission.csv").write_text('"Id","Prediction1"\n"0","1"\n')


def test_report_has_every_section(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "plan.tsv").write_text("study\trun\tchange\tseeds\ncifar\t01_basenet\tBaseNet\t2\n"
                                      "cifar\t08_final\tResNet-18\t1\nbirds\tfrozen\tfrozen backbone\t1\n"
                                      "birds\tfinetune\tfine-tune all\t1\n")
    fake_run(results, "cifar", "01_basenet", 0, 0.20, 0.21)
    fake_run(results, "cifar", "01_basenet", 1, 0.24, 0.25)
    fake_run(results, "cifar", "08_final", 0, 0.70, 0.69)
    fake_run(results, "birds", "frozen", 0, 0.60, 0.58, frozen=True)
    path = report.make_report(results)
    text = path.read_text()
    for needle in ("## CIFAR-100 from scratch", "### Ablation ladder", "### Frozen feature extractor vs full fine-tuning",
                   "### Architecture of the final network", "## Prediction CSVs", "cifar_curves.png", "birds_curves.png",
                   "**Missing runs**", "birds/finetune"):
        assert needle in text, needle
    assert "| 01_basenet (2/2 seeds) | BaseNet | 1,000 | 0.2200 ± 0.0283 | 0.2300 ± 0.0283 |" in text
    assert "| frozen | frozen backbone | yes | 10 / 1,000 | 0.6000 | 0.5800 |" in text
    for png in ("cifar_curves.png", "birds_curves.png"):
        assert (results / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.best_run(results, "cifar").name == "seed0"


def test_report_on_an_empty_tree_says_so(tmp_path):
    text = report.make_report(tmp_path).read_text()
    assert "No cifar runs yet." in text and "No birds runs yet." in text


def test_run_all_smoke_end_to_end(tmp_path):
    env = {**os.environ, "RESULTS": str(tmp_path / "results"), "PYTHON": sys.executable, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(["bash", "run_all.sh", "--smoke"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = tmp_path / "results"
    text = (results / "REPORT.md").read_text()
    assert "Missing runs" not in text
    assert text.count("| 0") >= 10  # every ladder and birds row carries real numbers
    for name in ("cifar_submission.csv", "birds_submission.csv", "cifar_curves.png", "birds_curves.png"):
        assert (results / name).stat().st_size > 0
    assert (results / "cifar_submission.csv").read_text().startswith('"Id","Prediction1"\n"0",')
    # a second invocation skips every finished run and redoes nothing
    again = subprocess.run(["bash", "run_all.sh", "--smoke", "--only", "birds"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done, skipped") == 5 and "epoch 1/" not in again.stdout


def test_run_all_rejects_unknown_options():
    proc = subprocess.run(["bash", "run_all.sh", "--bogus"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown option --bogus" in proc.stderr


def test_notebook_only_loads_results(tmp_path, monkeypatch):
    """lab2.ipynb's code cells run against a results tree and hold no training code."""
    import matplotlib
    matplotlib.use("Agg")
    results = tmp_path / "results"
    results.mkdir()
    fake_run(results, "cifar", "01_basenet", 0, 0.2, 0.21)
    fake_run(results, "birds", "frozen", 0, 0.6, 0.58, frozen=True)
    notebook = json.loads((ROOT / "lab2.ipynb").read_text())
    code = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
    assert not any(word in "\n".join(code) for word in ("fit(", "backward", "optimizer", "train_cifar"))
    monkeypatch.setenv("RESULTS", str(results))
    scope = {}
    for cell in code:
        exec(compile(cell, "lab2.ipynb", "exec"), scope)
    assert set(scope["table"].run) == {"frozen", "01_basenet"}
    assert (results / "cifar_curves.png").is_file()


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
    env = {**os.environ, **OFFLINE, "RESULTS": str(tmp_path / "results"), "PYTHON": sys.executable,
           "CIFAR_DATA": str(cifar_dir), "BIRDS_DATA": str(clean_cub_dir), "BIRDS_ARCH": "resnet18",
           "BIRDS_WEIGHTS": "none", "BIRDS_IMG": "32", "DEVICE": "cpu", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(["bash", "run_all.sh", "--plan-only"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "cifar/11_final" in proc.stdout and "birds/finetune" in proc.stdout and "estimated total:" in proc.stdout
    assert "download" not in proc.stderr and not (tmp_path / "results").exists()
