"""make_splits: stratified carving, disjoint test, manifest round trip and reuse, subset."""
import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from resforge.data import load_manifest, load_source, make_splits, save_manifest, subset
from resforge.data.sources import DataBundle, Split


@pytest.fixture
def digits(tmp_cache):
    return load_source("digits")


def ids(bundle, split):
    return set(bundle.splits[split].ids)


def test_val_carved_stratified_and_disjoint(digits):
    b, m = make_splits(digits, val_fraction=0.1, seed=0)
    assert list(b.splits) == ["train", "val", "test"]
    assert len(b.splits["val"].labels) == 144 and len(b.splits["train"].labels) == 1437 - 144
    assert b.splits["test"].ids == digits.splits["test"].ids               # existing test untouched
    assert not ids(b, "train") & ids(b, "val") and not ids(b, "val") & ids(b, "test")
    counts = np.bincount(b.splits["val"].labels, minlength=10)
    assert counts.min() >= 13 and counts.max() <= 16                       # ~14.4 per class
    v = b.splits["val"]
    src = digits.splits["train"]
    k = src.ids.index(v.ids[3])
    assert np.array_equal(v.images[3], src.images[k]) and v.labels[3] == src.labels[k]
    assert m["source"] == "digits" and m["fingerprint"] == digits.fingerprint and m["seed"] == 0
    assert set(m["splits"]) == {"train", "val", "test"} and len(m["hash"]) == 64


def test_same_seed_same_split_other_seed_differs(digits):
    a = make_splits(digits, seed=1)[1]
    assert make_splits(digits, seed=1)[1]["hash"] == a["hash"]
    assert make_splits(digits, seed=2)[1]["hash"] != a["hash"]


def test_manifest_round_trip_reproduces_splits(digits, tmp_path):
    b, m = make_splits(digits, seed=3)
    save_manifest(tmp_path / "splits.json", m)
    loaded = load_manifest(tmp_path / "splits.json")
    assert loaded == m
    again, m2 = make_splits(digits, seed=99, val_fraction=0.3, manifest={**loaded, "note": 1})
    assert m2["hash"] == m["hash"] and m2["note"] == 1 and m2["seed"] == 3
    for s in ("train", "val", "test"):
        assert again.splits[s].ids == b.splits[s].ids
        assert np.array_equal(again.splits[s].images, b.splits[s].images)
        assert np.array_equal(again.splits[s].labels, b.splits[s].labels)


def test_manifest_with_missing_ids_and_tampering(digits, tmp_path):
    _, m = make_splits(digits)
    m["splits"]["val"] = m["splits"]["val"] + ["digits:99999", "digits:-1"]
    with pytest.raises(ValueError, match=r"2 ids .* missing .*'digits:99999'"):
        make_splits(digits, manifest=m)
    path = tmp_path / "m.json"
    save_manifest(path, make_splits(digits)[1])
    raw = json.loads(path.read_text())
    raw["splits"]["train"].pop()
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="hash does not match"):
        load_manifest(path)


def test_flat_source_gets_test_carved_too(tmp_path, tmp_cache):
    root = tmp_path / "flat"
    for c in ("x", "y"):
        (root / c).mkdir(parents=True)
        for i in range(20):
            Image.new("L", (4, 4), i * 10 + (c == "y")).save(root / c / f"{i}.png")
    b, m = make_splits(load_source(root), val_fraction=0.2, seed=0)
    sizes = {s: len(sp.labels) for s, sp in b.splits.items()}
    assert sizes == {"train": 24, "val": 8, "test": 8}
    assert np.bincount(b.splits["test"].labels).tolist() == [4, 4]
    assert not ids(b, "test") & (ids(b, "train") | ids(b, "val"))
    assert b.splits["test"].files[0].endswith(".png")


def tiny_bundle(labels):
    n = len(labels)
    split = Split(labels=np.array(labels), images=np.zeros((n, 1, 2, 2), np.uint8), files=None,
                  ids=[f"i{k}" for k in range(n)])
    return DataBundle("tiny", ["a", "b", "c"], {"train": split}, 1, (2, 2), "f" * 64, [])


def test_singleton_class_falls_back_with_warning():
    with pytest.warns(UserWarning, match="stratified split impossible"):
        b, _ = make_splits(tiny_bundle([0] * 10 + [1] * 9 + [2]), val_fraction=0.2)
    assert sum(len(sp.labels) for sp in b.splits.values()) == 20


def test_bad_val_fraction():
    with pytest.raises(ValueError, match="val_fraction"):
        make_splits(tiny_bundle([0, 1] * 5), val_fraction=0.0)


def test_subset_count_fraction_per_class(digits):
    small = subset(digits, "train", 100, seed=0)
    assert len(small.splits["train"].labels) == 100 and small.splits["test"] is digits.splits["test"]
    assert np.bincount(small.splits["train"].labels).min() >= 9
    assert len(subset(digits, "train", 0.5).splits["train"].labels) == 718
    few = subset(digits, "train", 5, seed=1, per_class=True).splits["train"]
    assert np.bincount(few.labels).tolist() == [5] * 10
    assert few.ids == sorted(few.ids, key=digits.splits["train"].ids.index)   # order kept
    with pytest.raises(ValueError, match="fraction"):
        subset(digits, "train", 1.5)
    assert dataclasses.is_dataclass(small)
