r"""The maintained libraries: PyTorch's quantiser, ONNX export and ONNX Runtime (Chapter 11).

The other modules of this package build pruning, quantisation and distillation from
scratch, to show how they work. To *ship* a compressed model one uses maintained tools.
This module wraps the ones a PyTorch user meets first, in the versions this course pins
(torch 2.15, onnx 1.23, onnxruntime 1.32, onnxscript 0.7), and records their quirks.

**torch.ao: eager dynamic quantisation, deprecated.** :func:`ao_quantize_dynamic` calls
``torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)``. Each
``nn.Linear`` becomes a ``DynamicQuantizedLinear``: its weights are stored as int8 with
one scale per tensor, and at every call the activations are quantised with a scale taken
from their own range (that is what *dynamic* means), multiplied in integers, and the
result turned back into float. In this torch the call still works but warns, in these
words (a ``DeprecationWarning``, captured by running it; long lines wrapped)::

    torch.ao.quantization is deprecated and will be removed in 2.10.
    For migrations of users:
    1. Eager mode quantization (torch.ao.quantization.quantize,
    torch.ao.quantization.quantize_dynamic), please migrate to use torchao eager mode
    quantize_ API instead
    2. FX graph mode quantization (torch.ao.quantization.quantize_fx.prepare_fx,
    torch.ao.quantization.quantize_fx.convert_fx, please migrate to use torchao pt2e
    quantization API instead (prepare_pt2e, convert_pt2e)
    3. pt2e quantization has been migrated to torchao
    (https://github.com/pytorch/ao/tree/main/torchao/quantization/pt2e)
    see https://github.com/pytorch/ao/issues/2259 for more details

(the message says 2.10, yet torch 2.15 still ships it), followed by a ``UserWarning``
that the quantised tensor types ``torch.qint8`` and friends are deprecated too. The
replacement lives in the separate **torchao** package: its ``quantize_(model, config)``
API rewrites a model in place, and ``Int8DynamicActivationInt8WeightConfig`` is the
counterpart of this int8 dynamic-activation, int8-weight scheme (with finer scales: one
per token for activations, one per output channel for weights); ``Int8WeightOnlyConfig``
and ``Int4WeightOnlyConfig`` quantise the weights only. For static quantisation of a whole graph
the replacement is the **pt2e** flow, ``torch.export`` followed by torchao's
``prepare_pt2e`` / ``convert_pt2e``. torchao is not a dependency of this course, so the
chapter shows the deprecated call and names its successors.

**ONNX export.** ONNX is a file format for computation graphs that many runtimes read.
:func:`export_onnx` uses ``torch.onnx.export`` with the *dynamo* exporter, the default in
this torch: ``torch.export`` traces the model into a graph of ATen operators, and
onnxscript translates that graph into ONNX operators (then optimises it: the MLP's
``Linear`` layers become ``Gemm`` nodes). What works here:

* ``dynamic_shapes`` given as a tuple, one dict per positional input, mapping an axis to
  a named ``torch.export.Dim``: ``({0: Dim("batch"), 1: Dim("sequence")},)``. The tuple
  form does not depend on the name of the model's ``forward`` argument, and the names
  reach the ONNX file as symbolic dimensions (``['batch', 64]``). An example batch of 1
  works too. The older ``dynamic_axes`` argument also works but warns that it is
  deprecated with this exporter, so we do not use it.
* ``external_data=False``: by default the exporter writes the weights to a side file
  ``model.onnx.data``; for small models one file is simpler. Files over 2 GB must use
  external data (a protobuf limit), and :func:`file_size` counts any side file.
* ``verbose=False``: otherwise the exporter prints its progress
  (``[torch.onnx] Obtain model graph for ...``) on standard output.

*Tracing cannot follow data.* ``torch.export`` runs ``forward`` on symbolic tensors, so a
Python ``if`` on tensor *values* cannot be decided. :class:`aimodels.gpt.GPT` checks its
token ids with ``int(idx.min()) < 0``; exporting it fails with
``GuardOnDataDependentSymNode: Could not extract specialized integer from data-dependent
expression``. Such checks belong outside the graph: :func:`export_onnx` leaves GPT's
value check out while it exports (shape checks stay), and ONNX Runtime's ``Gather``
refuses an out-of-range id by itself. ``torch.export.draft_export`` would "succeed"
by specialising the branch to the example's values (it asserted that the smallest id is
always 1), which is worse.

**ONNX Runtime.** :func:`ort_session` opens a model on the CPU with a fixed number of
threads, and :func:`ort_run` feeds it one array. Two int8 quantisers ship with it:

* :func:`ort_quantize_dynamic`, like torch.ao's: int8 weights, activations quantised at
  run time (``DynamicQuantizeLinear`` → ``MatMulInteger`` → rescale to float). No data
  needed.
* :func:`ort_quantize_static`: the scales of the activations too are fixed in advance,
  from their ranges on *calibration* data fed through a ``CalibrationDataReader``. No
  range is measured at run time, and ORT can chain integer kernels.

A dynamo export stores ``value_info``, the type and shape of every intermediate tensor,
with symbolic dimensions. Such annotations can disagree with the shapes the quantiser
infers for itself and make quantisation fail; the helpers therefore delete them first
(ONNX Runtime infers shapes when it loads a model, so nothing is lost). With the pinned
versions our MLP and GPT quantise even without this step; it is insurance.

=============================== ==========================================================
name                            what it does
=============================== ==========================================================
:func:`ao_quantize_dynamic`     torch.ao's int8 dynamic quantisation, with its warnings
:func:`export_onnx`             ``torch.onnx.export`` (dynamo) with a dynamic batch axis
:func:`ort_session`             an ONNX Runtime CPU session with a fixed thread count
:func:`ort_run`                 run a one-input session on a NumPy array
:func:`ort_quantize_dynamic`    ONNX Runtime's dynamic int8 quantisation
:func:`ort_quantize_static`     ONNX Runtime's static int8 quantisation, with calibration
:class:`ArrayCalibrationReader` feeds calibration batches to ``quantize_static``
:func:`file_size`               bytes of an ONNX model, its external-data files included
=============================== ==========================================================
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from torch import nn

__all__ = [
    "ArrayCalibrationReader",
    "ao_quantize_dynamic",
    "export_onnx",
    "file_size",
    "ort_quantize_dynamic",
    "ort_quantize_static",
    "ort_run",
    "ort_session",
]

PathLike = str | os.PathLike


# --------------------------------------------------------------------------- torch.ao
def ao_quantize_dynamic(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Quantise the ``nn.Linear`` layers of a copy of ``model`` to int8, dynamically.

    Calls ``torch.ao.quantization.quantize_dynamic(copy, {nn.Linear}, dtype=torch.qint8)``
    on a deep copy (``model`` itself is untouched) and records the warnings the call
    raises, whatever the caller's warning filters. Returns the quantised copy, in eval
    mode, and the distinct warning messages in the order they came (torch emits the
    deprecation notice twice). See the module docstring for what replaces this API.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    copied = copy.deepcopy(model).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantized = torch.ao.quantization.quantize_dynamic(copied, {nn.Linear},
                                                           dtype=torch.qint8)
    messages = list(dict.fromkeys(str(w.message) for w in caught))
    return quantized.eval(), messages


# --------------------------------------------------------------------------- ONNX export
def _as_tuple(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(inputs, Sequence) or isinstance(inputs, str) or not inputs:
        raise TypeError(f"example_inputs must be a tensor or a non-empty tuple of tensors, "
                        f"got {type(example_inputs).__name__}")
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"example_inputs[{i}] must be a torch.Tensor, "
                            f"got {type(x).__name__}")
    return tuple(inputs)


def _names(names: Sequence[str] | None, default: str, count: int | None) -> list[str] | None:
    if names is None:
        if count is None:
            return None
        return [default] if count == 1 else [f"{default}_{i}" for i in range(count)]
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{default} names must be a sequence of str, got {names!r}")
    if count is not None and len(names) != count:
        raise ValueError(f"expected {count} {default} names (one per example input), "
                         f"got {len(names)}: {list(names)}")
    return list(names)


def export_onnx(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor],
                path: PathLike, dynamic_batch: bool = True, dynamic_sequence: bool = False,
                input_names: Sequence[str] | None = None,
                output_names: Sequence[str] | None = ("output",),
                external_data: bool = False) -> Path:
    """Export ``model`` to the ONNX file ``path`` with the dynamo exporter; return the path.

    ``example_inputs`` is a tensor or a tuple of tensors, the positional arguments of
    ``forward``. With ``dynamic_batch`` axis 0 of every input is the symbolic dimension
    ``batch`` (one shared ``torch.export.Dim``), so the file accepts any batch size; with
    ``dynamic_sequence`` axis 1 is ``sequence`` as well (token ids ``[N, T]``). Any other
    axis keeps the size of the example. ``input_names`` default to ``input`` (or
    ``input_0``, ``input_1``, ...). The model is exported in eval mode and its mode
    restored afterwards. With ``external_data=False`` (the default) the weights are
    stored inside the one file; set it for models over 2 GB. Missing parent directories
    are created. Quiet: the exporter's progress lines are switched off.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    inputs = _as_tuple(example_inputs)
    in_names = _names(input_names, "input", len(inputs))
    out_names = _names(output_names, "output", None)
    if dynamic_sequence and any(x.ndim < 2 for x in inputs):
        raise ValueError(f"dynamic_sequence needs inputs with at least 2 axes [batch, "
                         f"sequence, ...], got shapes {[list(x.shape) for x in inputs]}")
    dynamic_shapes = None
    if dynamic_batch or dynamic_sequence:
        batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
        axes: dict[int, torch.export.Dim] = {}
        if dynamic_batch:
            axes[0] = batch
        if dynamic_sequence:
            axes[1] = sequence
        dynamic_shapes = tuple(dict(axes) for _ in inputs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        with _without_value_checks(model):
            torch.onnx.export(model, inputs, str(path), dynamo=True, input_names=in_names,
                              output_names=out_names, dynamic_shapes=dynamic_shapes,
                              external_data=external_data, verbose=False)
    finally:
        model.train(was_training)
    _drop_stack_traces(path)
    return path


_STACK_TRACE = "pkg.torch.onnx.stack_trace"


def _drop_stack_traces(path: Path) -> None:
    """Remove the Python stack traces the dynamo exporter stores on every ONNX node.

    Each trace names the source files, by absolute path on the exporting machine, of the
    lines that produced the node (the notebook's own cells among them). They are debug
    information that no runtime reads, but they reveal local paths and make the size and
    bytes of the file depend on where and how it was exported. The file is rewritten
    through a temporary file in the same directory, so it is never left half written;
    external weight files are not touched.
    """
    proto = onnx.load(str(path), load_external_data=False)

    def strip(nodes: Iterable[onnx.NodeProto]) -> None:
        for node in nodes:
            kept = [p for p in node.metadata_props if p.key != _STACK_TRACE]
            del node.metadata_props[:]
            node.metadata_props.extend(kept)
            for attribute in node.attribute:  # the branches of If, the body of Loop, ...
                for graph in [attribute.g, *attribute.graphs]:
                    strip(graph.node)

    strip(proto.graph.node)
    for function in proto.functions:
        strip(function.node)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(handle)
    try:
        onnx.save(proto, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _without_value_checks(model: nn.Module) -> Iterator[None]:
    """Leave out checks that branch on the *values* of the inputs while exporting.

    :class:`~aimodels.gpt.GPT` checks that its token ids lie in ``[0, vocab_size)`` with
    ``int(idx.min())``, a branch on tensor data that ``torch.export`` cannot trace (it
    fails with ``GuardOnDataDependentSymNode``). The exported graph does without it:
    ONNX Runtime's ``Gather`` refuses an out-of-range id by itself. Shape checks stay.
    """
    from aimodels.gpt import GPT

    gpts = [m for m in model.modules() if isinstance(m, GPT)]
    originals = {id(m): m._check_ids for m in gpts}

    def shapes_only(gpt: GPT) -> Callable[[torch.Tensor, int], None]:
        def check(idx: torch.Tensor, past: int) -> None:
            if idx.ndim != 2 or past + idx.shape[1] > gpt.config.context_length:
                originals[id(gpt)](idx, past)  # raises the usual error
        return check

    for gpt in gpts:
        gpt._check_ids = shapes_only(gpt)  # an instance attribute shadows the method
    try:
        yield
    finally:
        for gpt in gpts:
            del gpt._check_ids


def file_size(path: PathLike) -> int:
    """Bytes on disk of an ONNX model: the file plus the external-data files it refers to.

    A model saved with external data keeps its tensors in side files (``model.onnx.data``)
    named in the tensors' ``external_data`` entries; each such file is counted once.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX file at {path}")
    total = path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        tensors += [attr.t for attr in node.attribute if attr.type == onnx.AttributeProto.TENSOR]
    locations = set()
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {entry.key: entry.value for entry in tensor.external_data}
            locations.add(entries["location"])
    for location in sorted(locations):
        side = path.parent / location
        if not side.is_file():
            raise FileNotFoundError(f"{path} refers to the external-data file {side}, "
                                    f"which is missing")
        total += side.stat().st_size
    return total


# --------------------------------------------------------------------------- ONNX Runtime
def ort_session(path: PathLike, threads: int = 1) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session for ``path`` on the CPU, with ``threads`` intra-op threads.

    Intra-op threads split one operator (a large matrix product) across cores; inter-op
    threads would run independent operators at once, which a chain of layers does not
    have, so it is 1. Fixing both makes timings comparable with a PyTorch model limited
    by ``torch.set_num_threads``.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"no ONNX file at {path}")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), sess_options=options,
                                        providers=["CPUExecutionProvider"])


_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64,
               "tensor(double)": np.float64, "tensor(int32)": np.int32}


def ort_run(session: onnxruntime.InferenceSession, array: np.ndarray) -> np.ndarray:
    """Feed ``array`` to the session's one input; return its first output.

    The array must already have the input's dtype (float32 for pixels, int64 for token
    ids): ONNX Runtime does not convert, and a silent cast would hide a bug.
    """
    if not isinstance(session, onnxruntime.InferenceSession):
        raise TypeError(f"expected an onnxruntime.InferenceSession, "
                        f"got {type(session).__name__}")
    if not isinstance(array, np.ndarray):
        raise TypeError(f"expected a numpy array, got {type(array).__name__}")
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ValueError(f"ort_run feeds one input, but the model has {len(inputs)}: "
                         f"{[i.name for i in inputs]}; call session.run with a dict")
    expected = _ORT_DTYPES.get(inputs[0].type)
    if expected is not None and array.dtype != expected:
        raise TypeError(f"input {inputs[0].name!r} expects {np.dtype(expected)} "
                        f"({inputs[0].type}), got {array.dtype}")
    return session.run(None, {inputs[0].name: array})[0]


# --------------------------------------------------------------------------- quantisation
@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """Hide the quantisers' advice to pre-process the model (logged on the root logger).

    We skip ``quant_pre_process`` on purpose (see the module docstring); errors still show.
    """
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _without_value_info(fp32_path: PathLike, directory: Path) -> Path:
    """Copy of the model at ``fp32_path`` without ``value_info``, saved in ``directory``."""
    source = Path(fp32_path)
    if not source.is_file():
        raise FileNotFoundError(f"no ONNX file at {source}")
    model = onnx.load(str(source))  # loads external data too, so the copy is complete
    # The dynamo exporter annotates every intermediate tensor with its type and a shape
    # with symbolic dimensions. The quantiser runs its own shape inference and inserts new
    # tensors; stale or conflicting annotations can make that fail (a known issue with
    # dynamo exports), so we drop them. They are optional: ORT infers shapes on loading.
    del model.graph.value_info[:]
    cleaned = directory / f"{source.stem}.no_value_info.onnx"
    onnx.save(model, str(cleaned))
    return cleaned


def _check_output(fp32_path: PathLike, int8_path: PathLike) -> Path:
    out = Path(int8_path)
    if out.resolve() == Path(fp32_path).resolve():
        raise ValueError(f"int8_path must differ from fp32_path, got {out} for both")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def ort_quantize_dynamic(fp32_path: PathLike, int8_path: PathLike) -> Path:
    """ONNX Runtime's dynamic int8 quantisation of ``fp32_path``, written to ``int8_path``.

    ``weight_type=QuantType.QInt8``: weights become signed int8, symmetric around zero (a
    zero point of 0, so the integer product needs no correction term for them), one scale
    per tensor. Activations are quantised at run time to uint8 by
    ``DynamicQuantizeLinear``, which only produces uint8; ``MatMulInteger`` then
    multiplies uint8 by int8 into int32 (the "U8S8" format), the fast path of x86 integer
    instructions. On x86 CPUs with AVX2 or AVX-512 but without VNNI, ORT's U8S8 kernel
    (``VPMADDUBSW``) can saturate 16-bit intermediate sums ("Generally, this is not a big
    issue for the final result", says ORT's documentation); if accuracy drops a lot,
    ``QUInt8`` weights (U8U8) or ``reduce_range`` avoid it. Machines with VNNI, and ARM,
    are not affected. Returns ``int8_path``.
    """
    out = _check_output(fp32_path, int8_path)
    with tempfile.TemporaryDirectory() as tmp:
        cleaned = _without_value_info(fp32_path, Path(tmp))
        with _quiet_root_logger():
            quantize_dynamic(cleaned, out, weight_type=QuantType.QInt8)
    return out


class ArrayCalibrationReader(CalibrationDataReader):
    """Hands ``quantize_static`` one calibration batch per call, then ``None``.

    The batches should be held-out data that look like what the model will see (not the
    test set): the quantiser records the range of every activation over them.
    """

    def __init__(self, batches: Sequence[np.ndarray], input_name: str) -> None:
        if isinstance(batches, np.ndarray) or not batches:
            raise ValueError("calibration_batches must be a non-empty list of numpy arrays")
        for i, batch in enumerate(batches):
            if not isinstance(batch, np.ndarray):
                raise TypeError(f"calibration batch {i} must be a numpy array, "
                                f"got {type(batch).__name__}")
        self.batches, self.input_name = list(batches), input_name
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.batches):
            return None
        self._next += 1
        return {self.input_name: self.batches[self._next - 1]}

    def rewind(self) -> None:
        self._next = 0


def ort_quantize_static(fp32_path: PathLike, int8_path: PathLike,
                        calibration_batches: list[np.ndarray],
                        input_name: str | None = None) -> Path:
    """ONNX Runtime's static int8 quantisation, calibrated on ``calibration_batches``.

    Every batch goes through the model once; the quantiser records the minimum and
    maximum of each activation (``CalibrationMethod.MinMax``) and fixes its scale and
    zero point from them. ``input_name`` defaults to the model's only input. The
    choices, all ones that run on the CPU and give outputs close to float:

    * **QDQ format** (``QuantFormat.QDQ``): the graph keeps its float operators and gains
      ``QuantizeLinear``/``DequantizeLinear`` pairs around them; the weights are stored
      as int8 followed by a ``DequantizeLinear``. When ORT loads the file it fuses each
      ``DequantizeLinear → Gemm → QuantizeLinear`` pattern into an integer kernel. The
      other format, **QOperator**, writes integer operators (``QLinearMatMul``,
      ``QGemm``) directly; it runs only where those operators exist.
    * **int8 activations and weights** (S8S8). ORT's documentation: "S8S8 with QDQ is the
      default setting and balances performance and accuracy. It should be the first
      choice", while "S8S8 with QOperator will be slow on x86-64 CPUs".
    * **one scale per tensor** (``per_channel=False``). Per-channel weights (one scale
      per output unit) help when the rows of a weight matrix have very different ranges;
      ORT suggests trying them "if the accuracy loss is large", adding that on AVX2 and
      AVX-512 machines ``reduce_range`` is then generally needed too. On the digits MLP
      the two are equally close to float (relative error of the logits about 0.7%, the
      same test predictions), so we keep the simpler, portable choice, which also makes
      a slightly smaller file (no per-row scales and zero points).

    ORT recommends dynamic quantisation for transformers and RNNs, whose activation
    ranges vary from input to input, and static quantisation for CNNs.

    ORT logs a warning that suggests running
    ``onnxruntime.quantization.shape_inference.quant_pre_process`` (symbolic shape
    inference plus graph optimisation) first. We skip it: the dynamo exporter has
    already fused the layers, our models quantise correctly without it, and on a GPT
    export it fails in symbolic shape inference (``TypeError``) in this version.
    Returns ``int8_path``.
    """
    out = _check_output(fp32_path, int8_path)
    with tempfile.TemporaryDirectory() as tmp:
        cleaned = _without_value_info(fp32_path, Path(tmp))
        graph_inputs = onnx.load(str(cleaned), load_external_data=False).graph.input
        names = [i.name for i in graph_inputs]
        if input_name is None:
            if len(names) != 1:
                raise ValueError(f"the model has {len(names)} inputs {names}; "
                                 f"name the one to calibrate with input_name")
            input_name = names[0]
        elif input_name not in names:
            raise ValueError(f"input_name {input_name!r} is not an input of the model; "
                             f"its inputs are {names}")
        reader = ArrayCalibrationReader(calibration_batches, input_name)
        elem_type = graph_inputs[names.index(input_name)].type.tensor_type.elem_type
        expected = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
        for i, batch in enumerate(reader.batches):
            if batch.dtype != expected:
                raise TypeError(f"calibration batch {i} must have the dtype of input "
                                f"{input_name!r}, {expected}, got {batch.dtype}")
        with _quiet_root_logger():
            quantize_static(cleaned, out, reader, quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            per_channel=False)
    return out
