"""report.json / report.md / confusion files, merge behaviour, and the plots they use."""

import csv
import json

import numpy as np
from PIL import Image

from resforge.metrics import classification_metrics
from resforge.plots import plot_confusion, plot_training_curves, read_metrics_csv
from resforge.report import write_report

NAMES = ["cat", "dog", "bird|x"]  # a pipe must not break the markdown table
META = {"model": {"name": "resnet20", "num_classes": 3}, "class_names": NAMES}


def _metrics(seed: int, n: int = 30) -> dict:
    rng = np.random.default_rng(seed)
    return classification_metrics(rng.normal(size=(n, 3)), rng.integers(0, 3, size=n), NAMES)


def _assert_png(path):
    assert path.exists()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100


def test_write_report_files_and_keys(tmp_path):
    rejected = [{"path": f"bad/{i}.jpg", "reason": "truncated"} for i in range(60)]
    extra = {"rejected": rejected, "data": {"source": "folder", "fingerprint": "abc123"}}
    jpath, mdpath = write_report(tmp_path, {"test": _metrics(0)}, meta=META, extra=extra)

    report = json.loads(jpath.read_text())
    assert {"resforge_version", "model", "class_names", "rejected", "data", "test"} <= report.keys()
    assert report["model"]["name"] == "resnet20" and report["class_names"] == NAMES
    assert 0.0 <= report["test"]["top1"] <= 1.0 and report["test"]["n"] == 30
    assert report["splits"] == ["test"]

    md = mdpath.read_text()
    assert "## Summary" in md and "| test |" in md and "## Per-class: test" in md
    assert "bird\\|x" in md  # escaped
    assert "## Rejected files (60)" in md and "bad/49.jpg" in md and "bad/50.jpg" not in md
    assert "and 10 more" in md and "## Data notes" in md and "abc123" in md

    with open(tmp_path / "confusion_test.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["true\\pred", *NAMES]
    assert [list(map(int, r[1:])) for r in rows[1:]] == report["test"]["confusion"]
    _assert_png(tmp_path / "confusion_test.png")
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind


def test_merge_adds_and_replaces_splits(tmp_path):
    write_report(tmp_path, {"val": _metrics(1), "test": _metrics(2)}, meta=META)
    new_test = _metrics(3, n=12)
    jpath, mdpath = write_report(tmp_path, {"test": new_test, "test_tta": _metrics(4)}, meta=META)
    report = json.loads(jpath.read_text())
    assert report["splits"] == ["val", "test", "test_tta"]
    assert report["test"]["n"] == 12 and report["test"]["top1"] == new_test["top1"]
    assert report["val"]["n"] == 30  # kept from the first write
    md = mdpath.read_text()
    assert "| val |" in md and "| test_tta |" in md
    assert (tmp_path / "confusion_test_tta.png").exists()


def test_report_for_other_model_is_replaced(tmp_path):
    write_report(tmp_path, {"val": _metrics(1)}, meta=META)
    other = {"model": {"name": "resnet56"}, "class_names": NAMES}
    jpath, _ = write_report(tmp_path, {"test": _metrics(2)}, meta=other)
    report = json.loads(jpath.read_text())
    assert report["splits"] == ["test"] and "val" not in report


def test_binary_report_has_auc_column(tmp_path):
    m = classification_metrics(np.array([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0]]), np.array([0, 1, 1]), ["n", "p"])
    _, mdpath = write_report(tmp_path, {"test": m}, meta={"model": "tiny", "class_names": ["n", "p"]})
    md = mdpath.read_text()
    assert "AUC" in md and "top-5" not in md  # top-5 of 2 classes is always 100%: no column


def test_top5_column_only_above_five_classes(tmp_path):
    names = [f"c{i}" for i in range(6)]
    rng = np.random.default_rng(0)
    m = classification_metrics(rng.normal(size=(20, 6)), rng.integers(0, 6, size=20), names)
    _, mdpath = write_report(tmp_path, {"test": m}, meta={"model": "tiny", "class_names": names})
    assert "| top-5 |" in mdpath.read_text()


def test_plot_confusion_large_k(tmp_path):
    k = 30  # above the annotation threshold; row with no samples must not produce NaNs
    cm = np.random.default_rng(0).integers(0, 5, size=(k, k))
    cm[3] = 0
    out = plot_confusion(cm, [f"class_{i}" for i in range(k)], tmp_path / "sub" / "cm.png", "big")
    _assert_png(out)


