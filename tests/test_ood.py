"""MSP calibration and the out-of-distribution flag (resforge.ood): the maths on hand-made
numbers, then one tiny digits run whose threshold, fitted on its validation split, flags
pixel-shuffled digits far more often than real ones, through predict, the CLI and the report."""
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import resforge
from deploy_helpers import torch_one_thread  # noqa: F401
from resforge import ood
from resforge.checkpoint import read_meta, save_checkpoint
from resforge.metrics import expected_calibration_error
from resforge.models import create_model

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the maths


def test_msp_score_is_minus_log_of_the_top_probability():
    z = np.array([[0.0, math.log(3.0)], [2.0, 2.0], [40.0, 0.0]])
    # softmax tops 3/4, 1/2 and 1 / (1 + e^-40): 1 - MSP rounds that last one to 0, its log does not
    assert ood.neg_log_msp(z) == pytest.approx([-math.log(0.75), math.log(2.0), math.exp(-40.0)], rel=1e-12)
    assert 1 - ood.softmax(z)[2].max() == 0.0 and ood.neg_log_msp(z)[2] > 0
    assert np.exp(-ood.neg_log_msp(z)) == pytest.approx(ood.softmax(z).max(axis=1))
    assert ood.score(z, {"score": "energy"}) == pytest.approx(ood.energy(z))


def test_energy_is_minus_logsumexp():
    z = np.array([[0.0, math.log(3.0)],          # logsumexp = log(1 + 3)
                  [1.0, 1.0],                    # log(2e) = 1 + log 2
                  [1000.0, 1000.0]])             # stable: 1000 + log 2, not inf
    want = [-math.log(4.0), -(1 + math.log(2.0)), -(1000 + math.log(2.0))]
    assert ood.energy(z) == pytest.approx(want, rel=1e-12)
    assert ood.energy(torch.tensor(z, dtype=torch.float32)) == pytest.approx(want, rel=1e-6)
    # T scales the logits inside and the result outside: -T log sum exp(z / T)
    assert ood.energy(z[:1], temperature=2.0)[0] == pytest.approx(-2 * math.log(1 + 3 ** 0.5))
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        ood.energy(np.zeros(3))


def test_threshold_accepts_the_stated_fraction_of_val():
    rng = np.random.default_rng(0)
    for n in (20, 100, 137, 1000):
        s = rng.normal(size=n)
        t = ood.fit_threshold(s, 0.95)
        accepted = np.mean(s <= t)
        assert 0.95 <= accepted < 0.95 + 1 / n + 1e-12             # the smallest such score
        assert np.mean(ood.flagged(s, {"threshold": t})) == pytest.approx(1 - accepted)
    assert ood.fit_threshold(np.arange(100.0), 0.95) == 94.0       # the 95th smallest of 0..99
    record = ood.fit(rng.normal(size=(50, 4)))
    assert record["score"] == "msp" and record["n"] == 50 and record["fitted_on"] == "val"
    assert np.mean(ood.score(rng.normal(size=(50, 4)) * 0, record) > record["threshold"]) == 1.0   # uniform: log K
    for bad, words in (([], "need finite"), ([0.0, np.nan], "need finite")):
        with pytest.raises(ValueError, match=words):
            ood.fit_threshold(bad)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        ood.fit_threshold([1.0, 2.0], 1.0)


