"""Benchmark: a trained GPT compressed every way, in one table (Chapter 11).

The model is chapter 9's GPT made Linear-heavy (width 256, 6 layers, 4.8 M parameters,
context 64, BPE vocabulary 512 over the standard library's source), trained here for
``--steps`` steps on two threads. Rows:

* fp32, as trained;
* structured pruning: half of every block's MLP hidden units removed
  (:func:`aimodels.compress.shrink_gpt_mlp`), then fine-tuned;
* int8, ours: :func:`aimodels.compress.quantize_linears` (every projection of every
  block, the stacked query/key/value one included; embeddings and the tied output
  layer stay fp32);
* int8, ``torch.ao.quantization.quantize_dynamic`` (``nn.Linear`` only);
* ONNX Runtime: the fp32 export, and its dynamic int8 quantisation;
* a distilled student (width 64, 2 layers) trained on the teacher's soft targets at
  temperature 1 and the tokens (alpha = 0.5), and the same student trained on the tokens
  alone, with the same loop, seed and steps;
* the distilled student in int8 (ours).

Columns: the number of weights (before quantisation), file size on disk (safetensors
for PyTorch, the .onnx file for ONNX Runtime, ``torch.save`` for torch.ao, whose packed
weights are not plain tensors), latency at
batch 1 and batch 64 (sequences of 64 tokens) as a ratio against fp32 eager, the best of
``--repeats`` rounds in which every model is timed once in turn (side by side, one thread),
and validation perplexity. It prints which rows meet the issue's bounds (:func:`check_bounds`)
and exits with an error if no int8 path meets them.
Writes book/figures/compress_gpt.csv. Run with ``python benchmarks/bench_compress.py``.
"""

from __future__ import annotations

import argparse
import copy
import io
import math
import platform
import tempfile
import time
from pathlib import Path

import torch
from common import FIGURES, write_table
from torch.nn import functional as F

from aimodels import compress, gpt
from aimodels.compress import export
from aimodels.gpt import GPT, GPTConfig

TABLE = "compress_gpt.csv"


def batches(ids: torch.Tensor, steps: int, batch: int, length: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, len(ids) - length - 1, (batch,), generator=g)
        x = torch.stack([ids[s:s + length] for s in start.tolist()])
        y = torch.stack([ids[s + 1:s + length + 1] for s in start.tolist()])
        yield x, y


def train_student(student: GPT, train_ids, steps: int, seed: int, teacher: GPT | None = None,
                  temperature: float = 1.0, alpha: float = 0.5) -> None:
    """AdamW with warm-up and cosine decay; the distillation loss if a teacher is given.

    T = 1: with the same loop, seed and 600 steps, T = 2 left the student worse than training
    on the tokens alone (perplexity 35.36 against 33.27) and T = 1 better (28.93).
    """
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps,
                                                   pct_start=0.1)
    student.train()
    for x, y in batches(train_ids, steps, 32, student.config.context_length, seed):
        logits = student(x).reshape(-1, student.config.vocab_size)
        if teacher is None:
            loss = F.cross_entropy(logits, y.reshape(-1))
        else:
            with torch.no_grad():
                soft = teacher(x).reshape(-1, student.config.vocab_size)
            loss = compress.distillation_loss(logits, soft, y.reshape(-1), temperature, alpha)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    student.eval()


def round_robin_best(callers, x, repeats: int) -> list[float]:
    """Each caller's best time on ``x``, timed in turn, one call each per round, so that a slow
    spell of the machine falls on every model alike (side by side), after one warm-up call."""
    for f in callers:
        f(x)
    best = [math.inf] * len(callers)
    for _ in range(repeats):
        for i, f in enumerate(callers):
            start = time.perf_counter()
            f(x)
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def perplexity_of(run, val_ids: torch.Tensor, length: int, vocab: int) -> float:
    n = (len(val_ids) - 1) // length
    x = val_ids[:n * length].view(n, length)
    y = val_ids[1:n * length + 1].view(n, length)
    total = 0.0
    for i in range(0, n, 64):
        logits = torch.as_tensor(run(x[i:i + 64]))
        total += F.cross_entropy(logits.reshape(-1, vocab), y[i:i + 64].reshape(-1),
                                 reduction="sum").item()
    return math.exp(total / (n * length))


