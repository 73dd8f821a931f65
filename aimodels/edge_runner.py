r"""Run an ONNX classifier on a file of inputs, with no PyTorch at all (Chapter 14).

A device that only *runs* a model needs neither PyTorch nor this course's package: the
ONNX file holds the graph and the weights, and ONNX Runtime executes it. This script
imports only ``onnxruntime``, ``numpy`` and the standard library, so it runs where
PyTorch is not installed::

    python aimodels/edge_runner.py model.onnx digits.npy
    python -m aimodels.edge_runner model.onnx digits.csv --threads 1

(the second form works because ``aimodels/__init__.py`` imports nothing). The inputs
are a ``.npy`` array or a ``.csv`` file with one example per row. They are cast to the
model's input dtype (float32 pixels, int64 token ids) and each row is reshaped to the
model's fixed input sizes (64 values become ``[1, 8, 8]``). The script prints one JSON
object: the predicted class of every example (the arg-max over the last axis), whether
``torch`` was imported (it never is), the wall-clock time at the first prediction (for
measuring cold start from outside), the time spent importing, loading and predicting,
and the peak resident memory of the process.
"""

from __future__ import annotations

import sys
import time

_T_START = time.time()

if __name__ == "__main__":
    # ``python aimodels/edge_runner.py`` puts aimodels/ first on sys.path, and its modules
    # (data.py, text.py, ...) would shadow top-level modules of the same name. Drop it.
    from pathlib import Path as _Path

    if sys.path and _Path(sys.path[0] or ".").resolve() == _Path(__file__).resolve().parent:
        sys.path.pop(0)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime  # noqa: E402

_T_IMPORTED = time.time()

DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64,
          "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def load_inputs(path: str | Path) -> np.ndarray:
    """A ``.npy`` array, or a ``.csv`` file of numbers with one example per row."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no input file at {path}")
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if path.suffix == ".csv":
        return np.loadtxt(path, delimiter=",", ndmin=2)
    raise ValueError(f"inputs must be a .npy or .csv file, got {path.name}")


def fit_to_input(array: np.ndarray, shape: list, type_name: str) -> np.ndarray:
    """Cast ``array`` to the input's dtype and reshape each example to its fixed sizes.

    ``shape`` is the input's declared shape, axis 0 the (dynamic) batch; the other axes
    must be fixed ints unless the array already has the right rank.
    """
    dtype = DTYPES.get(type_name)
    if dtype is None:
        raise ValueError(f"unsupported input type {type_name}")
    if np.issubdtype(dtype, np.integer) and not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.equal(np.mod(array, 1), 0)):
            raise ValueError(f"the model expects integers ({type_name}), got fractions")
    array = array.astype(dtype, copy=False)
    if array.ndim == len(shape):
        return array
    rest = shape[1:]
    if not all(isinstance(d, int) for d in rest):
        raise ValueError(f"cannot reshape inputs of shape {list(array.shape)} to {shape}: "
                         f"only the batch axis may be dynamic")
    per_example = math.prod(rest)
    if array.ndim < 1 or array[0].size != per_example:
        raise ValueError(f"each example must have {per_example} values to fit {shape}, "
                         f"got shape {list(array.shape)}")
    return array.reshape(len(array), *rest)


def open_session(model: str | Path, threads: int = 1) -> onnxruntime.InferenceSession:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads."""
    if not Path(model).is_file():
        raise FileNotFoundError(f"no ONNX file at {model}")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(model), sess_options=options,
                                        providers=["CPUExecutionProvider"])


def predict(session: onnxruntime.InferenceSession, array: np.ndarray) -> list:
    """The arg-max over the last axis of the first output, as nested lists of ints."""
    declared = session.get_inputs()[0]
    x = fit_to_input(array, list(declared.shape), declared.type)
    output = session.run(None, {declared.name: x})[0]
    return output.argmax(axis=-1).tolist()


def peak_rss_bytes() -> int | None:
    """Peak resident memory of this process in bytes, or ``None`` where unknown.

    On Linux this is ``VmHWM`` from ``/proc/self/status``, the high-water mark of this
    program's own memory. ``getrusage``'s ``ru_maxrss`` is not used there: Linux carries
    it across ``exec``, so a child started by a large parent (a notebook with PyTorch
    loaded) would report the parent's peak. Elsewhere ``ru_maxrss`` is used (bytes on
    macOS); on Windows there is no ``resource`` module.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="the .onnx file")
    parser.add_argument("inputs", help="a .npy or .csv file, one example per row")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    args = parser.parse_args(argv)
    session = open_session(args.model, args.threads)
    t_loaded = time.time()
    predictions = predict(session, load_inputs(args.inputs))
    t_first = time.time()
    report = {
        "predictions": predictions,
        "torch_imported": "torch" in sys.modules,
        "first_prediction_unix": t_first,
        "seconds": {"imports": _T_IMPORTED - _T_START, "load": t_loaded - _T_IMPORTED,
                    "first_prediction": t_first - t_loaded},
        "peak_rss_bytes": peak_rss_bytes(),
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
