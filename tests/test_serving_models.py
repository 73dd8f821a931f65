"""The served model: it trains, rebuilds from config + tensors, and predicts in batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aimodels.serving.models import (
    DIGITS_SIGNATURE,
    DigitsClassifier,
    Servable,
    build_model,
    digits_arrays,
    digits_config,
    train_digits_classifier,
)


@pytest.fixture(scope="module")
def trained():
    return train_digits_classifier(epochs=30)


def test_digits_arrays_are_raw_pixels():
    data = digits_arrays()
    assert data["X_train"].shape == (1437, 64) and data["X_test"].shape == (360, 64)
    assert data["X_train"].dtype == np.float32 and data["y_train"].dtype == np.int64
    assert data["X_train"].min() == 0 and data["X_train"].max() == 16
    np.testing.assert_allclose(data["X_train"], np.round(data["X_train"]), atol=1e-5)


def test_training_reaches_high_accuracy(trained):
    _, metrics = trained
    assert metrics["test_accuracy"] > 0.93 and metrics["trained"] == 1.0


def test_untrained_model_is_near_chance():
    _, metrics = train_digits_classifier(hidden=32, train=False)
    assert metrics["trained"] == 0.0 and metrics["test_accuracy"] < 0.4


def test_rebuild_from_config_and_tensors_gives_the_same_outputs(trained):
    model, _ = trained
    rebuilt = build_model(digits_config(), model.state_dict())
    x = torch.from_numpy(digits_arrays()["X_test"][:17])
    torch.testing.assert_close(rebuilt(x), model(x))


def test_build_model_is_strict_and_names_the_architecture(trained):
    model, _ = trained
    with pytest.raises(ValueError, match="unknown architecture 'resnet'"):
        build_model({"architecture": "resnet"}, model.state_dict())
    with pytest.raises(RuntimeError, match="size mismatch"):
        build_model(digits_config(hidden=32), model.state_dict())


def test_wider_and_deeper_variants_keep_the_interface():
    model = DigitsClassifier(hidden=128, depth=3)
    assert model(torch.zeros(5, 64)).shape == (5, 10)
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 4
    with pytest.raises(ValueError, match="hidden must be a positive int"):
        DigitsClassifier(hidden=0)
    with pytest.raises(ValueError, match="depth must be a positive int"):
        DigitsClassifier(depth=0)


def test_servable_predict_batches_and_matches_the_model(trained):
    model, _ = trained
    servable = Servable("digits", 1, model, digits_config())
    assert servable.signature == DIGITS_SIGNATURE
    x = digits_arrays()["X_test"][:9]
    out = servable.predict({"input": x})
    assert out["probabilities"].dtype == np.float32 and out["probabilities"].shape == (9, 10)
    assert out["label"].dtype == np.int64 and out["label"].shape == (9,)
    np.testing.assert_allclose(out["probabilities"].sum(1), 1.0, rtol=1e-5)
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(x)), -1).numpy()
    np.testing.assert_allclose(out["probabilities"], expected, rtol=1e-6, atol=1e-7)
    # Row by row equals the whole batch: batching must not change an answer.
    rows = np.concatenate([servable.predict({"input": x[i:i + 1]})["probabilities"]
                           for i in range(len(x))])
    np.testing.assert_allclose(rows, out["probabilities"], rtol=1e-5, atol=1e-6)
