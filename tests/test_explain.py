"""Grad-CAM relative to a reference film, its summary (peak, region), and the picture that shows it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pneumoscan.networks import ChestClassifier
from pneumoscan.explain import GradCAM, cam_from_features, cam_summary, head_gradient
from pneumoscan.outputs.overlay import prediction_picture


@pytest.fixture(scope="module")
def model() -> ChestClassifier:
    torch.manual_seed(0)
    return ChestClassifier().eval()


def _features(model: ChestClassifier, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.feature_map(x).numpy()


def test_relative_map_sums_to_the_logit_rise_over_the_reference(model):
    """With the two-layer head the logit is g·pooled + c exactly, so the relative map (before its
    ReLU) sums to g·(pooled − r): the logit's rise over the reference film's features."""
    torch.manual_seed(1)
    x = torch.rand(1, 1, 96, 96)
    features = _features(model, x)
    reference = _features(model, torch.rand(4, 1, 96, 96)).mean(axis=(0, 2, 3))
    pooled = features.mean(axis=(2, 3))
    g = head_gradient(pooled, model.head, 3)
    raw = (g[:, :, None, None] / 9 * (features - reference[None, :, None, None])).sum(axis=1)  # 3×3 map
    with torch.no_grad():
        logit = model.head(torch.from_numpy(pooled))[0, 3].item()
        # the same active units at the reference: its logit by the same linear piece
        w1, b1 = model.head[0].weight.numpy(), model.head[0].bias.numpy()
        active = (pooled @ w1.T + b1) > 0
        w2, b2 = model.head[3].weight.numpy()[3], model.head[3].bias.numpy()[3]
        at_reference = float((((reference @ w1.T + b1) * active) @ w2 + b2)[0])
    assert raw.sum() == pytest.approx(logit - at_reference, rel=1e-4, abs=1e-4)


def test_hooks_and_forward_only_agree_with_a_reference(model):
    torch.manual_seed(2)
    x = torch.rand(2, 1, 96, 96)
    reference = _features(model, torch.rand(3, 1, 96, 96)).mean(axis=(0, 2, 3))
    with GradCAM(model, reference=reference) as cam:
        hooked = cam(x, 5)
    forward_only = cam_from_features(_features(model, x), model.head, 5, (96, 96), reference=reference)
    assert np.abs(hooked - forward_only).max() < 1e-4


def test_a_map_that_plain_gradcam_leaves_blank_is_not_blank_relative_to_a_weaker_film(model):
    """Find a film and class whose plain map is empty although its logit is above an average
    film's: the relative map is not empty there (the issue's 'blank on called films')."""
    torch.manual_seed(3)
    films = torch.rand(24, 1, 96, 96) * torch.linspace(0.2, 1.0, 24)[:, None, None, None]
    features = _features(model, films)
    reference = features.mean(axis=(0, 2, 3))
    with torch.no_grad():
        logits = model.head(torch.from_numpy(features.mean(axis=(2, 3)))).numpy()
        at_ref = model.head(torch.from_numpy(reference[None])).numpy()[0]
    found = 0
    for i in range(len(films)):
        for k in range(15):
            plain = cam_from_features(features[i:i + 1], model.head, k, (96, 96))[0]
            if plain.max() == 0 and logits[i, k] > at_ref[k] + 0.05:
                relative = cam_from_features(features[i:i + 1], model.head, k, (96, 96), reference=reference)[0]
                assert relative.max() > 0
                found += 1
    assert found > 0, "no blank plain map found: the test would not test anything"


def test_cam_summary_peak_and_region_in_original_pixels():
    heat = np.zeros((224, 224), np.float32)
    heat[100:120, 30:60] = 1.0
    heat[110, 40] = 2.0
    lung = np.zeros((224, 224), np.uint8)
    lung[:, :50] = 1
    box = (100, 200, 548, 648)  # the crop is this box stretched to 224²: 2 original pixels per crop pixel
    peak, region = cam_summary(heat, lung, box)
    assert peak == [100 + 81, 200 + 221]
    assert region == [100 + 60, 200 + 200, 100 + 100, 200 + 240]  # x 30..49: cut at the lung mask (x < 50)
    assert cam_summary(np.zeros((224, 224), np.float32), lung, box) == (None, None)
    outside = cam_summary(heat, np.zeros_like(lung), box)
    assert outside[0] == peak and outside[1] is None


def _colour_share(picture: np.ndarray) -> float:
    p = picture.astype(int)
    return float(((np.abs(p[..., 0] - p[..., 1]) + np.abs(p[..., 1] - p[..., 2])) > 30).mean())


def test_a_map_below_threshold_is_muted_and_the_title_says_not_called():
    film = np.tile(np.linspace(0.2, 0.8, 800, dtype=np.float32), (600, 1))  # above MIN_SIDE: drawn 1:1
    cam = np.zeros((600, 800), np.float32)
    cam[100:300, 120:400] = 1.0
    called = prediction_picture(film, None, None, False, cam, "Pneumonia", 0.7, threshold=0.5, region=[120, 100, 400, 300])
    muted = prediction_picture(film, None, None, False, cam, "Pneumonia", 0.3, threshold=0.5, region=[120, 100, 400, 300])
    assert called.shape == muted.shape
    # the muted map changes the film's colour less
    diff = lambda pic: np.abs(pic[80:160, 120:400].astype(int) - pic[80:160, 600:760].mean()).mean()  # noqa: E731
    assert _colour_share(muted[:, :800]) <= _colour_share(called[:, :800])
    assert diff(muted) != diff(called)
