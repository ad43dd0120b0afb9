"""resforge export: ONNX / TorchScript artifacts, their metadata, and the parity check.

Parity is checked for one representative of every registry family (family, layout and
feature width, so basic and bottleneck ResNets both appear), computed from the registry so
new families are covered automatically.
"""
import json
import logging
import sys

import numpy as np
import pytest
import torch

from deploy_helpers import png_bytes, torch_one_thread, trained_run  # noqa: F401
from resforge.backends import OnnxBackend, TorchScriptBackend, load_backend
from resforge.export import ExportError, check_parity, export, export_model, limit_text, parity_batches
from resforge.models import create_model, list_models, model_info

pytest.importorskip("onnxruntime", reason="ONNX parity needs onnxruntime (pip install resforge[onnx])")
pytest.importorskip("onnx", reason="ONNX export needs onnx (pip install resforge[onnx])")


def family_representatives() -> list[str]:
    """The smallest model of each (family, layout, feature width) group of the registry."""
    best = {}
    for name in list_models():
        i = model_info(name)
        key = (i["family"], i["layout"], i["num_features"])
        if key not in best or i["params"] < model_info(best[key])["params"]:
            best[key] = name
    return sorted(best.values())


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


def _random_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """BatchNorm with non-trivial statistics, so folding BN into convs is really exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def _meta(name: str, size: int, k: int = 7) -> dict:
    return {"model": {"name": name, "num_classes": k, "in_chans": 3, "kwargs": {}},
            "class_names": [f"class{i}" for i in range(k)], "input_size": [3, size, size],
            "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "metrics": {"top1": 0.5}}


def _calibrated(model: torch.nn.Module, x: np.ndarray, peak: float = 10.0) -> torch.nn.Module:
    """Scale the head so the largest |logit| is `peak`, as in a trained model (random deep
    nets can reach |logits| of 100+, where the check's bound turns relative)."""
    with torch.inference_mode():
        scale = peak / float(model(torch.from_numpy(x)).abs().max())
        fc = model.fc
        fc.weight.mul_(scale)
        if fc.bias is not None:
            fc.bias.mul_(scale)
    return model


@pytest.mark.parametrize("name", family_representatives())
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_parity_every_family(name, fmt, tmp_path):
    size = 16                                   # ImageNet layout too: keeps the test fast
    inputs = torch.randn(12, 3, size, size, generator=torch.Generator().manual_seed(1)).numpy()
    model = _calibrated(_random_bn(create_model(name, num_classes=7)), inputs)
    out = tmp_path / f"{name}.{'onnx' if fmt == 'onnx' else 'torchscript'}"
    result = export_model(model, _meta(name, size), fmt, out, inputs=inputs, origin="random")
    assert result.path == out and out.is_file()
    assert result.max_abs_diff <= 1e-4 and result.top1_agreement == 1.0 and result.n_samples == 12

    backend = OnnxBackend(out) if fmt == "onnx" else TorchScriptBackend(out)
    assert backend.meta["class_names"] == [f"class{i}" for i in range(7)]
    x = inputs[:5]                              # a batch size the export never saw
    with torch.inference_mode():
        want = model(torch.from_numpy(x)).numpy()
    assert np.abs(backend(x) - want).max() <= 1e-4


def test_export_run_uses_its_own_data_and_embeds_metadata(run, tmp_path):
    import onnx

    result = export(run, "onnx")
    assert result.path == run / "weights" / "best.onnx"
    assert result.samples == "test images of digits" and result.n_samples == 64
    assert result.max_abs_diff <= result.limit and result.top1_agreement == 1.0
    assert "parity vs eager PyTorch" in result.summary()

    props = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
    sidecar = json.loads((run / "weights" / "best.json").read_text())
    assert json.loads(props["class_names"]) == sidecar["class_names"]
    assert json.loads(props["input_size"]) == [1, 8, 8]
    assert json.loads(props["mean"]) == sidecar["mean"] and props["resize"] == "shorter-center-crop"
    meta = json.loads(props["resforge_meta"])
    assert meta["model"]["name"] == "resnet20" and meta["metrics"] == sidecar["metrics"]
    assert "config" not in meta                 # no local paths inside a shipped artifact
    assert meta["ood"] == sidecar["ood"] and load_backend(result.path).meta["ood"] == sidecar["ood"]

    graph = onnx.load(str(result.path)).graph   # the batch axis is symbolic
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_cli_export_torchscript_and_backends_agree(run, tmp_path, capsys):
    from resforge.cli import main

    out = tmp_path / "m.torchscript"
    assert main(["export", str(run), "--format", "torchscript", "--out", str(out)]) == 0
    assert "top-1 identical 100.0%" in capsys.readouterr().out
    ts, eager = load_backend(out), load_backend(run)
    assert ts.name == "torchscript" and eager.name == "torch"
    x = np.random.default_rng(0).normal(size=(3, 1, 8, 8)).astype(np.float32)
    assert np.abs(ts(x) - eager(x)).max() <= 1e-3 * max(1.0, np.abs(eager(x)).max())
    with pytest.raises(ValueError, match="cannot run on the onnx backend"):
        load_backend(out, "onnx")
    onnx_backend = load_backend(run, "onnx")     # a run on the onnx backend: export on first use
    assert onnx_backend.name == "onnx" and (run / "weights" / "best.onnx").is_file()
    assert np.abs(onnx_backend(x) - eager(x)).max() <= 1e-3 * max(1.0, np.abs(eager(x)).max())


def test_samples_option_and_random_fallback_warns(tmp_path, caplog):
    from resforge.checkpoint import save_checkpoint

    model = _random_bn(create_model("resnet20", num_classes=7))
    save_checkpoint(tmp_path / "w" / "best", model, _meta("resnet20", 16))
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.png").write_bytes(png_bytes(40 * i, (20, 24), mode="RGB"))
    r = export(tmp_path / "w", "onnx", samples=[folder])
    assert r.samples == f"images from {folder}" and r.n_samples == 5
    with caplog.at_level(logging.WARNING, logger="resforge.export"):
        r = export(tmp_path / "w" / "best.safetensors", "torchscript")
    assert r.samples == "random inputs" and "random inputs" in caplog.text
    assert r.path == tmp_path / "w" / "best.torchscript"


def test_parity_failures_are_loud(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    x = torch.randn(20, 3, 8, 8, generator=torch.Generator().manual_seed(0)).numpy()

    def eager(a):
        with torch.inference_mode():
            return model(torch.from_numpy(a)).numpy()

    assert check_parity(model, eager, x)[0] == 0.0
    with pytest.raises(ExportError, match=r"max \|logit diff\| (9\.99\de-04|1\.00\de-03) \(limit 1\.0e-04; rule"):
        check_parity(model, lambda a: eager(a) + 1e-3, x)
    with pytest.raises(ExportError, match="max \\|logit diff\\| nan"):
        check_parity(model, lambda a: eager(a) * np.nan, x)
    with pytest.raises(ExportError, match="batch axis is not dynamic"):
        check_parity(model, lambda a: eager(a[:1]), x)

    def flip_top1(a):                             # tiny change that swaps the top two classes
        y = eager(a)
        top = y.argmax(1)
        y[np.arange(len(y)), top] -= 50
        return y
    with pytest.raises(ExportError, match="top-1 identical for 0.0%"):
        check_parity(model, flip_top1, x, atol=1e3)
    assert [s.stop - s.start for s in parity_batches(64)] == [1, 15, 48]

    # a broken artifact is refused and not left behind under the target name
    import resforge.export as ex
    monkeypatch.setattr(ex, "_open", lambda path, fmt: (lambda a: eager(a) + 1.0))
    out = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match="the artifact was not written"):
        export_model(model, _meta("resnet20", 8, k=4), "onnx", out, inputs=x)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_missing_optional_dependencies_name_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)     # import now raises ImportError
    with pytest.raises(ImportError, match=r"pip install resforge\[onnx\]"):
        OnnxBackend(tmp_path / "x.onnx")
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r"pip install resforge\[onnx\]"):
        export_model(create_model("resnet20", num_classes=3), _meta("resnet20", 8, k=3), "onnx",
                     tmp_path / "y.onnx")
    monkeypatch.setitem(sys.modules, "fastapi", None)
    monkeypatch.delitem(sys.modules, "resforge.serve.app", raising=False)
    from resforge.serve import create_app
    with pytest.raises(ImportError, match=r"pip install resforge\[serve\]"):
        create_app(tmp_path)
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export(tmp_path, "tflite")


def test_printed_parity_limit_states_the_readmes_rule():
    """The summary's limit reads as the README's rule, also when the relative part raised it."""
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rule = "1e-4, or 1e-6 of the largest |logit| once that exceeds 100"
    assert f"≤ {rule}" in " ".join(readme.split())
    assert limit_text(1e-4) == f"limit 1.0e-04; rule: <= {rule}"
    assert limit_text(2.4e-4) == f"limit 2.4e-04 = 1e-6 x max |logit| 240; rule: <= {rule}"
