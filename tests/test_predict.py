"""predict() on a folder of real PNG/JPEG files with a tiny fake model behind load_for_inference."""

import csv
import json
import sys
import types

import pytest
import torch
from PIL import Image
from torch import nn

from resforge.infer import expand_inputs, format_predictions, predict, save_predictions

NAMES = ["red", "green", "blue"]
META = {"class_names": NAMES, "input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.5] * 3,
        "model": {"name": "tiny"}}


class ColourNet(nn.Module):
    """Logit k = 10 * mean of channel k, so a pure red image predicts "red"."""

    def __init__(self):
        super().__init__()
        self.seen_shapes = []
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x):  # (B, 3, 16, 16), normalised to [-1, 1] by META's mean/std
        self.seen_shapes.append(tuple(x.shape))
        assert x.min() >= -1.0 - 1e-5 and x.max() <= 1.0 + 1e-5
        return self.scale * x.mean(dim=(2, 3))  # (B, 3)


@pytest.fixture
def fake_loader(monkeypatch):
    """Install a fake resforge.checkpoint.load_for_inference; returns the calls it received."""
    calls, model = [], ColourNet().eval()

    def load_for_inference(source, *, model_name=None, num_classes=None, in_chans=None,
                           class_names=None, device="cpu"):
        calls.append({"source": source, "model_name": model_name, "device": device})
        return model, dict(META)

    try:
        import resforge.checkpoint as ckpt
    except ImportError:  # the real module is not written yet: stand in for it
        ckpt = types.ModuleType("resforge.checkpoint")
        monkeypatch.setitem(sys.modules, "resforge.checkpoint", ckpt)
    monkeypatch.setattr(ckpt, "load_for_inference", load_for_inference, raising=False)
    return calls, model


@pytest.fixture
def image_dir(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (32, 20), (255, 0, 0)).save(root / "a_red.png")
    Image.new("RGB", (40, 40), (0, 255, 0)).save(root / "b_green.jpg", quality=95)
    Image.new("RGB", (17, 50), (0, 0, 255)).save(root / "sub" / "c_blue.jpeg", quality=95)
    Image.new("L", (20, 20), 128).save(root / "d_gray.png")  # 1-channel file, 3-channel model
    (root / "e_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (root / "notes.txt").write_text("not an image")  # ignored when expanding a folder
    return root


def test_expand_inputs(image_dir):
    files = expand_inputs([image_dir])
    names = [f.rsplit("/", 1)[-1] for f in files]
    assert names == ["a_red.png", "b_green.jpg", "d_gray.png", "e_corrupt.jpg", "c_blue.jpeg"]
    assert expand_inputs([image_dir, image_dir / "a_red.png"]) == files  # duplicates dropped
    assert expand_inputs(str(image_dir)) == files  # a lone path is not iterated per character


def test_predict_folder_with_corrupt_and_missing(fake_loader, image_dir, tmp_path):
    calls, model = fake_loader
    missing = tmp_path / "nope.png"
    rows = predict(tmp_path / "run", [image_dir, missing], topk=2, batch_size=2, device="cpu",
                   model_name="tiny")
    assert calls == [{"source": tmp_path / "run", "model_name": "tiny", "device": "cpu"}]
    assert all(s[1:] == (3, 16, 16) for s in model.seen_shapes)  # size from meta only

    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in rows}
    assert len(rows) == 6
    for name, label in [("a_red.png", "red"), ("b_green.jpg", "green"), ("c_blue.jpeg", "blue")]:
        row = by_name[name]
        assert row["error"] is None and len(row["topk"]) == 2
        assert row["topk"][0]["label"] == label and row["topk"][0]["prob"] > 0.9
        assert row["topk"][0]["prob"] >= row["topk"][1]["prob"]
    gray = by_name["d_gray.png"]["topk"]
    assert gray[0]["prob"] == pytest.approx(1 / 3, abs=0.02)  # equal channels -> uniform
    assert by_name["e_corrupt.jpg"]["error"] and by_name["e_corrupt.jpg"]["topk"] == []
    assert rows[-1]["path"] == str(missing) and "not found" in rows[-1]["error"]

    table = format_predictions(rows)
    assert "red 100.0%" in table and "ERROR" in table and table.endswith("6 files, 2 errors")


