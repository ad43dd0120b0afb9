"""Hostile artifacts: every file resforge reads back is validated at load (resforge.artifact).

One tiny untrained checkpoint (resnet20, 1x8x8, 10 classes) is the base; each hostile variant
rewrites its sidecar *with a matching sha256* (whoever hands over the pair can), its tensors,
or the metadata inside one ONNX / TorchScript export of it. Each must be refused at load with
an ArtifactError / WeightsError naming the file and the field, by the Python API (predict,
export, evaluate, serve) and, for a few, by the CLI (exit status 2, no traceback).
"""
import copy
import hashlib
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

import resforge
from resforge import ood
from deploy_helpers import png_bytes, torch_one_thread  # noqa: F401
from resforge.artifact import ArtifactError, load_state, read_manifest, validate_meta
from resforge.backends import META_FILE, META_KEY, OnnxBackend, TorchScriptBackend, load_backend
from resforge.checkpoint import load_for_inference, read_meta, save_checkpoint
from resforge.export import export
from resforge.models import create_model
from resforge.weights import WeightsError

REPO = Path(__file__).resolve().parents[1]


def base_meta() -> dict:
    return {"model": {"name": "resnet20", "num_classes": 10, "in_chans": 1, "kwargs": {}},
            "class_names": [str(i) for i in range(10)], "input_size": [1, 8, 8],
            "mean": [0.3], "std": [0.37], "resize": "shorter-center-crop", "epoch": 1,
            "metrics": {"val_top1": 0.2}, "split_hash": "0" * 64}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A run-like folder: weights/best.safetensors + best.json."""
    root = tmp_path_factory.mktemp("good")
    torch.manual_seed(0)
    save_checkpoint(root / "weights" / "best", create_model("resnet20", num_classes=10, in_chans=1), base_meta())
    return root


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "a.png"
    path.write_bytes(png_bytes(100, (8, 8)))
    return path


GOOD_OOD = {"score": "energy", "temperature": 1.0, "threshold": -4.2, "accept_rate": 0.95, "fitted_on": "val",
            "n": 144}      # resforge.ood's record of a fitted threshold


def _resign(folder: Path, edit) -> None:
    """Rewrite best.json through `edit(meta)`, keeping the sha256 valid (as an attacker would)."""
    side = folder / "weights" / "best.json"
    meta = json.loads(side.read_text())
    edit(meta)
    side.write_text(json.dumps(meta))


def _set(path: str, value):
    def edit(meta):
        *parents, last = path.split(".")
        d = meta
        for p in parents:
            d = d[p]
        d[last] = value
    return edit


def _nan_weights(folder: Path) -> None:
    side = folder / "weights" / "best.json"
    meta = json.loads(side.read_text())
    model = create_model("resnet20", num_classes=10, in_chans=1)
    with torch.no_grad():
        model.layer2[0].conv1.weight[0, 0, 0, 0] = float("nan")
    blob = save({k: v.contiguous() for k, v in model.state_dict().items()},
                metadata={"format": "pt", "resforge": "resforge-checkpoint"})
    (folder / "weights" / "best.safetensors").write_bytes(blob)
    side.write_text(json.dumps({**meta, "weights_sha256": hashlib.sha256(blob).hexdigest()}))


def _three_channel_sidecar(meta):
    meta["model"]["in_chans"] = 3
    meta["input_size"] = [3, 8, 8]
    meta["mean"], meta["std"] = [0.3] * 3, [0.37] * 3


def _five_classes(meta):        # consistent in itself, but the head has 10 rows
    meta["model"]["num_classes"] = 5
    meta["class_names"] = list("abcde")
    if "output" in meta:        # an export's own record of its logits
        meta["output"]["shape"] = ["batch", 5]


# (id, how to spoil the good checkpoint, the field the refusal must name)
CHECKPOINT_CASES = [
    ("short-class-names", _set("class_names", ["a", "b", "c"]), "class_names"),
    ("class-names-not-strings", _set("class_names", list(range(10))), "class_names[0]"),
    ("duplicate-class-names", _set("class_names", ["a"] * 10), "class_names"),
    ("num-classes-vs-head", _five_classes, "model.num_classes"),
    ("wrong-in-chans", _set("model.in_chans", 3), "input_size[0]"),
    ("in-chans-vs-stem", _three_channel_sidecar, "model.in_chans"),
    ("wrong-input-size-channels", _set("input_size", [3, 8, 8]), "input_size[0]"),
    ("input-size-not-ints", _set("input_size", [1, "8", 8]), "input_size[1]"),
    ("huge-input-size", _set("input_size", [1, 200000, 200000]), "input_size[1]"),
    ("bogus-resize", _set("resize", "fisheye"), "resize"),
    ("std-zero", _set("std", [0]), "std[0]"),
    ("std-negative", _set("std", [-1.0]), "std[0]"),
    ("mean-nan", _set("mean", [float("nan")]), "mean[0]"),
    ("mean-too-long", _set("mean", [0.3, 0.3, 0.3]), "mean"),
    ("num-classes-1e12", _set("model.num_classes", 1e12), "model.num_classes"),
    ("num-classes-10-to-12", _set("model.num_classes", 10 ** 12), "model.num_classes"),
    ("kwargs-bogus", _set("model.kwargs", {"bogus": 1}), "model.kwargs"),
    ("kwargs-pretrained-path", _set("model.kwargs", {"pretrained": "/etc/passwd"}), "model.kwargs"),
    ("kwargs-bad-value", _set("model.kwargs", {"drop_rate": 7}), "model.kwargs"),
    ("unknown-model", _set("model.name", "evilnet"), "model.name"),
    ("newer-format", _set("format_version", 99), "format_version"),
    ("sidecar-not-an-object", lambda meta: meta.clear() or meta.update({"x": 1}), "format"),
    ("ood-unknown-score", _set("ood", {**GOOD_OOD, "score": "mahalanobis"}), "ood.score"),
    ("ood-threshold-nan", _set("ood", {**GOOD_OOD, "threshold": float("nan")}), "ood.threshold"),
    ("ood-accept-rate-one", _set("ood", {**GOOD_OOD, "accept_rate": 1}), "ood.accept_rate"),
    ("ood-not-an-object", _set("ood", [-4.2]), "ood"),
    ("nan-weights", None, "NaN"),
]


@pytest.fixture(scope="module")
def hostile(good, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    out = {}
    for name, edit, _ in CHECKPOINT_CASES:
        folder = root / name
        shutil.copytree(good, folder)
        _nan_weights(folder) if edit is None else _resign(folder, edit)
        out[name] = folder
    return out


def _refused(exc_info, folder: Path, field: str) -> None:
    msg = str(exc_info.value)
    assert str(folder) in msg and field in msg, msg
    assert "\n" not in msg.strip() and "Traceback" not in msg


@pytest.mark.parametrize("name,field", [(n, f) for n, _, f in CHECKPOINT_CASES])
def test_hostile_checkpoint_refused_by_every_loader(hostile, image, name, field, tmp_path):
    folder = hostile[name]
    for load in (lambda: load_for_inference(folder),
                 lambda: resforge.predict(folder, [image]),
                 lambda: export(folder, "onnx", tmp_path / "x.onnx"),
                 lambda: resforge.evaluate(folder, data="digits", out_dir=tmp_path / "eval"),
                 lambda: load_backend(folder)):
        with pytest.raises(WeightsError) as e:
            load()
        _refused(e, folder, field)
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "eval").exists()


def test_good_checkpoint_loads_and_sidecar_validates(good):
    model, meta = load_for_inference(good)
    assert meta["class_names"] == [str(i) for i in range(10)] and model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert read_meta(good / "weights" / "best.safetensors")["input_size"] == [1, 8, 8]


def test_limits_are_settable(hostile, monkeypatch):
    monkeypatch.setenv("RESFORGE_MAX_IMAGE_SIDE", "16")
    meta = {**base_meta(), "input_size": [1, 32, 32]}
    with pytest.raises(ArtifactError, match=r"input_size\[1\] \(height\) is 32, above the limit of 16.*RESFORGE_MAX_IMAGE_SIDE"):
        validate_meta(meta, "m.json", "weights")
    monkeypatch.setenv("RESFORGE_MAX_CLASSES", "5")
    with pytest.raises(ArtifactError, match="above the limit of 5 classes"):
        validate_meta(base_meta(), "m.json", "weights")


def test_cli_predict_and_eval_refuse_in_one_line(hostile, image):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    for argv, name in ((["predict", str(hostile["kwargs-pretrained-path"]), str(image)], "kwargs-pretrained-path"),
                       (["eval", str(hostile["short-class-names"]), "--data", "digits"], "short-class-names")):
        r = subprocess.run([sys.executable, "-m", "resforge.cli", *argv], capture_output=True, text=True,
                           env=env, timeout=120)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and str(hostile[name]) in r.stderr, r.stderr


def test_serve_refuses_to_start(hostile):
    pytest.importorskip("fastapi")
    from resforge.serve.app import create_app
    for name in ("std-zero", "short-class-names", "nan-weights"):
        with pytest.raises(WeightsError, match=str(hostile[name])):
            create_app(hostile[name])


# ---------------------------------------------------------------- exported artifacts


@pytest.fixture(scope="module")
def exported(good, tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    root = tmp_path_factory.mktemp("exported")
    return {fmt: export(good, fmt, root / f"best{suffix}").path
            for fmt, suffix in (("onnx", ".onnx"), ("torchscript", ".torchscript"))}


def _onnx_with(src: Path, dst: Path, edit=None, raw: str | None = None, nan_initializer: bool = False) -> Path:
    import onnx
    from onnx import numpy_helper
    proto = onnx.load(str(src))
    props = {p.key: p.value for p in proto.metadata_props}
    meta = json.loads(props[META_KEY])
    if edit is not None:
        edit(meta)
    props[META_KEY] = raw if raw is not None else json.dumps(meta)
    if raw == "":
        del props[META_KEY]
    del proto.metadata_props[:]
    for k, v in props.items():
        proto.metadata_props.add(key=k, value=v)
    if nan_initializer:
        init = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))
        arr = numpy_helper.to_array(init).copy()
        arr.flat[0] = np.nan            # one weight: onnxruntime's output stays finite (but wrong)
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(proto, str(dst))
    return dst


def _torchscript_with(src: Path, dst: Path, edit) -> Path:
    extra = {META_FILE: ""}
    module = torch.jit.load(str(src), _extra_files=extra)
    meta = json.loads(extra[META_FILE])
    edit(meta)
    torch.jit.save(module, str(dst), _extra_files={META_FILE: json.dumps(meta)})
    return dst


def _onnx_three_channels(meta):
    _three_channel_sidecar(meta)


ONNX_CASES = [  # (id, how, field)
    ("onnx-short-class-names", dict(edit=_five_classes), "class_names"),
    ("onnx-input-size-vs-graph", dict(edit=_set("input_size", [1, 16, 16])), "input_size[1]"),
    ("onnx-in-chans-vs-graph", dict(edit=_onnx_three_channels), "model.in_chans"),
    ("onnx-std-zero", dict(edit=_set("std", [0.0])), "std[0]"),
    ("onnx-no-resize", dict(edit=lambda m: m.pop("resize")), "resize"),
    ("onnx-kwargs-path", dict(edit=_set("model.kwargs", {"pretrained": "/etc/passwd"})), "model.kwargs"),
    ("onnx-not-json", dict(raw="{not json"), "not valid JSON"),
    ("onnx-no-meta", dict(raw=""), META_KEY),
    ("onnx-nan-weights", dict(nan_initializer=True), "holds NaN or inf"),
    ("onnx-ood-threshold-inf", dict(edit=_set("ood", {**GOOD_OOD, "threshold": float("inf")})), "ood.threshold"),
]
TS_CASES = [
    ("ts-short-class-names", _five_classes, "class_names"),
    ("ts-in-chans-vs-model", _onnx_three_channels, "input_size"),
    ("ts-mean-nan", _set("mean", [float("nan")]), "mean[0]"),
    ("ts-format-mismatch", _set("format", "onnx"), "format"),
    ("ts-ood-temperature-zero", _set("ood", {**GOOD_OOD, "temperature": 0}), "ood.temperature"),
]


def test_nan_constant_in_torchscript_refused(tmp_path):
    model = create_model("resnet20", num_classes=10, in_chans=1).eval()
    with torch.no_grad():
        model.layer2[0].conv1.weight[0, 0, 0, 0] = float("nan")
        traced = torch.jit.freeze(torch.jit.trace(model, torch.zeros(2, 1, 8, 8), check_trace=False))
    meta = {**base_meta(), "format": "torchscript"}
    torch.jit.save(traced, str(tmp_path / "m.torchscript"), _extra_files={META_FILE: json.dumps(meta)})
    with pytest.raises(ArtifactError, match=r"m\.torchscript: tensor constant %\S+ holds NaN or inf"):
        TorchScriptBackend(tmp_path / "m.torchscript")


@pytest.mark.parametrize("name,how,field", ONNX_CASES)
def test_hostile_onnx_refused(exported, tmp_path, name, how, field):
    path = _onnx_with(exported["onnx"], tmp_path / f"{name}.onnx", **how)
    for load in (lambda: OnnxBackend(path), lambda: load_backend(path)):
        with pytest.raises(ArtifactError) as e:
            load()
        _refused(e, path, field)


@pytest.mark.parametrize("name,edit,field", TS_CASES)
def test_hostile_torchscript_refused(exported, tmp_path, name, edit, field):
    path = _torchscript_with(exported["torchscript"], tmp_path / f"{name}.torchscript", edit)
    with pytest.raises(ArtifactError) as e:
        TorchScriptBackend(path)
    _refused(e, path, field)


def test_good_exports_load(exported):
    for path in exported.values():
        assert load_backend(path)(np.zeros((3, 1, 8, 8), np.float32)).shape == (3, 10)


def test_cli_serve_refuses_hostile_onnx(exported, tmp_path):
    pytest.importorskip("fastapi")
    path = _onnx_with(exported["onnx"], tmp_path / "short.onnx", edit=_five_classes)
    from resforge.serve.app import create_app
    with pytest.raises(ArtifactError, match="class_names has 5 names but the graph returns"):
        create_app(path)


# ---------------------------------------------------------------- resume state, split manifest


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_evil_resume_state_never_runs(tmp_path, how):
    marker, path = tmp_path / "pwned", tmp_path / "last.state.pt"
    obj = {"fit_state": {"epoch": 1}, "model": _Evil(marker)}
    if how == "torch.save":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))
    with pytest.raises(WeightsError) as e:
        load_state(path)
    msg = str(e.value)
    assert str(path) in msg and "system" in msg and "weights_only=False" not in msg.split("Loading")[0]
    assert "Traceback" not in msg and not marker.exists()


@pytest.mark.parametrize("state,field", [
    ({"x": torch.zeros(1)}, "fit_state"),
    ({"fit_state": {"epoch": -1}}, "fit_state.epoch"),
    ({"fit_state": {"bogus": 1}}, "fit_state.bogus"),
    ({"fit_state": {"epoch": 1}, "model": {"w": torch.tensor([float("nan")])}}, "model.w"),
    ({"fit_state": {"epoch": 1}, "model": {"w": torch.zeros(1)}, "optimizer": [1]}, "optimizer"),
])
def test_malformed_resume_state(tmp_path, state, field):
    path = tmp_path / "last.state.pt"
    torch.save(state, path)
    with pytest.raises(ArtifactError) as e:
        load_state(path)
    _refused(e, path, field)


def test_real_resume_state_passes(tmp_path):
    from resforge.training.loop import FitState, _snapshot
    model = create_model("resnet20", num_classes=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    torch.save(_snapshot(FitState(epoch=2), model, opt, sched, None, None, None), tmp_path / "s.pt")
    assert load_state(tmp_path / "s.pt")["fit_state"]["epoch"] == 2


def _manifest(splits) -> dict:
    from resforge.data.splits import manifest_hash
    return {"source": "digits", "splits": splits, "hash": manifest_hash(splits)}


@pytest.mark.parametrize("content,field", [
    (_manifest({"train": [1, 2]}), "splits.train[0]"),
    (_manifest({"train": "abc"}), "splits.train"),
    ({**_manifest({"train": ["a"]}), "seed": "x"}, "seed"),
    ({**_manifest({"train": ["a"]}), "hash": "0"}, "hash"),
    ([1, 2], "the split manifest"),
])
def test_hostile_split_manifest(tmp_path, content, field):
    from resforge.data import load_manifest
    path = tmp_path / "splits.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError) as e:
        load_manifest(path)
    _refused(e, path, field)
    path.write_text("[" * 100_000)                      # deep nesting: RecursionError inside json
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(path)


# ---------------------------------------------------------------- third-party files, file modes


def test_bare_pth_says_preprocessing_was_assumed(good, tmp_path, caplog):
    model, _ = load_for_inference(good)
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    with caplog.at_level("WARNING", logger="resforge.checkpoint"):
        _, meta = load_for_inference(tmp_path / "bare.pth")
    assert "no resforge sidecar: assuming ImageNet preprocessing" in caplog.text
    assert meta["preprocessing"]["assumed"] is True and meta["mean"] == pytest.approx([0.449])
    from resforge.report import write_report
    write_report(tmp_path / "r", {}, meta=meta)
    assert json.loads((tmp_path / "r" / "report.json").read_text())["preprocessing"]["assumed"] is True


def test_nan_in_third_party_weights_is_refused(tmp_path):
    sd = create_model("resnet20").state_dict()
    sd["fc.bias"][0] = float("inf")
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(WeightsError, match=r"w\.pth: tensor fc\.bias holds NaN or inf"):
        load_for_inference(tmp_path / "w.pth")


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_every_artifact_gets_the_umask_mode(tmp_path, umask, mode):
    from resforge.checkpoint import atomic_write_text
    from resforge.report import write_report
    old = os.umask(umask)
    try:
        save_checkpoint(tmp_path / "w" / "best", create_model("resnet20", num_classes=10, in_chans=1), base_meta())
        atomic_write_text(tmp_path / "config.json", "{}")
        write_report(tmp_path, {}, meta=base_meta())
    finally:
        os.umask(old)
    for f in ("w/best.safetensors", "w/best.json", "config.json", "report.json"):
        assert (tmp_path / f).stat().st_mode & 0o777 == mode, f


# ---------------------------------------------------------------- property: only ArtifactError

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                     max_leaves=12)
_paths = ["model", "model.name", "model.num_classes", "model.in_chans", "model.kwargs", "class_names",
          "input_size", "mean", "std", "resize", "format", "format_version", "weights_sha256", "metrics",
          "epoch", "output", "config", "preprocessing", "ood", "ood.score", "ood.threshold", "ood.accept_rate",
          "ood.temperature", "ood.n"]


def _sound(kind: str) -> dict:
    meta = {**base_meta(), "format": "resforge-checkpoint" if kind == "checkpoint" else kind, "ood": dict(GOOD_OOD)}
    if kind in ("onnx", "torchscript"):
        meta["output"] = {"name": "logits", "shape": ["batch", 10]}
    return meta


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(["checkpoint", "onnx", "torchscript", "weights"]),
       edits=st.lists(st.tuples(st.sampled_from(_paths), _json | st.just("<drop>")), max_size=3),
       whole=st.one_of(st.none(), _json))
def test_validator_raises_only_its_own_error(kind, edits, whole):
    meta = copy.deepcopy(_sound(kind)) if whole is None else whole
    for path, value in edits:
        d, keys = meta, path.split(".")
        for k in keys[:-1]:
            d = d.get(k) if isinstance(d, dict) else None
        if isinstance(d, dict):
            d.pop(keys[-1], None) if value == "<drop>" else d.__setitem__(keys[-1], value)
    try:
        out = validate_meta(meta, "m.json", kind)
    except ArtifactError as e:
        assert str(e).startswith("m.json: ")
    else:   # what passes is sound: the consumers' assumptions hold
        k = out["model"]["num_classes"]
        assert len(out["class_names"]) == k and len(out["mean"]) == len(out["std"]) == out["input_size"][0]
        assert all(math.isfinite(v) for v in out["mean"] + out["std"]) and min(out["std"]) > 0
        if out.get("ood") is not None:       # predict --ood and serve compare a finite score with it
            assert math.isfinite(out["ood"]["threshold"]) and 0 < out["ood"]["accept_rate"] < 1
            assert np.isfinite(ood.score(np.zeros((1, k)), out["ood"])).all()


def test_sound_metas_pass():
    for kind in ("checkpoint", "onnx", "torchscript", "weights"):
        assert validate_meta(_sound(kind), "m.json", kind)
    lean = {**_sound("checkpoint"), "ood": {"score": "msp", "threshold": 0.3, "accept_rate": 0.9, "temperature": None}}
    assert ood.score(np.zeros((1, 10)), validate_meta(lean, "m.json")["ood"]) == pytest.approx([math.log(10)])
