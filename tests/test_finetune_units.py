"""Fine-tuning building blocks without a training run: policy plans and rates, head rows kept
from pretrained classes, the probe head's folding, prototype head, imbalance handling."""
import numpy as np
import pytest
import torch

import resforge
from resforge.config import FinetuneConfig, load_config
from resforge.data.augment import Augmenter
from resforge.data.loader import TensorBatches
from resforge.finetune import policies as P
from resforge.finetune.probe import FeatureBatches, ProbeHead, PrototypeHead, reestimate_bn
from resforge.weightfile import CIFAR10_CLASSES
from resforge.finetune.source import (build_from_pretrained, class_row_map, keep_class_rows,
                                      read_pretrained)
from resforge.training.device import make_runtime
from resforge.training.loop import soft_cross_entropy


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: see conftest


def test_plans_of_every_policy_on_both_layouts():
    ft = FinetuneConfig(head_init="fresh", unfreeze_epochs=2)
    cifar, imagenet = resforge.create_model("resnet20"), resforge.create_model("resnet18")
    assert [p.stages for p in P.plan("last-stages:2", imagenet, ft, 5)] == [("layer3", "layer4", "fc")]
    assert [p.stages for p in P.plan("stages:layer1,stem", cifar, ft, 5)] == [("stem", "layer1", "fc")]
    assert [p.kind for p in P.plan("linear-probe", cifar, ft, 5)] == ["probe"]
    gradual = P.plan("gradual", imagenet, ft, 5)
    assert [p.name for p in gradual] == ["probe", "layer4+", "layer3+", "layer2+", "layer1+", "all"]
    assert [p.epochs for p in gradual[1:]] == [2, 2, 2, 2, 5]
    assert P.plan("full", cifar, FinetuneConfig(head_init="probe"), 3)[0].kind == "probe"   # LP-FT


def test_discriminative_rates_fall_from_head_to_stem_per_stage_or_block():
    m = resforge.create_model("resnet18")
    st = P.discriminative_rates(m, 0.5, "stage", 10.0)
    assert st == {"fc": 10.0, "layer4": 1.0, "layer3": 0.5, "layer2": 0.25, "layer1": 0.125,
                  "conv1": 0.0625, "bn1": 0.0625}
    bl = P.discriminative_rates(m, 0.5, "block", 10.0)
    assert bl["layer4.1"] == 1.0 and bl["layer4.0"] == 0.5 and bl["layer1.0"] == 0.5 ** 7
    assert bl["conv1"] == 0.5 ** 8 < bl["layer1.0"]


def test_apply_phase_sets_trainable_parameters_and_locks_bn_in_eval_mode():
    m = resforge.create_model("resnet20", num_classes=3)
    phase = P.Phase("x", "fit", ("layer3", "fc"))
    counts = P.apply_phase(m, phase, "train")
    assert counts["trainable"] == sum(p.numel() for n, p in m.named_parameters() if n.startswith(("layer3", "fc")))
    m.train()
    m(torch.randn(4, 3, 16, 16))                             # the loop calls train(); hooks undo it
    assert not m.layer1[0].bn1.training and m.layer3[0].bn1.training
    P.release(m)
    m.train()
    m(torch.randn(4, 3, 16, 16))
    assert m.layer1[0].bn1.training and all(p.requires_grad for p in m.parameters())


def test_bn_auto_is_train_but_keeps_pretrained_statistics_under_lora():
    m = resforge.create_model("resnet18", num_classes=2)
    full, lora = (P.plan(p, m, FinetuneConfig(), 3) for p in ("full", "lora"))
    assert P.resolve_bn("auto", full) == "train" and P.resolve_bn("auto", lora) == "freeze-stats"
    assert P.resolve_bn("freeze", lora) == "freeze" and P.resolve_bn("train", lora) == "train"