def _write_metrics_csv(path, rows, header):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_plot_training_curves_synthetic(tmp_path):
    header = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "val_ece", "notes"]
    rows = [[e, 0.1 * 0.9**e, 2 / e, 1 - 1 / (e + 1), 2.2 / e, 0.9 - 1 / (e + 2), 0.99, 0.05, ""]
            for e in range(1, 11)]
    rows[4][4] = ""  # an empty val_loss cell -> gap, not a crash
    rows.append([3, 0.5, 9.0, 0.1, 9.0, 0.1, 0.5, 0.5, ""])  # resumed run repeats epoch 3 (last wins)
    csv_path = tmp_path / "metrics.csv"
    _write_metrics_csv(csv_path, rows, header)

    cols = read_metrics_csv(csv_path)
    assert "notes" not in cols  # entirely empty column dropped
    assert cols["epoch"].tolist() == list(range(1, 11))
    assert cols["train_loss"][2] == 9.0 and np.isnan(cols["val_loss"][4])
    _assert_png(plot_training_curves(csv_path, tmp_path / "results.png"))


def test_plot_training_curves_minimal_and_empty(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    _write_metrics_csv(csv_path, [[1, 0.5], [2, 0.4]], ["epoch", "train_loss"])
    _assert_png(plot_training_curves(csv_path, tmp_path / "a.png"))
    _write_metrics_csv(csv_path, [], ["epoch", "lr", "train_loss", "val_loss"])  # header only
    _assert_png(plot_training_curves(csv_path, tmp_path / "b.png"))


def test_results_png_says_the_training_loss_includes_label_smoothing(tmp_path, monkeypatch):
    import resforge.plots as plots
    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, out: figs.append(fig) or out)
    csv_path = tmp_path / "metrics.csv"
    _write_metrics_csv(csv_path, [[1, 0.1, 1.2, 0.5, 0.9, 0.6], [2, 0.0, 0.8, 0.8, 0.4, 0.9]],
                       ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc"])
    for ls in (0.1, 0.0):
        plot_training_curves(csv_path, tmp_path / "r.png", label_smoothing=ls)
    legends = [[t.get_text() for t in fig.axes[0].get_legend().get_texts()] for fig in figs]
    assert legends[0] == ["train_loss (incl. label smoothing 0.1)", "val_loss"]
    assert legends[1] == ["train_loss", "val_loss"]


def test_report_md_names_the_tta_views(tmp_path):
    m = {**_metrics(5), "tta": True, "tta_views": ["identity", "shift(+1,+1)", "shift(-1,-1)"]}
    tta = {"views": m["tta_views"], "from": "the run's aug config (config.json)"}
    _, md_path = write_report(tmp_path, {"test": m}, meta=META, extra={"tta": tta})
    md = md_path.read_text()
    assert "| TTA views |" in md and "3 (TTA)" in md
    assert "## Test-time augmentation" in md and "`shift(-1,-1)`" in md and "the run's aug config" in md
    assert json.loads((tmp_path / "report.json").read_text())["tta"]["views"] == m["tta_views"]


def test_msp_calibration_section_and_reliability_diagram(tmp_path):
    from resforge import ood
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(40, 3)) * 3, rng.integers(0, 3, size=40)
    m = {**classification_metrics(logits, labels, NAMES), "calibration": ood.calibration(logits, labels)}
    record = {**ood.fit(logits), "flagged": {"test": 0.25}}
    jpath, mdpath = write_report(tmp_path, {"test": m}, meta=META, extra={"ood": record})
    report = json.loads(jpath.read_text())
    assert report["test"]["calibration"]["ece"] == report["test"]["ece"] and report["ood"]["flagged"] == {"test": 0.25}
    md = mdpath.read_text()
    assert "## MSP calibration" in md and "reliability_test.png" in md and "## Data notes" not in md
    assert f"{record['threshold']:.4g}" in md and "Flagged here: test 25.00%" in md
    _assert_png(tmp_path / "reliability_test.png")
    _, mdpath = write_report(tmp_path / "none", {"test": m}, meta=META,
                             extra={"ood": ood.summary(None, {})})
    assert "No out-of-distribution threshold: it carries no OOD threshold (" in mdpath.read_text()
