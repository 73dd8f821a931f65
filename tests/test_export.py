"""Tests for aimodels.export: torch.export with dynamic axes, ONNX files, OnnxModel."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from aimodels import export
from aimodels.cnn import LeNet5
from aimodels.gpt import GPT, GPTConfig

TINY = GPTConfig(vocab_size=128, context_length=32, d_model=32, n_heads=2, n_layers=2)


def digits_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {"lenet": (LeNet5().eval(), torch.randn(2, 1, 32, 32)),
            "mlp": (digits_mlp().eval(), torch.randn(2, 1, 8, 8)),
            "gpt": (GPT(TINY).eval(), torch.randint(0, TINY.vocab_size, (2, 8)))}


@pytest.fixture(scope="module")
def onnx_files(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    paths = {}
    for name, (model, example) in models.items():
        paths[name] = export.to_onnx(model, example, folder / f"{name}.onnx",
                                     dynamic_sequence=(name == "gpt"))
    return paths


# --------------------------------------------------------------------------- torch.export
@pytest.mark.parametrize("name", ["lenet", "mlp", "gpt"])
def test_export_program_runs_at_other_batch_sizes(models, name):
    model, example = models[name]
    program = export.export_program(model, example, dynamic_sequence=(name == "gpt"))
    for batch in (1, 5):
        if name == "gpt":
            x = torch.randint(0, TINY.vocab_size, (batch, 13))
        else:
            x = torch.randn(batch, *example.shape[1:])
        with torch.no_grad():
            assert_close(program.module()(x), model(x))


def test_graph_ops_lists_aten_operators_in_order(models):
    program = export.export_program(*models["lenet"])
    ops = export.graph_ops(program)
    assert ops[0] == "aten.conv2d.default"
    assert ops.count("aten.conv2d.default") == 2 and ops.count("aten.linear.default") == 3
    with pytest.raises(TypeError, match="ExportedProgram"):
        export.graph_ops(models["lenet"][0])


def test_gpt_sequence_axis_is_bounded_by_the_context(models):
    model, example = models["gpt"]
    program = export.export_program(model, example, dynamic_sequence=True)
    x = torch.randint(0, TINY.vocab_size, (2, TINY.context_length + 1))
    with pytest.raises(Exception, match="sequence|s\\d+|<= 32|32"):
        program.module()(x)


def test_export_program_refuses_a_batch_of_one(models):
    model, _ = models["lenet"]
    with pytest.raises(ValueError, match="at least 2"):
        export.export_program(model, torch.randn(1, 1, 32, 32))
    with pytest.raises(TypeError, match="nn.Module"):
        export.export_program(lambda x: x, torch.randn(2, 3))


class _BranchOnValue(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # a Python branch on tensor data
            return x * 2
        return x - 1


class _BranchWithCond(nn.Module):
    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda t: t * 2, lambda t: t - 1, (x,))


def test_data_dependent_branch_breaks_export_and_cond_fixes_it():
    with pytest.raises(Exception, match="data-dependent|data dependent"):
        export.export_program(_BranchOnValue(), torch.randn(2, 3))
    program = export.export_program(_BranchWithCond(), torch.randn(2, 3))
    for x in (torch.ones(4, 3), -torch.ones(3, 3)):  # both branches, new batch sizes
        assert_close(program.module()(x), _BranchOnValue()(x))
    assert "cond" in " ".join(export.graph_ops(program))


# --------------------------------------------------------------------------- ONNX Runtime
@pytest.mark.parametrize("name", ["lenet", "mlp", "gpt"])
def test_onnx_runtime_equals_torch_at_new_batch_sizes(models, onnx_files, name):
    model, example = models[name]
    runner = export.OnnxModel(onnx_files[name])
    for batch in (1, 3, 7):  # the example had 2
        if name == "gpt":
            x = torch.randint(0, TINY.vocab_size, (batch, 5 + batch))
        else:
            x = torch.randn(batch, *example.shape[1:])
        with torch.no_grad():
            expected = model(x)
        assert_close(torch.from_numpy(runner(x.numpy())), expected, atol=1e-5, rtol=1e-4)


def test_onnx_model_describes_its_inputs(onnx_files):
    lenet = export.OnnxModel(onnx_files["lenet"], threads=2)
    assert lenet.input_names == ["input"] and lenet.output_names == ["output"]
    assert lenet.input_shapes == [["batch", 1, 32, 32]]
    assert lenet.input_dtypes == [np.dtype(np.float32)]
    gpt = export.OnnxModel(onnx_files["gpt"])
    assert gpt.input_shapes == [["batch", "sequence"]]
    assert gpt.input_dtypes == [np.dtype(np.int64)]
    assert "batch" in repr(lenet)


def test_onnx_model_errors_name_what_was_expected(onnx_files):
    lenet = export.OnnxModel(onnx_files["lenet"])
    with pytest.raises(TypeError, match=r"'input' expects dtype float32, got float64"):
        lenet(np.zeros((2, 1, 32, 32)))
    with pytest.raises(ValueError, match=r"expects shape \['batch', 1, 32, 32\].*\[2, 1, 28, 28\]"):
        lenet(np.zeros((2, 1, 28, 28), dtype=np.float32))
    with pytest.raises(ValueError, match="got \\[1, 32, 32\\]"):
        lenet(np.zeros((1, 32, 32), dtype=np.float32))
    with pytest.raises(ValueError, match="1 input"):
        lenet(np.zeros((2, 1, 32, 32), dtype=np.float32), np.zeros(2, dtype=np.float32))
    with pytest.raises(TypeError, match="numpy array"):
        lenet(torch.zeros(2, 1, 32, 32))
    gpt = export.OnnxModel(onnx_files["gpt"])
    with pytest.raises(TypeError, match="int64, got int32"):
        gpt(np.zeros((2, 4), dtype=np.int32))
    with pytest.raises(FileNotFoundError):
        export.OnnxModel(onnx_files["gpt"].parent / "missing.onnx")


@pytest.mark.parametrize("declared, actual, ok", [
    (["batch", 1, 32, 32], (5, 1, 32, 32), True),
    (["batch", 1, 32, 32], (5, 3, 32, 32), False),
    (["batch", 1, 32, 32], (5, 32, 32), False),
    (["batch", "sequence"], (1, 99), True),
    ([None, 4], (8, 4), True),
    ([2, 4], (3, 4), False),
])
def test_shape_accepts(declared, actual, ok):
    assert export.shape_accepts(declared, actual) is ok


def test_int8_gpt_is_smaller_and_close(models, onnx_files, tmp_path):
    model, _ = models["gpt"]
    int8 = export.quantize_int8(onnx_files["gpt"], tmp_path / "gpt_int8.onnx")
    # int8 weights, the embedding table (read by Gather) included; a tiny model keeps a
    # larger share of fp32 leftovers and graph overhead, so the ratio is below 4
    assert export.file_size(int8) < 0.6 * export.file_size(onnx_files["gpt"])
    initializers = {t.name: t.data_type for t in onnx.load(str(int8)).graph.initializer}
    assert initializers["tok_emb.weight_quantized"] in (onnx.TensorProto.UINT8,
                                                        onnx.TensorProto.INT8)
    x = torch.randint(0, TINY.vocab_size, (3, 16))
    with torch.no_grad():
        reference = model(x).numpy()
    got = export.OnnxModel(int8)(x.numpy())
    assert got.shape == reference.shape
    assert np.abs(got - reference).max() < 0.1 * np.abs(reference).max()


def test_torch_runner_classifies_like_the_model(models, tmp_path):
    model, example = models["lenet"]
    path = tmp_path / "lenet.pt2"
    torch.export.save(export.export_program(model, example), path)
    x = torch.randn(4, 1, 32, 32)
    np.save(tmp_path / "x.npy", x.numpy())
    done = subprocess.run([sys.executable, "-c", export.TORCH_RUNNER, str(path),
                           str(tmp_path / "x.npy")], capture_output=True, text=True, timeout=120,
                          check=True)
    report = json.loads(done.stdout)
    with torch.no_grad():
        assert report["predictions"] == model(x).argmax(-1).tolist()
    assert report["torch_imported"] is True and report["peak_rss_bytes"] > 0
