"""Reading weight files safely, format detection, adaptation and mismatch errors."""

import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from resforge.models import create_model
from resforge.weights import (ArchitectureMismatchError, HeadMismatchError, UnsafeWeightsError,
                              WeightsError, adapt_input_channels, guess_architecture,
                              load_weights, read_state_dict)

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny batches: see conftest


def shared_data() -> Path | None:
    """The read-only shared data folder (env RESFORGE_SHARED_DATA, or shared/ in or beside the repo)."""
    for cand in (os.environ.get("RESFORGE_SHARED_DATA"), ROOT / "shared" / "data",
                 ROOT.parent / "shared" / "data"):
        if cand and Path(cand).is_dir():
            return Path(cand)
    return None


def akamaster(depth: int) -> Path:
    data = shared_data()
    found = sorted(data.glob(f"pretrained/akamaster-resnet{depth}-*.th")) if data else []
    if not found:
        pytest.skip(f"akamaster resnet{depth} weights not in shared data")
    return found[0]


def torchvision_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with real torchvision key names and shapes (1000 classes)."""
    g = torch.Generator().manual_seed(seed)
    keys = json.loads((FIXTURES / f"torchvision_{name}_keys.json").read_text())["keys"]
    return {k: (torch.tensor(0, dtype=torch.long) if k.endswith("num_batches_tracked")
                else torch.randn(shape, generator=g)) for k, shape in keys.items()}


# ----------------------------------------------------------------------------- torchvision layout

@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_keys_load_strict_without_remapping(name):
    sd = torchvision_state_dict(name)
    model = create_model(name)
    ours = model.state_dict()
    assert [(k, list(v.shape)) for k, v in ours.items()] == [(k, list(v.shape)) for k, v in sd.items()]
    model.load_state_dict(sd, strict=True)  # plain PyTorch, no remapping
    result = load_weights(create_model(name), sd)
    assert result.fmt == "torchvision" and not result.missing and not result.unexpected


def test_torchvision_file_in_container_with_module_prefix(tmp_path):
    sd = torchvision_state_dict("resnet18")
    path = tmp_path / "tv.pth"
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 90}, path)
    read, meta, fmt = read_state_dict(path)
    assert fmt == "torchvision" and meta == {"epoch": 90} and read.keys() == sd.keys()
    model = create_model("resnet18", pretrained=path)
    torch.testing.assert_close(model.layer3[1].conv2.weight, sd["layer3.1.conv2.weight"])


def test_safetensors_with_sidecar(tmp_path):
    from resforge.checkpoint import save_checkpoint
    model = create_model("resnet20")
    sd = model.state_dict()
    save_checkpoint(tmp_path / "best", model, {
        "model": {"name": "resnet20", "num_classes": 10, "in_chans": 3, "kwargs": {}}, "epoch": 3,
        "class_names": list("abcdefghij"), "input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3})
    read, meta, fmt = read_state_dict(tmp_path / "best.safetensors")
    assert fmt == "resforge" and meta["epoch"] == 3 and read.keys() == sd.keys()
    (tmp_path / "best.json").write_text(json.dumps({"name": "someone else's JSON"}))
    with pytest.raises(WeightsError, match="best.json: format is null"):   # resforge wrote these weights
        read_state_dict(tmp_path / "best.safetensors")
    save_file(sd, str(tmp_path / "best.safetensors"))                       # someone else's: JSON ignored
    assert read_state_dict(tmp_path / "best.safetensors")[1:] == ({}, "state_dict")
    (tmp_path / "best.json").unlink()
    assert read_state_dict(tmp_path / "best.safetensors")[1:] == ({}, "state_dict")


# ----------------------------------------------------------------------------- in_chans

def test_1_channel_model_sums_rgb_filters():
    sd = torchvision_state_dict("resnet18")
    model = create_model("resnet18", in_chans=1).eval()
    result = load_weights(model, sd)
    assert result.adapted == ["conv1.weight"]
    torch.testing.assert_close(model.conv1.weight, sd["conv1.weight"].sum(1, keepdim=True))
    # a grey image through the 1-channel stem == the same image as (x, x, x) through the RGB stem
    x = torch.randn(2, 1, 32, 32)
    grey = F.conv2d(x, model.conv1.weight, stride=2, padding=3)
    rgb = F.conv2d(x.expand(-1, 3, -1, -1), sd["conv1.weight"], stride=2, padding=3)
    torch.testing.assert_close(grey, rgb, rtol=1e-4, atol=1e-4)


def test_other_channel_counts_tile_and_rescale():
    w = torch.randn(8, 3, 3, 3)
    w5 = adapt_input_channels(w, 5)
    assert w5.shape == (8, 5, 3, 3)
    torch.testing.assert_close(w5, torch.cat([w, w[:, :2]], 1) * 3 / 5)  # tiled cyclically
    # whole tiles: an input that is the same in every channel gives the RGB response
    torch.testing.assert_close(adapt_input_channels(w, 6).sum(1), w.sum(1))
    model = create_model("resnet20", in_chans=4)
    load_weights(model, create_model("resnet20").state_dict())
    assert model.conv1.weight.shape == (16, 4, 3, 3)
    with pytest.raises(WeightsError, match="adapt_in_chans"):
        load_weights(create_model("resnet20", in_chans=1), create_model("resnet20").state_dict(),
                     adapt_in_chans=False)


# ----------------------------------------------------------------------------- head

def test_head_mismatch_says_what_differs_and_how_to_fine_tune():
    sd = torchvision_state_dict("resnet18")
    with pytest.raises(HeadMismatchError) as err:
        load_weights(create_model("resnet18", num_classes=10), sd)
    with pytest.raises(ArchitectureMismatchError):  # a wrong body is reported before the head
        load_weights(create_model("resnet34", num_classes=10), sd)
    msg = str(err.value)
    for part in ["1000 classes", "10 classes", "[1000, 512]", "[10, 512]",
                 "create_model('resnet18', num_classes=10", "head='reset'", "resforge finetune"]:
        assert part in msg, part


def test_head_reset_and_keep_matching(tmp_path):
    sd = torchvision_state_dict("resnet18")
    path = tmp_path / "tv.pth"
    torch.save(sd, path)
    model = create_model("resnet18", num_classes=10, pretrained=path, head="reset")
    assert model.fc.weight.shape == (10, 512)
    torch.testing.assert_close(model.layer4[1].bn2.running_var, sd["layer4.1.bn2.running_var"])
    fresh = create_model("resnet18", num_classes=10)
    before = fresh.fc.weight.clone()
    result = load_weights(fresh, sd, head="keep-matching")  # shape differs: fc kept
    assert torch.equal(fresh.fc.weight, before) and "fc.weight" in result.unexpected
    same = create_model("resnet18")
    load_weights(same, sd, head="keep-matching")  # shape matches: fc loaded
    torch.testing.assert_close(same.fc.weight, sd["fc.weight"])
    with pytest.raises(ValueError, match="head must be"):
        load_weights(same, sd, head="drop")


# ----------------------------------------------------------------------------- architecture

def test_architecture_mismatch_names_the_probable_architecture():
    with pytest.raises(ArchitectureMismatchError) as err:
        load_weights(create_model("resnet34"), torchvision_state_dict("resnet18"))
    msg = str(err.value)
    assert "looks like resnet18" in msg and "missing from the file (" in msg
    assert msg.count("layer") >= 5 and "more)" in msg  # at most 5 listed per kind
    with pytest.raises(ArchitectureMismatchError, match="looks like resnet50"):
        load_weights(create_model("resnet18"), torchvision_state_dict("resnet50"))
    with pytest.raises(ArchitectureMismatchError, match="shape mismatches"):
        load_weights(create_model("resnet18", small_input=True), torchvision_state_dict("resnet18"))


def test_non_strict_loads_the_matching_part():
    sd = torchvision_state_dict("resnet18")
    model = create_model("resnet34")
    result = load_weights(model, sd, strict=False)
    assert "layer3.5.conv1.weight" in result.missing and "layer1.0.conv1.weight" in result.loaded
    torch.testing.assert_close(model.layer1[0].conv1.weight, sd["layer1.0.conv1.weight"])


def test_guess_architecture():
    assert guess_architecture(torchvision_state_dict("resnet18")) == "resnet18"
    assert guess_architecture(torchvision_state_dict("resnet50")) == "resnet50"
    for name in ["resnet34", "resnet101", "resnet152", "resnet110"]:
        with torch.device("meta"):
            assert guess_architecture(create_model(name).state_dict()) == name
    assert guess_architecture({"w": torch.zeros(1)}) is None


def test_guess_architecture_on_akamaster_resnet56():
    sd, _, fmt = read_state_dict(akamaster(56))
    assert fmt == "akamaster" and guess_architecture(sd) == "resnet56"
    raw = torch.load(akamaster(56), map_location="cpu", weights_only=True)["state_dict"]
    assert guess_architecture(raw) == "resnet56"  # module./linear. names too
    with pytest.raises(ArchitectureMismatchError, match="looks like resnet56"):
        load_weights(create_model("resnet20"), akamaster(56))


# ----------------------------------------------------------------------------- real weights

def cifar_train_sample(n: int):
    """First n CIFAR-10 training images (normalised as the akamaster weights expect), or None."""
    data = shared_data()
    if data is None or not (data / "cifar-10-binary.tar.xz").is_file():
        return None
    with tarfile.open(data / "cifar-10-binary.tar.xz", "r|xz") as tf:
        for member in tf:  # data_batch_1.bin comes first: only its head is decompressed
            if member.name.endswith("data_batch_1.bin"):
                raw = tf.extractfile(member).read(3073 * n)
                break
        else:
            return None
    rec = np.frombuffer(raw, np.uint8).reshape(n, 3073)
    x = torch.from_numpy(rec[:, 1:].reshape(n, 3, 32, 32).copy()).float() / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    labels = torch.from_numpy(rec[:, 0].astype(np.int64))
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1), labels


def test_akamaster_resnet20_loads_strict_and_predicts():
    path = akamaster(20)
    sd, meta, fmt = read_state_dict(path)
    assert fmt == "akamaster" and "fc.weight" in sd and meta["best_prec1"] > 90
    model = create_model("resnet20", pretrained=path).eval()  # strict head and architecture
    n_file = sum(v.numel() for k, v in sd.items() if "running" not in k)
    assert n_file == sum(p.numel() for p in model.parameters())
    sample = cifar_train_sample(200)
    with torch.no_grad():
        if sample is None:  # no CIFAR data: at least a confident, varied classifier on noise
            logits = model(torch.randn(8, 3, 32, 32))
            assert torch.isfinite(logits).all() and logits.std() > 0.1
            return
        x, y = sample
        acc = (model(x).argmax(1) == y).float().mean().item()
    # Seen during training; a wrong option-A padding layout gives ~20% here.
    assert acc > 0.9


# ----------------------------------------------------------------------------- unsafe files

class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path, how):
    marker, path = tmp_path / "marker", tmp_path / "evil.pth"
    payload = {"state_dict": {"conv1.weight": torch.zeros(1)}, "x": Exploit(marker)}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(UnsafeWeightsError) as err:
        load_weights(create_model("resnet20"), path)
    msg = str(err.value)
    assert str(path) in msg and "Python objects" in msg and "will not be executed" in msg
    assert "safetensors" in msg
    with pytest.raises(UnsafeWeightsError):
        read_state_dict(path)
    assert not marker.exists()


def test_unreadable_files(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a weights file")
    with pytest.raises(WeightsError, match="bad.pth") as err:
        read_state_dict(bad)
    assert not isinstance(err.value, UnsafeWeightsError)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(WeightsError, match="safetensors"):
        read_state_dict(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "missing.pth")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "nostate.pth")
    with pytest.raises(WeightsError, match="no state dict found"):
        read_state_dict(tmp_path / "nostate.pth")


def test_shortcut_option_mismatch_names_the_option():
    with pytest.raises(ArchitectureMismatchError, match="shortcut='B'"):
        load_weights(create_model("resnet20"), create_model("resnet20", shortcut="B").state_dict())
    with pytest.raises(ArchitectureMismatchError, match="shortcut='A'"):
        load_weights(create_model("resnet20", shortcut="B"), create_model("resnet20").state_dict())


def test_safetensors_detected_by_content(tmp_path):
    sd = create_model("resnet20").state_dict()
    save_file(sd, str(tmp_path / "weights.bin"))
    read, meta, fmt = read_state_dict(tmp_path / "weights.bin")
    assert read.keys() == sd.keys() and meta == {}
