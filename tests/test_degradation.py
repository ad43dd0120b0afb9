"""The degradation experiment (He et al. 2016, Fig. 6) on a tiny subset: twins, outputs, resume."""
import json
import shutil

import pytest
import torch
from torch import nn

import resforge.train_run
from resforge.cli import _seeds, main
from resforge.config import OptimConfig, load_config
from resforge.experiments import degradation as dg
from resforge.experiments import degradation_results as dgr
from resforge.models import create_model
from resforge.plots import read_metrics_csv
from resforge.training.optim import lr_factor
from resforge.training.probes import GradNormMeter, fixed_subset_index

DEPTHS, EPOCHS = (20, 32), 2
# The short recipe, shrunk to the embedded digits set at 8x8 so four runs take seconds.
TINY = ["data.source=digits", "data.image_size=8", "aug.translate=1", "train.eval_train=256", "eval.splits=[test]",
        "train.progress=false"]


def _tiny(tmp_path):
    return TINY + [f"data.cache_dir={tmp_path / 'cache'}"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny 8x8 batches gain nothing from threads, and on a shared CPU OpenMP's spinning
    threads slow small kernels (batch norm) by 100x; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, one_thread):
    """One finished tiny experiment shared by the tests below (they copy it before changing it)."""
    root = tmp_path_factory.mktemp("deg")
    summary = dg.run_degradation(DEPTHS, [0], epochs=EPOCHS, overrides=_tiny(root), name="tiny", project=root)
    return root, summary


# ---------------------------------------------------------------- twins

@pytest.mark.parametrize("depth", [20, 32, 56, 110])
def test_twins_have_equal_layers_and_identical_parameter_lists(depth):
    info = dg.twin_check(depth)
    assert info["layers"] == depth and info["same_layers"] and info["same_parameters"]
    plain, res = create_model(f"plain{depth}"), create_model(f"resnet{depth}")
    assert dg.weighted_layers(plain) == dg.weighted_layers(res) == depth
    assert [(n, p.shape) for n, p in plain.named_parameters()] == [(n, p.shape) for n, p in res.named_parameters()]
    # the only modules the residual twin adds are the parameter-free option-A shortcuts
    kinds = lambda m: sorted(type(x).__name__ for x in m.modules())      # noqa: E731
    extra = list(kinds(res))
    for k in kinds(plain):
        extra.remove(k)
    assert set(extra) == {"ShortcutA"} and len(extra) == 2           # at the two down-sampling stages


def test_twins_differ_only_in_the_shortcut_given_identical_weights():
    torch.manual_seed(0)
    plain, res = create_model("plain20").eval(), create_model("resnet20").eval()
    res.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for blk in res.modules():                         # switch the shortcuts off: the nets coincide
        if hasattr(blk, "residual"):
            blk.residual = False
    assert torch.allclose(plain(x), res(x))


# ---------------------------------------------------------------- runner

def test_runner_writes_runs_figures_and_table(experiment):
    root, summary = experiment
    exp = root / "degradation-tiny"
    for f in ("experiment.json", "degradation.png", "degradation.md", "degradation.json", "grad_norms.png"):
        assert (exp / f).is_file(), f
    for spec in dg.run_specs(DEPTHS, [0]):                      # each a normal, complete run folder
        run = exp / spec.folder
        assert (run / "report.json").is_file() and (run / "weights" / "last.state.pt").is_file()
        cols = read_metrics_csv(run / "metrics.csv")
        assert len(cols["epoch"]) == EPOCHS
        assert {"train_eval_acc", "val_acc", "grad_norm_stem", "grad_norm_layer3", "grad_norm_fc"} <= set(cols)
        assert json.loads((run / "config.json").read_text())["model"]["name"] == spec.model
    assert [r["model"] for r in summary["table"]] == ["plain20", "plain32", "resnet20", "resnet32"]
    row = summary["table"][0]
    assert 0 <= row["train_error"]["mean"] <= 100 and row["test_error"]["n"] == 1
    assert summary["findings"]["per_seed"]["0"]["complete"] is True
    assert json.loads((exp / "degradation.json").read_text())["findings"] == summary["findings"]
    md = (exp / "degradation.md").read_text()
    assert "| plain-32 | 32 |" in md and "| ResNet-20 | 20 |" in md and "8.75" in md
    assert "train time (min) |" in md                        # fresh runs know their whole training time


def _spy(monkeypatch):
    calls = []
    real = resforge.train_run.train

    def train(*args, **kwargs):
        calls.append("resume" if kwargs.get("resume") else "new")
        return real(*args, **kwargs)
    monkeypatch.setattr(resforge.train_run, "train", train)   # what run_degradation calls
    return calls


