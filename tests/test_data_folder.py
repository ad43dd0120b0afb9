"""ImageFolder sources: layouts, defaults, rejected/ignored files, empty classes, the cache."""
import numpy as np
import pytest
from PIL import Image

import resforge.data.folder as folder_mod
from resforge.data import load_source


def png(path, value, size=(16, 16), mode="RGB"):
    """Solid-colour image file; value is a grey level or an RGB tuple."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size[1], size[0]), value).save(path)
    return path


def broken_files(folder):
    """A corrupt JPEG, a zero-byte PNG, a text file named .png: three rejects."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(200)))
    (folder / "zero.png").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")


@pytest.fixture
def flat_tree(tmp_path):
    root = tmp_path / "pets"
    for i in range(4):
        png(root / "cat" / f"c{i}.png", (200, 10 * i, 0))
        png(root / "dog" / f"d{i}.jpg", 30 * i)                       # RGB JPEG
    png(root / "dog" / "big.png", 90, size=(24, 20))                 # odd size: resized
    png(root / "dog" / "sub" / "deep.png", 60)                       # nested folders count
    noisy = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(root / "dog" / "d1x.png")
    cut = (root / "dog" / "d1x.png").read_bytes()
    (root / "dog" / "d1x.png").write_bytes(cut[: len(cut) // 2])      # header fine, data truncated
    broken_files(root / "cat")
    (root / "cat" / ".hidden.png").write_bytes(b"x")
    (root / "cat" / "labels.csv").write_text("a,b")
    (root / ".git").mkdir()
    (root / "README.md").write_text("hi")
    return root


def test_flat_tree(flat_tree, tmp_cache):
    b = load_source(flat_tree)
    assert b.name == "pets" and b.class_names == ["cat", "dog"] and set(b.splits) == {"train"}
    tr = b.splits["train"]
    assert tr.images.shape == (10, 3, 16, 16) and b.image_size == (16, 16) and b.channels == 3
    assert tr.labels.tolist() == [0] * 4 + [1] * 6
    assert "dog/sub/deep.png" in tr.ids and tr.files[0].endswith("cat/c0.png")
    reasons = {r["id"]: r["reason"] for r in b.rejected}
    assert set(reasons) == {"cat/corrupt.jpg", "cat/zero.png", "cat/notes.png", "dog/d1x.png"}
    assert "empty" in reasons["cat/zero.png"] and "truncated" in reasons["dog/d1x.png"]
    d2 = tr.ids.index("dog/d2.jpg")                                  # rows after the reject kept aligned
    assert abs(int(tr.images[d2, 0, 8, 8]) - 60) <= 2
    assert b.extra["ignored"] == 4     # .hidden.png, labels.csv, .git, README.md
    assert tr.images[0, :, 8, 8].tolist() == [200, 0, 0]


def test_split_layout_valid_dir_and_class_union(tmp_path, tmp_cache):
    root = tmp_path / "ds"
    png(root / "train" / "a" / "1.png", 10, mode="L")
    png(root / "train" / "b" / "1.png", 20, mode="L")
    png(root / "valid" / "a" / "1.png", 30, mode="L")
    png(root / "test" / "c" / "1.png", 40, mode="L")
    b = load_source(root)
    assert b.class_names == ["a", "b", "c"] and set(b.splits) == {"train", "val", "test"}
    assert b.splits["val"].ids == ["valid/a/1.png"] and b.splits["test"].labels.tolist() == [2]
    assert b.channels == 1                                           # every image is grayscale


def test_requested_size_and_channels(flat_tree, tmp_cache):
    b = load_source(flat_tree, image_size=(8, 12), channels=1)
    assert b.splits["train"].images.shape == (10, 1, 8, 12) and b.image_size == (8, 12)


def test_most_common_size_wins(tmp_path, tmp_cache):
    root = tmp_path / "sizes"
    for i in range(3):
        png(root / "a" / f"{i}.png", 5, size=(10, 20))
    png(root / "a" / "odd.png", 5, size=(30, 30))
    png(root / "b" / "odd.png", 5, size=(30, 30))
    assert load_source(root).image_size == (10, 20)


def test_empty_class_is_an_error_naming_it(tmp_path, tmp_cache):
    root = tmp_path / "ds"
    png(root / "good" / "1.png", 1)
    broken_files(root / "broken")
    with pytest.raises(ValueError, match="'broken' has no valid images.*3 rejected"):
        load_source(root)
    (root / "empty").mkdir()
    for f in (root / "broken").iterdir():
        f.unlink()
    (root / "broken").rmdir()
    with pytest.raises(ValueError, match="'empty' has no valid images"):
        load_source(root)


def test_mixed_split_and_class_dirs_rejected(tmp_path, tmp_cache):
    png(tmp_path / "ds" / "train" / "a" / "1.png", 1)
    png(tmp_path / "ds" / "cats" / "1.png", 1)
    with pytest.raises(ValueError, match="mixes split folders"):
        load_source(tmp_path / "ds")


def test_second_load_uses_cache_without_decoding(flat_tree, tmp_cache, monkeypatch):
    calls = []
    real = folder_mod.decode_image
    monkeypatch.setattr(folder_mod, "decode_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = load_source(flat_tree)
    n_decoded = len(calls)
    assert n_decoded == 11                      # 3 broken files fail the header probe, d1x.png later
    second = load_source(flat_tree)
    assert len(calls) == n_decoded              # nothing decoded again
    assert isinstance(second.splits["train"].images, np.memmap)
    assert second.splits["train"].images.flags.writeable is False
    assert np.array_equal(first.splits["train"].images, second.splits["train"].images)
    assert second.fingerprint == first.fingerprint and second.rejected == first.rejected
    assert (tmp_cache / first.fingerprint / "train.u8").is_file()
    assert (tmp_cache / first.fingerprint / "meta.json").is_file()
    load_source(flat_tree, image_size=8)        # other settings: a new entry, decoded again
    assert len(calls) > n_decoded


def test_fingerprint_follows_content(flat_tree, tmp_cache):
    before = load_source(flat_tree).fingerprint
    png(flat_tree / "cat" / "c0.png", (0, 0, 255))
    after = load_source(flat_tree)
    assert after.fingerprint != before and after.splits["train"].images[0, :, 0, 0].tolist() == [0, 0, 255]
