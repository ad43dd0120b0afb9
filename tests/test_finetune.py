"""Fine-tuning on a tiny real subset of BreastMNIST from the real akamaster ResNet-20 weights:
every policy runs end to end, frozen means frozen, trainable counts are as printed, the report
has its rows, and bad input fails with a message that says what to do."""
import json
import re
import sys

import numpy as np
import pytest
import torch

from resforge.checkpoint import load_for_inference
from resforge.cli import main
from resforge.finetune import finetune, lr_find
from resforge.finetune.source import build_from_pretrained, read_pretrained
from resforge.weights import WeightsError

FAST = ["train.epochs=1", "train.batch_size=16", "train.eval_batch_size=64", "train.progress=false",
        "finetune.probe_epochs=2", "finetune.unfreeze_epochs=1", "optim.lr=0.01"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on tiny batches: one thread is fastest, and immune to a busy machine
    (two OpenMP threads on a loaded 2-core box run ~10x slower than one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def no_plots(request, monkeypatch):
    """Rendering PNGs is most of a tiny run's time: figures are built but saved as empty files,
    except in the one test that checks them. (Patching the method, not the plot functions,
    leaves nothing behind in modules that import those functions by name.)"""
    if "with_plots" in request.fixturenames:
        return
    from matplotlib.figure import Figure
    monkeypatch.setattr(Figure, "savefig", lambda self, fname, *a, **k: open(fname, "wb").close())


@pytest.fixture(scope="module")
def tiny_npz(shared_data, tmp_path_factory):
    """48 train / 16 val / 24 test real BreastMNIST images (both classes in every split)."""
    src = np.load(shared_data / "breastmnist.npz")
    out, rng = {}, np.random.default_rng(0)
    for split, n in (("train", 48), ("val", 16), ("test", 24)):
        y = src[f"{split}_labels"].reshape(-1)
        idx = np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), n // 2, replace=False) for c in (0, 1)]))
        out[f"{split}_images"], out[f"{split}_labels"] = src[f"{split}_images"][idx], src[f"{split}_labels"][idx]
    path = tmp_path_factory.mktemp("data") / "breast-tiny.npz"
    np.savez(path, **out)
    return path


@pytest.fixture(scope="module")
def resnet20(shared_data):
    path = next((shared_data / "pretrained").glob("akamaster-resnet20-*.th"), None)
    if path is None:
        pytest.skip("akamaster ResNet-20 weights not in shared data")
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _ft(src, npz, tmp_path, cache, policy, *extra, name="ft"):
    return finetune(src, data=str(npz), policy=policy, recipe="finetune",
                    overrides=FAST + [f"train.project={tmp_path}", f"train.name={name}",
                                      f"data.cache_dir={cache}", *extra])


def _initial(src, n_classes=2, in_chans=1):
    model, _ = build_from_pretrained(read_pretrained(src), n_classes, in_chans)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _bn_buffers(keys):
    return [k for k in keys if k.endswith(("running_mean", "running_var"))]


def _printed_trainable(out: str) -> list[int]:
    return [int(m.replace(",", "")) for m in re.findall(r"trainable params ([\d,]+) of", out)]


@pytest.mark.parametrize("policy, frozen_prefixes", [
    ("last-stages:1", ("conv1", "bn1", "layer1", "layer2")),
    ("stages:layer2", ("conv1", "bn1", "layer1", "layer3")),
])
def test_frozen_stages_and_their_bn_statistics_do_not_move(policy, frozen_prefixes, resnet20, tiny_npz,
                                                            tmp_path, cache):
    before = _initial(resnet20)
    run = _ft(resnet20, tiny_npz, tmp_path, cache, policy)
    after = run.model.state_dict()
    frozen = [k for k in before if k.split(".")[0] in frozen_prefixes]
    assert frozen and _bn_buffers(frozen)
    assert all(torch.equal(before[k], after[k].cpu()) for k in frozen), policy
    trained = [k for k in before if k.split(".")[0] not in frozen_prefixes and k.endswith("weight")]
    assert any(not torch.equal(before[k], after[k].cpu()) for k in trained)    # something did train
    assert [r["key"] for r in run.rows] == ["a", "b", "c"]


def test_linear_probe_trains_the_head_only_and_matches_its_report_row(resnet20, tiny_npz, tmp_path, cache, capsys):
    before = _initial(resnet20)
    run = _ft(resnet20, tiny_npz, tmp_path, cache, "linear-probe")
    after = run.model.state_dict()
    assert all(torch.equal(before[k], after[k].cpu()) for k in before if not k.startswith("fc."))
    assert not torch.equal(before["fc.weight"], after["fc.weight"].cpu())
    a, b, c = run.rows
    assert _printed_trainable(capsys.readouterr().out) == [130]
    assert b["trainable_params"] == c["trainable_params"] == 64 * 2 + 2
    assert a["trainable_params"] == 0
    assert abs(b["top1"] - c["top1"]) < 1e-9                  # the probe's head, evaluated in the model
    assert [p["name"] for p in run.phases] == ["probe"]
    # 16 val images are too few for a 5% tail: no OOD threshold, and the report says why
    assert "ood" not in run.meta and "only 16 validation images" in json.loads(
        (run.dir / "report.json").read_text())["ood"]["why"]


def test_the_ood_threshold_is_fitted_on_val_and_saved_with_the_weights(resnet20, tiny_npz, tmp_path, cache,
                                                                       monkeypatch):
    from resforge import ood
    from resforge.checkpoint import read_meta
    monkeypatch.setattr(ood, "MIN_FIT", 16)                   # the tiny set's 16 val images may fit one
    run = _ft(resnet20, tiny_npz, tmp_path, cache, "linear-probe", "finetune.compare=false")
    record = read_meta(run.dir / "weights" / "best.safetensors")["ood"]
    assert record == run.meta["ood"] and record["n"] == 16 and record["fitted_on"] == "val"
    # ceil(0.95 * 16) = 16: the threshold is the largest val score, so no val image is flagged
    assert json.loads((run.dir / "report.json").read_text())["ood"]["flagged"]["val"] == 0.0


def test_bitfit_trains_biases_and_bn_affine_only_with_frozen_statistics(resnet20, tiny_npz, tmp_path, cache, capsys):
    before = _initial(resnet20)
    run = _ft(resnet20, tiny_npz, tmp_path, cache, "bitfit", "finetune.bn=freeze-stats", "finetune.head_init=fresh")
    after = run.model.state_dict()
    convs = [k for k in before if k.endswith("conv1.weight") or k.endswith("conv2.weight")]
    assert convs and all(torch.equal(before[k], after[k].cpu()) for k in convs)
    assert all(torch.equal(before[k], after[k].cpu()) for k in _bn_buffers(before))   # freeze-stats
    assert any(not torch.equal(before[k], after[k].cpu()) for k in before if k.endswith("bn1.weight"))
    bn_affine = sum(v.numel() for k, v in before.items() if re.search(r"bn\d\.(weight|bias)$", k))
    expected = bn_affine + 64 * 2 + 2
    assert _printed_trainable(capsys.readouterr().out) == [130, expected]      # probe row (b), then bitfit
    assert run.rows[-1]["trainable_params"] == expected


def test_bn_freeze_keeps_affine_parameters_too(resnet20, tiny_npz, tmp_path, cache):
    before = _initial(resnet20)
    run = _ft(resnet20, tiny_npz, tmp_path, cache, "full", "finetune.bn=freeze", "finetune.compare=false")
    after = run.model.state_dict()
    bn = [k for k in before if re.search(r"bn\d\.(weight|bias|running_mean|running_var)$", k)]
    assert bn and all(torch.equal(before[k], after[k].cpu()) for k in bn)
    assert not torch.equal(before["layer1.0.conv1.weight"], after["layer1.0.conv1.weight"].cpu())
    assert [r["key"] for r in run.rows] == ["c"]


def test_lora_counts_adapters_and_merges_into_a_plain_checkpoint(resnet20, tiny_npz, tmp_path, cache, capsys):
    pytest.importorskip("peft")
    before = _initial(resnet20)
    run = _ft(resnet20, tiny_npz, tmp_path, cache, "lora", "finetune.lora_rank=2", "finetune.bn=freeze-stats")
    # LoRA on a conv (cin, cout, k): A is (r, cin, k, k), B is (cout, r, 1, 1)
    convs = [v for k, v in before.items() if v.ndim == 4]
    expected = sum(2 * w.shape[1] * w.shape[2] * w.shape[3] + w.shape[0] * 2 for w in convs) + 64 * 2 + 2
    assert _printed_trainable(capsys.readouterr().out) == [130, expected]      # probe (head first), then LoRA
    assert run.rows[-1]["trainable_params"] == expected
    after = run.model.state_dict()
    assert set(after) == set(before)                          # adapters merged away
    assert all(torch.equal(before[k], after[k].cpu()) for k in _bn_buffers(before))
    model, meta = load_for_inference(run.dir)
    assert model(torch.zeros(1, *meta["input_size"])).shape == (1, 2)


def test_lora_without_the_extra_says_how_to_install_it(resnet20, tiny_npz, tmp_path, cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)            # import peft -> ImportError
    with pytest.raises(ValueError, match=r"pip install 'resforge\[peft\]'"):
        _ft(resnet20, tiny_npz, tmp_path, cache, "lora")


@pytest.fixture
def with_plots():
    """Requested by the one test that checks the figures (see no_plots)."""


def test_gradual_unfreezes_from_the_top_and_writes_the_report(resnet20, tiny_npz, tmp_path, cache, with_plots):
    run = _ft(resnet20, tiny_npz, tmp_path, cache, "gradual")
    assert [p["name"] for p in run.phases] == ["probe", "layer3+", "layer2+", "layer1+", "all"]
    trainable = [p["trainable"] for p in run.phases[1:]]
    assert trainable == sorted(trainable) and trainable[-1] == sum(p.numel() for p in run.model.parameters())
    scale = run.phases[-1]["lr_scale"]
    assert scale["fc"] > scale["layer3"] > scale["layer2"] > scale["layer1"] > scale["conv1"]
    for f in ("report.md", "report.json", "comparison.png", "metrics.csv", "results.png", "splits.json",
              "weights/best.safetensors", "weights/best.json"):
        assert (run.dir / f).is_file(), f
    report = json.loads((run.dir / "report.json").read_text())
    rows = report["comparison"]["rows"]
    assert [r["key"] for r in rows] == ["a", "b", "c"] and {r["n"] for r in rows} == {24}
    assert set(rows[2]["per_class_f1_delta"]) == {"0", "1"} and rows[2]["auc"] is not None
    md = (run.dir / "report.md").read_text()
    assert "(a)" in md and "(b)" in md and "(c)" in md and "Per-class F1" in md
    assert report["test"]["n"] == 24


def test_run_folder_is_a_checkpoint_to_fine_tune_again(resnet20, tiny_npz, tmp_path, cache):
    first = _ft(resnet20, tiny_npz, tmp_path, cache, "linear-probe", "finetune.compare=false", name="first")
    again = _ft(first.dir, tiny_npz, tmp_path, cache, "last-stages:1", "finetune.compare=false",
                "finetune.keep_class_rows=true", name="second")    # same class names: rows kept
    assert again.meta["finetune"]["source_format"] == "resforge"
    with pytest.raises(WeightsError, match="holds a resnet20, not a resnet56"):
        finetune(first.dir, data=str(tiny_npz), policy="full", model="resnet56",
                 overrides=FAST + [f"train.project={tmp_path}", f"data.cache_dir={cache}"])


def test_torchvision_weights_fine_tune_in_one_command(tiny_npz, tmp_path, cache, capsys):
    import resforge
    weights = tmp_path / "resnet18-imagenet.pth"
    torch.save(resforge.create_model("resnet18").state_dict(), weights)      # torchvision key layout
    code = main(["finetune", "--from", str(weights), "--data", str(tiny_npz), "--policy", "linear-probe",
                 "--project", str(tmp_path), "--name", "tv", *FAST, f"data.cache_dir={cache}"])
    out = capsys.readouterr().out
    assert code == 0 and "torchvision weights" in out and "(c)  policy linear-probe" in out
    assert (tmp_path / "tv" / "report.md").is_file()


@pytest.mark.parametrize("args, words", [
    (["--policy", "last-stages:5"], "resnet20 has 4 stages below the head"),
    (["--policy", "stages:layer4"], "no stage 'layer4'; its stages are stem, layer1, layer2, layer3"),
    (["--policy", "half"], "unknown fine-tuning policy 'half'"),
    (["--policy", "full", "--model", "resnet56"], "holds resnet20 weights .* not resnet56"),
    (["--policy", "full", "finetune.keep_class_rows=true"], "none of the data's classes"),
    (["--policy", "full", "finetune.class_map=tumour:cat"], "'tumour' is not a class of the data"),
    (["--policy", "full", "finetune.class_map=0:tiger"], "'tiger' is not a pretrained class"),
    (["--policy", "full", "finetune.bn=frozen"], "Did you mean 'freeze'"),
])
def test_bad_input_is_one_clear_line(args, words, resnet20, tiny_npz, tmp_path, cache, capsys):
    code = main(["finetune", "--from", str(resnet20), "--data", str(tiny_npz), "--project", str(tmp_path),
                 *args, *FAST, f"data.cache_dir={cache}"])
    err = capsys.readouterr().err
    assert code == 2 and re.search(words, err), err


def test_lr_find_plots_and_suggests_a_rate_and_leaves_weights_alone(resnet20, tiny_npz, tmp_path, cache, capsys):
    code = main(["lr-find", "--from", str(resnet20), "--data", str(tiny_npz), "--policy", "full",
                 "--out", str(tmp_path / "lrf"), "--steps", "12", "--start-lr", "1e-5", *FAST,
                 "finetune.head_init=fresh", f"data.cache_dir={cache}"])
    out = capsys.readouterr().out
    assert code == 0 and "suggested optim.lr=" in out
    res = json.loads((tmp_path / "lrf" / "lr_find.json").read_text())
    assert 1e-6 <= res["suggested"] <= 0.1 and len(res["lrs"]) <= 12 and res["target"].endswith("phase 'full'")
    assert (tmp_path / "lrf" / "lr_find.png").is_file()
    # without --from: the recipe's model from scratch; the model's weights are restored afterwards
    res = lr_find(recipe="digits", steps=8, out=tmp_path / "lrf2",
                  overrides=["data.image_size=8", "train.batch_size=64", f"data.cache_dir={cache}"])
    assert res["target"] == "resnet20 from scratch" and len(res["lrs"]) == 8


def test_scratch_control_runs_through_the_same_pipeline(tiny_npz, tmp_path, cache):
    run = _ft("scratch:resnet20", tiny_npz, tmp_path, cache, "full", "finetune.head_init=fresh",
              "finetune.compare=false", "finetune.input_size=32", "finetune.balanced_sampling=true",
              "finetune.class_weights=balanced", "model.drop_rate=0.3")
    assert run.meta["input_size"] == [1, 32, 32] and run.meta["finetune"]["source_format"] == "scratch"
    assert run.model.drop.p == 0.3
    model, meta = load_for_inference(run.dir)                 # resized input recorded for inference
    assert meta["input_size"] == [1, 32, 32] and model(torch.zeros(2, 1, 32, 32)).shape == (2, 2)


def test_a_diverging_phase_is_undone_and_reported(resnet20, tiny_npz, tmp_path, cache):
    # optim.lr=1e6 sends an unfreeze phase to inf/nan in its first epoch: nothing in it to keep,
    # so the run keeps what the phases before it left, skips the rest, and says so
    run = _ft(resnet20, tiny_npz, tmp_path, cache, "gradual", "optim.lr=1e6", "optim.schedule=constant")
    flags = [p.get("diverged", False) for p in run.phases]
    assert flags[-1] and not any(flags[:-1]) and len(flags) < 5          # probe + 4 unfreeze phases planned
    assert all(torch.isfinite(v).all() for v in run.model.state_dict().values() if v.is_floating_point())
    assert [r["key"] for r in run.rows] == ["a", "b", "c"]
    report = (run.dir / "report.md").read_text()
    assert "diverged: undone" in report and "was undone" in report


def _count_no_grad_images_before_training(monkeypatch):
    """Images through forward_features with gradients off before the first training step:
    the feature passes (and BN re-estimation) fine-tuning spends before it trains."""
    import resforge.finetune.run as run_mod
    seen = {"before": 0, "training": False}
    build = run_mod.build_setup

    def counting_setup(*a, **k):
        s = build(*a, **k)
        forward = s.model.forward_features

        def counted(x):
            seen["training"] = seen["training"] or torch.is_grad_enabled()
            if not seen["training"]:
                seen["before"] += len(x)
            return forward(x)
        s.model.forward_features = counted
        return s
    monkeypatch.setattr(run_mod, "build_setup", counting_setup)
    return seen


def test_rows_and_the_policys_probe_share_one_feature_pass(resnet20, tiny_npz, tmp_path, cache, monkeypatch):
    """48 train / 16 val / 24 test. A policy that trains BN (last-stages:1): AdaBN over train,
    then ONE feature pass per split for rows (a), (b) and the policy's probe (it was: rows on
    train+val+test, AdaBN, train+val again = 200 images). finetune.compare=false drops the test
    pass and rows (a), (b), and the policy (row c) is the same either way."""
    seen = _count_no_grad_images_before_training(monkeypatch)
    on = _ft(resnet20, tiny_npz, tmp_path, cache, "last-stages:1", name="cmp-on")
    assert seen["before"] == 48 + (48 + 16 + 24)
    seen.update(before=0, training=False)
    off = _ft(resnet20, tiny_npz, tmp_path, cache, "last-stages:1", "finetune.compare=false", name="cmp-off")
    assert seen["before"] == 48 + (48 + 16)
    assert [r["key"] for r in on.rows] == ["a", "b", "c"] and [r["key"] for r in off.rows] == ["c"]
    assert on.rows[2]["top1"] == off.rows[0]["top1"] and on.rows[2]["ece"] == off.rows[0]["ece"]
    assert "(AdaBN)" in on.rows[1]["method"]     # rows (a), (b) describe the network the policy starts from
    report = json.loads((on.dir / "report.json").read_text())["finetune"]
    assert report["compare"] is True and report["comparison_seconds"] > 0
    assert "Rows (a) and (b) cost" in (on.dir / "report.md").read_text()
    assert "skipped (finetune.compare=false)" in (off.dir / "report.md").read_text()
