"""Batch prediction throughput path on a real trained run: hundreds of files, decoding
threads ahead of the model, batches, CSV/JSON out, results independent of batching."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

from deploy_helpers import torch_one_thread, trained_run  # noqa: F401
from resforge.infer import predict


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def folder(run, tmp_path_factory):
    """200 real test digits as PNG/JPEG files in nested folders, plus one broken file."""
    from resforge.pipeline import prepare_data
    from resforge.config import load_config
    cfg = json.loads((run / "config.json").read_text())
    split = prepare_data(load_config(None, None, base=cfg))[0].splits["test"]
    root = tmp_path_factory.mktemp("many")
    for i in range(200):
        sub = root / f"part{i % 3}"
        sub.mkdir(exist_ok=True)
        img = Image.fromarray(np.asarray(split.images[i % len(split.labels)])[0]).resize((24, 24))
        img.save(sub / f"{i:04d}.{'png' if i % 2 else 'jpg'}")
    (root / "part0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    return root


def test_many_files_batched_in_parallel(run, folder, tmp_path):
    out = tmp_path / "preds.csv"
    rows = predict(run, [folder], topk=2, batch_size=32, workers=2, progress=False, out=out, device="cpu")
    assert len(rows) == 201 and sum(r["error"] is not None for r in rows) == 1
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)          # input order kept
    with open(out, newline="") as f:
        table = list(csv.DictReader(f))
    assert [t["path"] for t in table] == [r["path"] for r in rows]

    # batching, thread count and batch size must not change any answer
    small = predict(run, [folder], topk=2, batch_size=7, workers=1, progress=False, device="cpu")
    for a, b in zip(rows, small):
        assert [t["label"] for t in a["topk"]] == [t["label"] for t in b["topk"]]
        assert [t["prob"] for t in a["topk"]] == pytest.approx([t["prob"] for t in b["topk"]], abs=1e-5)


def test_cli_predict_workers_and_json(run, folder, tmp_path, capsys):
    from resforge.cli import main
    out = tmp_path / "p.json"
    assert main(["predict", str(run), str(folder / "part1"), "--workers", "2", "--batch-size", "16",
                 "--out", str(out), "--topk", "1"]) == 0
    saved = json.loads(out.read_text())
    assert len(saved) == 67 and all(r["error"] is None for r in saved)
    assert "67 files, 0 errors" in capsys.readouterr().out
    with pytest.raises(ValueError, match="workers must be >= 1"):
        predict(run, [folder], workers=0)
