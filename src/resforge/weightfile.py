"""What a weights file is: architecture, state dict, classes and preprocessing, read in one place.

    wf = read_weights_file("runs/cifar10/")          # run folder, weights folder or file
    wf.fmt, wf.arch, wf.kwargs, wf.num_classes, wf.in_chans, wf.class_names, wf.mean, wf.input_size

Inference (checkpoint.load_for_inference), fine-tuning (finetune/source.py) and training from
weights (pipeline.build_model) all start here. The reading itself is weights.read_state_dict's
(never unpickles; a resforge sidecar comes back verified against the weights and validated by
artifact.validate_meta); this module adds what the file means:

  resforge checkpoints   everything comes from the sidecar (allow-listed model.kwargs included)
  third-party files      torchvision/timm ImageNet ResNets, akamaster CIFAR ResNets, bare state
                         dicts: the architecture and builder variants are read from the keys, the
                         preprocessing is assumed to be ImageNet's (what those nets were trained on)
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from resforge import artifact
from resforge.models import check_settings, create_model
from resforge.models.resnet import norm_stats
from resforge.weights import WeightsError, guess_architecture, read_state_dict

IMAGENET_MEAN, IMAGENET_STD = list(norm_stats(3)[0]), list(norm_stats(3)[1])
# akamaster/pytorch_resnet_cifar10 files hold CIFAR-10 nets; their outputs are in its class order.
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class WeightsFile:
    """One weights file, read and identified."""
    path: Path
    fmt: str                              # resforge | torchvision | akamaster | state_dict
    state_dict: dict = field(repr=False)  # resforge key names (wrapper prefixes stripped)
    meta: dict                            # the validated sidecar (resforge), else scalars stored beside the tensors
    arch: str | None                      # registry name; None: neither sidecar, keys nor caller say
    kwargs: dict                          # builder settings (small_input, shortcut, drop_rate, ...)
    num_classes: int | None               # rows of the file's head; None: it has no fc
    in_chans: int                         # input channels of the file's stem
    class_names: list[str] | None         # the head's classes in output order, when known
    mean: list[float]                     # per-channel input normalisation on the 0..1 scale
    std: list[float]
    input_size: list[int] | None          # (C, H, W) the weights were trained at; None with arch None
    assumed_preprocessing: bool           # True: mean/std are ImageNet's by assumption (no sidecar)

    def require_arch(self) -> str:
        """The architecture, or a clear error saying how to name it."""
        if self.arch is None:
            raise WeightsError(f"cannot tell which architecture {self.path} holds: pass --model NAME "
                               "(see `resforge models`)")
        return self.arch


VERSION_REF = re.compile(r"(.+)@(v[1-9][0-9]{0,5}|latest)")       # RUN@v3, RUN@latest


def version_folder(source: str | Path) -> Path | None:
    """RUN@vN -> RUN/versions/vN, RUN@latest -> the run's newest version (continual/versions.py
    lays them out); None when `source` is not of that form (or is an existing path). A run that no
    update has versioned yet is its own v1 (the first update registers it as such): RUN@v1 and
    RUN@latest are then the run folder."""
    m = VERSION_REF.fullmatch(str(source))
    if m is None or Path(source).exists():
        return None
    run, tag = Path(m.group(1)), m.group(2)
    if tag in ("v1", "latest") and not (run / "versions").is_dir() and (run / "config.json").is_file():
        return run
    if tag == "latest":
        root = run / "versions"
        numbers = sorted(int(p.name[1:]) for p in root.iterdir()
                         if re.fullmatch(r"v[1-9][0-9]{0,5}", p.name) and p.is_dir()) if root.is_dir() else []
        if not numbers:
            raise FileNotFoundError(f"{run} has no model versions ({source}): make one with `resforge update "
                                    f"{run} --data NEW`, or pass the run folder itself")
        return root / f"v{numbers[-1]}"
    folder = run / "versions" / tag
    if not folder.is_dir():
        raise FileNotFoundError(f"{run} has no model version {tag} ({source}); list them with "
                                f"`resforge versions {run}`")
    return folder


def resolve_weights(source: str | Path, which: str = "best") -> Path:
    """A run folder, a model version (RUN/versions/vN, RUN@vN, RUN@latest), a weights folder or a
    file -> the weights file to read."""
    p = version_folder(source) or Path(source)
    if p.is_dir():
        for cand in (p / "weights" / f"{which}.safetensors", p / f"{which}.safetensors",
                     p / "weights" / "last.safetensors", p / "last.safetensors"):
            if cand.is_file():
                return cand
        raise FileNotFoundError(f"{p} is a folder without weights/{which}.safetensors: "
                                "pass a run folder of resforge or a weights file")
    if not p.is_file():
        raise FileNotFoundError(f"weights not found: {p}")
    return p


def imagenet_stats(in_chans: int) -> tuple[list[float], list[float]]:
    """ImageNet mean/std for `in_chans` channels (non-RGB inputs get the RGB average per channel)."""
    mean, std = norm_stats(in_chans)
    return list(mean), list(std)


def read_weights_file(source: str | Path, model_name: str | None = None) -> WeightsFile:
    """Read and identify the weights behind `source` (run folder, weights folder or file).

    model_name: the architecture the caller says the file holds; it must agree with the sidecar,
    or with the layer keys of a third-party file (plainN and resnetN, whose keys are identical,
    agree). Without it a third-party file's architecture is guessed from its keys, and is None
    when they match no registered layout (`require_arch` then says to pass --model)."""
    path = resolve_weights(source)
    sd, meta, fmt = read_state_dict(path)          # a resforge sidecar comes back validated
    if fmt == "resforge":
        return _from_sidecar(path, sd, meta, model_name)
    arch = _third_party_arch(path, sd, model_name)
    stem = sd.get("conv1.weight")
    in_chans = int(stem.shape[1]) if stem is not None else 3
    if not 1 <= in_chans <= artifact.MAX_IN_CHANS:
        raise artifact.ArtifactError(f"{path}: conv1.weight takes {in_chans} input channels, outside "
                                     f"1..{artifact.MAX_IN_CHANS}; {artifact.REMEDY['weights']}")
    head = sd.get("fc.weight")
    kwargs, input_size = {}, None
    if arch is not None:
        kwargs = _builder_kwargs(arch, sd)
        try:
            with torch.device("meta"):            # default input size without allocating weights
                input_size = list(create_model(arch, in_chans=in_chans, **kwargs).default_cfg["input_size"])
        except (TypeError, ValueError) as e:      # e.g. a plainN named for a file with projection shortcuts
            raise WeightsError(f"{path}: its keys need {arch} built with {kwargs}, which it cannot be ({e}): "
                               "pass the --model these weights are for") from None
    mean, std = imagenet_stats(in_chans)
    return WeightsFile(path, fmt, sd, meta, arch, kwargs, int(head.shape[0]) if head is not None else None,
                       in_chans, CIFAR10_CLASSES if fmt == "akamaster" else None, mean, std, input_size, True)


def _from_sidecar(path: Path, sd: dict, meta: dict, model_name: str | None) -> WeightsFile:
    m = meta["model"]
    if model_name and model_name != m["name"]:
        raise WeightsError(f"{path} holds a {m['name']}, not a {model_name}: drop --model "
                           f"(resforge checkpoints name their architecture) or pass weights of a {model_name}")
    return WeightsFile(path, "resforge", sd, meta, m["name"], dict(m.get("kwargs", {})), int(m["num_classes"]),
                       int(m["in_chans"]), list(meta["class_names"]), list(meta["mean"]), list(meta["std"]),
                       list(meta["input_size"]), False)


def _third_party_arch(path: Path, sd: dict, model_name: str | None) -> str | None:
    guess = guess_architecture(sd)
    if model_name is None:
        return guess
    twins = guess is not None and model_name.replace("plain", "resnet") == guess  # same keys
    if guess is not None and model_name != guess and not twins:
        raise WeightsError(f"{path} holds {guess} weights (by its layer keys), not {model_name}: "
                           f"pass --model {guess} or drop --model")
    return model_name


def _builder_kwargs(arch: str, sd: dict) -> dict:
    """Variants that share a name, read from the keys: a 3x3 ImageNet stem (small_input), CIFAR
    projection shortcuts (shortcut B). A setting the builder does not take is left out: the file
    then fails to load with the architecture mismatch it is."""
    with torch.device("meta"):
        layout = create_model(arch).default_cfg["layout"]
    stem = sd.get("conv1.weight")
    if layout == "imagenet":
        kwargs = {"small_input": True} if stem is not None and stem.shape[-1] == 3 else {}
    else:
        kwargs = {"shortcut": "B"} if any(".downsample." in k for k in sd) else {}
    return kwargs if check_settings(arch, kwargs) is None else {}
