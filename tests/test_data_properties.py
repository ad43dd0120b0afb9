"""Property-based tests (Hypothesis): splits (make_splits) and the augmentation ops.

Splits: disjoint and complete, test never shared with train/val, stratified where possible,
the same under the same seed, and a saved manifest reproduces them whatever seed is passed.
Augmentation: shapes, value ranges and determinism under a seeded generator.
"""
import warnings

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resforge.config import AugConfig
from resforge.data.augment import (Augmenter, alternating_flip_mask, cutout, flip_where, mix,
                                   random_resized_crop, random_translate)
from resforge.data.sources import DataBundle, Split
from resforge.data.splits import make_splits

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- splits

@st.composite
def bundles(draw):
    """A train-only bundle: 2..5 classes of 2..30 items each, in a random order."""
    counts = draw(st.lists(st.integers(2, 30), min_size=2, max_size=5))
    labels = np.repeat(np.arange(len(counts)), counts)
    labels = labels[np.random.default_rng(draw(st.integers(0, 2**16))).permutation(len(labels))]
    split = Split(labels=labels, images=np.zeros((len(labels), 1, 2, 2), np.uint8), files=None,
                  ids=[f"train:{i}" for i in range(len(labels))])
    return DataBundle(name="prop", class_names=[str(k) for k in range(len(counts))],
                      splits={"train": split}, channels=1, image_size=(2, 2), fingerprint="f",
                      rejected=[])


def _splits(bundle, fraction, seed, manifest=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")           # the plain-random fallback warns; fine here
        return make_splits(bundle, fraction, seed, manifest=manifest)


def _valid_fraction(n_train, fraction):
    n = round(fraction * n_train)
    return 1 <= n and 2 * n < n_train             # both carves leave a non-empty train


@FAST
@given(bundles(), st.floats(0.05, 0.45), st.integers(0, 2**31 - 1))
def test_splits_are_disjoint_complete_stable_and_stratified(bundle, fraction, seed):
    labels = bundle.splits["train"].labels
    if not _valid_fraction(len(labels), fraction):
        return
    out, manifest = _splits(bundle, fraction, seed)
    ids = {s: out.splits[s].ids for s in ("train", "val", "test")}
    flat = [i for s in ids.values() for i in s]
    assert sorted(flat) == sorted(bundle.splits["train"].ids) and len(set(flat)) == len(flat)
    assert not set(ids["test"]) & (set(ids["train"]) | set(ids["val"]))
    n = round(fraction * len(labels))
    assert len(ids["test"]) == n and len(ids["val"]) == n
    for s, sp in out.splits.items():                # labels travel with their ids
        assert [labels[int(i.split(":")[1])] for i in sp.ids] == sp.labels.tolist()
    k, counts = len(bundle.class_names), np.bincount(labels)
    if n >= k and len(labels) - n >= k:             # sklearn can stratify the test carve
        got = np.bincount(out.splits["test"].labels, minlength=k)
        assert np.all(np.abs(got - n * counts / len(labels)) < 1 + 1e-9)
    again, m2 = _splits(bundle, fraction, seed)
    assert m2["hash"] == manifest["hash"]           # same seed -> same splits
    reused, m3 = _splits(bundle, 0.3, seed + 1, manifest=manifest)
    assert {s: reused.splits[s].ids for s in ids} == ids and m3["hash"] == manifest["hash"]


@FAST
@given(bundles(), st.floats(0.05, 0.45), st.integers(0, 2**31 - 1))
def test_existing_test_split_is_never_touched(bundle, fraction, seed):
    """A source's own test split stays as it is; val is carved from train only."""
    tr = bundle.splits["train"]
    if not _valid_fraction(len(tr.labels), fraction) or len(tr.labels) < 6:
        return
    cut = len(tr.labels) // 3
    test = Split(labels=tr.labels[:cut], images=tr.images[:cut], files=None,
                 ids=[f"test:{i}" for i in range(cut)])
    train = Split(labels=tr.labels[cut:], images=tr.images[cut:], files=None, ids=tr.ids[cut:])
    b = DataBundle(**{**bundle.__dict__, "splits": {"train": train, "test": test}})
    if round(fraction * len(train.labels)) < 1 or round(fraction * len(train.labels)) >= len(train.labels):
        return
    out, _ = _splits(b, fraction, seed)
    assert out.splits["test"].ids == test.ids
    assert not set(out.splits["val"].ids) & set(test.ids)
    assert sorted(out.splits["train"].ids + out.splits["val"].ids) == sorted(train.ids)


# ---------------------------------------------------------------- augmentation

@st.composite
def batches(draw):
    b, c = draw(st.integers(1, 4)), draw(st.sampled_from([1, 3]))
    h, w = draw(st.integers(2, 12)), draw(st.integers(2, 12))
    x = torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(draw(st.integers(0, 999))))
    return x, draw(st.integers(0, 2**31 - 1))


