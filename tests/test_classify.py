"""Stage 6: DenseNet-121 + thesis head, ImageNet loading that fails loudly, loss and augmentation."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from pneumoscan.classify import Classifier
from pneumoscan.labels import LABELS
from pneumoscan.networks import (
    IMAGENET_FILE,
    ChestClassifier,
    PretrainedWeightsError,
    backbone_key,
    imagenet_weights_path,
    load_imagenet,
)
from pneumoscan.training.data import augment
from pneumoscan.training.loss import masked_bce, positive_weights


def _published_layout(model: ChestClassifier) -> dict[str, torch.Tensor]:
    """A DenseNet-121 state dict in the key layout of densenet121-a639ec97.pth
    (``...denselayer1.norm.1.weight``, ``classifier.weight`` 1000×1024, no num_batches_tracked)."""
    torch.manual_seed(1)
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("net.class_layers") or key.endswith("num_batches_tracked"):
            continue
        name = key.removeprefix("net.")
        name = re.sub(r"\.layers\.(norm|conv)([12])\.", r".\1.\2.", name)
        state[name] = torch.randn_like(value) if value.is_floating_point() else value
    state["classifier.weight"] = torch.randn(1000, 1024)
    state["classifier.bias"] = torch.randn(1000)
    return state


def test_head_is_the_thesis_head():
    model = ChestClassifier()
    head = model.net.class_layers.out
    assert [type(m).__name__ for m in head] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert head[0].in_features == 1024 and head[0].out_features == 1000
    assert head[2].p == 0.4 and head[3].out_features == 15
    assert model(torch.rand(2, 1, 64, 64)).shape == (2, 15)


def test_published_keys_map_to_monai_names():
    assert backbone_key("features.denseblock1.denselayer1.norm.1.weight") == \
        "net.features.denseblock1.denselayer1.layers.norm1.weight"
    assert backbone_key("features.denseblock2.denselayer3.conv2.weight") == \
        "net.features.denseblock2.denselayer3.layers.conv2.weight"
    assert backbone_key("features.norm5.running_var") == "net.features.norm5.running_var"


def test_imagenet_file_in_published_layout_loads_every_backbone_tensor(tmp_path):
    model = ChestClassifier()
    published = _published_layout(model)
    torch.save(published, tmp_path / IMAGENET_FILE)
    head_before = model.net.class_layers.out[0].weight.clone()
    info = load_imagenet(model, tmp_path / IMAGENET_FILE)
    assert info["tensors_loaded"] == info["tensors_required"] > 600
    torch.testing.assert_close(model.net.features.conv0.weight, published["features.conv0.weight"])
    torch.testing.assert_close(model.net.features.denseblock4.denselayer16.layers.conv2.weight,
                               published["features.denseblock4.denselayer16.conv.2.weight"])
    torch.testing.assert_close(model.net.class_layers.out[0].weight, head_before)  # head stays new


def test_imagenet_loading_from_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = imagenet_weights_path()
    assert path == tmp_path / "hub" / "checkpoints" / IMAGENET_FILE
    path.parent.mkdir(parents=True)
    torch.save(_published_layout(ChestClassifier()), path)
    assert load_imagenet(ChestClassifier())["file"] == IMAGENET_FILE


def test_mismatched_weights_file_fails_loudly(tmp_path):
    model = ChestClassifier()
    published = {f"module.{k}": v for k, v in _published_layout(model).items()}  # DataParallel names
    torch.save(published, tmp_path / "wrapped.pth")
    before = model.net.features.conv0.weight.clone()
    with pytest.raises(PretrainedWeightsError, match="only 0 of"):
        load_imagenet(model, tmp_path / "wrapped.pth")
    torch.testing.assert_close(model.net.features.conv0.weight, before)  # nothing half-loaded
    partial = _published_layout(model)
    partial["features.conv0.weight"] = torch.randn(64, 1, 7, 7)  # a 1-channel stem
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(PretrainedWeightsError, match="features.conv0.weight"):
        load_imagenet(model, tmp_path / "partial.pth")


def test_offline_without_weights_says_which_file_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(PretrainedWeightsError) as info:
        load_imagenet(ChestClassifier())
    message = str(info.value)
    assert IMAGENET_FILE in message and str(tmp_path / "hub" / "checkpoints") in message
    assert "--weights" in message and "--init random" in message


def test_masked_bce_ignores_unknown_labels():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    known = torch.tensor([[1.0, 0.0, float("nan")]])
    weights = torch.ones(3)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, :2], known[:, :2])
    torch.testing.assert_close(masked_bce(logits, known, weights), expected)
    flipped = known.clone()
    assert masked_bce(torch.tensor([[2.0, -1.0, -9.0]]), flipped, weights) == pytest.approx(expected.item())
    assert torch.isfinite(masked_bce(logits, torch.full((1, 3), float("nan")), weights))


def test_positive_weights_count_known_labels_only():
    labels = np.array([[1, 0, np.nan], [0, 0, np.nan], [0, 1, np.nan], [0, np.nan, np.nan]], np.float32)
    np.testing.assert_allclose(positive_weights(labels), [3.0, 2.0, 1.0])


def test_augmentation_is_small_and_reproducible():
    x = torch.zeros(4, 1, 64, 64)
    x[:, :, 20:44, 10:30] = 1.0  # a bright block on the left
    a = augment(x, torch.Generator().manual_seed(5))
    b = augment(x, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, x)
    left, right = a[..., :32].sum(), a[..., 32:].sum()
    assert left > 3 * right  # no horizontal flip moved the block across


def _assessment(assessed: dict[str, float]) -> dict:
    return {label: {"assessed": label in assessed, "threshold": assessed.get(label)} for label in LABELS}


def test_classifier_round_trip_keeps_assessment_and_thresholds(tmp_path):
    model = ChestClassifier()
    classifier = Classifier(model, {"input_size": 64})
    classifier.set_assessment(_assessment({"Pneumonia": 0.3, "No Finding": 0.6}))
    classifier.save(tmp_path / "c.pt")
    again = Classifier.load(tmp_path / "c.pt")
    assert again.size == 64 and again.assessed_labels == ["No Finding", "Pneumonia"]
    assert again.thresholds[LABELS.index("Pneumonia")] == pytest.approx(0.3)
    assert np.isnan(again.thresholds[LABELS.index("Nodule")])  # no silent 0.5 for an unassessed label
    crops = np.random.default_rng(0).random((3, 64, 64)).astype(np.float32)
    probs = again.predict_proba(crops)
    np.testing.assert_allclose(probs, classifier.predict_proba(crops), atol=1e-6)
    row = probs[0].copy()
    row[:] = 0.99  # every output high: only the assessed ones may become findings
    assert again.findings(row) == ["Pneumonia"]  # and No Finding never beside a finding
    row[LABELS.index("Pneumonia")] = 0.1
    assert again.findings(row) == ["No Finding"]


def test_old_model_file_without_assessment_assesses_nothing(tmp_path):
    """A file from before the assessed flag (thresholds only, 0.5 defaults) reports no finding."""
    Classifier(ChestClassifier(), {"input_size": 64, "thresholds": {l: 0.5 for l in LABELS}}).save(tmp_path / "o.pt")
    old = Classifier.load(tmp_path / "o.pt")
    assert old.assessed_labels == [] and np.isnan(old.thresholds).all()
    assert old.findings(np.ones(15)) == []


def test_classifier_refuses_crops_outside_0_1_or_of_the_wrong_size():
    classifier = Classifier(ChestClassifier(), {"input_size": 64})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        classifier.predict_proba(np.full((1, 64, 64), 255, np.float32))  # uint8 values not divided
    with pytest.raises(ValueError, match="64×64"):
        classifier.predict_proba(np.zeros((1, 224, 224), np.float32))
    with pytest.raises(ValueError, match="finite"):
        classifier.predict_proba(np.full((1, 64, 64), np.nan, np.float32))


def test_balanced_sampling_draws_populations_equally_and_replays_by_epoch():
    from pneumoscan.training.data import BalancedSampler, sampling_weights

    sources = np.array(["kermany"] * 4000 + ["nih"] * 400 + ["shenzhen"] * 100)
    weights = sampling_weights(sources, 0.5)
    assert weights.sum() == pytest.approx(1.0)
    assert weights[sources == "kermany"].sum() == pytest.approx(0.5)  # paediatric = adult
    # inside the adult half: shares ∝ sqrt(size): nih 20, shenzhen 10
    assert weights[sources == "nih"].sum() == pytest.approx(0.5 * 20 / 30)
    equal = sampling_weights(sources, 0.0)
    assert equal[sources == "nih"].sum() == pytest.approx(equal[sources == "shenzhen"].sum())
    adult = sampling_weights(sources, 1.0, adult_share=0.75)
    assert adult[sources == "kermany"].sum() == pytest.approx(0.25)
    assert adult[sources == "nih"].sum() == pytest.approx(0.75 * 400 / 500)
    sampler = BalancedSampler(weights, 3000, seed=7)
    first = list(sampler)
    assert list(sampler) == first and len(first) == 3000
    sampler.set_epoch(1)
    assert list(sampler) != first
    drawn = sources[first]
    assert abs((drawn == "kermany").mean() - 0.5) < 0.05


def test_selection_score_is_the_mean_within_source_auc():
    from pneumoscan.training.metrics import selection_score

    j = LABELS.index("Pneumonia")
    labels = np.full((40, 15), np.nan, np.float32)
    labels[:, j] = np.r_[np.ones(10), np.zeros(10), np.ones(10), np.zeros(10)]
    probs = np.zeros((40, 15), np.float32)
    probs[:20, j] = np.r_[np.linspace(0.6, 1, 10), np.linspace(0, 0.4, 10)]  # source A: perfect
    probs[20:, j] = np.r_[np.linspace(0, 0.4, 10), np.linspace(0.6, 1, 10)]  # source B: inverted
    score, parts = selection_score(labels, probs, np.array(["A"] * 20 + ["B"] * 20))
    assert parts == {"Pneumonia/A": 1.0, "Pneumonia/B": 0.0} and score == pytest.approx(0.5)


def test_labels_of_single_class_sources_are_masked_for_training():
    from pneumoscan.training.data import mask_single_class_sources

    j, k = LABELS.index("Pneumonia"), LABELS.index("Effusion")
    labels = np.full((6, 15), np.nan, np.float32)
    labels[:, j] = [1, 0, 0, 0, 1, 0]          # A: both classes; B: only negatives
    labels[:, k] = [0, 1, 0, 0, np.nan, np.nan]
    sources = np.array(["A", "A", "B", "B", "C", "C"])
    out, masked = mask_single_class_sources(labels, sources)
    assert np.isnan(out[2:4, j]).all() and not np.isnan(out[:2, j]).any()  # B taught only "B = not pneumonia"
    assert masked == {"B": ["Effusion", "Pneumonia"]}
    np.testing.assert_array_equal(out[4:, j], [1, 0])  # C has both
    assert not np.isnan(labels).sum() == np.isnan(out).sum()  # the input is left as it was
