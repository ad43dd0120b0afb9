"""classification_metrics against small hand-computed cases."""

import json
import math

import numpy as np
import pytest
import torch

from resforge.metrics import classification_metrics, expected_calibration_error

NAMES3 = ["a", "b", "c"]


def _one_hot_logits(preds, k, scale=50.0):
    """Logits whose softmax is ~one-hot on `preds` (confidence ~1)."""
    logits = np.zeros((len(preds), k))
    logits[np.arange(len(preds)), preds] = scale
    return logits


def test_perfect_confident_predictions():
    y = np.array([0, 1, 2, 2, 1, 0])
    m = classification_metrics(_one_hot_logits(y, 3), y, NAMES3)
    assert m["n"] == 6
    assert m["top1"] == 1.0 and m["top5"] == 1.0
    assert m["ece"] == pytest.approx(0.0, abs=1e-6)
    assert m["nll"] == pytest.approx(0.0, abs=1e-6)
    assert m["macro"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert m["confusion"] == [[2, 0, 0], [0, 2, 0], [0, 0, 2]]
    assert "auc" not in m


def test_known_confusion_and_per_class():
    # true:  0 0 0 1 1 2 ; pred: 0 0 1 1 2 2
    y = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 2, 2])
    m = classification_metrics(_one_hot_logits(pred, 3), y, NAMES3)
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["top1"] == pytest.approx(4 / 6)
    a, b, c = m["per_class"]
    assert a == {"name": "a", "precision": 1.0, "recall": pytest.approx(2 / 3), "f1": pytest.approx(0.8), "support": 3}
    assert b["precision"] == pytest.approx(0.5) and b["recall"] == pytest.approx(0.5) and b["support"] == 2
    assert c["precision"] == pytest.approx(0.5) and c["recall"] == 1.0
    assert m["macro"]["recall"] == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)
    assert m["weighted"]["recall"] == pytest.approx(m["top1"])  # weighted recall == accuracy
    # Confident (p ~ 1) everywhere, 2 of 6 wrong -> ECE = |4/6 - 1| = 1/3.
    assert m["ece"] == pytest.approx(1 / 3, abs=1e-6)


def test_topk_and_probs_input():
    probs = np.array([
        [0.5, 0.3, 0.1, 0.05, 0.03, 0.02],  # label 1 -> top-2 hit, top-1 miss
        [0.15, 0.2, 0.3, 0.2, 0.1, 0.05],   # label 5 is ranked last -> top-5 miss
        [0.9, 0.02, 0.02, 0.02, 0.02, 0.02],
    ])
    y = np.array([1, 5, 0])
    m = classification_metrics(probs, y, list("uvwxyz"), from_logits=False)
    assert m["top1"] == pytest.approx(1 / 3)
    assert m["top5"] == pytest.approx(2 / 3)
    expected_nll = -(math.log(0.3) + math.log(0.05) + math.log(0.9)) / 3
    assert m["nll"] == pytest.approx(expected_nll)


def test_ece_hand_computed_bins():
    # conf 0.95 correct, 0.95 wrong -> bin (0.9,1]: |0.5-0.95| * 2/4; conf 0.6 correct x2 -> |1-0.6| * 2/4
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.6, 0.4], [0.4, 0.6]])
    y = np.array([0, 1, 0, 1])
    ece = expected_calibration_error(probs, y, n_bins=10)
    assert ece == pytest.approx(0.45 * 0.5 + 0.4 * 0.5)


def test_binary_auc_and_torch_input():
    p1 = torch.tensor([0.1, 0.4, 0.35, 0.8])  # classic sklearn example -> AUC 0.75
    probs = torch.stack([1 - p1, p1], dim=1)
    y = torch.tensor([0, 0, 1, 1])
    m = classification_metrics(probs, y, ["neg", "pos"], from_logits=False)
    assert m["auc"] == pytest.approx(0.75)
    assert m["top5"] == 1.0  # top-min(5, K) with K = 2


def test_binary_auc_single_class_is_none():
    m = classification_metrics(np.array([[2.0, 0.0], [0.0, 1.0]]), np.array([0, 0]), ["neg", "pos"])
    assert m["auc"] is None


def test_absent_class_and_json_serialisable():
    y = np.array([0, 0, 1, 1])  # class "c" never appears, nor is predicted
    m = classification_metrics(_one_hot_logits(y, 3), y, NAMES3)
    assert m["per_class"][2] == {"name": "c", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["confusion"][2] == [0, 0, 0]
    text = json.dumps(m, allow_nan=False)  # plain Python types only
    assert json.loads(text)["n"] == 4
    assert all(type(v) is float for v in (m["top1"], m["top5"], m["ece"], m["nll"]))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="class names"):
        classification_metrics(np.zeros((2, 3)), np.array([0, 1]), ["a", "b"])
    with pytest.raises(ValueError, match="labels"):
        classification_metrics(np.zeros((2, 3)), np.array([0, 3]), NAMES3)
    with pytest.raises(ValueError, match="empty"):
        classification_metrics(np.zeros((0, 3)), np.array([], dtype=int), NAMES3)