def run(steps: int = 600, repeats: int = 20, folder: Path = FIGURES) -> list[dict]:
    corpus = gpt.stdlib_token_streams(max_chars=1_200_000, vocab_size=512)
    train_ids, val_ids = corpus["train"], corpus["val"]
    config = GPTConfig(vocab_size=corpus["tokenizer"].vocab_size, context_length=64,
                       d_model=256, n_heads=4, n_layers=6)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    teacher = GPT(config)
    gpt.pretrain(teacher, train_ids, val_ids, steps=steps, batch_size=32,
                 lr=0.64 / config.d_model, warmup_steps=min(50, steps // 5), min_lr=1e-4,
                 weight_decay=0.1, clip_grad_norm=1.0, eval_every=steps, progress=False)
    teacher.eval()

    pruned = compress.shrink_gpt_mlp(teacher, keep=0.5)
    tune = max(steps // 6, 2)
    gpt.pretrain(pruned, train_ids, val_ids, steps=tune, batch_size=32, lr=1e-3,
                 warmup_steps=min(10, tune // 2), min_lr=1e-4, weight_decay=0.1, clip_grad_norm=1.0,
                 eval_every=steps, progress=False)
    pruned.eval()
    small = GPTConfig(vocab_size=config.vocab_size, context_length=64, d_model=64,
                      n_heads=4, n_layers=2)
    students = {}
    for label, with_teacher in (("student, tokens only", None), ("distilled student", teacher)):
        torch.manual_seed(1)
        students[label] = GPT(small)
        train_student(students[label], train_ids, steps, seed=1, teacher=with_teacher)
    torch.set_num_threads(1)

    with torch.inference_mode():
        int8 = compress.quantize_linears(copy.deepcopy(teacher))
        distilled_int8 = compress.quantize_linears(copy.deepcopy(students["distilled student"]))
    ao, _ = export.ao_quantize_dynamic(teacher)
    folder_tmp = Path(tempfile.mkdtemp(prefix="bench-compress-"))
    example = torch.randint(0, config.vocab_size, (1, 64))
    onnx_fp32 = export.export_onnx(teacher, example, folder_tmp / "gpt.onnx")
    onnx_int8 = export.ort_quantize_dynamic(onnx_fp32, folder_tmp / "gpt_int8.onnx")
    sessions = {path: export.ort_session(path) for path in (onnx_fp32, onnx_int8)}

    def ao_size(model) -> int:
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        return len(buffer.getvalue())

    def count(model) -> int:
        return sum(p.numel() for p in model.parameters())

    student = students["distilled student"]
    rows_in = [  # (label, model or ONNX session, file bytes, weights before quantisation)
        ("fp32", teacher, compress.saved_size_bytes(teacher), count(teacher)),
        ("structured pruning (MLP 50%) + fine-tuning", pruned, compress.saved_size_bytes(pruned),
         count(pruned)),
        ("int8, ours", int8, compress.saved_size_bytes(int8), count(teacher)),
        ("int8, torch.ao", ao, ao_size(ao), count(teacher)),
        ("ONNX Runtime fp32", sessions[onnx_fp32], export.file_size(onnx_fp32), count(teacher)),
        ("int8, ONNX Runtime dynamic", sessions[onnx_int8], export.file_size(onnx_int8),
         count(teacher)),
        ("student, tokens only", students["student, tokens only"],
         compress.saved_size_bytes(students["student, tokens only"]), count(student)),
        ("distilled student", student, compress.saved_size_bytes(student), count(student)),
        ("distilled student + int8", distilled_int8, compress.saved_size_bytes(distilled_int8),
         count(student)),
    ]

    def caller(model):
        if isinstance(model, torch.nn.Module):
            return model
        return lambda x: export.ort_run(model, x.numpy())

    inputs = {n: torch.randint(0, config.vocab_size, (n, 64)) for n in (1, 64)}
    machine = f"{platform.machine()}, torch {torch.__version__}, 1 thread"
    callers = [caller(model) for _, model, _, _ in rows_in]
    rows = []
    with torch.inference_mode():
        best = {n: round_robin_best(callers, inputs[n], repeats) for n in (1, 64)}
        for i, (label, _model, size, weights) in enumerate(rows_in):
            rows.append({
                "model": label,
                "weights": weights,
                "file_bytes": size,
                "smaller": round(rows_in[0][2] / size, 2),
                "speed_b1": round(best[1][0] / best[1][i], 2),
                "speed_b64": round(best[64][0] / best[64][i], 2),
                "perplexity": round(perplexity_of(callers[i], val_ids, 64, config.vocab_size), 3),
                "machine": machine,
            })
    write_table(rows, TABLE, folder)
    return rows


def check_bounds(rows: list[dict]) -> list[str]:
    """The issue's bounds for the GPT, one line per row they apply to; each says PASS or FAIL.

    int8: >= 3.5x smaller, >= 2.5x faster (batch 1 and 64, one thread), <= 1% relative
    perplexity increase. Structured pruning after fine-tuning: >= 1.3x faster. Distillation:
    the distilled student recovers at least half of the gap between the student trained
    alone and the teacher.
    """
    by = {r["model"]: r for r in rows}
    fp32 = by["fp32"]
    lines = []
    for r in rows:
        if r["model"].startswith("int8"):
            ok = (r["smaller"] >= 3.5 and min(r["speed_b1"], r["speed_b64"]) >= 2.5
                  and r["perplexity"] <= 1.01 * fp32["perplexity"])
            lines.append(f"{'PASS' if ok else 'FAIL'} {r['model']}: {r['smaller']}x smaller "
                         f"(>= 3.5), {r['speed_b1']}x / {r['speed_b64']}x faster at batch 1 / 64 "
                         f"(>= 2.5), perplexity {r['perplexity'] / fp32['perplexity'] - 1:+.2%} "
                         "(<= +1%)")
        elif r["model"].startswith("structured"):
            ok = min(r["speed_b1"], r["speed_b64"]) >= 1.3
            lines.append(f"{'PASS' if ok else 'FAIL'} {r['model']}: {r['speed_b1']}x / "
                         f"{r['speed_b64']}x faster at batch 1 / 64 (>= 1.3)")
    alone, distilled = by["student, tokens only"], by["distilled student"]
    recovered = ((alone["perplexity"] - distilled["perplexity"])
                 / (alone["perplexity"] - fp32["perplexity"]))
    lines.append(f"{'PASS' if recovered >= 0.5 else 'FAIL'} distillation recovers "
                 f"{recovered:.0%} of the gap from the student alone to the teacher (>= 50%)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=FIGURES, help="folder for the CSV")
    args = parser.parse_args()
    rows = run(args.steps, args.repeats, args.out)
    print(f"{'':>45}{'bytes':>12}{'smaller':>9}{'b=1':>7}{'b=64':>7}{'ppl':>9}")
    for r in rows:
        print(f"{r['model']:>45}{r['file_bytes']:>12,}{r['smaller']:>8}x{r['speed_b1']:>6}x"
              f"{r['speed_b64']:>6}x{r['perplexity']:>9}")
    lines = check_bounds(rows)
    print("\n".join(lines))
    if not any(line.startswith("PASS int8") for line in lines):
        raise SystemExit("no int8 path meets the issue's bounds for the GPT")


if __name__ == "__main__":
    main()
