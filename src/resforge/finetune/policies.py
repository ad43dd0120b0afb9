"""Fine-tuning policies as data: which parameters train, how BatchNorm behaves, at what rates.

A policy is parsed into a list of `Phase`s; the runner executes each phase by configuring the
model (`apply_phase`) and calling the one training loop (`training.loop.fit`). Nothing here
trains: policies are a composition freeze -> fit -> unfreeze -> fit, never a copy of the loop.

    linear-probe     head only, on features cached once (backbone frozen, BN in eval mode)
    last-stages:K    the last K stages below the head, plus the head
    stages:A,B       the named stages, plus the head
    full             everything
    gradual          head first (the probe), then unfreeze one stage per phase from the top,
                     with rates decaying by finetune.layer_decay per stage (or block) downwards
    bitfit           biases and BN affine parameters, plus the head
    lora             LoRA adapters on every Conv2d/Linear below the head (PEFT), plus the head
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from resforge.config import FinetuneConfig

POLICIES = ("linear-probe", "last-stages:K", "stages:A,B", "full", "gradual", "bitfit", "lora")
HEAD = "fc"


@dataclass
class Phase:
    name: str
    kind: str                              # "probe" (cached features) | "fit" (the image loop)
    stages: tuple[str, ...] = ()           # stages whose parameters may train (head included)
    params: str = "all"                    # all | bitfit | lora: which parameters of those stages
    epochs: int = 0
    lr_scale: dict[str, float] = field(default_factory=dict)  # parameter-name prefix -> multiplier


# ---------------------------------------------------------------- parsing

def body_stages(model: nn.Module) -> list[str]:
    """Stages below the head, input side first: ["stem", "layer1", ...]."""
    return [s for s in model.stage_names if s != HEAD]


def parse_policy(policy: str, model: nn.Module) -> tuple[str, tuple[str, ...]]:
    """'last-stages:2' -> ('stages', ('layer3', 'layer4')); plain names -> (name, ())."""
    name, _, arg = policy.partition(":")
    body = body_stages(model)
    arch = model.default_cfg.get("arch", type(model).__name__)
    if name in ("linear-probe", "full", "gradual", "bitfit", "lora") and not arg:
        return name, ()
    if name == "last-stages":
        if not arg.isdigit() or not 1 <= int(arg) <= len(body):
            raise ValueError(f"policy {policy!r}: {arch} has {len(body)} stages below the head "
                             f"({', '.join(body)}): use last-stages:1 .. last-stages:{len(body)}, or full")
        return "stages", tuple(body[-int(arg):])
    if name == "stages":
        named = tuple(s.strip() for s in arg.split(",") if s.strip())
        unknown = [s for s in named if s not in body]
        if not named or unknown:
            raise ValueError(f"policy {policy!r}: {arch} has no stage {unknown[0] if unknown else '(none named)'!r}; "
                             f"its stages are {', '.join(body)} (the head '{HEAD}' always trains)")
        return "stages", tuple(s for s in body if s in named)
    raise ValueError(f"unknown fine-tuning policy {policy!r}: use one of {', '.join(POLICIES)}")


def plan(policy: str, model: nn.Module, ft: FinetuneConfig, epochs: int) -> list[Phase]:
    """The phases of `policy` for `model`; `epochs` is the main phase's length (train.epochs)."""
    kind, chosen = parse_policy(policy, model)
    if kind == "lora":
        require_peft()
    body, head_rate = body_stages(model), {HEAD: ft.head_lr_mult}
    probe = [Phase("probe", "probe", (HEAD,), epochs=ft.probe_epochs)]
    if kind == "linear-probe":
        return probe
    first = probe if ft.head_init == "probe" else []
    if kind == "full":
        return first + [Phase("full", "fit", tuple(body) + (HEAD,), epochs=epochs, lr_scale=head_rate)]
    if kind == "stages":
        return first + [Phase("+".join(chosen), "fit", chosen + (HEAD,), epochs=epochs, lr_scale=head_rate)]
    if kind == "bitfit":
        return first + [Phase(kind, "fit", tuple(body) + (HEAD,), params=kind, epochs=epochs, lr_scale=head_rate)]
    if kind == "lora":                                 # prefixes of the adapted layers: their adapters' rate
        rates = {**{t: ft.lora_lr_mult for t in lora_targets(model)}, **head_rate}
        return first + [Phase(kind, "fit", tuple(body) + (HEAD,), params=kind, epochs=epochs, lr_scale=rates)]
    return probe + _gradual(model, ft, epochs)    # gradual: the head always goes first


