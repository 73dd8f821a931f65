"""Datasets. Offline: data that ships inside installed packages, or that we generate.
Online: MNIST and CIFAR-10 through torchvision, with a clear error when they are absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing (or corrupt) and cannot be downloaded here."""


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


def _missing(name: str, folder: Path, missing: list[str], offline: str, cause: str = "") -> str:
    return (
        f"{name} is not available: {len(missing)} file(s) missing from {folder}: "
        f"{', '.join(missing)}.{cause} To get it, call this function with download=True on a "
        f"machine with internet access, or copy the extracted files into that folder. "
        f"To work offline instead, use {offline}."
    )


def mnist(root: str | Path, train: bool = True, download: bool = False, transform=None):
    """MNIST (LeCun et al., 1998) through ``torchvision.datasets.MNIST``.

    Expects the four extracted files of :data:`MNIST_FILES` in ``root/MNIST/raw``.
    Without them, and without ``download=True``, raises :class:`DatasetNotFoundError`
    naming the folder, the missing files and the offline alternative. Images come as
    ``[1, 28, 28]`` float tensors in [0, 1] unless another ``transform`` is given.
    """
    from torchvision import datasets, transforms

    folder = Path(root) / "MNIST" / "raw"
    missing = [f for f in MNIST_FILES if not (folder / f).is_file()]
    offline = "aimodels.data.digits(size=28), the 8x8 digits enlarged to MNIST's size"
    if missing and not download:
        raise DatasetNotFoundError(_missing("MNIST", folder, missing, offline))
    try:
        return datasets.MNIST(
            str(root), train=train, download=download, transform=transform or transforms.ToTensor()
        )
    except (RuntimeError, OSError) as exc:  # no network, or a broken download
        raise DatasetNotFoundError(
            _missing("MNIST", folder, missing or list(MNIST_FILES), offline, f" ({exc})")
        ) from exc


def cifar10(
    root: str | Path,
    train: bool = True,
    download: bool = False,
    transform=None,
    verify_checksums: bool = True,
):
    """CIFAR-10 (Krizhevsky, 2009) through ``torchvision.datasets.CIFAR10``.

    Expects the extracted python version in ``root/cifar-10-batches-py``. torchvision
    checks each file's MD5 checksum before unpickling it; ``verify_checksums=False``
    only checks that the files exist. Use it for files you made yourself (the tests
    write tiny ones): unpickling a file runs code, so never use it on files you did
    not make or verify.
    """
    from torchvision import datasets, transforms

    folder = Path(root) / "cifar-10-batches-py"
    missing = [f for f in CIFAR10_FILES if not (folder / f).is_file()]
    offline = "aimodels.data.digits(size=32), which LeNet-5 accepts too"
    if missing and not download:
        raise DatasetNotFoundError(_missing("CIFAR-10", folder, missing, offline))
    dataset_class = datasets.CIFAR10 if verify_checksums else _unchecked_cifar10_class()
    try:
        return dataset_class(
            str(root), train=train, download=download, transform=transform or transforms.ToTensor()
        )
    except (RuntimeError, OSError) as exc:
        raise DatasetNotFoundError(
            f"CIFAR-10 files in {folder} are missing or fail their MD5 checksum ({exc}). "
            f"Download them again with download=True, or use {offline}."
        ) from exc


def _unchecked_cifar10_class():
    from torchvision import datasets

    class UncheckedCIFAR10(datasets.CIFAR10):
        """CIFAR-10 whose files are only checked for existence (md5 None)."""

        train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
        test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
        meta = {**datasets.CIFAR10.meta, "md5": None}

    return UncheckedCIFAR10



