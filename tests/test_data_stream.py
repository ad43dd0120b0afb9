"""stream=True folders and FileImageDataset through a DataLoader with worker processes."""
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from resforge.data import FileImageDataset, ImageError, load_source


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "s"
    for c, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        (root / c).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (20, 12), colour).save(root / c / f"{i}.png")
    return root


def test_streamed_bundle_has_files_not_images(tree, tmp_cache):
    b = load_source(tree, stream=True)
    sp = b.splits["train"]
    assert sp.images is None and len(sp.files) == 10 and sp.labels.tolist() == [0] * 5 + [1] * 5
    assert b.image_size == (12, 20) and b.channels == 3 and b.extra["fingerprint_kind"] == "metadata"
    assert not list(tmp_cache.rglob("*.u8"))           # no decoded tensor cached (only a memo)


def test_decode_check_is_memoised_until_the_tree_changes(tree, tmp_cache, monkeypatch):
    import resforge.data.folder as folder_mod
    calls = []
    real = folder_mod.verify_image
    monkeypatch.setattr(folder_mod, "verify_image", lambda p: calls.append(p) or real(p))
    first = load_source(tree, stream=True)
    assert len(calls) == 10
    assert load_source(tree, stream=True).rejected == first.rejected and len(calls) == 10
    (tree / "red" / "4.png").write_bytes(b"broken")  # size changes: the listing key changes
    assert [r["id"] for r in load_source(tree, stream=True).rejected] == ["red/4.png"]
    assert len(calls) == 20


def test_dataloader_with_workers(tree, tmp_cache):
    b = load_source(tree, stream=True, image_size=(8, 8), channels=3)
    ds = FileImageDataset.from_split(b, "train")
    batches = list(DataLoader(ds, batch_size=4, num_workers=2))
    x = torch.cat([xb for xb, _ in batches])
    y = torch.cat([yb for _, yb in batches])
    assert x.shape == (10, 3, 8, 8) and x.dtype == torch.uint8
    assert y.tolist() == [0] * 5 + [1] * 5
    assert x[:5, 2].float().mean() > 250 and x[5:, 0].float().mean() > 250   # blue=0, red=1


def test_unreadable_file_is_rejected_at_load_not_in_a_worker(tree, tmp_cache):
    (tree / "red" / "9.png").write_bytes(b"")         # passes listing, fails the load-time decode
    b = load_source(tree, stream=True, image_size=(8, 8), channels=1)
    assert [r["id"] for r in b.rejected] == ["red/9.png"] and len(b.splits["train"].files) == 10
    ds = FileImageDataset.from_split(b, "train")
    (tree / "red" / "0.png").write_bytes(b"")         # broken after the load: still names the file
    loader = iter(DataLoader(ds, batch_size=4, num_workers=2))
    with pytest.raises(ImageError, match="0.png"):
        list(loader)
    loader._shutdown_workers()        # now, not when pytest drops the traceback (slow there)