def _two_class(confidence: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose top-1 probability is `confidence`, labels right with that probability."""
    logits = np.stack([np.log(confidence), np.log1p(-confidence)], axis=1)
    labels = np.where(rng.random(confidence.size) < confidence, 0, 1)
    return logits, labels


def test_ece_of_calibrated_and_overconfident_sets():
    rng = np.random.default_rng(0)
    logits, labels = _two_class(rng.uniform(0.5, 0.999, size=20_000), rng)
    fair = ood.calibration(logits, labels)
    assert fair["ece"] < 0.02 and abs(fair["mean_confidence"] - fair["accuracy"]) < 0.02
    sharp = ood.calibration(4 * logits, labels)                    # same answers, far more sure
    assert sharp["ece"] > 0.1 and sharp["mean_confidence"] > sharp["accuracy"] + 0.1
    for c in (fair, sharp):
        assert len(c["bins"]) == 15 and sum(b["count"] for b in c["bins"]) == 20_000
        assert all(b["lo"] < b["confidence"] <= b["hi"] for b in c["bins"] if b["count"])
    # one binning for the report's diagram and metrics' ECE
    assert sharp["ece"] == pytest.approx(expected_calibration_error(ood.softmax(4 * logits), labels))


def test_summary_says_why_there_is_no_threshold():
    z = np.zeros((5, 3))
    assert "only 5 validation images" in ood.summary(ood.fit_on_val({"val": z}), {"val": z})["why"]
    assert "eval.tta" in ood.fit_on_val({"test": z})["why"] and not ood.fitted(ood.fit_on_val({"test": z}))
    assert ood.fit_on_val({"val": np.zeros((40, 3))}, "none")["why"] == "eval.ood_score=none"
    assert "no OOD threshold" in ood.summary(None, {"test": z})["why"]            # a model without one
    record = {**ood.fit(np.zeros((40, 3)), "energy"), "threshold": -5.0}
    flagged = ood.summary(record, {"val": np.zeros((4, 3)), "test": np.array([[50.0, 0, 0], [9.0, 9.0, 9.0]])})
    assert flagged["flagged"] == {"val": 1.0, "test": 0.0}    # energies -log 3 > -5; -50, -9 - log 3 < -5
    assert ood.describe(flagged) == "OOD flag: energy -logsumexp(logits) > -5 (accepts 95% of 40 val images); " \
        "flagged val 100.0%, test 0.0%"


# ---------------------------------------------------------------- a tiny run, end to end


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """resnet20 on 8x8 digits, 4 epochs (as tests/test_train.py's FAST): ~5 s."""
    root = tmp_path_factory.mktemp("ood")
    return resforge.train("digits", ["data.image_size=8", "train.epochs=4", "train.batch_size=128",
                                     "train.progress=false", f"train.project={root}",
                                     "train.name=run", f"data.cache_dir={root / 'cache'}"]).dir


@pytest.fixture(scope="module")
def images(run, tmp_path_factory) -> dict[str, list[Path]]:
    """120 test digits and the same digits with their pixels shuffled: same intensities, no strokes."""
    from resforge.pipeline import prepare_data
    from resforge.config import load_config
    bundle, _ = prepare_data(load_config(None, None, base=json.loads((run / "config.json").read_text())))
    folder, rng = tmp_path_factory.mktemp("ood-images"), np.random.default_rng(0)
    out = {"digits": [], "shuffled": []}
    for i, x in enumerate(np.asarray(bundle.splits["test"].images[:120])[:, 0]):     # (8, 8) uint8
        for kind, arr in (("digits", x), ("shuffled", rng.permutation(x.ravel()).reshape(x.shape))):
            path = folder / kind / f"{i:03d}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(arr).save(path)
            out[kind].append(path)
    return out


def test_run_fits_a_threshold_on_val_into_its_checkpoints_and_report(run):
    meta = read_meta(run / "weights" / "best.safetensors")     # still verified against the weights
    record = meta["ood"]
    assert record["score"] == "msp" and record["fitted_on"] == "val" and record["n"] == 144
    assert record["accept_rate"] == 0.95 and math.isfinite(record["threshold"])
    report = json.loads((run / "report.json").read_text())
    assert report["ood"]["threshold"] == record["threshold"]
    assert 0.04 <= report["ood"]["flagged"]["val"] <= 0.06 and report["ood"]["flagged"]["test"] < 0.2
    cal = report["test"]["calibration"]
    assert cal["ece"] == pytest.approx(report["test"]["ece"]) and cal["accuracy"] == pytest.approx(report["test"]["top1"])
    md = (run / "report.md").read_text()
    assert "## MSP calibration" in md and f"{record['threshold']:.4g}" in md and "Flagged here: val" in md
    assert (run / "reliability_test.png").is_file() and (run / "reliability_val.png").is_file()


def test_predict_flags_shuffled_digits_far_more_often_than_digits(run, images):
    rates, scores = {}, {}
    for kind, files in images.items():
        rows = resforge.predict(run, files, ood=True, device="cpu")
        assert all(isinstance(r["ood"], bool) and math.isfinite(r["ood_score"]) for r in rows)
        rates[kind] = np.mean([r["ood"] for r in rows])
        scores[kind] = np.array([r["ood_score"] for r in rows])
    # by design about 5% of real digits are flagged (3-13% over seeds 0-3); shuffled ones 45-65%
    assert rates["digits"] <= 0.2 and rates["shuffled"] >= rates["digits"] + 0.2, rates
    assert np.median(scores["shuffled"]) > np.median(scores["digits"])
    rows = resforge.predict(run, images["digits"][:2], device="cpu")
    assert "ood" not in rows[0] and "ood_score" not in rows[0]    # only asked for


def test_cli_predict_ood_table_and_csv(run, images, tmp_path):
    files = [str(images["digits"][0]), str(images["shuffled"][0]), str(tmp_path / "missing.png")]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    r = subprocess.run([sys.executable, "-m", "resforge.cli", "predict", str(run), *files, "--ood", "--topk", "1",
                        "--out", str(tmp_path / "p.csv")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    head, *body = r.stdout.splitlines()
    assert head.split()[-2:] == ["ood", "(score)"]
    assert body[0].split()[-2] in ("ok", "OOD") and "flagged out-of-distribution" in r.stdout
    with open(tmp_path / "p.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0])[-3:] == ["ood_score", "ood", "error"]
    assert table[0]["ood"] in ("true", "false") and float(table[0]["ood_score"]) >= 0     # -log MSP
    assert table[2]["ood"] == "" and table[2]["error"]           # the missing file: no score


def test_a_model_without_threshold_is_refused_with_the_remedy(tmp_path, images):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "weights" / "best", create_model("resnet20", num_classes=10, in_chans=1),
                    {"model": {"name": "resnet20", "num_classes": 10, "in_chans": 1, "kwargs": {}},
                     "class_names": [str(i) for i in range(10)], "input_size": [1, 8, 8], "mean": [0.3], "std": [0.4]})
    with pytest.raises(ValueError, match="no OOD threshold.*validation split"):
        resforge.predict(tmp_path, images["digits"][:1], ood=True)
    assert resforge.predict(tmp_path, images["digits"][:1])[0]["error"] is None      # without --ood: fine


def test_eval_report_carries_calibration_and_flag_rates(run, tmp_path):
    results = resforge.evaluate(run, splits=("val", "test"), out_dir=tmp_path / "eval")
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["ood"]["threshold"] == read_meta(run / "weights" / "best.safetensors")["ood"]["threshold"]
    assert set(report["ood"]["flagged"]) == {"val", "test"} and "calibration" in results["test"]
    assert "## MSP calibration" in (tmp_path / "eval" / "report.md").read_text()


def test_sidecars_of_the_checkpoints_holding_the_model_get_the_fields(tmp_path):
    from resforge.checkpoint import add_to_sidecars
    torch.manual_seed(0)
    a, b = (create_model("resnet20", num_classes=10, in_chans=1) for _ in range(2))
    meta = {"model": {"name": "resnet20", "num_classes": 10, "in_chans": 1, "kwargs": {}},
            "class_names": [str(i) for i in range(10)], "input_size": [1, 8, 8], "mean": [0.3], "std": [0.4]}
    for stem, model in (("best", a), ("last", b)):
        save_checkpoint(tmp_path / stem, model, meta)
    record = ood.fit(np.random.default_rng(0).normal(size=(30, 10)))
    assert add_to_sidecars(tmp_path, b, {"ood": record}) == [tmp_path / "last.json"]
    assert read_meta(tmp_path / "last.safetensors")["ood"] == record       # sha256 still matches its weights
    assert "ood" not in read_meta(tmp_path / "best.safetensors")
