"""EfficientNet-Lite0 model code reproduces ImageNet predictions with the shipped weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from niteru.models.efficientnet_lite import (
    FEATURE_DIM,
    INPUT_MEAN,
    INPUT_SIZE,
    INPUT_STD,
    efficientnet_lite0,
    same_padding,
)

skimage_data = pytest.importorskip("skimage.data")

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
IMAGENET_COFFEE = {967, 968}  # espresso, cup


def _preprocess(rgb: np.ndarray) -> torch.Tensor:
    img = Image.fromarray(rgb).resize((INPUT_SIZE, INPUT_SIZE), Image.BICUBIC)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255.0)[None]
    mean = torch.tensor(INPUT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(INPUT_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return efficientnet_lite0("shipped")


def test_same_padding_matches_tensorflow() -> None:
    assert same_padding(224, 3, 2) == (0, 1)  # TF pads the bottom/right only for even inputs
    assert same_padding(224, 5, 2) == (1, 2)
    assert same_padding(7, 3, 1) == (1, 1)
    assert same_padding(225, 3, 2) == (1, 1)


def test_normalisation_is_x_minus_127_over_128() -> None:
    pixels = torch.tensor([0.0, 127.0, 255.0])
    scaled = (pixels / 255.0 - INPUT_MEAN[0]) / INPUT_STD[0]
    torch.testing.assert_close(scaled, (pixels - 127.0) / 128.0)


def test_shipped_weights_classify_chelsea_as_a_cat(model: torch.nn.Module) -> None:
    with torch.inference_mode():
        probs = model(_preprocess(skimage_data.chelsea())).softmax(-1)[0]
    top5 = probs.topk(5).indices.tolist()
    assert top5[0] in IMAGENET_CATS, f"top-5 classes {top5}"
    assert float(probs[list(IMAGENET_CATS)].sum()) > 0.8  # measured 0.96


def test_shipped_weights_classify_coffee_as_espresso(model: torch.nn.Module) -> None:
    with torch.inference_mode():
        top1 = int(model(_preprocess(skimage_data.coffee())).argmax(-1))
    assert top1 in IMAGENET_COFFEE


def test_random_init_does_not_recognise_the_cat() -> None:
    torch.manual_seed(0)
    random_model = efficientnet_lite0(None)
    with torch.inference_mode():
        probs = random_model(_preprocess(skimage_data.chelsea())).softmax(-1)[0]
    assert float(probs[list(IMAGENET_CATS)].sum()) < 0.1


def test_feature_model_outputs_pooled_1280d_and_matches_classifier_trunk(model: torch.nn.Module) -> None:
    features = efficientnet_lite0("shipped", classifier=False)
    x = _preprocess(skimage_data.chelsea())
    with torch.inference_mode():
        feats = features(x)
        torch.testing.assert_close(feats, model.forward_features(x))
        # non-square / odd inputs work thanks to dynamic SAME padding
        assert features(torch.zeros(2, 3, 193, 251)).shape == (2, FEATURE_DIM)
    assert feats.shape == (1, FEATURE_DIM)


def test_fused_batch_norm_gives_the_same_features() -> None:
    model = efficientnet_lite0("shipped", classifier=False)
    x = _preprocess(skimage_data.chelsea())
    with torch.inference_mode():
        reference = model(x)
        fused = model.fuse_bn()
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
        torch.testing.assert_close(fused(x), reference, atol=1e-4, rtol=1e-4)
