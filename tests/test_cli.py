"""The CLI end to end, in process: train -> eval -> predict, listings, and clear errors."""
import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from resforge.cli import main

TRAIN_OUTPUT = {}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", "--project", str(root), "--name", "r", "--epochs", "2", "data.image_size=8",
                     "train.progress=false", f"data.cache_dir={root / 'cache'}", "--threads", "1"]) == 0
    TRAIN_OUTPUT["text"] = out.getvalue()
    return root / "r"


def test_train_start_line_names_the_thread_count(run_dir):
    start = next(line for line in TRAIN_OUTPUT["text"].splitlines() if line.startswith("resforge "))
    assert "1 CPU thread " in start + " " and json.loads((run_dir / "config.json").read_text())["train"]["threads"] == 1


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


# ---------------------------------------------------------------- first hour: help, errors, devices, listings

import errno  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from resforge import cli, config  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")
NO_GPU = not torch.cuda.is_available()


def _cli(args, cwd, env=None):
    """Run `python -X importtime -m resforge.cli ARGS` -> (rc, stdout, stderr, modules imported, seconds)."""
    env = {**os.environ, "PYTHONPATH": SRC, **(env or {})}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "resforge.cli", *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - t0
    lines = p.stderr.splitlines()
    modules = {ln.rsplit("|", 1)[1].strip() for ln in lines if ln.startswith("import time:")}
    err = "\n".join(ln for ln in lines if not ln.startswith("import time:"))
    return p.returncode, p.stdout, err, modules, seconds


@pytest.mark.parametrize("args, rc, words", [
    (["--help"], 0, "Exit codes"),
    (["train", "--help"], 0, "(default: the recipe's"),
    (["predict"], 2, "the following arguments are required"),
    (["eval", "x", "--batch-size", "0"], 2, "must be at least 1"),
    (["predict", "run", "x.png", "--device", "gpu0"], 2, "device='gpu0' is not one of auto, cpu, mps"),
    (["train", "--device", "banana", "optim.lr=0.1"], 2, "train.device='banana' is not one of auto, cpu, mps"),
    (["train", "optim.lr=-1"], 2, "optim.lr=-1.0 is out of range"),
    (["train", "--batch-size", "0"], 2, "train.batch_size=0 is out of range"),
    (["train", "--pretrained", "resnet18"], 2, "https://download.pytorch.org/models/resnet18-f37072fd.pth"),
    (["config", "--section", "train"], 0, "train.threads"),
])
def test_help_and_argument_errors_are_instant_and_import_no_torch(args, rc, words, tmp_path):
    code, out, err, modules, seconds = _cli(args, tmp_path)
    assert code == rc, err
    assert words in out + err
    assert "torch" not in modules and seconds < 5, (sorted(m for m in modules if "torch" in m), seconds)
    assert not (tmp_path / "runs").exists()          # nothing created before the values are checked
    if rc == 2 and "required" not in err and "at least 1" not in err:
        assert err.count("\n") == 0 and "Traceback" not in err, err


def test_package_attributes_stay_lazy_and_work():
    probe = "import sys, resforge; assert 'torch' not in sys.modules and 'create_model' in dir(resforge)"
    p = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "PYTHONPATH": SRC},
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    import resforge
    from resforge.models import create_model
    assert resforge.create_model is create_model and callable(resforge.train) and resforge.model_info("resnet20")


def _option_actions(parser):
    for action in parser._actions:
        if getattr(action, "choices", None) and isinstance(action.choices, dict):      # subcommands
            for sub in action.choices.values():
                yield from _option_actions(sub)
        elif action.option_strings and action.dest not in ("help", "version"):
            yield parser.prog, action


def test_every_option_shows_its_default_in_help():
    fmt = cli._Help("resforge")
    missing = [f"{prog} {a.option_strings[0]}" for prog, a in _option_actions(cli.build_parser())
               if not a.required and "default" not in fmt._expand_help(a).lower()]
    assert not missing