def _gradual(model: nn.Module, ft: FinetuneConfig, epochs: int) -> list[Phase]:
    """Unfreeze one more stage per phase from the top; the last phase (all) runs `epochs`."""
    body = body_stages(model)[::-1]                       # top (next to the head) first
    rates = discriminative_rates(model, ft.layer_decay, ft.decay_unit, ft.head_lr_mult)
    phases = []
    for k in range(1, len(body) + 1):
        stages = tuple(body[:k][::-1]) + (HEAD,)
        last = k == len(body)
        name = "all" if last else f"{body[k - 1]}+"
        phases.append(Phase(name, "fit", stages, epochs=epochs if last else ft.unfreeze_epochs,
                            lr_scale=dict(rates)))
    return phases


def discriminative_rates(model: nn.Module, decay: float, unit: str, head_mult: float) -> dict[str, float]:
    """Rate multipliers by parameter prefix: the top unit below the head gets 1, each unit
    further down `decay` times the one above (stem lowest); the head gets `head_mult`."""
    units, table = [], stage_prefixes(model)             # units: prefixes, input side first
    for s in body_stages(model):
        prefixes, mod = table[s], model.get_stage(s)
        if unit == "block" and s != "stem" and isinstance(mod, nn.Sequential) and len(mod) > 1:
            units += [f"{prefixes[0]}.{i}" for i in range(len(mod))]
        else:
            units.append(tuple(prefixes))
    rates = {HEAD: head_mult}
    for depth, u in enumerate(reversed(units)):
        for p in (u if isinstance(u, tuple) else (u,)):
            rates[p] = decay ** depth
    return rates


# ---------------------------------------------------------------- parameters and BatchNorm

def stage_prefixes(model: nn.Module) -> dict[str, list[str]]:
    """Stage -> the module names that make it up ('stem' -> ['conv1', 'bn1'])."""
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for s in model.stage_names:
        mod = model.get_stage(s)
        parts = list(mod) if id(mod) not in names else [mod]  # "stem" is a fresh ModuleList
        out[s] = [names[id(m)] for m in parts]
    return out


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def stage_of(model: nn.Module) -> dict[str, str]:
    """Parameter/module name -> stage name, for every parameter of the model."""
    table = stage_prefixes(model)
    out = {}
    for n, _ in list(model.named_parameters()) + list(model.named_modules()):
        owner = next((s for s, ps in table.items() if _under(n, ps)), None)
        if owner is not None:
            out[n] = owner
    return out


def _bn_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def resolve_bn(bn: str, phases: list[Phase] = ()) -> str:
    """finetune.bn "auto" -> "train", except with LoRA -> "freeze-stats": the adapters learn a
    small change of the pretrained function, and statistics moving under them change it outside
    the adapters (BreastMNIST: test AUC 0.842 over 3 seeds with the pretrained statistics; runs whose
    statistics moved or were re-estimated reached 0.819 on one seed or diverged, see docs/finetune.md)."""
    if bn != "auto":
        return bn
    return "freeze-stats" if any(ph.params == "lora" for ph in phases) else "train"


def bn_to_adapt(model: nn.Module, phases: list[Phase], bn: str) -> list[nn.Module]:
    """The BN layers some fit phase will run in train mode (bn "train", stage trainable): their
    statistics are the pretrained domain's, while training normalises with the new data's batch
    statistics, so the features fine-tuning starts from are not the ones a probe was fitted on."""
    if bn != "train":
        return []
    owner = stage_of(model)
    stages = {st for ph in phases if ph.kind == "fit" for st in ph.stages}
    return [m for n, m in _bn_modules(model).items() if owner.get(n) in stages]


def _is_bitfit(name: str, bn_names) -> bool:
    return name.endswith(".bias") or _under(name, bn_names)


