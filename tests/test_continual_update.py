"""`resforge update` end to end on tiny digits splits: every method on a class-incremental split
(digits 0-4, then 5-9), a domain-incremental one (same classes, inverted images), a chain
v1 -> v2 -> v3, interrupted updates (a failure before the rename, a SIGKILL mid-training), the
report's figures, the CLI's one-sentence errors, and eval/predict/export/serve of a version."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import resforge
from resforge.cli import main
from resforge.continual import buffer as B
from resforge.continual import report as R
from resforge.continual import update as U
from resforge.continual import versions as V

SRC = str(Path(__file__).resolve().parents[1] / "src")
FAST = ["train.epochs=1", "train.batch_size=64", "train.progress=false"]
HEADLINE = ("old_top1", "new_top1", "top1", "forgetting", "backward_transfer")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def digits_npz(path, classes, names=None, transform=None, per_class=None, seed=0):
    from sklearn.datasets import load_digits
    d = load_digits()
    x, y = np.round(d.images * 255 / 16).astype(np.uint8), d.target
    keep = np.isin(y, classes)
    x, y = x[keep], y[keep]
    if per_class is not None:
        pick = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in classes])
        x, y = x[pick], y[pick]
    if transform is not None:
        x = transform(x)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    lab = np.searchsorted(np.asarray(classes), y)
    n = int(0.7 * len(y)) if per_class is None else len(y)
    arrays = dict(train_images=x[:n], train_labels=lab[:n], class_names=np.array(names or [str(c) for c in classes]))
    if per_class is None:
        arrays.update(test_images=x[n:], test_labels=lab[n:])
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("continual")
    a = digits_npz(root / "first.npz", [0, 1, 2, 3, 4])
    b = digits_npz(root / "second.npz", [5, 6, 7, 8, 9])
    inv = digits_npz(root / "inverted.npz", [0, 1, 2, 3, 4], transform=lambda x: 255 - x, seed=1)
    run = resforge.train("digits", [f"data.source={a}", "data.image_size=8", "train.epochs=3", "train.batch_size=64",
                                    "train.progress=false", f"train.project={root / 'runs'}", "train.name=base",
                                    f"data.cache_dir={root / 'cache'}"]).dir
    return {"root": root, "run": run, "a": a, "b": b, "inv": inv}


def _files(folder):
    return {p: p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.mark.parametrize("method", ["naive", "replay", "lwf", "derpp"])
def test_every_method_updates_a_class_incremental_split(world, method):
    run = world["run"]
    v1 = V.register_root(run)
    before = _files(v1.dir)
    r = U.update(f"{run}@v1", world["b"], method=method, overrides=FAST, buffer_size=50, align=method == "derpp")
    v = r.version
    assert v.parent == 1 and v.lineage == v1.lineage and v.class_names == [str(i) for i in range(10)]
    assert _files(v1.dir) == before                               # the parent is only read
    rep = json.loads((v.dir / "report.json").read_text())
    for key in HEADLINE + ("per_class_forgetting", "accuracy_matrix", "verdict"):
        assert key in rep
    assert rep["verdict"].startswith(("HURT", "KEPT")) and (v.dir / "report.md").read_text().startswith("**")
    assert rep["accuracy_matrix"]["values"][-1][1] == rep["new_top1"]
    assert set(rep["per_class_forgetting"]) == {"0", "1", "2", "3", "4"}
    assert (v.dir / "accuracy_matrix.png").stat().st_size > 1000
    assert rep["method"]["name"] == method and (rep["method"]["weight_align_gamma"] is not None) == (method == "derpp")
    buf = B.load(v.buffer, lineage=v1.lineage)
    assert sum(buf.counts().values()) == 50 and set(buf.counts().values()) == {5}    # 50 images, 10 classes
    assert rep["top1"] is not None and 0 <= rep["old_top1"] <= 1 and rep["new_top1"] > 0.5
    assert v.record["images_seen"] > v1.record["images_seen"]


def test_domain_incremental_update_then_a_chain_of_three(world):
    run = world["run"]
    r2 = U.update(f"{run}@v1", world["inv"], method="replay", overrides=FAST, buffer_size=40)
    assert r2.version.class_names == [str(i) for i in range(5)] and r2.report["classes"]["added"] == []
    assert {d["id"] for d in r2.version.data} == {"d1", "d2"}
    r3 = U.update(r2.version.dir, world["b"], method="derpp", overrides=FAST, buffer_size=40)
    v3 = r3.version
    assert [v.number for v in V.chain(v3)] == [1, r2.version.number, v3.number]
    mat = r3.report["accuracy_matrix"]
    assert mat["data"] == ["d1", "d2", "d3"] and len(mat["values"]) == 3
    assert mat["values"][0][1] is None and mat["values"][0][2] is None and mat["values"][1][2] is None
    assert all(x is not None for x in mat["values"][2])
    assert r3.report["forgetting"] is not None and set(r3.report["per_data_set"]) == {"d1", "d2"}
    table = resforge.versions(run)
    assert f"v{v3.number}" in table and "derpp" in table and "lineage" in table


def test_report_figures_follow_their_definitions():
    e = lambda top1, n=10: {"top1": top1, "n": n, "per_class": {"c": top1}, "support": {"c": n}}  # noqa: E731
    data = [{"id": "d1", "version": 1}, {"id": "d2", "version": 2}, {"id": "d3", "version": 3}]
    history = [(1, {"d1": e(0.9)}), (2, {"d1": e(0.8), "d2": e(0.95)})]
    s = R.summarise(history, {"d1": e(0.7), "d2": e(0.9)}, {"d1": e(0.6), "d2": e(0.85), "d3": e(0.99)}, data, "d3", {})
    # best earlier minus now; the parent's figures are those measured now (d2: 0.9, not its record's 0.95)
    assert s["forgetting"] == pytest.approx(((0.9 - 0.6) + (0.9 - 0.85)) / 2)
    assert s["backward_transfer"] == pytest.approx(((0.6 - 0.9) + (0.85 - 0.9)) / 2)   # now minus when learnt
    assert s["old_top1"] == pytest.approx(0.725) and s["old_top1_before"] == pytest.approx(0.8)
    assert s["accuracy_matrix"]["values"][1] == [0.7, 0.9, None]        # the parent's row as measured now
    assert s["verdict"].startswith("HURT") and "-7.5 points" in s["verdict"]


def test_a_failure_before_the_rename_leaves_the_parent_and_a_rerun_succeeds(world, monkeypatch):
    run = world["run"]
    numbers = V.version_numbers(run)
    with monkeypatch.context() as m:
        m.setattr(R, "write", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk vanished")))
        with pytest.raises(RuntimeError, match="disk vanished"):
            U.update(f"{run}@v1", world["b"], method="naive", overrides=FAST, buffer_size=20)
    assert V.version_numbers(run) == numbers
    assert not [p for p in (run / "versions").iterdir() if p.name.startswith(".")]
    r = U.update(f"{run}@v1", world["b"], method="naive", overrides=FAST, buffer_size=20)
    assert r.version.number == numbers[-1] + 1
    for n in numbers:
        V.load_version(run / "versions" / f"v{n}")                   # all earlier versions intact


def test_sigkill_mid_update_leaves_every_version_intact_and_the_rerun_cleans_up(world):
    run = world["run"]
    numbers = V.version_numbers(run)
    env = {**os.environ, "PYTHONPATH": SRC, "RESFORGE_THREADS": "1"}
    cmd = [sys.executable, "-m", "resforge.cli", "update", f"{run}@v1", "--data", str(world["b"]),
           "--method", "derpp", "--buffer", "20", "train.epochs=200", "train.progress=false"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    try:
        while time.time() < deadline:                    # killed once it is training (metrics.csv written)
            if list((run / "versions").glob(".v*.tmp-*/metrics.csv")):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the update never started training")
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert V.version_numbers(run) == numbers and list((run / "versions").glob(".v*.tmp-*"))
    for n in numbers:
        V.load_version(run / "versions" / f"v{n}")
    assert main(["update", f"{run}@v1", "--data", str(world["b"]), "--method", "naive", "--buffer", "20", *FAST]) == 0
    assert V.version_numbers(run) == numbers + [numbers[-1] + 1]
    assert not list((run / "versions").glob(".v*.tmp-*"))


def test_cli_errors_are_one_sentence(world, capsys, tmp_path):
    run = world["run"]
    clash = digits_npz(tmp_path / "clash.npz", [0, 5], names=["0 ", "5"])
    assert main(["update", str(run), "--data", str(clash), *FAST]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--merge '0 =0'" in err and "differ only in case or spacing" in err
    tiny = digits_npz(tmp_path / "tiny.npz", [5, 6], per_class=1)
    assert main(["update", str(run), "--data", str(tiny), "data.val_fraction=0", *FAST]) == 2
    err = capsys.readouterr().err
    assert "fewer than continual.min_per_class=2 training images" in err
    other = resforge.train("digits", ["data.image_size=8", "train.epochs=1", "train.progress=false",
                                      f"train.project={tmp_path}", "train.name=other",
                                      f"data.source={world['a']}"]).dir
    ov = U.update(other, world["b"], method="naive", overrides=FAST, buffer_size=20).version
    assert main(["update", f"{run}@v1", "--data", str(world["b"]), "--replay-buffer", str(ov.buffer), *FAST]) == 2
    err = capsys.readouterr().err
    assert "belongs to model lineage" in err and err.count("\n") == 1
    assert main(["update", f"{run}@v99", "--data", str(world["b"])]) == 2
    assert "no model version v99" in capsys.readouterr().err
    assert main(["versions", str(run)]) == 0
    assert "version  parent  method" in capsys.readouterr().out


def test_eval_predict_export_and_serve_take_a_version(world, tmp_path):
    run = world["run"]
    v = U.update(f"{run}@v1", world["b"], method="replay", overrides=FAST, buffer_size=20).version
    ref = f"{run}@v{v.number}"
    full = digits_npz(tmp_path / "all.npz", list(range(10)))
    res = resforge.evaluate(ref, data=str(full), out_dir=tmp_path / "ev")
    assert res["test"]["n"] > 0 and (tmp_path / "ev" / "report.json").is_file()
    img = np.load(full)["test_images"][:2]
    files = []
    for i, a in enumerate(img):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
        files.append(tmp_path / f"{i}.png")
    rows = resforge.predict(v.dir, files, topk=3)
    assert all(r["error"] is None for r in rows) and {t["label"] for r in rows for t in r["topk"]} <= set(v.class_names)
    from resforge.export import export
    out = export(ref, "torchscript", tmp_path / "m.torchscript", samples=files)
    assert out.top1_agreement == 1.0
    pytest.importorskip("fastapi")
    from resforge.serve.app import create_app
    assert create_app(ref, threads=1) is not None
    V.load_version(v.dir)                       # evaluating, predicting and exporting changed none of its files


def test_old_data_that_is_gone_is_named_and_the_rest_still_evaluated(world, tmp_path, capsys):
    run, first = world["run"], world["a"]
    moved = tmp_path / "away.npz"
    first.rename(moved)
    try:
        r = U.update(f"{run}@v1", world["b"], method="lwf", overrides=FAST, buffer_size=20)
        assert "d1" in r.report["unavailable"] and "could not be loaded" in r.report["unavailable"]["d1"]
        assert r.report["old_top1"] is None and r.report["new_top1"] is not None
        assert r.report["verdict"].startswith("UNKNOWN whether the update hurt the old data")
        assert main(["update", f"{run}@v1", "--data", str(world["b"]), "--method", "derpp", *FAST]) == 2
        assert "has no replay buffer and its training data cannot be loaded" in capsys.readouterr().err
    finally:
        moved.rename(first)


def test_a_class_without_training_images_is_refused(world, tmp_path, capsys):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = np.round(d.images * 255 / 16).astype(np.uint8)
    five, six = x[d.target == 5], x[d.target == 6]
    np.savez(tmp_path / "gap.npz", train_images=five[:20], train_labels=np.zeros(20, np.int64),
             test_images=np.concatenate([five[20:30], six[:10]]), test_labels=np.repeat([0, 1], 10),
             class_names=np.array(["5", "6"]))
    assert main(["update", str(world["run"]), "--data", str(tmp_path / "gap.npz"), *FAST]) == 2
    assert "'6' (0)" in capsys.readouterr().err