def test_config_lists_every_key_with_type_default_and_help(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    rows = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  ")}
    assert set(rows) == set(config._all_keys())
    assert rows["optim.lr"].split()[1:4] == ["float", "0.1", "peak"]
    assert "(Ultralytics/timm" not in rows["train.device"] or "mps" in rows["train.device"]
    assert main(["config", "--section", "trian"]) == 2 and "Did you mean 'train'" in capsys.readouterr().err


def test_recipes_show_whole_first_sentences(capsys):
    assert main(["recipes"]) == 0
    text = " ".join(capsys.readouterr().out.split())                      # undo the wrapping
    assert "(He et al. 2016, option A) on CIFAR-10 with a short one-cycle schedule: 30 epochs. cifar10-resnet56" \
        in text                                   # "al. 2016" is no sentence end; the 2nd sentence is not shown
    assert "with ImageNet-layout weights." not in text and "from ImageNet-layout weights. finetune-cifar10" in text
    assert config.recipe_summary("# One two (e.g. Foo) bar and\n# more. Next sentence.\n#\n# Notes.\nx: 1\n") \
        == "One two (e.g. Foo) bar and more."
    assert config.recipe_summary("data:\n  source: digits\n") == ""


@pytest.mark.skipif(not NO_GPU, reason="checks the messages of a machine without GPUs")
@pytest.mark.parametrize("device, words", [
    ("0", "asks for a CUDA GPU, but this machine"),
    ("cuda:1", "asks for a CUDA GPU, but this machine"),
    ("0,1", "torchrun"),
    ("mps", "Apple-silicon GPUs (MPS) are not available"),
])
def test_devices_as_ultralytics_and_timm_write_them(device, words, tmp_path, capsys):
    assert main(["train", "--device", device, "--project", str(tmp_path / "runs"), "train.progress=false"]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()
    assert main(["predict", "missing-run", "x.png", "--device", device]) == 2
    assert words in capsys.readouterr().err


def test_finetune_from_a_model_name_says_where_weights_come_from(capsys):
    assert main(["finetune", "--from", "resnet18", "--data", "digits"]) == 2
    err = capsys.readouterr().err
    assert "resnet18-f37072fd.pth" in err and "--from PATH" in err


@pytest.mark.parametrize("exc, code, words", [
    (OSError(errno.ENOSPC, "No space left on device", "runs/r/weights/last.pt"), 3,
     "runs/r/weights/last.pt: No space left on device: free some disk space"),
    (PermissionError(errno.EACCES, "Permission denied", "/srv/runs"), 3, "/srv/runs: Permission denied: choose a folder"),
    (OSError(errno.EIO, "Input/output error", "data.npz"), 3, "data.npz: Input/output error: the disk reported"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "preds.csv"), 2, "preds.csv: Is a directory"),
    (MemoryError(), 4, "out of memory: use a smaller train.batch_size"),
    (pickle.UnpicklingError("Weights only load failed. This file can still be loaded...\nlong text"), 2,
     "holds pickled Python objects"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_expected_failures_are_one_sentence_and_an_exit_code(exc, code, words, monkeypatch, capsys):
    def fail(section=None):
        raise exc
    monkeypatch.setattr(config, "describe_keys", fail)
    assert main(["config"]) == code
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and "Traceback" not in err
    assert code in cli.EXIT_CODES


def test_debug_flag_and_env_show_the_traceback(monkeypatch):
    def fail(section=None):
        raise OSError(errno.ENOSPC, "No space left on device", "x")
    monkeypatch.setattr(config, "describe_keys", fail)
    with pytest.raises(OSError):
        main(["config", "--debug"])
    with pytest.raises(OSError):
        main(["--debug", "config"])
    monkeypatch.setenv("RESFORGE_DEBUG", "1")
    with pytest.raises(OSError):
        main(["config"])


def test_os_error_without_a_file_name_names_the_folder_written_to(monkeypatch, tmp_path, capsys):
    import resforge.api

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")      # what f.write raises: no filename
    monkeypatch.setattr(resforge.api, "train", full)
    assert main(["train", "--project", str(tmp_path / "runs")]) == 3
    assert f"writing under {tmp_path / 'runs'}: No space left on device: free some" in capsys.readouterr().err
