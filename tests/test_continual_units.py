"""Pieces of continual learning, without training: head growth and class matching, the replay
buffer (selection, persistence, hostile files), the replay batches and the method losses."""
import json

import numpy as np
import pytest
import torch

from resforge.continual import buffer as B
from resforge.continual import head as H
from resforge.continual import methods as M
from resforge.models import create_model

LIN = "a" * 64


@pytest.mark.parametrize("name", ["resnet20", "airbench94"])
def test_growing_the_head_keeps_old_logits_bit_for_bit(name):
    torch.manual_seed(0)
    c = 3 if name == "airbench94" else 1
    model = create_model(name, num_classes=4, in_chans=c).eval()
    x = torch.randn(5, c, 16, 16)
    before = model(x)
    H.grow_head(model, 3)
    after = model(x)
    assert after.shape == (5, 7) and model.fc.out_features == 7
    assert torch.equal(after[:, :4], before)                    # not close: identical
    norms = model.fc.weight.norm(dim=1)
    assert torch.allclose(norms[4:], norms[:4].mean().expand(3), rtol=1e-5)


def test_weight_aligning_matches_new_row_norms_to_old():
    model = create_model("resnet20", num_classes=6, in_chans=1)
    with torch.no_grad():
        model.fc.weight[4:] *= 5
    old = model.fc.weight[:4].clone()
    gamma = H.align_weights(model, 4)
    n = model.fc.weight.norm(dim=1)
    assert gamma < 1 and torch.allclose(n[4:].mean(), n[:4].mean(), rtol=1e-5)
    assert torch.equal(model.fc.weight[:4], old)
    assert H.align_weights(model, 6) is None                   # no new classes: nothing to align


def test_classes_are_matched_by_name_and_ambiguous_clashes_need_a_word():
    r = H.reconcile(["cat", "dog"], ["dog", "bird", "cat"])
    assert r.class_names == ["cat", "dog", "bird"] and r.head_index == [1, 2, 0] and r.added == ["bird"]
    with pytest.raises(H.ClassClashError, match=r"--merge 'Cat =cat'.*--rename 'cat=<another name>'"):
        H.reconcile(["cat", "dog"], ["Cat ", "fox"])
    merged = H.reconcile(["cat", "dog"], ["Cat ", "fox"], merge={"Cat ": "cat"})
    assert merged.head_index == [0, 2] and merged.class_names == ["cat", "dog", "fox"]
    renamed = H.reconcile(["cat", "dog"], ["Cat ", "fox"], rename={"cat": "cat_old"})
    assert renamed.class_names == ["cat_old", "dog", "Cat ", "fox"] and renamed.renamed == {"cat": "cat_old"}
    with pytest.raises(H.ClassClashError, match="differ only in case"):
        H.reconcile(["x"], ["sea lion", "Sea_Lion"])
    with pytest.raises(H.ClassClashError, match="has no class 'wolf'"):
        H.reconcile(["cat"], ["dog"], rename={"wolf": "w"})
    with pytest.raises(H.ClassClashError, match="NAME=NAME"):
        H.parse_pairs(["catdog"], "--merge")


def _offer(classes, per_class, shape=(1, 4, 4), k=None, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.asarray(classes), per_class)
    images = rng.integers(0, 256, (len(labels), *shape), dtype=np.uint8)
    k = k or max(classes) + 1
    return images, labels.astype(np.int64), rng.normal(size=(len(labels), k)).astype(np.float32)


def test_buffer_is_class_balanced_and_shrinks_fairly_when_classes_arrive():
    names = [str(i) for i in range(4)]
    buf = B.empty((1, 4, 4), names[:2], LIN, 40)
    x, y, lg = _offer([0, 1], 50, k=2)
    buf = B.update(buf, x, y, lg)
    assert buf.counts() == {"0": 20, "1": 20}
    buf = B.grow_classes(buf, names)
    assert buf.logits.shape == (40, 4) and (buf.logits[:, 2:] == 0).all() and (buf.logit_k == 2).all()
    x2, y2, lg2 = _offer([2, 3], 50, k=4, seed=1)
    buf = B.update(buf, x2, y2, lg2)
    assert buf.counts() == {n: 10 for n in names} and len(buf) == 40
    assert sorted(set(buf.logit_k.tolist())) == [2, 4]
    assert buf.seen == {"0": 50, "1": 50, "2": 50, "3": 50}


def test_reservoir_gives_every_offered_image_the_same_chance():
    hits = np.zeros(100)
    for s in range(300):
        buf = B.empty((1, 1, 1), ["0"], LIN, 10, seed=s)
        for part in range(4):            # 100 images of one class offered in 4 updates
            ids = np.arange(25 * part, 25 * part + 25)
            x = ids.astype(np.uint8).reshape(-1, 1, 1, 1)
            buf = B.update(buf, x, np.zeros(25, np.int64), np.zeros((25, 1), np.float32))
        hits[buf.images.reshape(-1)] += 1
    share = hits / 300                   # each should be in the buffer 10% of the time
    assert abs(share[:25].mean() - share[75:].mean()) < 0.04 and abs(share.mean() - 0.1) < 1e-9