def test_rerun_skips_finished_runs_and_resumes_unfinished_ones(experiment, tmp_path, monkeypatch):
    root, _ = experiment
    exp = tmp_path / "degradation-tiny"
    shutil.copytree(root / "degradation-tiny", exp)
    (exp / "resnet20-s0" / "report.json").unlink()          # killed during its final evaluation
    shutil.rmtree(exp / "plain32-s0")                      # never started
    before = (exp / "plain20-s0" / "report.json").stat().st_mtime_ns
    calls = _spy(monkeypatch)
    argv = ["experiment", "degradation", "--depths", "20,32", "--epochs", str(EPOCHS), "--seeds", "1",
            "--name", "tiny", "--project", str(tmp_path), *_tiny(root)]
    assert main(argv) == 0
    assert sorted(calls) == ["new", "resume"]
    assert (exp / "plain20-s0" / "report.json").stat().st_mtime_ns == before          # skipped
    assert (exp / "resnet20-s0" / "report.json").is_file() and (exp / "plain32-s0" / "report.json").is_file()
    assert len(read_metrics_csv(exp / "resnet20-s0" / "metrics.csv")["epoch"]) == EPOCHS
    calls.clear()
    assert main(argv) == 0 and calls == []                  # everything finished: nothing trains


def test_report_draws_unfinished_runs_and_trains_nothing(experiment, tmp_path, monkeypatch):
    root, _ = experiment
    exp = tmp_path / "degradation-tiny"
    shutil.copytree(root / "degradation-tiny", exp)
    (exp / "plain32-s0" / "report.json").unlink()          # still training: one epoch of two so far
    lines = (exp / "plain32-s0" / "metrics.csv").read_text().splitlines()
    (exp / "plain32-s0" / "metrics.csv").write_text("\n".join(lines[:2]) + "\n")
    shutil.rmtree(exp / "resnet32-s0")                     # not started
    for f in ("degradation.png", "degradation.md"):
        (exp / f).unlink()
    calls = _spy(monkeypatch)
    argv = ["experiment", "degradation", "--depths", "20,32", "--epochs", str(EPOCHS), "--seeds", "1",
            "--name", "tiny", "--project", str(tmp_path), "--report", *_tiny(root)]
    assert main(argv) == 0 and calls == []
    summary = json.loads((exp / "degradation.json").read_text())
    assert [r["model"] for r in summary["table"]] == ["plain20", "resnet20"]
    assert summary["in_progress"] == [{"family": "plain", "depth": 32, "seed": 0, "epochs": 1, "planned_epochs": EPOCHS,
                                       "train_error": summary["in_progress"][0]["train_error"],
                                       "last_val_error": summary["in_progress"][0]["last_val_error"]}]
    assert summary["findings"]["per_seed"]["0"]["complete"] is False
    md = (exp / "degradation.md").read_text()
    assert "- plain-32 seed 0: epoch 1 of 2, training error" in md and "not decided yet" in md
    assert (exp / "degradation.png").is_file()
    with pytest.raises(FileNotFoundError, match="no experiment"):
        dg.report_degradation(DEPTHS, [0], epochs=EPOCHS, name="other", project=tmp_path)


def test_jobs_train_the_runs_in_helper_processes_too(tmp_path):
    threads = torch.get_num_threads()
    summary = dg.run_degradation(DEPTHS, [0], epochs=1, overrides=_tiny(tmp_path), name="jobs", project=tmp_path,
                                 jobs=2)
    exp = tmp_path / "degradation-jobs"
    assert all(dg.run_state(exp / s.folder) == "finished" for s in dg.run_specs(DEPTHS, [0]))
    assert summary["findings"]["per_seed"]["0"]["complete"] and (exp / "degradation.png").is_file()
    assert torch.get_num_threads() == threads
    with pytest.raises(ValueError, match="jobs"):
        dg.run_degradation(DEPTHS, [0], epochs=1, overrides=_tiny(tmp_path), name="jobs", project=tmp_path, jobs=0)


def test_rerun_with_other_settings_is_refused(experiment):
    root, _ = experiment
    with pytest.raises(ValueError, match="--name"):
        dg.run_degradation(DEPTHS, [0], epochs=EPOCHS + 1, overrides=_tiny(root), name="tiny", project=root)


def test_a_run_another_process_is_training_is_left_to_it(tmp_path):
    import fcntl
    spec = dg.RunSpec("plain", 20, 0)
    calls = []
    with open(tmp_path / f".{spec.folder}.lock", "a") as other:     # a second open file: as another process
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert dg.run_one(spec, tmp_path, {}, lambda *a, **k: calls.append(a)) == "busy"
    assert calls == []
    settings = {"recipe": "digits", "epochs": None, "overrides": []}
    assert dg.run_one(spec, tmp_path, settings, lambda *a, **k: calls.append(a)) == "trained" and len(calls) == 1


