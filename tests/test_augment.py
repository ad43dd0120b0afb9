"""Batch-wide augmentation ops: shapes, value ranges, determinism, alternating-flip coverage."""
import torch

from resforge.config import AugConfig
from resforge.data.augment import (Augmenter, alternating_flip_mask, cutout, flip_where, mix,
                                   random_resized_crop, random_translate, tta_views)


def gen(seed=0):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def batch(b=16, c=3, h=32, w=32):
    return torch.rand(b, c, h, w, generator=gen(123))


def test_translate_is_a_shift_of_each_image():
    x = batch()
    y = random_translate(x, 2, gen())
    assert y.shape == x.shape
    for i in range(len(x)):  # each output equals the zero-padded input shifted by some (dy, dx)
        xp = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        assert any(torch.equal(y[i], xp[:, dy:dy + 32, dx:dx + 32]) for dy in range(5) for dx in range(5))


def test_ops_are_deterministic_under_a_seed():
    x = batch()
    for op in (lambda g: random_translate(x, 4, g), lambda g: cutout(x, 8, g),
               lambda g: random_resized_crop(x, (24, 24), g)):
        assert torch.equal(op(gen(5)), op(gen(5)))
        assert not torch.equal(op(gen(5)), op(gen(6)))


def test_alternating_flip_covers_both_orientations_over_two_epochs():
    idx = torch.arange(1000)
    m0, m1 = alternating_flip_mask(idx, 0, seed=0), alternating_flip_mask(idx, 1, seed=0)
    assert torch.all(m0 ^ m1)                    # every image flipped in exactly one of the epochs
    assert 0.4 < m0.float().mean() < 0.6         # and about half flipped in each
    assert torch.equal(m0, alternating_flip_mask(idx, 2, seed=0))


def test_flip_and_cutout_ranges():
    x = batch()
    f = flip_where(x, torch.ones(len(x), dtype=torch.bool))
    assert torch.equal(f, x.flip(3))
    c = cutout(x, 8, gen())
    assert c.shape == x.shape and (c == 0).any() and c.max() <= x.max()


def test_random_resized_crop_output_size_and_range():
    x = batch(h=64, w=48)
    y = random_resized_crop(x, (32, 32), gen(), scale=(0.3, 1.0))
    assert y.shape == (16, 3, 32, 32)
    assert y.min() >= x.min() - 1e-5 and y.max() <= x.max() + 1e-5


def test_mixup_and_cutmix_give_soft_targets_that_sum_to_one():
    x, y = batch(), torch.arange(16) % 10
    for kw in ({"mixup": 0.4}, {"cutmix": 1.0}):
        xm, t = mix(x, y, 10, gen(), **kw)
        assert xm.shape == x.shape and t.shape == (16, 10)
        assert torch.allclose(t.sum(1), torch.ones(16))


def test_augmenter_normalises_uint8_batches():
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    aug = Augmenter(AugConfig(flip="alternate", translate=2), [0.5] * 3, [0.25] * 3, 10, (32, 32))
    out, t = aug(x, torch.zeros(8, dtype=torch.long), torch.arange(8), 0, gen())
    assert out.dtype == torch.float32 and out.shape == (8, 3, 32, 32)
    assert out.min() >= -2.0 - 1e-6 and out.max() <= 2.0 + 1e-6
    plain = aug.normalize(x)
    assert torch.allclose(plain * 0.25 + 0.5, x.float() / 255)


def test_tta_views():
    x = batch()
    assert len(tta_views(x)) == 6 and len(tta_views(batch(h=96, w=96))) == 2
    assert all(v.shape == x.shape for v in tta_views(x))
