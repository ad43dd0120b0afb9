"""`resforge bench`: well-formed results and exact floor arithmetic (never a speed assertion:
these run on shared, busy CPUs)."""
import contextlib
import io
import json
import math
import shutil

import pytest
import torch
from torch import nn

import resforge
from resforge.bench import bench, pipeline_overhead
from resforge.bench.breakdown import CATEGORIES, run_fractions
from resforge.bench.peak import conv_rates, conv_shapes, matmul_peak
from resforge.bench.work import Work, floors, run_work
from resforge.cli import main
from resforge.config import load_config
from resforge.flops import count_flops
from resforge.training.device import make_runtime

TINY = ["data.image_size=8", "train.threads=1", "train.progress=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-epoch digits run (8x8 images) and bench()'s result for it."""
    root = tmp_path_factory.mktemp("bench")
    run = resforge.train("digits", TINY + ["train.epochs=2", "train.batch_size=128", f"train.project={root}",
                                           "train.name=r", f"data.cache_dir={root / 'cache'}"])
    return run, bench(run.dir, [f"data.cache_dir={root / 'cache'}"], seconds=0.05, steps=1, matmul_sizes=(64, 128),
                      say=lambda _: None)


def _tiny_runtime():
    return make_runtime("cpu", "fp32", True, 1)


def test_matmul_peak_and_conv_shapes_of_a_tiny_model():
    rt = _tiny_runtime()
    mm = matmul_peak(rt, 0.02, sizes=(32, 64))
    assert mm["precision"] == "fp32" and set(mm["by_size"]) == {32, 64}
    assert mm["flops_per_s"] == max(mm["by_size"].values()) > 0
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1, stride=2))
    shapes = conv_shapes(net, (3, 8, 8))
    assert sorted(shapes.values()) == [1, 1, 2]           # the two 8->8 3x3 layers share one shape
    first = next(s for s in shapes if s.cin == 3)
    assert not first.input_grad and first.weight_grad     # the input image needs no gradient
    rates = conv_rates(net, (3, 8, 8), 4, rt, 0.01)
    assert all(r["flops_per_s"] > 0 for r in rates["shapes"]) and rates["flops_per_s"] > 0
    # each shape's FLOPs are the model's own, per batch: together they are its whole count
    assert sum(r["flops"] * r["count"] for r in rates["shapes"]) == pytest.approx(4 * count_flops(net, (3, 8, 8))["train"])


def test_floors_are_the_work_divided_by_the_rates():
    w = Work(flops_per_train_image=3e6, flops_per_eval_image=2e6, train_images=1000, eval_images=50, steps=10,
             final_eval_images=60, train_flops=3e9 + 1e8, source="test")
    f = floors(w, peak_flops_per_s=1e9, conv_flops_per_s=5e8, bare_s_per_image=0.01, bare_eval_s_per_image=0.002,
               inference_flops=1e6)          # an evaluated image worth two forwards (TTA x2 in the record)
    assert f["ideal"] == w.train_flops / 1e9 and f["conv"] == w.train_flops / 5e8
    assert f["bare"] == pytest.approx(1000 * 0.01 + 50 * 0.002 * 2) and f["final_eval_bare"] == pytest.approx(60 * 0.002)


def test_breakdown_fractions_sum_to_one_and_scale_to_the_run():
    profiled = {"step_seconds": {"data": 0.01, "augmentation": 0.02, "compute": 0.5, "optimiser": 0.03, "other": 0.04},
                "eval_seconds_per_image": 0.001}
    out = run_fractions(profiled, run_steps=100, run_eval_images=2000)
    assert list(out["fractions"]) == list(CATEGORIES) and math.isclose(sum(out["fractions"].values()), 1.0)
    assert out["seconds"]["compute"] == pytest.approx(50) and out["seconds"]["evaluation"] == pytest.approx(2)
    assert out["projected_seconds"] == pytest.approx(62)


