"""weightfile.read_weights_file: what a weights file is, for every loader that reads one."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from resforge.artifact import ArtifactError
from resforge.checkpoint import load_for_inference, save_checkpoint
from resforge.config import load_config
from resforge.finetune.source import read_pretrained
from resforge.models import create_model
from resforge.pipeline import build_model
from resforge.weightfile import CIFAR10_CLASSES, IMAGENET_MEAN, IMAGENET_STD, read_weights_file
from resforge.weights import WeightsError

FIXTURES = Path(__file__).parent / "fixtures"
pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: see conftest

META = {"model": {"name": "resnet20", "num_classes": 3, "in_chans": 1, "kwargs": {"shortcut": "B"}},
        "class_names": ["cat", "dog", "owl"], "input_size": [1, 16, 16], "mean": [0.3], "std": [0.2],
        "epoch": 1}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run-like folder holding a resforge checkpoint: weights/best.safetensors + best.json."""
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    save_checkpoint(root / "weights" / "best", create_model("resnet20", num_classes=3, in_chans=1, shortcut="B"),
                    META)
    return root


def test_resforge_checkpoint_is_described_by_its_sidecar(run):
    wf = read_weights_file(run)                                   # the run folder resolves to best.safetensors
    assert wf.path == run / "weights" / "best.safetensors" and wf.fmt == "resforge"
    assert (wf.arch, wf.kwargs, wf.num_classes, wf.in_chans) == ("resnet20", {"shortcut": "B"}, 3, 1)
    assert wf.class_names == ["cat", "dog", "owl"] and (wf.mean, wf.std) == ([0.3], [0.2])
    assert wf.input_size == [1, 16, 16] and not wf.assumed_preprocessing and wf.meta["epoch"] == 1
    assert wf.state_dict["fc.weight"].shape == (3, 64)
    assert read_weights_file(run, "resnet20").arch == "resnet20"
    with pytest.raises(WeightsError, match="holds a resnet20, not a resnet56"):
        read_weights_file(run, "resnet56")
    # every loader sees the same file
    assert read_pretrained(run).kwargs == {"shortcut": "B"} and read_pretrained(run).class_names == wf.class_names
    assert load_for_inference(run)[1]["mean"] == wf.mean
    cfg = load_config(None, {"model.name": "resnet20", "model.shortcut": "B", "model.pretrained": str(run)})
    _, _, pre = build_model(cfg, num_classes=3, in_chans=1)
    assert pre == {"mean": [0.3], "std": [0.2]}


@pytest.mark.parametrize("edit,field", [
    (lambda m: m["model"].update(kwargs={"pretrained": "/etc/passwd"}), "model.kwargs"),
    (lambda m: m["model"].update(name="os.system"), "model.name"),
    (lambda m: m.update(class_names=["cat"]), "class_names"),
    (lambda m: m.update(std=[0.0]), "std"),
])
def test_hostile_sidecar_is_refused(run, tmp_path, edit, field):
    folder = tmp_path / "hostile" / "weights"
    folder.mkdir(parents=True)
    (folder / "best.safetensors").write_bytes((run / "weights" / "best.safetensors").read_bytes())
    meta = json.loads((run / "weights" / "best.json").read_text())
    edit(meta)
    (folder / "best.json").write_text(json.dumps(meta))
    with pytest.raises(WeightsError) as e:
        read_weights_file(folder.parent)
    assert str(folder / "best.json") in str(e.value) and field in str(e.value)


def test_bare_safetensors_architecture_and_variant_guessed_from_keys(tmp_path):
    path = tmp_path / "bare.safetensors"
    save_file(create_model("resnet20", num_classes=7, shortcut="B").state_dict(), str(path))
    wf = read_weights_file(path)
    assert (wf.fmt, wf.arch, wf.kwargs, wf.num_classes, wf.in_chans) == ("state_dict", "resnet20",
                                                                         {"shortcut": "B"}, 7, 3)
    assert wf.class_names is None and wf.assumed_preprocessing and wf.meta == {}
    assert (wf.mean, wf.std, wf.input_size) == (IMAGENET_MEAN, IMAGENET_STD, [3, 32, 32])
    with pytest.raises(WeightsError, match="bare.safetensors: its keys need plain20 built with .'shortcut': 'B'"):
        read_weights_file(path, "plain20")                              # plain nets have no projections
    with pytest.raises(WeightsError, match="holds resnet20 weights .by its layer keys., not resnet56"):
        read_weights_file(path, "resnet56")
    model, meta = load_for_inference(path)                              # projection shortcuts built
    assert meta["model"]["kwargs"] == {"shortcut": "B"} and meta["preprocessing"]["assumed"]


