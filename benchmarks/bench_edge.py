"""Benchmark: a trained GPT at the edge, and a runtime without PyTorch (Chapter 14).

Part 1 (``edge_gpt.csv``). Chapter 11's GPT (width 256, 6 layers, 4.8 M parameters,
context 64, BPE vocabulary 512 over the standard library's source) is trained here for
``--steps`` steps on two threads, then served three ways on **one thread** (a small
device): eager fp32 PyTorch, ONNX Runtime fp32, and ONNX Runtime dynamic int8
(:func:`aimodels.export.quantize_int8`). Columns: file size (safetensors for PyTorch,
the .onnx file for ONNX Runtime) and how many times smaller than fp32; latency of one
sequence of 64 tokens and of a batch of 8, best and median of ``--repeats`` runs taken
round-robin (the three runtimes alternate, so a slow moment hits all of them), and the
speed-up over eager PyTorch; peak resident memory of a separate process that loads the
model and predicts once (PyTorch loads a ``torch.export`` program, ``.pt2``; ONNX
Runtime runs :mod:`aimodels.edge_runner`); top-1 next-token agreement with fp32
PyTorch and perplexity on held-out text.

Part 2 (``edge_runtime.csv``). A LeNet-5 trained on the digits, classified from a
``.npy`` file by :mod:`aimodels.edge_runner` (onnxruntime + numpy, no torch) and by
``aimodels.export.TORCH_RUNNER`` (a ``.pt2`` file): time from process start to first
prediction (median of ``--starts`` cold starts), peak memory, and the bytes of the
installed packages each needs (alone and with everything they require).

Run with ``python benchmarks/bench_edge.py`` (about 10 minutes on two cores).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import FIGURES, write_table
from torch.nn import functional as F

from aimodels import compress, edge, export, gpt
from aimodels.cnn import LeNet5
from aimodels.data import digits
from aimodels.gpt import GPT, GPTConfig
from aimodels.train import fit

RUNNER = Path(__file__).resolve().parents[1] / "aimodels" / "edge_runner.py"


def timings(runtimes: dict, x: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """Round-robin timings of every runtime on the same input, after one warm-up call."""
    times: dict[str, list[float]] = {name: [] for name in runtimes}
    for f in runtimes.values():
        f(x)
    for _ in range(repeats):
        for name, f in runtimes.items():
            start = time.perf_counter()
            f(x)
            times[name].append(time.perf_counter() - start)
    return times


def held_out(val_ids: torch.Tensor, length: int, windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = min(windows, (len(val_ids) - 1) // length)
    x = val_ids[:n * length].view(n, length)
    y = val_ids[1:n * length + 1].view(n, length)
    return x, y


def cold_starts(argv: list[str], starts: int) -> dict:
    reports = [edge.measure_process(argv) for _ in range(starts)]
    return {"cold_start_s": statistics.median(r["cold_start_s"] for r in reports),
            "peak_rss_bytes": statistics.median(r["peak_rss_bytes"] for r in reports),
            "predictions": reports[0]["predictions"],
            "torch_imported": reports[0]["torch_imported"]}


def gpt_table(steps: int, repeats: int, starts: int, tmp: Path) -> list[dict]:
    corpus = gpt.stdlib_token_streams(max_chars=1_200_000, vocab_size=512)
    config = GPTConfig(vocab_size=corpus["tokenizer"].vocab_size, context_length=64,
                       d_model=256, n_heads=4, n_layers=6)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = GPT(config)
    gpt.pretrain(model, corpus["train"], corpus["val"], steps=steps, batch_size=32,
                 lr=0.64 / config.d_model, warmup_steps=min(50, steps // 5), min_lr=1e-4,
                 weight_decay=0.1, clip_grad_norm=1.0, eval_every=steps, progress=False)
    model.eval()
    torch.set_num_threads(1)

    example = torch.randint(0, config.vocab_size, (2, 64))
    fp32 = export.to_onnx(model, example, tmp / "gpt.onnx", dynamic_sequence=True)
    int8 = export.quantize_int8(fp32, tmp / "gpt_int8.onnx")
    pt2 = tmp / "gpt.pt2"
    torch.export.save(export.export_program(model, example, dynamic_sequence=True), pt2)
    sizes = {"fp32 PyTorch (eager)": compress.saved_size_bytes(model),
             "fp32 ONNX Runtime": export.file_size(fp32),
             "int8 ONNX Runtime": export.file_size(int8)}
    sessions = {"fp32 ONNX Runtime": export.OnnxModel(fp32, threads=1),
                "int8 ONNX Runtime": export.OnnxModel(int8, threads=1)}

    def torch_call(x):
        with torch.inference_mode():
            return model(x).numpy()

    runtimes = {"fp32 PyTorch (eager)": torch_call,
                **{name: (lambda x, s=s: s(x.numpy())) for name, s in sessions.items()}}
    lat = {n: timings(runtimes, torch.randint(0, config.vocab_size, (n, 64)), repeats)
           for n in (1, 8)}

    x, y = held_out(corpus["val"], 64, 256)
    outputs = {name: np.concatenate([f(x[i:i + 32]) for i in range(0, len(x), 32)])
               for name, f in runtimes.items()}
    reference = outputs["fp32 PyTorch (eager)"].argmax(-1)

    ids = tmp / "ids.npy"
    np.save(ids, x[:8].numpy())
    memory = {"fp32 PyTorch (eager)": cold_starts(
        [sys.executable, "-c", export.TORCH_RUNNER, str(pt2), str(ids)], starts),
        "fp32 ONNX Runtime": cold_starts([sys.executable, str(RUNNER), str(fp32), str(ids)],
                                         starts),
        "int8 ONNX Runtime": cold_starts([sys.executable, str(RUNNER), str(int8), str(ids)],
                                         starts)}
    machine = f"{platform.machine()}, torch {torch.__version__}, 1 thread"
    base = "fp32 PyTorch (eager)"
    rows = []
    for name in runtimes:
        logits = torch.from_numpy(outputs[name])
        perplexity = float(torch.exp(F.cross_entropy(logits.reshape(-1, config.vocab_size),
                                                     y.reshape(-1))))
        row = {"runtime": name, "parameters": sum(p.numel() for p in model.parameters()),
               "train_steps": steps, "file_bytes": sizes[name],
               "smaller": round(sizes[base] / sizes[name], 2)}
        for n in (1, 8):
            best, median = min(lat[n][name]), statistics.median(lat[n][name])
            row |= {f"b{n}_best_ms": round(1000 * best, 2),
                    f"b{n}_median_ms": round(1000 * median, 2),
                    f"b{n}_speedup_best": round(min(lat[n][base]) / best, 2),
                    f"b{n}_speedup_median": round(statistics.median(lat[n][base]) / median, 2)}
        row |= {"peak_rss_mb": round(memory[name]["peak_rss_bytes"] / 2**20, 1),
                "memory_ratio": round(memory[base]["peak_rss_bytes"]
                                      / memory[name]["peak_rss_bytes"], 2),
                "top1_agreement": round(float((outputs[name].argmax(-1) == reference).mean()),
                                        4),
                "perplexity": round(perplexity, 3), "held_out_tokens": int(y.numel()),
                "repeats": repeats, "machine": machine}
        rows.append(row)
    return rows


def runtime_table(starts: int, tmp: Path) -> list[dict]:
    data = digits(size=32)
    torch.manual_seed(0)
    lenet = LeNet5()
    fit(lenet, torch.optim.Adam(lenet.parameters(), lr=2e-3), torch.nn.CrossEntropyLoss(),
        data["X_train"], data["y_train"], epochs=8)
    lenet.eval()
    onnx_path = export.to_onnx(lenet, data["X_test"][:2], tmp / "lenet.onnx")
    pt2 = tmp / "lenet.pt2"
    torch.export.save(export.export_program(lenet, data["X_test"][:2]), pt2)
    images = tmp / "digits.npy"
    np.save(images, data["X_test"].numpy())
    results = {
        "PyTorch (torch.export .pt2)": (cold_starts(
            [sys.executable, "-c", export.TORCH_RUNNER, str(pt2), str(images)], starts),
            ["torch", "numpy"]),
        "ONNX Runtime (edge_runner)": (cold_starts(
            [sys.executable, str(RUNNER), str(onnx_path), str(images)], starts),
            ["onnxruntime", "numpy"]),
    }
    labels = data["y_test"].tolist()
    rows = []
    for name, (report, packages) in results.items():
        rows.append({
            "runtime": name, "packages": "+".join(packages),
            "torch_imported": report["torch_imported"],
            "accuracy": round(float(np.mean(np.array(report["predictions"]) == labels)), 4),
            "cold_start_s": round(report["cold_start_s"], 3),
            "peak_rss_mb": round(report["peak_rss_bytes"] / 2**20, 1),
            "installed_mb": round(edge.installed_bytes(packages) / 2**20, 1),
            "installed_with_requirements_mb": round(
                edge.installed_bytes(packages, with_requirements=True) / 2**20, 1),
            "starts": starts, "machine": f"{platform.machine()}, python "
                                         f"{platform.python_version()}"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--starts", type=int, default=5, help="cold starts per runtime")
    parser.add_argument("--out", type=Path, default=FIGURES, help="folder for the CSVs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-edge-") as tmp:
        runtime_rows = runtime_table(args.starts, Path(tmp))
        write_table(runtime_rows, "edge_runtime.csv", args.out)
        for r in runtime_rows:
            print(r)
        rows = gpt_table(args.steps, args.repeats, args.starts, Path(tmp))
        write_table(rows, "edge_gpt.csv", args.out)
    for r in rows:
        print(r)
    int8, base = rows[2], rows[0]
    print(f"int8 ONNX Runtime vs eager fp32: {int8['smaller']}x smaller (>= 3.5: "
          f"{int8['smaller'] >= 3.5}), {int8['b1_speedup_best']}x faster at batch 1 (>= 2: "
          f"{int8['b1_speedup_best'] >= 2}), top-1 agreement {int8['top1_agreement']:.3f} "
          f"(>= 0.97: {int8['top1_agreement'] >= 0.97}); fp32 perplexity {base['perplexity']}")


if __name__ == "__main__":
    main()
