"""Fine-tuning pretrained ResNets: policies, cached-feature probes, lr-find, before/after report.

    from resforge.finetune import finetune, lr_find
    run = finetune("runs/imagenette/", data="breastmnist.npz", policy="gradual",
                   overrides=["finetune.input_size=128", "train.epochs=10"])
    run.rows        # (a) prototype head, (b) linear probe, (c) the policy, on the same test split

policies.py (what trains, BN modes, phase plans), probe.py (cached features, linear probe,
prototype head), source.py (reading pretrained weights), setup.py (what finetune and lr-find share),
lrfind.py (range test + `lr_find`), report.py, run.py (`finetune`).
"""
from resforge.finetune.policies import POLICIES, Phase, parse_policy, plan
from resforge.finetune.lrfind import lr_find
from resforge.finetune.run import FinetuneRun, finetune

__all__ = ["POLICIES", "Phase", "parse_policy", "plan", "FinetuneRun", "finetune", "lr_find"]