def test_plain_and_residual_twins_share_keys(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file(create_model("resnet20").state_dict(), str(path))        # option A: parameter-free shortcuts
    assert read_weights_file(path).arch == "resnet20"
    assert read_weights_file(path, "plain20").arch == "plain20"         # same keys: the caller decides


def test_unrecognised_keys_need_a_model_name(tmp_path):
    path = tmp_path / "fast.safetensors"
    save_file(create_model("airbench94", num_classes=10).state_dict(), str(path))
    wf = read_weights_file(path)
    assert wf.arch is None and wf.input_size is None
    with pytest.raises(WeightsError, match="cannot tell which architecture .* pass --model NAME"):
        wf.require_arch()
    named = read_weights_file(path, "airbench94")
    assert named.arch == "airbench94" and named.kwargs == {} and named.input_size == [3, 32, 32]


def test_torchvision_key_layout_in_a_container(tmp_path):
    g = torch.Generator().manual_seed(0)
    keys = json.loads((FIXTURES / "torchvision_resnet18_keys.json").read_text())["keys"]
    sd = {k: (torch.tensor(0) if k.endswith("num_batches_tracked") else torch.randn(shape, generator=g))
          for k, shape in keys.items()}
    path = tmp_path / "tv.pth"
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 90}, path)
    wf = read_weights_file(path)
    assert (wf.fmt, wf.arch, wf.kwargs, wf.num_classes, wf.in_chans) == ("torchvision", "resnet18", {}, 1000, 3)
    assert wf.meta == {"epoch": 90} and wf.input_size == [3, 224, 224] and wf.class_names is None
    assert set(wf.state_dict) == set(sd)                                # the module. prefix is gone
    pre = read_pretrained(path)
    assert (pre.arch, pre.kwargs, pre.input_size, pre.mean) == ("resnet18", {}, [3, 224, 224], IMAGENET_MEAN)


def test_small_input_imagenet_stem_and_akamaster_layout(tmp_path):
    small = tmp_path / "small.pt"
    torch.save(create_model("resnet18", num_classes=5, small_input=True).state_dict(), small)
    assert read_weights_file(small).kwargs == {"small_input": True}
    sd = create_model("resnet20").state_dict()                         # akamaster: module. prefix, linear head
    aka = {f"module.{'linear' + k[2:] if k.startswith('fc.') else k}": v for k, v in sd.items()
           if not k.endswith("num_batches_tracked")}
    path = tmp_path / "resnet20.th"
    torch.save({"best_prec1": 91.7, "state_dict": aka}, path)
    wf = read_weights_file(path)
    assert (wf.fmt, wf.arch, wf.num_classes) == ("akamaster", "resnet20", 10)
    assert wf.class_names == CIFAR10_CLASSES and wf.meta == {"best_prec1": 91.7}
    assert "fc.weight" in wf.state_dict and "linear.weight" not in wf.state_dict


def test_third_party_stem_with_too_many_channels_is_refused(tmp_path):
    path = tmp_path / "wide.safetensors"
    save_file(create_model("resnet20", in_chans=65).state_dict(), str(path))
    with pytest.raises(ArtifactError, match="wide.safetensors: conv1.weight takes 65 input channels, outside 1..64"):
        read_weights_file(path)


def test_a_run_no_update_has_versioned_is_its_own_v1(tmp_path):
    """RUN@v1 / RUN@latest before the first update (which registers the run as v1) is the run
    folder; a run trained without a validation split has only weights/last.safetensors."""
    from resforge.weightfile import resolve_weights, version_folder
    run = tmp_path / "run"
    torch.manual_seed(0)
    save_checkpoint(run / "weights" / "last", create_model("resnet20", num_classes=3, in_chans=1), META)
    (run / "config.json").write_text("{}")
    assert version_folder(f"{run}@v1") == run and version_folder(f"{run}@latest") == run
    assert resolve_weights(f"{run}@v1") == run / "weights" / "last.safetensors"
    with pytest.raises(FileNotFoundError, match="no model version v2"):
        version_folder(f"{run}@v2")
