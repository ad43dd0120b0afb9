"""Stage outputs: the half of the model contract that dense heads (FPN, U-Net decoders) attach to.

A network declares its stages in `feature_info`, in order, one entry per stage module:
    {"module": "layer2", "num_chs": 128, "reduction": 8}
num_chs: channels of that stage's output; reduction: input side / output side (nominal: a
stride-2 stage halves the side, rounding down for odd sides), so a neck knows every level's
width and scale without running the network. The ImageNet nets' C2..C5 are layer1..layer4
(reductions 4, 8, 16, 32); the CIFAR nets' three stages are 1, 2, 4.

forward_stem(x) is what comes before the first stage; forward_features runs stem + every stage
(the classifier's input), forward_intermediates keeps each stage's output on the way.
"""
from __future__ import annotations

import torch


class StageOutputs:
    feature_info: list[dict]

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        for f in self.feature_info:
            x = getattr(self, f["module"])(x)
        return x                                   # (B, num_features, H / reduction, W / reduction)

    def forward_intermediates(self, x: torch.Tensor, stages: list[str] | None = None) -> list[torch.Tensor]:
        """[(B, num_chs, H / reduction, W / reduction)] of `stages` (default: all), shallow to deep;
        stages after the deepest one asked for are not run."""
        names = [f["module"] for f in self.feature_info]
        wanted = names if stages is None else list(stages)
        unknown = [s for s in wanted if s not in names]
        if unknown or not wanted:
            raise ValueError(f"stage(s) {unknown or wanted} are not stages of this network; its stages "
                             f"are {names} (model.feature_info)")
        last = max(names.index(s) for s in wanted)
        x, out = self.forward_stem(x), []
        for name in names[:last + 1]:
            x = getattr(self, name)(x)
            if name in wanted:
                out.append(x)
        return out