def test_bench_of_a_run_is_well_formed_and_its_arithmetic_exact(trained):
    run, r = trained
    report = json.loads((run.dir / "report.json").read_text())
    assert r["target"] == {"kind": "run", "name": str(run.dir)}
    assert r["runtime"]["precision"] in ("fp32", "bf16") and r["runtime"]["threads"] == 1
    assert r["peak"]["flops_per_s"] > 0 and r["convs"]["shapes"]
    assert r["peak"]["flops_per_s"] >= max(c["flops_per_s"] for c in r["convs"]["shapes"])
    w, fl = r["work"], r["floors"]
    n_train = report["data"]["splits"]["train"]
    assert w["train_images"] == 2 * (n_train // 128 * 128) and w["eval_images"] == 2 * report["data"]["splits"]["val"]
    assert w["train_flops"] == w["flops_per_train_image"] * w["train_images"] + w["flops_per_eval_image"] * w["eval_images"]
    assert fl["ideal"] == w["train_flops"] / r["peak"]["flops_per_s"]
    assert fl["bare"] == pytest.approx(w["train_images"] * r["steps"]["bare"]["seconds_per_image"]
                                       + w["eval_images"] * r["steps"]["bare_eval"]["seconds_per_image"])
    assert r["run"]["train_seconds"] == report["train_seconds"]
    assert r["run"]["ratio_to_ideal"] == report["train_seconds"] / fl["ideal"]
    assert r["run"]["ratio_to_bare"] == report["train_seconds"] / fl["bare"]
    b = r["breakdown"]
    assert set(b["fractions"]) == set(CATEGORIES) and math.isclose(sum(b["fractions"].values()), 1.0)
    assert all(v >= 0 for v in b["fractions"].values()) and b["fractions"]["compute"] > 0
    assert b["fractions"]["evaluation"] > 0          # the run validated every epoch
    assert r["steps"]["pipeline_overhead"] > 0 and r["steps"]["bare"]["images_per_s"] > 0
    json.dumps(r)                                    # JSON-ready as returned


def test_a_run_with_a_compute_record_is_read_from_it(trained, tmp_path):
    run, _ = trained
    report = json.loads((run.dir / "report.json").read_text())
    report["compute"] = {"flops_per_train_image": 5.0, "flops_per_eval_image": 2.0, "train_images_seen": 1024,
                         "eval_images": 10, "train_flops": 5140.0, "train_seconds": 3.5, "input_size": [1, 8, 8]}
    cfg = load_config(None, base=json.loads((run.dir / "config.json").read_text()))
    w = run_work(run.dir, cfg, report, {"train": 1.0, "inference": 1.0}, 1)
    assert (w.source, w.train_flops, w.train_images, w.eval_images, w.train_seconds) == \
        ("report.json compute", 5140.0, 1024, 10, 3.5)
    assert w.steps == 8 and w.final_eval_images == sum(report["data"]["splits"][s] for s in cfg.eval.splits)


def test_cli_bench_of_the_digits_recipe_prints_the_floors_and_writes_json(tmp_path):
    out, path = io.StringIO(), tmp_path / "b.json"
    with contextlib.redirect_stdout(out):
        assert main(["bench", "digits", "--seconds", "0.05", "--steps", "1", "--threads", "1", "--json", str(path),
                     "data.image_size=8", f"data.cache_dir={tmp_path / 'cache'}"]) == 0
    text = out.getvalue()
    assert "compute floor  ideal" in text and "pipeline overhead" in text and "where the time goes" in text
    r = json.loads(path.read_text())
    assert r["target"] == {"kind": "recipe", "name": "digits"} and "run" not in r
    assert r["work"]["train_images"] == 8 * (r["work"]["train_images"] // 8)       # 8 epochs of whole batches
    assert r["floors"]["ideal"] == r["work"]["train_flops"] / r["peak"]["flops_per_s"]


def test_a_run_folder_without_report_json_is_one_clear_sentence(trained, tmp_path, capsys):
    run, _ = trained
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run.dir, unfinished)
    (unfinished / "report.json").unlink()
    assert main(["bench", str(unfinished)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{unfinished / 'report.json'} not found" in err and f"resforge train --resume {unfinished}" in err
    (unfinished / "config.json").unlink()
    assert main(["bench", str(unfinished)]) == 2
    assert "is not a resforge run folder" in capsys.readouterr().err
    assert main(["bench", str(tmp_path / "no" / "such-run")]) == 2
    assert "not found" in capsys.readouterr().err


def test_pipeline_overhead_of_the_digits_recipe(tmp_path):
    r = pipeline_overhead("digits", TINY + [f"data.cache_dir={tmp_path / 'cache'}"], seconds=0.05, rounds=2)
    assert r["model"] == "resnet20" and r["input_size"] == [1, 8, 8] and r["batch_size"] == 64
    assert r["bare"]["rounds"] == r["resforge"]["rounds"] == 2 and r["pipeline_overhead"] > 0
    assert torch.get_num_threads() == 1                  # the recipe's runtime applied train.threads