def gen(seed):
    return torch.Generator().manual_seed(seed)


@FAST
@given(batches(), st.integers(0, 6))
def test_translate_keeps_shape_values_and_is_seeded(xb, pad):
    x, seed = xb
    out = random_translate(x, pad, gen(seed))
    assert out.shape == x.shape
    allowed = torch.cat([x.flatten(), torch.zeros(1)])
    assert torch.isin(out.flatten(), allowed).all()             # pixels moved or zero padding
    assert torch.equal(out, random_translate(x, pad, gen(seed)))


@FAST
@given(batches(), st.integers(0, 8))
def test_cutout_only_zeroes_pixels(xb, size):
    x, seed = xb
    out = cutout(x, size, gen(seed))
    assert out.shape == x.shape
    assert torch.all((out == x) | (out == 0))
    assert torch.equal(out, cutout(x, size, gen(seed)))


@FAST
@given(batches(), st.integers(1, 16), st.integers(1, 16))
def test_resized_crop_shape_range_and_seed(xb, oh, ow):
    x, seed = xb
    out = random_resized_crop(x, (oh, ow), gen(seed))
    assert out.shape == (x.shape[0], x.shape[1], oh, ow)
    eps = 1e-5                                                  # bilinear: convex combinations
    assert out.min() >= x.min() - eps and out.max() <= x.max() + eps
    assert torch.equal(out, random_resized_crop(x, (oh, ow), gen(seed)))


@FAST
@given(batches(), st.integers(0, 5), st.integers(0, 100))
def test_flips_are_involutions_and_alternate(xb, epoch, seed):
    x, _ = xb
    index = torch.arange(x.shape[0])
    m = alternating_flip_mask(index, epoch, seed)
    assert torch.equal(flip_where(flip_where(x, m), m), x)
    assert torch.equal(m, ~alternating_flip_mask(index, epoch + 1, seed))   # each side once per 2 epochs


@FAST
@given(batches(), st.integers(2, 6), st.floats(0.05, 1.0), st.sampled_from(["mixup", "cutmix", "both"]))
def test_mix_targets_are_distributions(xb, k, alpha, which):
    x, seed = xb
    y = torch.randint(0, k, (x.shape[0],), generator=gen(seed))
    mixup, cutmix = (alpha if which != "cutmix" else 0.0), (alpha if which != "mixup" else 0.0)
    xm, t = mix(x, y, k, gen(seed), mixup=mixup, cutmix=cutmix)
    assert xm.shape == x.shape and t.shape == (x.shape[0], k)
    assert torch.allclose(t.sum(1), torch.ones(x.shape[0]), atol=1e-5) and t.min() >= 0
    assert xm.min() >= x.min() - 1e-5 and xm.max() <= x.max() + 1e-5
    xm2, t2 = mix(x, y, k, gen(seed), mixup=mixup, cutmix=cutmix)
    assert torch.equal(xm, xm2) and torch.equal(t, t2)


@FAST
@given(st.integers(0, 2**31 - 1), st.booleans(), st.sampled_from(["random", "alternate", "none"]))
def test_augmenter_is_a_function_of_its_seed(seed, rrc, flip):
    cfg = AugConfig(random_resized_crop=rrc, flip=flip, translate=2, cutout=3)
    aug = Augmenter(cfg, [0.5] * 3, [0.25] * 3, num_classes=3, out_hw=(8, 8), seed=seed)
    x = torch.randint(0, 256, (4, 3, 10, 10), dtype=torch.uint8, generator=gen(seed))
    y, index = torch.tensor([0, 1, 2, 0]), torch.arange(4)
    a, ya = aug(x, y, index, 1, gen(seed))
    b, yb = aug(x, y, index, 1, gen(seed))
    assert a.shape == (4, 3, 8, 8) and torch.equal(a, b) and torch.equal(ya, yb)
    lo, hi = (0 - 0.5) / 0.25, (1 - 0.5) / 0.25                # normalised [0, 1] pixels
    assert a.min() >= min(lo, 0) - 1e-4 and a.max() <= hi + 1e-4
