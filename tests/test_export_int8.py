"""resforge export --int8: static int8 ONNX, calibrated on the run's training images, refused
unless its top-1 on the run's test split is within the tolerance of fp32; its metadata record
is validated on load, and predict / serve run the artifact as they run any ONNX export.

The run is the shared tiny digits run (resnet20 at 8x8, 360 test images: one image is 0.28
points of top-1), so the passing tests state a tolerance of a few images; the default 0.5 is
for test sets of thousands (bench/int8_speed.py).
"""
import json

import numpy as np
import pytest
import torch

from deploy_helpers import digit_images, running_server, torch_one_thread, trained_run  # noqa: F401
from resforge.artifact import ArtifactError
from resforge.backends import OnnxBackend, load_backend
from resforge.api import export
from resforge.export import ExportError
from resforge.quantize import Int8Options, balanced_pick

onnx = pytest.importorskip("onnx", reason="ONNX export needs onnx (pip install resforge[onnx])")
pytest.importorskip("onnxruntime", reason="int8 export needs onnxruntime (pip install resforge[onnx])")

FEW_IMAGES = 3.0     # points of top-1: ~10 of the 360 test digits


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def int8_artifact(run, tmp_path_factory):
    """One int8 export of the run through the CLI (its summary printed), shared by the module."""
    import contextlib
    import io

    from resforge.cli import main

    out = tmp_path_factory.mktemp("int8") / "digits.int8.onnx"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["export", str(run), "--int8", "--calibration", "128", "--int8-tolerance", str(FEW_IMAGES),
                     "--out", str(out)])
    assert code == 0
    return out, buf.getvalue()


def _files(run, tmp_path, n=8):
    folder = tmp_path / "digits"
    folder.mkdir()
    labels = []
    for name, data, label in digit_images(run, n):
        (folder / name).write_bytes(data)
        labels.append(str(label))
    return folder, labels


def test_int8_export_passes_its_check_and_records_it(run, int8_artifact):
    out, printed = int8_artifact
    proto = onnx.load(str(out))
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["resforge_meta"])
    q = meta["quantization"]
    assert q["dtype"] == "int8" and q["method"] == "static QDQ" and q["weights"].startswith("int8 per channel")
    assert q["calibration_images"] == 128 and q["calibration_split"] == "train"
    assert q["split"] == "test" and q["n"] == 360 and q["data"] == "digits" and q["tolerance"] == FEW_IMAGES
    assert 100 * (q["fp32_top1"] - q["int8_top1"]) <= FEW_IMAGES and q["top1_agreement"] >= 0.9
    report = json.loads((run / "report.json").read_text())["test"]     # training's own test evaluation
    assert q["fp32_top1"] == pytest.approx(report["top1"], abs=1e-6) and q["n"] == report["n"]
    assert meta["class_names"] == [str(i) for i in range(10)] and meta["format"] == "onnx"
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"   # still dynamic
    assert "int8 accuracy on 360 test images of digits" in printed and "top-1 agreement" in printed
    assert f"int8 {100 * q['int8_top1']:.2f}%" in printed and "calibrated on 128 train images" in printed
    assert not (run / "weights" / "best.int8.onnx").exists()        # --out was honoured
    assert out.stat().st_size < 0.5 * (run / "weights" / "best.safetensors").stat().st_size


def test_predict_and_serve_run_the_int8_artifact(run, int8_artifact, tmp_path):
    import requests

    from resforge.infer import predict

    out, _ = int8_artifact
    backend = load_backend(out)
    assert backend.name == "onnx" and backend.meta["quantization"]["dtype"] == "int8"
    x = np.random.default_rng(0).normal(size=(5, 1, 8, 8)).astype(np.float32)
    assert backend(x).shape == (5, 10)                                   # a batch size it never saw
    folder, labels = _files(run, tmp_path)
    rows = predict(out, [folder], topk=2)
    eager = predict(run, [folder], topk=2)
    assert [r["error"] for r in rows] == [None] * 8
    int8_top1, eager_top1 = ([r["topk"][0]["label"] for r in rs] for rs in (rows, eager))
    assert sum(a == b for a, b in zip(int8_top1, eager_top1)) >= 7
    with running_server(out, "--max-wait-ms", "0", "--threads", "1") as url:
        info = requests.get(f"{url}/v1/model").json()
        assert info["backend"] == "onnx" and info["quantization"]["int8_top1"] == backend.meta["quantization"]["int8_top1"]
        files = [("file", (p.name, p.read_bytes())) for p in sorted(folder.iterdir())]
        served = requests.post(f"{url}/v1/predict?topk=1", files=files).json()["predictions"]
    assert [p["topk"][0]["label"] for p in served] == int8_top1


def test_int8_check_refuses_an_artifact_outside_its_tolerance(run, tmp_path, monkeypatch):
    """Real int8 models, really compared: calibration ranges measured on images scaled down 50x
    clip every activation of real images, and the accuracy collapses."""
    import resforge.quantize as quantize

    class Shrunk(quantize.CalibrationReader):
        def get_next(self):
            batch = super().get_next()
            return None if batch is None else {"input": batch["input"] * 0.02}

    monkeypatch.setattr(quantize, "CalibrationReader", Shrunk)
    out = tmp_path / "m.int8.onnx"
    with pytest.raises(ExportError, match=r"int8 accuracy check failed: top-1 .*% vs fp32 .*% on 360 test images "
                                          r"of digits, a drop of .* points where at most 0\.5 is allowed .* "
                                          r"m\.int8\.onnx was not written"):
        export(run, "onnx", out, int8=Int8Options(calibration=64))
    assert list(tmp_path.iterdir()) == []                   # no artifact, no temporaries
    monkeypatch.undo()
    # the same run, calibrated properly, passes a tolerance it could not meet
    assert export(run, "onnx", out, int8=Int8Options(calibration=64, tolerance=FEW_IMAGES)).path == out


