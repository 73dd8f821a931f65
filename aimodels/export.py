r"""Take a trained model out of Python: ``torch.export``, ONNX files and ONNX Runtime (Chapter 14).

A model trained in PyTorch is Python code plus tensors. A phone, a browser or a small
board has no Python interpreter and no PyTorch; what it can run is a *graph*: a list of
operators with fixed types, whose shapes may be symbolic. This module produces such
graphs and runs them.

**torch.export.** :func:`export_program` calls ``torch.export.export``. It runs
``forward`` once on *symbolic* tensors (fake tensors that carry a shape and a dtype but
no values) and records every ATen operator that is called, with the parameters lifted
out as inputs. The result, an ``ExportedProgram``, is a pure dataflow graph: no Python,
no ``if`` on data, no side effects. Sizes named by a ``torch.export.Dim`` stay symbolic
(``s0`` for the batch); every other size is frozen to the example's. What the graph
cannot hold makes export fail:

* an ``if`` (or ``int()``, ``.item()``) on tensor *values*. The tracer does not know the
  values, so it raises ``GuardOnDataDependentSymNode`` ("Could not guard on
  data-dependent expression"). Rewrite the branch as tensor arithmetic
  (``torch.where``), or use ``torch.cond(pred, true_fn, false_fn, operands)``, which
  records both branches in the graph;
* an ``if`` on a *dynamic size* that contradicts the range declared for it: the tracer
  then reports a constraint violation and suggests a narrower ``Dim``.

:class:`aimodels.gpt.GPT` checks its token ids with ``int(idx.min())``, a branch on
values; chapter 11's :func:`aimodels.compress.export.export_onnx` already leaves that
check out while tracing, and :func:`export_program` reuses its context manager.

**ONNX.** :func:`to_onnx` writes an ONNX file with chapter 11's
:func:`~aimodels.compress.export.export_onnx` (``torch.onnx.export(..., dynamo=True)``):
the same ``torch.export`` graph, translated into ONNX operators. Dynamic axes become
named symbolic dimensions in the file (``['batch', 1, 32, 32]``).

**ONNX Runtime.** :class:`OnnxModel` opens a file with ONNX Runtime and calls it on
NumPy arrays. Before running, it checks each array against the file's declared inputs
(:func:`shape_accepts`: the same rank, and every fixed size equal; a symbolic size
accepts any size) and dtype, and raises a ``ValueError`` or ``TypeError`` that names the
input, what the file expects and what arrived, instead of ONNX Runtime's terser error.

``TORCH_RUNNER`` is the PyTorch twin of :mod:`aimodels.edge_runner`: a program that loads
a model saved with ``torch.export.save`` and classifies a ``.npy`` file, for comparing
start-up time and memory (see :mod:`aimodels.edge`). It reads its peak memory from
Linux's ``/proc/self/status`` (``VmHWM``), so it runs on Linux only.

=============================== ==========================================================
name                            what it does
=============================== ==========================================================
:func:`export_program`          ``torch.export.export`` with dynamic batch (and sequence)
:func:`graph_ops`               the ATen operators of an exported graph, in order
:func:`to_onnx`                 an ONNX file with dynamic batch (and sequence) axes
:func:`shape_accepts`           does a concrete shape fit a declared (symbolic) shape?
:class:`OnnxModel`              ONNX Runtime on NumPy arrays, with input checks
:func:`quantize_int8`           ONNX Runtime dynamic int8 (chapter 11's helper)
``TORCH_RUNNER``                a torch-only classifier script, for comparison
=============================== ==========================================================
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from aimodels.compress.export import (
    _without_value_checks,
    export_onnx,
    file_size,
    ort_quantize_dynamic,
    ort_session,
)

__all__ = [
    "TORCH_RUNNER",
    "OnnxModel",
    "export_program",
    "file_size",
    "graph_ops",
    "quantize_int8",
    "shape_accepts",
    "to_onnx",
]

PathLike = str | os.PathLike


# --------------------------------------------------------------------------- torch.export
def _as_tuple(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if isinstance(inputs, str) or not isinstance(inputs, Sequence) or not inputs or not all(
            isinstance(x, torch.Tensor) for x in inputs):
        raise TypeError(f"example_inputs must be a tensor or a non-empty tuple of tensors, "
                        f"got {type(example_inputs).__name__}")
    return tuple(inputs)


def export_program(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor],
                   dynamic_batch: bool = True, dynamic_sequence: bool = False,
                   max_sequence: int | None = None) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` in eval mode, with symbolic batch/sequence axes.

    With ``dynamic_batch`` axis 0 of every input is ``Dim("batch")``; with
    ``dynamic_sequence`` axis 1 is ``Dim("sequence", max=max_sequence)``. A GPT adds the
    bound itself: its positional table has ``context_length`` rows, so ``max_sequence``
    defaults to that. The example's batch should be at least 2: ``torch.export``
    specialises a size of 1 (it cannot tell a broadcast from a batch of one). GPT's check
    of token-id *values* is left out while tracing, as in chapter 11's ``export_onnx``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    inputs = _as_tuple(example_inputs)
    if dynamic_batch and any(x.ndim == 0 or x.shape[0] < 2 for x in inputs):
        raise ValueError(f"a dynamic batch needs an example batch of at least 2 (a size of 1 "
                         f"is specialised), got shapes {[list(x.shape) for x in inputs]}")
    if dynamic_sequence and any(x.ndim < 2 for x in inputs):
        raise ValueError(f"dynamic_sequence needs inputs [batch, sequence, ...], got shapes "
                         f"{[list(x.shape) for x in inputs]}")
    from aimodels.gpt import GPT

    if dynamic_sequence and max_sequence is None and isinstance(model, GPT):
        max_sequence = model.config.context_length
    axes: dict[int, torch.export.Dim] = {}
    if dynamic_batch:
        axes[0] = torch.export.Dim("batch")
    if dynamic_sequence:
        axes[1] = torch.export.Dim("sequence", max=max_sequence)
    dynamic_shapes = tuple(dict(axes) for _ in inputs) if axes else None
    was_training = model.training
    model.eval()
    try:
        with _without_value_checks(model):
            return torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes)
    finally:
        model.train(was_training)


def graph_ops(program: torch.export.ExportedProgram) -> list[str]:
    """The operators an exported graph calls, in order: ``['aten.conv2d.default', ...]``.

    Placeholders (inputs and lifted parameters) and the output node are left out.
    """
    if not isinstance(program, torch.export.ExportedProgram):
        raise TypeError(f"expected a torch.export.ExportedProgram, "
                        f"got {type(program).__name__}")
    return [str(node.target) for node in program.graph.nodes if node.op == "call_function"]


# --------------------------------------------------------------------------- ONNX
def to_onnx(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor],
            path: PathLike, dynamic_batch: bool = True, dynamic_sequence: bool = False,
            input_names: Sequence[str] | None = None,
            output_names: Sequence[str] | None = ("output",)) -> Path:
    """Write ``model`` to the ONNX file ``path`` (dynamo exporter, one file); return the path.

    A thin name for chapter 11's :func:`aimodels.compress.export.export_onnx`: axis 0 of
    every input is the symbolic dimension ``batch`` with ``dynamic_batch``, axis 1 is
    ``sequence`` with ``dynamic_sequence``; GPT's id-value check is left out of the graph.
    """
    return export_onnx(model, example_inputs, path, dynamic_batch=dynamic_batch,
                       dynamic_sequence=dynamic_sequence, input_names=input_names,
                       output_names=output_names)


def quantize_int8(fp32_path: PathLike, int8_path: PathLike) -> Path:
    """ONNX Runtime's dynamic int8 quantisation (chapter 11's ``ort_quantize_dynamic``).

    It quantises the weights of ``MatMul``/``Gemm`` to int8 and those of ``Gather``, the
    embedding lookup, to uint8, with one scale per tensor; activations are quantised to
    uint8 at run time. Returns ``int8_path``.
    """
    return ort_quantize_dynamic(fp32_path, int8_path)


# --------------------------------------------------------------------------- ONNX Runtime
def shape_accepts(declared: Sequence[int | str | None], actual: Sequence[int]) -> bool:
    """Does an array of shape ``actual`` fit an ONNX input declared as ``declared``?

    ``declared`` is what ONNX Runtime reports for an input: an int for a fixed size, a
    string (``'batch'``) or ``None`` for a symbolic one. The ranks must be equal, every
    fixed size must match, and a symbolic size takes any size.
    """
    if len(declared) != len(actual):
        return False
    return all(not isinstance(d, int) or d == a for d, a in zip(declared, actual, strict=True))


_NUMPY_DTYPES = {"tensor(float)": np.dtype(np.float32), "tensor(double)": np.dtype(np.float64),
                 "tensor(int64)": np.dtype(np.int64), "tensor(int32)": np.dtype(np.int32),
                 "tensor(uint8)": np.dtype(np.uint8), "tensor(bool)": np.dtype(np.bool_)}


class OnnxModel:
    """An ONNX file run by ONNX Runtime on the CPU: ``OnnxModel(path)(array) -> ndarray``.

    ``threads`` is the number of intra-op threads (1 simulates a small device and makes
    timings comparable with ``torch.set_num_threads(1)``). ``input_names``,
    ``input_shapes`` (ints and symbolic names), ``input_dtypes`` and ``output_names``
    describe the file. Calling it with one array per input returns the first output, or
    all outputs with ``all_outputs=True``. Arrays are checked first: the dtype must be
    the declared one exactly (ONNX Runtime does not convert, and a silent cast would hide
    a bug), and the shape must fit (:func:`shape_accepts`).
    """

    def __init__(self, path: PathLike, threads: int = 1) -> None:
        self.path = Path(path)
        self.session = ort_session(self.path, threads=threads)
        self.threads = threads
        inputs = self.session.get_inputs()
        self.input_names = [i.name for i in inputs]
        self.input_shapes = [list(i.shape) for i in inputs]
        self.input_dtypes = [_NUMPY_DTYPES.get(i.type) for i in inputs]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __repr__(self) -> str:
        described = ", ".join(f"{n}: {s} {d}" for n, s, d in
                              zip(self.input_names, self.input_shapes, self.input_dtypes,
                                  strict=True))
        return f"OnnxModel({str(self.path)!r}, threads={self.threads}; {described})"

    def check(self, *arrays: np.ndarray) -> None:
        """Raise a clear error if ``arrays`` do not fit the model's declared inputs."""
        if len(arrays) != len(self.input_names):
            raise ValueError(f"the model has {len(self.input_names)} input(s) "
                             f"{self.input_names}, got {len(arrays)} array(s)")
        for name, shape, dtype, array in zip(self.input_names, self.input_shapes,
                                             self.input_dtypes, arrays, strict=True):
            if not isinstance(array, np.ndarray):
                raise TypeError(f"input {name!r} must be a numpy array, "
                                f"got {type(array).__name__}")
            if dtype is not None and array.dtype != dtype:
                raise TypeError(f"input {name!r} expects dtype {dtype}, got {array.dtype}; "
                                f"convert it with array.astype(np.{dtype})")
            if not shape_accepts(shape, array.shape):
                raise ValueError(f"input {name!r} expects shape {shape} (strings are "
                                 f"dynamic axes, ints are fixed), got {list(array.shape)}")

    def __call__(self, *arrays: np.ndarray, all_outputs: bool = False
                 ) -> np.ndarray | list[np.ndarray]:
        self.check(*arrays)
        outputs = self.session.run(None, dict(zip(self.input_names, arrays, strict=True)))
        return outputs if all_outputs else outputs[0]


# --------------------------------------------------------------------------- torch twin
TORCH_RUNNER = r'''
"""Classify a .npy file with a torch.export program (.pt2): the PyTorch twin of edge_runner."""
import json, sys, time
t_start = time.time()
import numpy as np
import torch
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
t_import = time.time()
program = torch.export.load(sys.argv[1])
module = program.module()
t_load = time.time()
x = np.load(sys.argv[2])
with torch.inference_mode():
    out = module(torch.from_numpy(x))
predictions = out.argmax(-1).tolist()
t_first = time.time()
print(json.dumps({"predictions": predictions, "torch_imported": "torch" in sys.modules,
                  "first_prediction_unix": t_first,
                  "seconds": {"imports": t_import - t_start, "load": t_load - t_import,
                              "first_prediction": t_first - t_load},
                  "peak_rss_bytes": next(int(line.split()[1]) * 1024 for line in
                                         open("/proc/self/status") if line.startswith("VmHWM:"))}))
'''