def test_run_state_tells_finished_started_and_stub_folders_apart(tmp_path):
    run = tmp_path / "plain20-s0"
    assert dg.run_state(run) == "absent"
    run.mkdir()
    (run / "config.yaml").write_text("x")
    (run / ".config.json.123.tmp").write_text("x")
    assert dg.run_state(run) == "stub"                  # killed while writing its first files
    for f in ("config.json", "splits.json"):
        (run / f).write_text("{}")
    assert dg.run_state(run) == "started"
    (run / "report.json").write_text("{}")
    assert dg.run_state(run) == "finished"
    odd = tmp_path / "resnet20-s0"
    (odd / "weights").mkdir(parents=True)
    with pytest.raises(ValueError, match="move it away"):
        dg.run_state(odd)


def test_findings_compare_shallowest_and_deepest_per_seed():
    runs = [{"family": f, "depth": d, "seed": 0, "train_error": e}
            for f, d, e in (("plain", 20, 5.0), ("plain", 56, 9.0), ("resnet", 20, 6.0), ("resnet", 56, 3.0))]
    f = dgr.findings(runs, [20, 56], [0])
    assert f["per_seed"]["0"] == {"plain_degrades": True, "resnet_improves": True, "complete": True}
    assert f["reproduced_every_seed"]
    assert not dgr.findings(runs, [20, 56], [0, 1])["reproduced_every_seed"]       # seed 1 missing


# ---------------------------------------------------------------- pieces

def test_train_time_is_shown_only_when_it_covers_the_whole_run():
    whole = {"train_seconds": 90.0, "timed_epochs": 15, "epochs_run": 15}
    assert dgr._whole_run_seconds(whole) == 90.0
    assert dgr._whole_run_seconds({**whole, "timed_epochs": 2}) is None          # resumed from an untimed state
    assert dgr._whole_run_seconds({"train_seconds": 90.0, "epochs_run": 15}) is None   # report from before


def test_seeds_argument():
    assert _seeds("3") == [0, 1, 2] and _seeds("0,4") == [0, 4] and _seeds("5,") == [5]


def test_paper_recipe_states_the_paper_schedule():
    cfg = load_config("he2016-cifar10")
    o, t = cfg.optim, cfg.train
    assert (o.lr, o.momentum, o.nesterov, o.weight_decay, t.batch_size) == (0.1, 0.9, False, 1e-4, 128)
    assert (cfg.data.val_fraction, cfg.aug.translate, cfg.aug.flip, cfg.eval.tta) == (0.1, 4, "random", False)
    steps_per_epoch = 45_000 // 128
    total = t.epochs * steps_per_epoch
    assert abs(total - 64_000) < steps_per_epoch                       # stop at ~64k iterations
    f = [lr_factor(o, s, total, steps_per_epoch) for s in (0, 31_999, 32_000, 47_999, 48_000, total - 1)]
    assert f == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    short = load_config("he2016-cifar10-short")
    assert short.train.epochs >= 15 and short.train.batch_size == 128 and short.train.eval_train > 0


def test_milestone_units():
    for unit, marks in (("fraction", [0.5]), ("epoch", [5]), ("step", [50]), ("auto", [0.5]), ("auto", [5])):
        cfg = OptimConfig(schedule="step", milestones=marks, milestone_unit=unit)
        assert lr_factor(cfg, 49, 100, 10) == 1 and lr_factor(cfg, 50, 100, 10) == pytest.approx(0.1)


def test_grad_norm_meter_matches_per_stage_norms():
    torch.manual_seed(0)
    model = create_model("resnet20")
    meter = GradNormMeter(model)
    assert list(meter.stages) == model.stage_names
    norms = []
    for _ in range(2):
        model.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3])).backward()
        meter.update()
        norms.append(torch.sqrt(sum((p.grad ** 2).sum() for p in model.layer2.parameters())).item())
    out = meter.epoch_means()
    assert out["grad_norm_layer2"] == pytest.approx(sum(norms) / 2, rel=1e-5)
    assert set(out) == {f"grad_norm_{s}" for s in model.stage_names} and meter.steps == 0


def test_fixed_train_subset_is_spread_and_stable():
    idx = fixed_subset_index(torch.arange(1000).numpy(), 10)
    assert idx[0] == 0 and idx[-1] == 999 and len(set(idx.tolist())) == 10
    assert (fixed_subset_index(torch.arange(5).numpy(), 10) == [0, 1, 2, 3, 4]).all()
