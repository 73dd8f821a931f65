"""The models the service runs, and the one interface the server needs from them.

A server must not care which network it serves. It needs three things from a model:
its *signature* (the names, datatypes and shapes of inputs and outputs, which the
Open Inference Protocol's metadata route reports), a way to rebuild it from what the
model store holds (a config and a dict of tensors), and a batched `predict` that maps
named NumPy arrays to named NumPy arrays. `Servable` bundles these.

The example model is the digits classifier: an MLP on scikit-learn's 8×8 digits. It
takes the raw pixel values 0-16 (64 per image) and returns class probabilities and a
label. `hidden` and `depth` make it wider and deeper without changing its interface:
chapter 12's benchmark uses that knob to vary the model's cost per call.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "DIGITS_SIGNATURE",
    "DigitsClassifier",
    "Servable",
    "build_model",
    "digits_arrays",
    "digits_config",
    "train_digits_classifier",
]

# The v2 protocol's view of the digits model. -1 means "any size" (the batch).
DIGITS_SIGNATURE: dict[str, list[dict[str, Any]]] = {
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
    "outputs": [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "label", "datatype": "INT64", "shape": [-1]},
    ],
}


class DigitsClassifier(nn.Module):
    """An MLP from 64 raw pixel values (0-16) to 10 class logits.

    The input is divided by 16 inside the model, so clients send the pixels exactly as
    `sklearn.datasets.load_digits` gives them. `depth` hidden layers of width `hidden`.
    """

    def __init__(self, hidden: int = 64, depth: int = 1) -> None:
        super().__init__()
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be a positive int, got {hidden!r}")
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        layers: list[nn.Module] = []
        width = 64
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, 10))
        self.net = nn.Sequential(*layers)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels / 16.0)


def digits_config(hidden: int = 64, depth: int = 1) -> dict[str, Any]:
    """The config stored beside the weights: enough to rebuild the model and serve it."""
    return {
        "architecture": "digits_mlp",
        "hidden": hidden,
        "depth": depth,
        "signature": DIGITS_SIGNATURE,
    }


def digits_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """The digits split as raw float32 pixels 0-16 of shape [n, 64] and int64 labels.

    The same stratified split as `aimodels.data.digits` (1,437 train, 360 test images).
    """
    from aimodels.data import digits

    data = digits(seed=seed)
    return {
        key: (value.reshape(len(value), -1) * 16.0).numpy() if key.startswith("X") else
        value.numpy()
        for key, value in data.items()
    }


def train_digits_classifier(
    hidden: int = 64, depth: int = 1, epochs: int = 60, seed: int = 0, train: bool = True
) -> tuple[DigitsClassifier, dict[str, float]]:
    """Train the classifier with Adam on the digits training split; return it and its metrics.

    `train=False` returns a randomly initialised model (for cost benchmarks, where only
    the arithmetic matters); its metrics then say so. 60 epochs take about a second.
    """
    torch.manual_seed(seed)
    model = DigitsClassifier(hidden, depth)
    data = digits_arrays(seed)
    X, y = torch.from_numpy(data["X_train"]), torch.from_numpy(data["y_train"])
    X_test, y_test = torch.from_numpy(data["X_test"]), torch.from_numpy(data["y_test"])
    start = time.perf_counter()
    if train:
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for idx in torch.randperm(len(X), generator=generator).split(64):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
                optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(X_test).argmax(1) == y_test).float().mean().item()
    metrics = {
        "test_accuracy": accuracy,
        "train_seconds": time.perf_counter() - start,
        "trained": float(train),
    }
    return model, metrics


def build_model(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """Rebuild a model from its stored config and weights (strictly: no missing keys)."""
    architecture = config.get("architecture")
    if architecture == "digits_mlp":
        model = DigitsClassifier(int(config["hidden"]), int(config["depth"]))
    else:
        raise ValueError(
            f"unknown architecture {architecture!r} in the model config; "
            "expected one of ['digits_mlp']"
        )
    model.load_state_dict(dict(tensors), strict=True)
    return model.eval()


_NUMPY = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}


@dataclass
class Servable:
    """A loaded model as the server sees it: name, version, signature and `predict`."""

    name: str
    version: int
    model: nn.Module
    config: dict[str, Any]
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def signature(self) -> dict[str, list[dict[str, Any]]]:
        return self.config["signature"]

    @classmethod
    def from_store(cls, store: Any, name: str, ref: int | str = "production") -> Servable:
        """Load `name` at a version or alias from an `aimodels.serving.store.ModelStore`."""
        stored = store.load(name, ref)
        model = build_model(stored.config, stored.tensors)
        return cls(stored.name, stored.version, model, stored.config, stored.manifest)

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on a batch: named input arrays in, named output arrays out.

        Inputs must already be validated against the signature (the server does it).
        """
        if self.config["architecture"] == "digits_mlp":
            x = torch.from_numpy(np.ascontiguousarray(inputs["input"], dtype=np.float32))
            with torch.inference_mode():
                probabilities = torch.softmax(self.model(x), dim=-1)
            return {
                "probabilities": probabilities.numpy(),
                "label": probabilities.argmax(-1).numpy().astype(np.int64),
            }
        raise ValueError(f"no predict rule for architecture {self.config['architecture']!r}")

    def output_dtype(self, name: str) -> type:
        """The NumPy dtype of an output, from the signature."""
        for spec in self.signature["outputs"]:
            if spec["name"] == name:
                return _NUMPY[spec["datatype"]]
        raise KeyError(name)
