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