def test_bn_of_trained_stages_is_reestimated_on_the_new_data_and_frozen_bn_is_not():
    # Pretrained statistics from another domain: train-mode (batch) and eval-mode (running)
    # normalisation disagree, so a head fitted on eval-mode features misfits fine-tuning's start.
    torch.manual_seed(0)
    m = resforge.create_model("resnet20", num_classes=2)
    for bn in (x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)):
        bn.running_mean.fill_(3.0)
        bn.running_var.fill_(50.0)
    phases = P.plan("last-stages:1", m, FinetuneConfig(head_init="probe"), 3)
    assert P.bn_to_adapt(m, phases, "freeze-stats") == [] and P.bn_to_adapt(m, phases[:1], "train") == []
    bns = P.bn_to_adapt(m, phases, "train")
    assert bns and all(any(b is x for x in m.layer3.modules()) for b in bns)
    frozen = m.layer1[0].bn1.running_mean.clone()
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    batches = TensorBatches(images.numpy(), np.zeros(64), torch.device("cpu"), 64)
    aug = Augmenter(load_config("digits").aug, (0.5,) * 3, (0.25,) * 3, 2, (16, 16))
    rt = make_runtime("cpu", "fp32", False)
    reestimate_bn(m, bns, batches, aug, rt)
    assert torch.equal(m.layer1[0].bn1.running_mean, frozen)               # frozen stage untouched
    x = aug.eval_view(images)
    with torch.no_grad():
        eval_feats = m.forward_head(m.forward_features(x), pre_logits=True)
        for b in bns:
            b.train()
        train_feats = m.forward_head(m.forward_features(x), pre_logits=True)
    assert not m.training and all(b.momentum == 0.1 for b in bns)
    assert torch.allclose(eval_feats, train_feats, rtol=0.05, atol=0.02)


def test_keep_class_rows_copies_the_matching_pretrained_rows(shared_data):
    path = next((shared_data / "pretrained").glob("akamaster-resnet20-*.th"))
    pre = read_pretrained(path)
    assert pre.arch == "resnet20" and pre.class_names == CIFAR10_CLASSES
    model, _ = build_from_pretrained(pre, 3, 3)
    rows = class_row_map(["Ship", "tumour", "cat"], pre.class_names, None)          # names match loosely
    assert rows == {0: 8, 2: 3}
    assert keep_class_rows(model, pre, rows) == 2
    assert torch.equal(model.fc.weight[0], pre.state_dict["fc.weight"][8])
    assert torch.equal(model.fc.bias[2], pre.state_dict["fc.bias"][3])
    assert class_row_map(["a", "b"], pre.class_names, "a:truck,b:0") == {0: 9, 1: 0}
    with pytest.raises(ValueError, match="source_classes"):
        class_row_map(["a"], None, None)


def test_probe_head_folds_its_standardisation_into_a_plain_fc():
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.rand(40, 8, generator=g) * 5 + 2, torch.arange(40) % 3
    head = ProbeHead(torch.nn.Linear(8, 3), 0.0, feats.mean(0), feats.std(0))
    head.init_from_class_means(feats, labels)
    fc = torch.nn.Linear(8, 3)
    fc.load_state_dict(head.model_fc_state())
    with torch.no_grad():
        assert torch.allclose(head(feats[:, :, None, None]), fc(feats), atol=1e-5)
    # the class-mean start is the Euclidean nearest-class-mean classifier
    z = (feats - feats.mean(0)) / feats.std(0)
    means = torch.stack([z[labels == c].mean(0) for c in range(3)])
    assert torch.equal(fc(feats).argmax(1), torch.cdist(z, means).argmin(1))


def test_probe_head_does_not_blow_up_near_constant_features():
    # A unit that fires on 2 of 200 images has a tiny std; dividing by it would fold a weight
    # ~1000x the others into the model's fc, and fine-tuning that wakes the unit explodes.
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(200, 16, generator=g)
    feats[:, 3] = 0.0
    feats[:2, 3] = 1e-3
    feats[:, 5] = 0.0                                          # dead: std 0
    labels = torch.arange(200) % 2
    head = ProbeHead(torch.nn.Linear(16, 2), 0.0, feats.mean(0), feats.std(0))
    head.init_from_class_means(feats, labels)
    w = head.model_fc_state()["weight"].abs()
    assert head.sd.min() >= 0.1 * feats.std(0)[feats.std(0) > 0].median() - 1e-9
    assert w.max() <= 20 * w[:, [0, 1, 2, 4]].max()
    assert torch.isfinite(w).all()