def apply_phase(model: nn.Module, phase: Phase, bn: str) -> dict:
    """Set requires_grad and BN modes for `phase`; -> {"trainable", "total", "frozen_bn"}.

    bn: "train" -- BN layers in trainable stages update their statistics;
        "freeze-stats" -- every BN normalises with its running statistics, which never move;
        "freeze" -- as freeze-stats, and BN weight/bias do not train either.
    BN layers in frozen stages are always in eval mode: frozen means frozen."""
    owner, bns = stage_of(model), _bn_modules(model)
    for n, p in model.named_parameters():
        p.requires_grad_(_trains(n, owner.get(n), phase, bns, bn))
    locked = 0
    for n, m in bns.items():
        lock = bn != "train" or owner.get(n) not in phase.stages
        set_bn_locked(m, lock)
        locked += lock
    return {"trainable": count_params(model, True), "total": count_params(model), "frozen_bn": locked}


def _trains(name: str, stage: str | None, phase: Phase, bns: dict, bn: str) -> bool:
    if stage not in phase.stages:
        return False
    if stage == HEAD:
        return True                                        # the new head always trains in full
    if bn == "freeze" and _under(name, bns):
        return False
    if phase.params == "bitfit":
        return _is_bitfit(name, bns)
    if phase.params == "lora":
        return "lora_" in name
    return True


def count_params(model: nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in model.parameters() if trainable is None or p.requires_grad == trainable)


def _keep_eval(module: nn.Module, args):
    # fit() calls model.train() every epoch; this pre-hook puts a locked BN back in eval mode
    # before each forward, so it normalises with (and never updates) its running statistics.
    if module.__dict__.get("_resforge_bn_locked"):
        module.training = False


def set_bn_locked(m: nn.Module, locked: bool) -> None:
    """Lock a BN layer in eval mode (or release it). A flag plus one permanent hook, rather than
    add/remove of hooks, so deep copies (EMA, best weights) follow the same switch."""
    if _keep_eval not in m._forward_pre_hooks.values():
        m.register_forward_pre_hook(_keep_eval)
    m.__dict__["_resforge_bn_locked"] = locked
    if locked:
        m.eval()


def release(model: nn.Module) -> None:
    """Unlock every BN layer and make every parameter trainable again (plain model)."""
    for m in _bn_modules(model).values():
        m.__dict__["_resforge_bn_locked"] = False
    for p in model.parameters():
        p.requires_grad_(True)


def frozen_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every tensor the current phase must not change: frozen parameters and the
    buffers (running statistics) of locked BN layers."""
    keep = {n for n, p in model.named_parameters() if not p.requires_grad}
    for n, m in _bn_modules(model).items():
        if m.__dict__.get("_resforge_bn_locked"):
            keep |= {f"{n}.{b}" for b, _ in m.named_buffers()}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in keep}


def changed(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> list[str]:
    state = model.state_dict()
    return [k for k, v in snapshot.items() if not torch.equal(state[k].to(v.device), v)]


# ---------------------------------------------------------------- LoRA (optional PEFT extra)

def require_peft():
    try:
        import peft
    except ImportError:
        raise ValueError("policy 'lora' needs the optional PEFT library, which is not installed: "
                         "pip install 'resforge[peft]' (or pip install peft), or choose another "
                         "policy (bitfit trains a similarly small share of the parameters)") from None
    return peft


def lora_targets(model: nn.Module) -> list[str]:
    """Every Conv2d/Linear below the head (the new head trains in full instead)."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and not _under(n, [HEAD])]


def add_lora(model: nn.Module, ft: FinetuneConfig):
    """Inject LoRA adapters into every Conv2d/Linear below the head, in place; -> the PEFT
    LoraModel (its merge_and_unload() folds the adapters back into plain weights)."""
    peft = require_peft()
    cfg = peft.LoraConfig(r=ft.lora_rank, lora_alpha=ft.lora_alpha, lora_dropout=ft.lora_dropout,
                          target_modules=lora_targets(model))
    return peft.LoraModel(model, cfg, "default")


def describe(phase: Phase, counts: dict, arch: str) -> str:
    share = 100 * counts["trainable"] / max(counts["total"], 1)
    what = {"bitfit": "biases + BN affine + head", "lora": "LoRA adapters + head"}.get(phase.params, "")
    return (f"phase '{phase.name}'{f' ({what})' if what else ''}: trainable params "
            f"{counts['trainable']:,} of {counts['total']:,} ({share:.2f}%) in {arch}; "
            f"{counts['frozen_bn']} BN layers in eval mode")