def test_topk_larger_than_classes(fake_loader, image_dir):
    rows = predict("weights.safetensors", [image_dir / "a_red.png"], topk=10)
    assert len(rows[0]["topk"]) == 3
    assert sum(t["prob"] for t in rows[0]["topk"]) == pytest.approx(1.0, abs=1e-5)


def test_save_csv_and_json(fake_loader, image_dir, tmp_path):
    out_csv = tmp_path / "out" / "preds.csv"
    rows = predict("run", [image_dir], topk=3, out=out_csv)
    with open(out_csv, newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0].keys()) == ["path", "top1_label", "top1_prob", "top2_label", "top2_prob",
                                     "top3_label", "top3_prob", "error"]
    assert [t["path"] for t in table] == [r["path"] for r in rows]
    red = next(t for t in table if t["path"].endswith("a_red.png"))
    assert red["top1_label"] == "red" and float(red["top1_prob"]) > 0.9 and red["error"] == ""
    bad = next(t for t in table if t["path"].endswith("e_corrupt.jpg"))
    assert bad["error"] and bad["top1_label"] == ""

    out_json = save_predictions(rows, tmp_path / "preds.json")
    assert json.loads(out_json.read_text()) == rows

    with pytest.raises(ValueError, match="csv or .json"):
        save_predictions(rows, tmp_path / "preds.txt")


def test_all_files_fail(fake_loader, tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"garbage")
    rows = predict("run", [bad], out=tmp_path / "p.csv")
    assert rows[0]["error"] and rows[0]["topk"] == []
    header = (tmp_path / "p.csv").read_text().splitlines()[0]
    assert header == "path,top1_label,top1_prob,error"
    assert "1 files, 1 errors" in format_predictions(rows)


def _row(path, labels, error=None):
    probs = [0.7, 0.2, 0.1][:len(labels)]
    return {"path": path, "topk": [{"label": lab, "prob": p} for lab, p in zip(labels, probs)], "error": error}


def test_table_shows_control_characters_escaped_one_row_per_line():
    rows = [_row("a.png", ["two\nlines", "tab\there", "esc\x1b[31m"]), _row("b\n.png", [], error="bad\rfile")]
    table = format_predictions(rows)
    lines = table.splitlines()
    assert len(lines) == 1 + len(rows) + 1                      # header, one line per row, summary
    assert "two\\nlines 70.0%" in lines[1] and "tab\\there" in lines[1] and "esc\\x1b[31m" in lines[1]
    assert lines[2].startswith("b\\n.png") and "bad\\rfile" in lines[2]


def test_csv_cells_cannot_run_as_spreadsheet_formulas(tmp_path):
    evil = ["=cmd|' /C calc'!A0", "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx", "fine=ok"]
    rows = [_row("=HYPERLINK(\"http://x\")", evil[:3]), _row("@x.png", evil[3:6]), _row("ok.png", evil[6:]),
            _row("bad.png", [], error="=1+1")]
    out = save_predictions(rows, tmp_path / "p.csv")
    with open(out, newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["path", "top1_label", "top1_prob", "top2_label", "top2_prob", "top3_label", "top3_prob", "error"]
    cells = [c for row in table[1:] for c in row if c]
    dangerous = [c for c in cells if c[0] in "=+-@\t\r"]
    assert not dangerous
    assert table[1][0] == "'=HYPERLINK(\"http://x\")" and table[1][1] == "'=cmd|' /C calc'!A0"
    assert table[3][1] == "fine=ok" and table[4][-1] == "'=1+1"
    assert json.loads(save_predictions(rows, tmp_path / "p.json").read_text()) == rows   # JSON keeps values
