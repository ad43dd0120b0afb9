"""The CLI end to end, in process: train -> eval -> predict, listings, and clear errors."""
import json

import numpy as np
import pytest
from PIL import Image

from resforge.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    assert main(["train", "--project", str(root), "--name", "r", "--epochs", "2", "data.image_size=8",
                 "train.progress=false", f"data.cache_dir={root / 'cache'}"]) == 0
    return root / "r"


def test_train_prints_accuracy_and_report_location(run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["test"]) >= {"top1", "top5", "per_class", "macro", "weighted", "confusion", "ece"}


def test_eval_on_a_run_reuses_its_test_split(run_dir, capsys):
    assert main(["eval", str(run_dir), "--split", "test", "--split", "val", "--tta"]) == 0
    out = capsys.readouterr().out
    assert "test: top1" in out and "val: top1" in out
    report = json.loads((run_dir / "eval" / "best-test-val-tta" / "report.json").read_text())   # its own folder
    assert report["test"]["n"] == 360 and report["test"]["tta"] is True
    assert json.loads((run_dir / "report.json").read_text())["test"]["tta"] is False   # the record stays


def test_predict_files_and_folders(run_dir, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "p.json"
    assert main(["predict", str(run_dir), str(folder), "--topk", "3", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 4 and sum(r["error"] is not None for r in rows) == 1
    assert all(len(r["topk"]) == 3 for r in rows if not r["error"])


def test_models_and_recipes_list(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "resnet18" in out and "11.69M" in out and "resnet56" in out and "0.85M" in out
    assert main(["recipes"]) == 0
    assert "digits" in capsys.readouterr().out


def test_data_scan_reports_duplicates(tmp_path, capsys):
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / "d" / split / cls).mkdir(parents=True)
    img = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "d" / "train" / "a" / "x.png")
    Image.fromarray(img).save(tmp_path / "d" / "test" / "a" / "same.png")       # leak across splits
    Image.fromarray(255 - img).save(tmp_path / "d" / "train" / "b" / "y.png")
    Image.fromarray(img[::-1]).save(tmp_path / "d" / "test" / "b" / "z.png")
    assert main(["data", "scan", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "same.png" in out or "leak" in out.lower()


@pytest.mark.parametrize("argv, words", [
    (["train", "optim.lrr=0.1"], "Did you mean 'optim.lr'"),
    (["train", "--recipe", "digts"], "Did you mean 'digits'"),
    (["train", "--model", "resnet21"], "resnet20"),
    (["eval", "/nonexistent/weights.th", "--data", "digits"], "not found"),
])
def test_bad_input_is_one_clear_error_line(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
