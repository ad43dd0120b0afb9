"""Model versions: v1 registered from a run, chains v1 -> v2 -> v3, hashes, lineage, atomic writes,
MODEL arguments, and eval/predict/export/serve reading weights from a version folder."""
import json
import shutil

import pytest

from resforge.checkpoint import load_for_inference, save_checkpoint
from resforge.weightfile import resolve_weights
from resforge.config import RunConfig
from resforge.continual import versions as V
from resforge.models import create_model


def fake_run(root, name="run", classes=("a", "b", "c"), seed=0):
    """A run folder as `resforge train` leaves it (weights + sidecar, config.json, report.json),
    without training: a tiny model saved as is."""
    import torch
    torch.manual_seed(seed)
    run = root / name
    model = create_model("resnet20", num_classes=len(classes), in_chans=1)
    meta = {"model": {"name": "resnet20", "num_classes": len(classes), "in_chans": 1, "kwargs": {}},
            "class_names": list(classes), "input_size": [1, 8, 8], "mean": [0.5], "std": [0.25],
            "config": RunConfig().to_dict(), "data": {"source": "digits", "fingerprint": "f" * 64}}
    save_checkpoint(run / "weights" / "best", model, meta)
    (run / "config.json").write_text(json.dumps(RunConfig().to_dict()))
    (run / "report.json").write_text(json.dumps({"test": {"top1": 0.9, "n": 30, "per_class": [
        {"name": c, "recall": 0.9} for c in classes]}}))
    return run, model, meta


def _child(run, parent, model, meta, tag="x"):
    def build(tmp):
        save_checkpoint(tmp / "weights" / "best", model, meta)
        (tmp / "note.txt").write_text(tag)
        return {"class_names": meta["class_names"], "method": {"name": "naive"}, "config": {},
                "data": parent.data, "images_seen": parent.record["images_seen"] + 5,
                "metrics": {"top1": 0.5}, "accuracy": {}}
    return V.write_version(run, parent=parent, build=build)


def test_version_chain_lineage_and_model_arguments(tmp_path):
    run, model, meta = fake_run(tmp_path)
    assert V.resolve_model(run) == (run, None)            # no versions yet: the caller registers v1
    v1 = V.register_root(run)
    assert (v1.number, v1.parent, v1.class_names) == (1, None, ["a", "b", "c"])
    assert v1.lineage == json.loads((run / "weights" / "best.json").read_text())["weights_sha256"]
    assert v1.record["accuracy"]["d1"]["top1"] == 0.9
    assert V.register_root(run).dir == v1.dir             # idempotent
    v2 = _child(run, v1, model, meta)
    v3 = _child(run, v2, model, meta)
    assert [v.number for v in V.list_versions(run)] == [1, 2, 3]
    assert [v.number for v in V.chain(v3)] == [1, 2, 3]
    assert {v.lineage for v in V.chain(v3)} == {v1.lineage}
    assert v3.parent == 2 and v3.record["images_seen"] == 10
    assert V.resolve_model(run)[1].number == 3            # a run folder: its latest version
    assert V.resolve_model(f"{run}@v2")[1].number == 2
    assert V.resolve_model(run / "versions" / "v1")[1].number == 1
    assert V.resolve_model(f"{run}@latest")[1].number == 3
    with pytest.raises(V.VersionError, match="no model version v7"):
        V.resolve_model(f"{run}@v7")
    # every reader of weights takes a version
    assert resolve_weights(f"{run}@v2") == run / "versions" / "v2" / "weights" / "best.safetensors"
    assert resolve_weights(run / "versions" / "v3") == run / "versions" / "v3" / "weights" / "best.safetensors"
    assert resolve_weights(f"{run}@latest").parent.parent.name == "v3"
    m, meta2 = load_for_inference(f"{run}@v2")
    assert meta2["class_names"] == ["a", "b", "c"]


def test_hand_edited_or_damaged_version_is_refused_naming_the_file(tmp_path):
    run, model, meta = fake_run(tmp_path)
    v2 = _child(run, V.register_root(run), model, meta)
    (v2.dir / "note.txt").write_text("edited")
    with pytest.raises(V.VersionError, match=r"note\.txt was changed after version v2"):
        V.load_version(v2.dir)
    (v2.dir / "note.txt").write_text("x")
    V.load_version(v2.dir)                                 # restored: loads again
    rec = json.loads((v2.dir / "version.json").read_text())
    rec["metrics"]["top1"] = 0.99
    (v2.dir / "version.json").write_text(json.dumps(rec))
    with pytest.raises(V.VersionError, match="edited by hand"):
        V.load_version(v2.dir)
    from resforge.continual.update import versions_table
    assert "v2: DAMAGED, not usable:" in versions_table(run) and "v1       -" in versions_table(run)
    (v2.dir / "version.json").write_text("{not json")
    with pytest.raises(V.VersionError, match="not readable JSON"):
        V.load_version(v2.dir)
    with pytest.raises(V.VersionError, match="no version.json"):
        V.load_version(tmp_path)


def test_a_failed_or_killed_write_leaves_no_version_and_the_next_one_sweeps_it(tmp_path):
    run, model, meta = fake_run(tmp_path)
    v1 = V.register_root(run)

    def dies(tmp):
        save_checkpoint(tmp / "weights" / "best", model, meta)
        raise RuntimeError("killed before the rename")
    with pytest.raises(RuntimeError):
        V.write_version(run, parent=v1, build=dies)
    assert V.version_numbers(run) == [1] and [p.name for p in (run / "versions").iterdir()] == ["v1"]
    stale = run / "versions" / ".v2.tmp-abc123"            # what a SIGKILL leaves: a temporary folder
    (stale / "weights").mkdir(parents=True)
    assert V.version_numbers(run) == [1]
    v2 = _child(run, v1, model, meta)
    assert v2.number == 2 and not stale.exists()
    V.load_version(v1.dir)                                  # the parent is intact


def test_a_version_of_another_run_cannot_be_the_parent(tmp_path):
    run_a, model, meta = fake_run(tmp_path, "a")
    run_b, _, _ = fake_run(tmp_path, "b", seed=1)
    va, vb = V.register_root(run_a), V.register_root(run_b)
    assert va.lineage != vb.lineage
    with pytest.raises(V.VersionError, match="belongs to"):
        _child(run_b, va, model, meta)
    # a version folder copied into another run's lineage is refused by chain()
    shutil.copytree(va.dir, run_b / "versions" / "v9")
    rec = json.loads((run_b / "versions" / "v9" / "version.json").read_text())
    rec.update(version=9, parent=1)
    rec["record_sha256"] = V._record_sha(rec)
    (run_b / "versions" / "v9" / "version.json").write_text(json.dumps(rec))
    with pytest.raises(V.VersionError, match="mixes versions of different models"):
        V.chain(V.load_version(run_b / "versions" / "v9"))