def test_herding_picks_the_images_nearest_the_class_mean_first():
    f = np.array([[1, 0.3], [1, -0.3], [1, 0.0], [0.2, 1]], np.float32)
    order = B.herding_order(f, 3)
    u = f / np.linalg.norm(f, axis=1, keepdims=True)
    assert order[0] == np.argmin(np.linalg.norm(u - u.mean(0), axis=1)) == 0
    assert order[:2] == [0, 2] and len(set(order)) == 3    # then the one that pulls the mean back
    buf = B.empty((1, 1, 1), ["0"], LIN, 3, selection="herding")
    x = np.arange(4, dtype=np.uint8).reshape(4, 1, 1, 1)
    buf = B.update(buf, x, np.zeros(4, np.int64), np.zeros((4, 1), np.float32), f)
    assert buf.images.reshape(-1).tolist() == [x[i, 0, 0, 0] for i in order]


def test_buffer_file_round_trip_and_hostile_files_are_refused(tmp_path):
    buf = B.empty((1, 4, 4), ["0", "1"], LIN, 20)
    buf = B.update(buf, *_offer([0, 1], 15, k=2))
    path = B.save(buf, tmp_path / "buffer.safetensors")
    back = B.load(path, lineage=LIN, class_names=["0", "1", "2"], image_shape=(1, 4, 4))
    for a in ("images", "labels", "logits", "logit_k"):
        assert np.array_equal(getattr(back, a), getattr(buf, a))
    assert (back.seen, back.capacity, back.selection) == (buf.seen, 20, "reservoir")
    assert b"pickle" not in path.read_bytes()[:8] and path.read_bytes()[8:9] == b"{"     # safetensors header
    with pytest.raises(B.BufferError, match="belongs to model lineage aaaaaaaaaaaa..., not bbbbbbbbbbbb"):
        B.load(path, lineage="b" * 64)
    with pytest.raises(B.BufferError, match="holds \\[1, 4, 4\\] images but the model takes"):
        B.load(path, image_shape=(3, 4, 4))
    with pytest.raises(B.BufferError, match="is for classes"):
        B.load(path, class_names=["x", "y"])
    from safetensors.numpy import save as np_save
    meta = json.dumps({"format_version": 1, "lineage": LIN, "class_names": ["0", "1"], "capacity": 20,
                       "selection": "reservoir", "seen": {}})
    good = {"images": buf.images, "labels": buf.labels, "logits": buf.logits, "logit_k": buf.logit_k}
    cases = {"labels must be int64 class indices": {**good, "labels": buf.labels + 5},
             "logits must be finite": {**good, "logits": np.full_like(buf.logits, np.nan)},
             "has no 'logit_k'": {k: v for k, v in good.items() if k != "logit_k"}}
    for words, tensors in cases.items():
        (tmp_path / "bad.safetensors").write_bytes(np_save(tensors, metadata={"resforge": "replay-buffer", "meta": meta}))
        with pytest.raises(B.BufferError, match=words):
            B.load(tmp_path / "bad.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(B.BufferError, match="not a safetensors file"):
        B.load(tmp_path / "junk.safetensors")


class _Batches:
    def __init__(self, n=6, bs=3):
        self.x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1)
        self.y, self.bs = torch.zeros(n, dtype=torch.long), bs

    def __len__(self):
        return len(self.y) // self.bs

    @property
    def num_images(self):
        return len(self.y)

    def batches(self, g=None):
        for i in range(len(self)):
            idx = torch.arange(i * self.bs, (i + 1) * self.bs)
            yield self.x[idx], self.y[idx], idx


def test_replay_batches_append_buffer_rows_that_losses_can_find():
    buf = {"images": torch.full((4, 1, 1, 1), 200, dtype=torch.uint8), "labels": torch.tensor([1, 1, 2, 2]),
           "logits": torch.zeros(4, 3), "logit_k": torch.tensor([2, 2, 3, 3])}
    rb = M.ReplayBatches(_Batches(), buf, per_step=2)
    g = torch.Generator().manual_seed(0)
    x, y, idx = next(rb.batches(g))
    assert len(x) == 5 and (x[3:] == 200).all() and (idx[3:] >= 6).all() and len(rb) == 2
    rep = M.is_replayed(idx, rb.offset)
    assert rep.tolist() == [False] * 3 + [True] * 2
    ce = torch.nn.functional.cross_entropy
    logits = torch.zeros(5, 3, requires_grad=True)
    target = y
    base = M.derpp_loss(ce, buf, rb.offset, alpha=0.0, beta=0.0)(logits, target, None, (x, y, idx))
    assert torch.allclose(base, ce(logits[:3], target[:3]))
    with_mse = M.derpp_loss(ce, buf, rb.offset, alpha=1.0, beta=0.0)
    shifted = torch.zeros(5, 3)
    shifted[3:, :] = 1.0                  # replayed rows 1 away from their stored (zero) logits
    assert torch.allclose(with_mse(shifted, target, None, (x, y, idx)) - ce(shifted[:3], target[:3]), torch.tensor(1.0))


def test_classes_declared_without_any_image_are_not_counted_as_too_few():
    """An .npz of task 2 with labels 5..9 and no class_names declares '0'..'9'; the empty 0..4 are not
    classes it brings (they match the old ones by name), but a class with one image still is refused."""
    from types import SimpleNamespace as NS
    import numpy as np
    from resforge.continual.update import _few
    names = [str(i) for i in range(10)]
    b = NS(class_names=names, splits={"train": NS(labels=np.repeat(np.arange(5, 10), 4)),
                                      "test": NS(labels=np.arange(5, 10))})
    assert _few(b, "train", 2) == []
    b.splits["test"] = NS(labels=np.array([0, 5]))           # '0' has a test image but no training image
    assert _few(b, "train", 2) == [("0", 0)]