def _edit_quantization(src, dst, edit):
    proto = onnx.load(str(src))
    props = {p.key: p.value for p in proto.metadata_props}
    meta = json.loads(props["resforge_meta"])
    edit(meta)
    for p in proto.metadata_props:
        if p.key == "resforge_meta":
            p.value = json.dumps(meta)
    onnx.save(proto, str(dst))
    return dst


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["quantization"].update(dtype="int4"), r"quantization\.dtype is a string 'int4', not one of int8"),
    (lambda m: m["quantization"].update(int8_top1="0.9"), r"quantization\.int8_top1 must be a number"),
    (lambda m: m["quantization"].update(top1_agreement=1.5), r"quantization\.top1_agreement is 1\.5, outside \[0, 1\]"),
    (lambda m: m["quantization"].update(calibration_images=0), r"quantization\.calibration_images is 0, below 1"),
    (lambda m: m["quantization"].pop("n"), r"quantization\.n must be an integer, it is missing"),
    (lambda m: m["quantization"].update(tolerance=-1), r"quantization\.tolerance is -1, outside \[0, 100\]"),
    (lambda m: m["quantization"].update(fp32_top1=0.99, int8_top1=0.5),
     r"quantization\.int8_top1 is 0\.5000, more than the recorded tolerance of 3 points below fp32_top1 0\.9900"),
    (lambda m: m.update(quantization=["int8"]), r"quantization must be an object, found a list"),
])
def test_malformed_quantization_metadata_is_refused_on_load(int8_artifact, tmp_path, edit, message):
    bad = _edit_quantization(int8_artifact[0], tmp_path / "bad.int8.onnx", edit)
    with pytest.raises(ArtifactError, match=message) as e:
        OnnxBackend(bad)
    assert str(e.value).startswith(str(bad)) and "resforge export RUN --format onnx" in str(e.value)


def test_an_int8_claim_on_a_float_graph_is_refused(run, int8_artifact, tmp_path):
    fp32 = export(run, "onnx", tmp_path / "fp32.onnx").path
    record = load_backend(int8_artifact[0]).meta["quantization"]
    bad = _edit_quantization(fp32, tmp_path / "claims.int8.onnx", lambda m: m.update(quantization=record))
    with pytest.raises(ArtifactError, match="quantization says the model is int8 but its graph has no "
                                            "DequantizeLinear node"):
        OnnxBackend(bad)


def test_int8_option_errors_are_one_sentence(run, tmp_path, capsys):
    from resforge.cli import main

    with pytest.raises(ValueError, match="--int8 quantises ONNX exports only, not torchscript"):
        export(run, "torchscript", int8=True)
    assert main(["export", str(run), "--format", "torchscript", "--int8"]) == 2
    assert "--int8 quantises ONNX exports only, not torchscript: use --format onnx" in capsys.readouterr().err
    assert main(["export", str(run), "--calibration", "64"]) == 2
    assert "--calibration only apply to an int8 export: add --int8" in capsys.readouterr().err
    for bad, message in ((dict(calibration=0), "calibration must be a number of images >= 1"),
                         (dict(tolerance=-0.1), "tolerance must be 0..100 percentage points"),
                         (dict(tolerance=float("nan")), "tolerance must be 0..100"),
                         (dict(check_images=0), "check_images must be >= 1")):
        with pytest.raises(ValueError, match=message):
            Int8Options(**bad)
    assert not (run / "weights" / "best.int8.onnx").exists() and not (run / "weights" / "best.torchscript").exists()


def test_weights_without_a_run_need_labelled_data(run, tmp_path):
    """A bare state dict (third-party style: no sidecar, no run folder) cannot calibrate on "its
    run's data"; with --data it calibrates on that data's train split and takes its class names."""
    from safetensors.torch import load_file

    weights = tmp_path / "digits-resnet20.pth"
    torch.save(load_file(run / "weights" / "best.safetensors"), weights)
    with pytest.raises(ValueError, match=r"not inside a run folder .*: pass --data SOURCE, labelled images of "
                                         r"the model's 10 classes"):
        export(weights, "onnx", int8=True, model_name="resnet20")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits-resnet20.pth"]
    # ImageNet statistics are assumed for such files, so accuracy is poor: the test is the path, not the figure
    r = export(weights, "onnx", int8=Int8Options(data="digits", calibration=32, tolerance=100, check_images=100),
               model_name="resnet20")
    assert r.path == tmp_path / "digits-resnet20.int8.onnx"
    assert r.quantization["data"] == "digits" and r.quantization["n"] == 100
    assert load_backend(r.path).meta["class_names"] == [str(i) for i in range(10)]


def test_calibration_images_are_balanced_and_seeded():
    labels = np.repeat(np.arange(4), [50, 30, 10, 2])
    pick = balanced_pick(labels, 20, seed=0)
    counts = np.bincount(labels[pick], minlength=4)
    assert len(set(pick)) == 20 and list(pick) == sorted(pick)
    assert counts[3] == 2 and counts[2] == 6 and counts[0] == counts[1] == 6   # the short class gives its turns away
    assert list(balanced_pick(labels, 20, seed=0)) == list(pick)
    assert list(balanced_pick(labels, 20, seed=1)) != list(pick)
    assert len(balanced_pick(labels, 500, seed=0)) == len(labels)