def test_prototype_head_predicts_the_nearest_class_mean_and_fits_a_temperature():
    feats = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    head = PrototypeHead(feats, labels, 2)
    assert head.logits(feats).argmax(1).tolist() == [0, 0, 1, 1]
    confident = head.fit_scale(feats, labels)                # separable: a sharp softmax fits best
    noisy = head.fit_scale(feats, torch.tensor([0, 1, 1, 1]))  # one label contradicts its features
    assert confident > 5 and noisy < confident
    with pytest.raises(ValueError, match="no training images"):
        PrototypeHead(feats, labels, 3)


def test_balanced_sampling_draws_rare_classes_as_often_and_class_weights_reweigh_the_loss():
    labels = np.array([0] * 90 + [1] * 10)
    w = 1.0 / np.bincount(labels)[labels]
    tb = TensorBatches(np.zeros((100, 1, 2, 2), np.uint8), labels, torch.device("cpu"), 50, shuffle=True,
                       sample_weights=w)
    drawn = torch.cat([y for _, y, _ in tb.batches(torch.Generator().manual_seed(0))])
    assert len(drawn) == 100 and 0.3 < drawn.float().mean() < 0.7
    fb = FeatureBatches(torch.zeros(100, 4), torch.from_numpy(labels), 50, shuffle=True, sample_weights=w)
    assert 0.3 < torch.cat([y for _, y, _ in fb.batches(torch.Generator().manual_seed(1))]).float().mean() < 0.7
    logits, y = torch.zeros(4, 2), torch.tensor([0, 0, 0, 1])
    logits[3, 1] = -3.0                                         # the rare class is badly predicted
    plain = soft_cross_entropy(0.0)(logits, y)
    weighted = soft_cross_entropy(0.0, torch.tensor([0.5, 5.0]))(logits, y)
    assert weighted > plain


def test_finetune_config_keys_resolve_and_check_their_values():
    cfg = load_config("finetune", ["policy=bitfit", "bn=freeze-stats", "finetune.input_size=64"])
    assert (cfg.finetune.policy, cfg.finetune.bn, cfg.finetune.input_size) == ("bitfit", "freeze-stats", 64)
    for recipe in ("finetune-breastmnist", "finetune-cifar10", "pretrain-imagenette"):
        load_config(recipe)
    from resforge.config import ConfigError
    with pytest.raises(ConfigError, match="Did you mean 'finetune.layer_decay'"):
        load_config(None, ["finetune.layer_decya=0.5"])
    with pytest.raises(ConfigError, match="balanced"):
        load_config(None, ["class_weights=inverse"])


def test_lr_range_test_restores_the_weights_and_stops_when_the_loss_diverges():
    from resforge.config import AugConfig, OptimConfig
    from resforge.data.augment import Augmenter
    from resforge.finetune.lrfind import lr_range_test
    from resforge.training.device import make_runtime
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 255, (64, 1, 8, 8), dtype=np.uint8), rng.integers(0, 3, 64)
    model = resforge.create_model("resnet20", num_classes=3, in_chans=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rt = make_runtime("cpu", "fp32", False)
    tb = TensorBatches(images, labels, rt.device, 16, shuffle=True)
    aug = Augmenter(AugConfig(flip="none"), [0.5], [0.25], 3, (8, 8))
    res = lr_range_test(model, tb, aug, rt, OptimConfig(), soft_cross_entropy(0.0), start=1e-4, end=1e4, steps=40)
    assert res["stopped_early"] and len(res["lrs"]) < 40          # 1e4 diverges long before the end
    assert res["suggested"] == res["min_loss_lr"] / 10
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
