"""Offline datasets: data that ships inside installed packages, or that we generate."""

from __future__ import annotations

import numpy as np


def diabetes_regression(test_fraction: float = 0.2, seed: int = 0) -> dict[str, np.ndarray]:
    """scikit-learn's diabetes data (Efron et al., 2004), standardised, split train/test.

    442 patients, 10 baseline measurements, and a measure of disease progression one
    year later. The file ships with scikit-learn, so no download is needed.
    Features and target are standardised with the training split's mean and standard
    deviation, so a learning rate means the same thing along every axis.
    Returns ``X_train, y_train, X_test, y_test`` (float64).
    """
    from sklearn.datasets import load_diabetes
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    X, y = load_diabetes(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=test_fraction, random_state=seed
    )
    x_mean, x_std = X_train.mean(axis=0), X_train.std(axis=0)
    y_mean, y_std = y_train.mean(), y_train.std()
    return {
        "X_train": (X_train - x_mean) / x_std,
        "y_train": (y_train - y_mean) / y_std,
        "X_test": (X_test - x_mean) / x_std,
        "y_test": (y_test - y_mean) / y_std,
    }


def digits(size: int = 8, test_fraction: float = 0.2, seed: int = 0) -> dict:
    """scikit-learn's handwritten digits as tensors, split into train and test.

    1,797 grey-scale images of the digits 0-9, 8×8 pixels with values 0-16, shipped
    with scikit-learn (a copy of the UCI optical digits test set). Pixels are scaled to
    [0, 1]. With ``size=32`` the images are enlarged by bilinear interpolation to the
    32×32 input of LeNet-5. Returns ``X_train, y_train, X_test, y_test`` with images of
    shape ``[n, 1, size, size]`` (float32) and labels of shape ``[n]`` (int64).
    The split is stratified, so every class keeps its share in both parts.
    """
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8 (the images are 8x8), got {size!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        images = torch.nn.functional.interpolate(
            images, size=(size, size), mode="bilinear", align_corners=False
        )
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=bunch.target
    )
    return {
        "X_train": images[train_idx],
        "y_train": labels[train_idx],
        "X_test": images[test_idx],
        "y_test": labels[test_idx],
    }