def seasonal_series(
    n_steps: int = 2000, period: int = 24, noise: float = 0.2, seed: int = 0
) -> np.ndarray:
    r"""A noisy seasonal time series, such as hourly demand with a daily cycle.

    :math:`y_t = \sin(2\pi t / P) + 0.5 \sin(4\pi t / P + 1) + 0.3\,\sin(2\pi t / (7P))
    + \varepsilon_t`, with :math:`\varepsilon_t \sim \mathcal N(0, \sigma^2)`: a main
    cycle of period P, a harmonic, a slow "weekly" cycle and Gaussian noise.
    """
    if not isinstance(period, int) or period < 2:
        raise ValueError(f"period must be an int >= 2, got {period!r}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    t = np.arange(n_steps, dtype=np.float64)
    signal = (np.sin(2 * np.pi * t / period) + 0.5 * np.sin(4 * np.pi * t / period + 1)
              + 0.3 * np.sin(2 * np.pi * t / (7 * period)))
    return signal + noise * np.random.default_rng(seed).standard_normal(n_steps)


def forecasting_windows(series: np.ndarray, window: int, test_fraction: float = 0.25) -> dict:
    """Cut a series into (past ``window`` values -> next value) pairs, split in time.

    The last ``test_fraction`` of the series is held out: every test target comes after
    every training target, so no future value leaks into training. Returns float32
    tensors ``X_train, y_train, X_test, y_test`` of shapes ``[n, window, 1]`` and ``[n, 1]``.
    """
    import torch

    series = np.asarray(series, dtype=np.float32)
    if series.ndim != 1 or len(series) <= window + 1:
        raise ValueError(
            f"expected a 1-D series longer than window + 1 = {window + 1}, got shape {series.shape}"
        )
    X = np.lib.stride_tricks.sliding_window_view(series[:-1], window)  # [n, window]
    y = series[window:]
    split = int(len(y) * (1 - test_fraction))
    to_tensor = lambda a: torch.tensor(np.ascontiguousarray(a))  # noqa: E731
    return {
        "X_train": to_tensor(X[:split, :, None]),
        "y_train": to_tensor(y[:split, None]),
        "X_test": to_tensor(X[split:, :, None]),
        "y_test": to_tensor(y[split:, None]),
    }


_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
         "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_DIGITS_ZH = "零一二三四五六七八九"


def english_number(n: int) -> str:
    """British English words for 0 <= n <= 9999: 321 -> "three hundred and twenty-one"."""
    if not isinstance(n, int) or not 0 <= n <= 9999:
        raise ValueError(f"english_number covers the integers 0..9999, got {n!r}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("-" + _ONES[n % 10] if n % 10 else "")
    big, rest = (n // 1000, n % 1000) if n >= 1000 else (0, n)
    parts = [f"{_ONES[big]} thousand"] if big else []
    if rest >= 100:
        parts.append(f"{_ONES[rest // 100]} hundred")
    if rest % 100:
        parts.append(("and " if parts else "") + english_number(rest % 100))
    return " ".join(parts)


def chinese_number(n: int) -> str:
    """Chinese numerals for 0 <= n <= 9999: 321 -> "三百二十一", 105 -> "一百零五", 15 -> "十五".

    A zero inside the number is read once as 零 (1005 -> 一千零五); tens after a larger
    unit keep their 一 (110 -> 一百一十), but 10..19 on their own do not (15 -> 十五).
    The digit 2 is written 二 throughout; everyday speech often says 两 before 百 and 千.
    """
    if not isinstance(n, int) or not 0 <= n <= 9999:
        raise ValueError(f"chinese_number covers the integers 0..9999, got {n!r}")
    if n < 10:
        return _DIGITS_ZH[n]
    if n < 20:
        return "十" + (_DIGITS_ZH[n % 10] if n % 10 else "")
    digits = [n // 1000, n // 100 % 10, n // 10 % 10, n % 10]
    units = ["千", "百", "十", ""]
    out, zero_pending, started = [], False, False
    for digit, unit in zip(digits, units, strict=True):
        if digit == 0:
            zero_pending = started
            continue
        if zero_pending:
            out.append("零")
            zero_pending = False
        out.append(_DIGITS_ZH[digit] + unit)
        started = True
    return "".join(out)


def number_translation_pairs(
    low: int = 1, high: int = 999, test_fraction: float = 0.2, seed: int = 0
) -> dict[str, list[tuple[int, str, str]]]:
    """(number, English words, Chinese numerals) triples, split so that test numbers are unseen.

    Every integer in [low, high] appears once; a random ``test_fraction`` of them is held
    out, so the test set measures translation of numbers never seen in training.
    """
    if not 0 <= low < high <= 9999:
        raise ValueError(f"expected 0 <= low < high <= 9999, got low={low!r}, high={high!r}")
    numbers = np.random.default_rng(seed).permutation(np.arange(low, high + 1)).tolist()
    n_test = int(round(len(numbers) * test_fraction))
    triple = lambda n: (n, english_number(n), chinese_number(n))  # noqa: E731
    return {"train": [triple(n) for n in sorted(numbers[n_test:])],
            "test": [triple(n) for n in sorted(numbers[:n_test])]}


def stdlib_files(max_chars: int = 200_000) -> list[tuple[str, str]]:
    """``(file name, text)`` pairs of the standard library's top-level ``*.py`` files.

    Files are taken in alphabetical order until ``max_chars`` characters are collected;
    the last one is cut at that limit. :func:`stdlib_corpus` joins the texts.
    """
    import sysconfig

    if not isinstance(max_chars, int) or max_chars < 1:
        raise ValueError(f"max_chars must be a positive int, got {max_chars!r}")
    folder = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(folder.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")[: max_chars - total]
        files.append((path.name, text))
        total += len(text)
        if total >= max_chars:
            break
    if not files:
        raise FileNotFoundError(f"no Python source files in the standard library folder {folder}")
    return files


def stdlib_split(max_chars: int = 1_200_000, val_every: int = 8) -> dict[str, str]:
    """A train/validation split of the standard-library corpus **by file** (Chapter 9).

    Every ``val_every``-th file (in alphabetical order, starting with the
    ``val_every``-th) goes to validation, the rest to training, so no file has lines on
    both sides: a model cannot score well on validation by having memorised the
    neighbouring lines of the same file. Returns ``{"train": ..., "val": ...,
    "val_files": "comma-separated names"}``.
    """
    if not isinstance(val_every, int) or val_every < 2:
        raise ValueError(f"val_every must be an int >= 2, got {val_every!r}")
    files = stdlib_files(max_chars)
    val = [(name, text) for i, (name, text) in enumerate(files, 1) if i % val_every == 0]
    if not val:
        raise ValueError(f"only {len(files)} files were read; raise max_chars so that at least "
                         f"{val_every} files are read and one goes to validation")
    train = [text for i, (_, text) in enumerate(files, 1) if i % val_every]
    return {"train": "".join(train), "val": "".join(text for _, text in val),
            "val_files": ", ".join(name for name, _ in val)}


def stdlib_corpus(max_chars: int = 200_000) -> str:
    """Text from the Python standard library's own source files: a corpus every machine has.

    Reads the top-level ``*.py`` files of the running Python's standard library in
    alphabetical order until ``max_chars`` characters are collected. The text differs a
    little between Python versions, so results computed from it are not byte-identical
    across versions.
    """
    return "".join(text for _, text in stdlib_files(max_chars))


def multistep_windows(series: np.ndarray, window: int, horizon: int,
                      test_fraction: float = 0.25) -> dict:
    """Cut a series into (past ``window`` values -> next ``horizon`` values) pairs, split in time.

    Window i holds ``series[i : i + window]`` and its targets are
    ``series[i + window : i + window + horizon]``. The split is made at the same point as
    :func:`forecasting_windows` (the last ``test_fraction`` of the targets), and the last
    ``horizon - 1`` training windows are dropped: their later targets would be test
    targets. Returns float32 tensors ``X_train, Y_train, X_test, Y_test`` of shapes
    ``[n, window, 1]`` and ``[n, horizon]``.
    """
    import torch

    series = np.asarray(series, dtype=np.float32)
    if not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"horizon must be a positive int, got {horizon!r}")
    if series.ndim != 1 or len(series) <= window + horizon:
        raise ValueError(f"expected a 1-D series longer than window + horizon = "
                         f"{window + horizon}, got shape {series.shape}")
    cut = np.lib.stride_tricks.sliding_window_view(series, window + horizon)
    X, Y = cut[:, :window], cut[:, window:]
    split = int((len(series) - window) * (1 - test_fraction))  # first test window
    to_tensor = lambda a: torch.tensor(np.ascontiguousarray(a))  # noqa: E731
    last_train = max(split - horizon + 1, 0)
    return {
        "X_train": to_tensor(X[:last_train, :, None]),
        "Y_train": to_tensor(Y[:last_train]),
        "X_test": to_tensor(X[split:, :, None]),
        "Y_test": to_tensor(Y[split:]),
    }


def logistic_map_series(n_steps: int = 2000, r: float = 4.0, x0: float = 0.2,
                        noise: float = 0.0, seed: int = 0) -> np.ndarray:
    r"""The logistic map :math:`x_{t+1} = r\,x_t (1 - x_t)` (May, 1976), optionally observed
    with Gaussian noise of standard deviation ``noise``.

    At r = 4 the series is chaotic: each value is an exact quadratic function of the
    previous one, yet a *linear* forecast from past values does no better than the mean
    (measured in Chapter 5). The recursion runs in float64, whose arithmetic is exactly
    rounded, so the series is the same on every machine.
    """
    if not 0 < r <= 4:
        raise ValueError(f"r must be in (0, 4] so that the map stays in [0, 1], got {r!r}")
    if not 0 < x0 < 1:
        raise ValueError(f"x0 must be strictly between 0 and 1, got {x0!r}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    x = np.empty(n_steps, dtype=np.float64)
    x[0] = x0
    for t in range(1, n_steps):
        x[t] = r * x[t - 1] * (1.0 - x[t - 1])
    return x + noise * np.random.default_rng(seed).standard_normal(n_steps)
