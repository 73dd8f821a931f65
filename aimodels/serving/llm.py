r"""Serving a language model: an engine with continuous batching, behind OpenAI's API.

**Why decoding is memory-bound.** Generating one token for one sequence multiplies a
single row vector by every weight matrix of the model: each weight is read from memory
once and used for two floating-point operations. Processors do far more arithmetic per
second than they can read bytes, so a decoding step of batch 1 leaves the arithmetic units
idle, waiting for weights. Decoding *B* sequences in the same step reads the weights once
for all *B* rows: up to the point where arithmetic becomes the limit, a step of 16
sequences costs little more than a step of 1. Batching is therefore the main lever of LLM
serving, and what limits the batch is the memory for each sequence's keys and values,
which is why :mod:`aimodels.serving.paged` stores them in blocks.

**Static versus continuous batching.** Requests differ in length: one reply stops after 5
tokens, another runs to 200. *Static* (request-level) batching takes a batch of requests,
decodes until the longest has finished, then takes the next batch: the slots of the
finished requests sit empty, and newcomers wait for the whole batch, not just for a free
slot. *Continuous* (iteration-level) batching (Yu et al., 2022, Orca; Kwon et al., 2023,
vLLM) schedules at every decoding step instead:

1. *admit* waiting requests, oldest first, while the batch has room and the block pool
   holds their prompt; each is *prefilled* (its prompt run through the model, keys and
   values cached) and gets its first token;
2. *preempt* if the running sequences need more new blocks than are free: the youngest
   gives all its blocks back and waits; when readmitted its prompt and the tokens it had
   generated are prefilled again (recomputation), so its reply does not change
   (counted by ``stats()["preemptions"]`` and, on a server, by the counter
   ``aimodels_llm_preemptions_total``);
3. *decode* one token for every running sequence in one batched step
   (:func:`~aimodels.serving.paged.decode_step`);
4. *retire* finished or cancelled sequences and free their blocks for the next step.

:class:`LLMEngine` runs that loop in one background thread; ``mode="static"`` runs the
request-level policy on the same code, for the comparison in ``benchmarks/bench_llm.py``:
a batch is admitted together and decoded as a fixed-shape batch, the rows of replies that
have ended computed as padding until the longest ends. (It is generous to static batching
in two ways: an ended reply is streamed to its client at once, and each prompt is
prefilled on its own rather than padded to the longest prompt of the batch.)

**The API: OpenAI's, on the same app.** Clients of LLM services speak the OpenAI API
(https://platform.openai.com/docs/api-reference/completions), so the official ``openai``
client, and every tool built on it, works against this server by changing ``base_url``.
:func:`add_openai_routes` adds to chapter 12's app:

=====================  ====  ==========================================================
route                  verb  answers
=====================  ====  ==========================================================
``/v1/models``         GET   ``{"object": "list", "data": [{"id", "object": "model",
                             "created", "owned_by"}]}``: the GPT models served
``/v1/completions``    POST  ``model``, ``prompt`` (text or token ids), ``max_tokens``,
                             ``temperature`` (0-2; 0 = greedy), ``top_p`` (0-1],
                             ``stop`` (string or up to 4), ``seed``, ``stream``
=====================  ====  ==========================================================

Errors come in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``:
400 for a bad parameter (naming the parameter, what was expected and what arrived),
404 for a model that is not served. ``max_tokens`` is capped by the server's limit and by
what the context has left after the prompt; the reply then ends with
``finish_reason: "length"``.

**Streaming with Server-Sent Events.** With ``"stream": true`` the reply is an HTTP
response that stays open, of content type ``text/event-stream``: each event is a line
``data: <json>`` followed by a blank line, here a chunk of the completion as soon as its
tokens are decoded, and the stream ends with ``data: [DONE]``. SSE is plain HTTP (no
WebSocket upgrade) and goes through proxies. (Browsers have ``EventSource`` for SSE,
but it only sends GET requests; a page reads this POST stream with ``fetch``.)
The client sees the first token after one prefill instead of after the whole reply: the
*time to first token* (TTFT). The gaps between the following chunks are the
*inter-token latency* (ITL, or time per output token, TPOT). If the client goes away,
the server notices, cancels the sequence and frees its blocks.

Text and tokens. A byte-level BPE token can end inside a multi-byte UTF-8 character,
so text is decoded incrementally and a chunk never carries half a character; text that
could be the start of a ``stop`` string is held back until it is certain not to be.
Concatenated, the streamed chunks equal the non-streamed text.
"""

from __future__ import annotations

import asyncio
import codecs
import itertools
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from aimodels.gpt import GPT, GPTConfig, sample_next
from aimodels.serving.paged import PagedKVCache, decode_step, prefill

__all__ = [
    "LLMEngine",
    "LLMService",
    "Token",
    "TOKENIZER_FILE",
    "TextDecoder",
    "add_openai_routes",
    "gpt_config",
    "load_tokenizer",
    "publish_tiny_gpt",
]

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"  # the BPE merges, as chapter 9 saves them
GPT_ARCHITECTURE = "gpt"
MODES = ("continuous", "static")


# =============================================================================== the model


def gpt_config(config: GPTConfig) -> dict[str, Any]:
    """The config stored beside a GPT's weights: the architecture tag and every field."""
    return {"architecture": GPT_ARCHITECTURE, **config.to_dict()}


def load_tokenizer(data: bytes | str):
    """A :class:`~aimodels.text.BPETokenizer` from the JSON list of merges."""
    from aimodels.text import BPETokenizer

    return BPETokenizer([tuple(pair) for pair in json.loads(data)])


def publish_tiny_gpt(store, name: str = "tiny-gpt", seconds: float = 30, seed: int = 0,
                     aliases: Sequence[str] = ("production",), steps: int | None = None) -> int:
    """Train chapter 9's tiny GPT (``steps`` steps or about ``seconds`` s) and publish it.

    Chapter 9's corpus (the standard library's source, BPE with 512 tokens) and sizes
    (context 64, width 96, 4 heads, 2 layers). Without ``steps``, their number is chosen
    from the time of a few trial steps so that training takes about ``seconds`` (at most
    600, chapter 9's schedule): reproducible models need ``steps``. The merges go in the file
    ``tokenizer.json``; ``aliases`` (default: production) point at the new version, returned.
    """
    from aimodels import gpt

    if not 1 <= seconds <= 600 or not (steps is None or 1 <= steps <= 600):
        raise ValueError(f"seconds and steps must be in [1, 600], got {seconds!r}, {steps!r}")
    torch.manual_seed(seed)
    corpus = gpt.stdlib_token_streams(max_chars=1_200_000, vocab_size=512)
    tokenizer, train_ids, val_ids = corpus["tokenizer"], corpus["train"], corpus["val"]
    config = GPTConfig(vocab_size=tokenizer.vocab_size, context_length=64, d_model=96,
                       n_heads=4, n_layers=2)
    probe = GPT(config)  # time a few steps (after a warm-up, without evaluation)
    for n in (2, 8) if steps is None else ():
        trial = gpt.pretrain(probe, train_ids, val_ids, steps=n, batch_size=32,
                             warmup_steps=1, eval_every=1000, progress=False, seed=seed)
    per_step = trial["train_seconds"][0] / 8 if steps is None else None
    steps = int(steps) if steps is not None else max(20, min(600, int(seconds * 0.9 / per_step)))
    torch.manual_seed(seed)
    model = GPT(config)
    history = gpt.pretrain(model, train_ids, val_ids, steps=steps, batch_size=32,
                           lr=0.64 / config.d_model, warmup_steps=min(50, steps // 5),
                           min_lr=1e-4, weight_decay=0.1, clip_grad_norm=1.0,
                           eval_every=steps, seed=seed, progress=False)
    model.eval()
    metrics = {"val_loss": history["val_loss"][-1], "steps": float(steps),
               "train_seconds": history["train_seconds"][0]}
    return store.publish(name, model.state_dict(), gpt_config(config), metrics=metrics,
                         aliases=list(aliases),
                         extra_files={TOKENIZER_FILE: json.dumps(tokenizer.merges)})


# =============================================================================== text


class TextDecoder:
    """Token ids in, text out, never half a UTF-8 character and never part of a stop string.

    :meth:`push` takes one token and returns the text that is now certain;
    :meth:`finish` returns the rest. When a stop string appears, :attr:`stopped` becomes
    True and the text ends just before it.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False

    def _bytes(self, token: int) -> bytes:
        pieces = getattr(self.tokenizer, "pieces", None)
        if pieces is not None:
            return pieces[token]
        return self.tokenizer.decode([token]).encode("utf-8")

    def _take(self, end: int) -> str:
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def _check_stop(self) -> str | None:
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if not hits:
            return None
        self.stopped = True
        self.text = self.text[:min(hits)]
        return self._take(len(self.text))

    def push(self, token: int) -> str:
        if self.tokenizer is None or self.stopped:
            return ""
        self.text += self._utf8.decode(self._bytes(token))
        stopped = self._check_stop()
        if stopped is not None:
            return stopped
        hold = max((len(s) - 1 for s in self.stop), default=0)
        return self._take(len(self.text) - hold)

    def finish(self) -> str:
        if self.tokenizer is None or self.stopped:
            return ""
        self.text += self._utf8.decode(b"", final=True)
        stopped = self._check_stop()
        return stopped if stopped is not None else self._take(len(self.text))


# =============================================================================== the engine


@dataclass
class Token:
    """One generated token as :meth:`LLMEngine.submit` yields it.

    ``text`` is the text this token makes certain (possibly empty); ``finish_reason`` is
    None until the last token, then ``"length"`` or ``"stop"``.
    """

    id: int
    text: str = ""
    finish_reason: str | None = None


@dataclass(eq=False)  # compared by identity
class _Sequence:
    """A request inside the engine (touched by the worker thread only, after submit)."""

    id: int
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float | None
    generator: torch.Generator | None
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    output: list[int] = field(default_factory=list)
    preempted: int = 0
    finished: bool = False  # all tokens sent (static batching may keep it as padding)

    @property
    def context(self) -> list[int]:
        return self.prompt + self.output


def _deliver(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


class LLMEngine:
    """A GPT behind a paged KV cache, decoding many requests in one background thread.

    ``num_blocks`` blocks of ``block_size`` tokens make up the cache; at most ``max_batch``
    sequences decode together. ``mode="continuous"`` schedules at every step (see the
    module docstring); ``mode="static"`` admits a batch only when the previous one has
    finished, after waiting up to ``static_window`` seconds for ``max_batch`` requests,
    and decodes it as a fixed-shape batch: a reply that has ended keeps its row, computed
    as padding, until the longest reply of the batch has ended.
    ``on_step(stats)`` is called from the worker after every step (for metrics).
    ``prefix_caching=True`` shares the cached blocks of a prompt's remembered prefix
    (see :class:`~aimodels.serving.paged.PagedKVCache`) instead of computing them again.

    Use :meth:`start` and :meth:`stop` (or ``with engine:``), then, on an event loop,
    ``async for token in engine.submit(prompt_ids, max_tokens, ...)``. Leaving the loop
    early (a client that went away) cancels the request and frees its blocks.
    """

    def __init__(self, model: GPT, tokenizer=None, *, num_blocks: int, block_size: int = 16,
                 max_batch: int = 16, mode: str = "continuous", static_window: float = 0.05,
                 on_step: Callable[[dict[str, int]], None] | None = None,
                 prefix_caching: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config: GPTConfig = model.config
        self.cache = PagedKVCache.for_model(self.config, num_blocks, block_size,
                                            dtype=model.tok_emb.weight.dtype,
                                            device=model.tok_emb.weight.device,
                                            prefix_caching=prefix_caching)
        self.max_batch = max_batch
        self.mode = mode
        self.static_window = static_window
        self.on_step = on_step
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._inbox: list[_Sequence] = []
        self._cancelled: set[int] = set()
        self._waiting: list[_Sequence] = []
        self._running: list[_Sequence] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0
        self.preemptions = 0  # sequences sent back to wait because blocks ran out

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> LLMEngine:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker; sequences still queued or running end with an error."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> LLMEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict[str, int]:
        """Sequences running, decoding and waiting, KV blocks used and free (a snapshot).

        ``running`` counts the rows of the batch; ``decoding`` those still generating
        (in a static batch the others are padding until the longest reply ends);
        ``tokens`` the tokens whose keys and values the running sequences hold;
        ``preemptions`` how often, since the engine was made, a running sequence gave its
        blocks back to wait and be recomputed.
        """
        with self._lock:
            return {"running": len(self._running),
                    "decoding": sum(not s.finished for s in self._running),
                    "tokens": sum(self.cache.length(s.id) for s in self._running
                                  if s.id in self.cache),
                    "waiting": len(self._waiting) + len(self._inbox),
                    "blocks_used": self.cache.num_blocks - self.cache.num_free_blocks,
                    "blocks_free": self.cache.num_free_blocks,
                    "preemptions": self.preemptions}

    # ------------------------------------------------------------------ requests
    def check_request(self, n_prompt: int, max_tokens: int) -> None:
        """Raise ValueError (with what was expected) if a request can never be served."""
        if n_prompt < 1:
            raise ValueError("the prompt must have at least one token")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
        total = n_prompt + max_tokens
        if total > self.config.context_length:
            raise ValueError(f"the prompt has {n_prompt} tokens and {max_tokens} new tokens "
                             f"were asked for: {total} positions, more than the context "
                             f"length {self.config.context_length}")
        if self.cache.blocks_for(total) > self.cache.num_blocks:
            raise ValueError(f"{total} tokens need {self.cache.blocks_for(total)} blocks, "
                             f"more than the whole pool of {self.cache.num_blocks}")

    async def submit(self, prompt_ids: Sequence[int], max_tokens: int,
                     temperature: float = 0.0, top_p: float | None = None,
                     stop: Sequence[str] | str | None = None,
                     seed: int | None = None) -> AsyncIterator[Token]:
        """Generate up to ``max_tokens`` tokens after ``prompt_ids``, yielding each as it comes.

        Greedy at ``temperature == 0``; otherwise sampled from ``softmax(logits /
        temperature)`` within the nucleus ``top_p``, with a generator of its own seeded by
        ``seed`` (the same seed, the same reply). ``stop`` strings end the reply (they
        need a tokenizer) with ``finish_reason="stop"``, the text cut before them.
        """
        prompt = [int(t) for t in prompt_ids]
        vocab = self.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise ValueError(f"token ids must be in [0, {vocab})")
        self.check_request(len(prompt), max_tokens)
        if not self.running:
            raise RuntimeError("the engine is not running; call start() first")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if stops and self.tokenizer is None:
            raise ValueError("stop strings need an engine with a tokenizer")
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=self.model.tok_emb.weight.device)
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)
        queue: asyncio.Queue = asyncio.Queue()
        seq = _Sequence(next(self._ids), prompt, max_tokens, float(temperature),
                        None if top_p is None or top_p >= 1 else float(top_p), generator,
                        asyncio.get_running_loop(), queue)
        decoder = TextDecoder(self.tokenizer, stops)
        with self._lock:
            self._inbox.append(seq)
            self._lock.notify_all()
        done = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    done = True
                    raise RuntimeError(f"generation failed: {item}") from item
                token, last = item
                text = decoder.push(token)
                if decoder.stopped:
                    yield Token(token, text, "stop")
                    return
                if last:
                    done = True
                    yield Token(token, text + decoder.finish(), "length")
                    return
                yield Token(token, text)
        finally:
            if not done:  # stopped early, or the consumer went away: free the blocks
                self.cancel(seq.id)

    def cancel(self, seq_id: int) -> None:
        """Drop a request wherever it is; the worker frees its blocks before its next step."""
        with self._lock:
            self._cancelled.add(seq_id)
            self._lock.notify_all()

    # ------------------------------------------------------------------ the worker
    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not (self._stopping or self._inbox or self._cancelled
                               or self._waiting or self._running):
                        self._lock.wait()
                    if self._stopping:
                        break
                    self._waiting.extend(self._inbox)
                    self._inbox.clear()
                    cancelled, self._cancelled = self._cancelled, set()
                    self._drop(cancelled)
                if self.mode == "static" and not self._running and self._waiting:
                    self._wait_for_static_batch()
                self.step()
        except BaseException as exc:  # report to every client rather than hang them
            logger.exception("the LLM engine stopped on an error")
            self._emit([(seq, exc) for seq in self._waiting + self._running + self._inbox
                        if not seq.finished])
            raise
        finally:
            with self._lock:
                if self._stopping:
                    self._emit([(seq, RuntimeError("the engine was stopped"))
                                for seq in self._waiting + self._running + self._inbox
                                if not seq.finished])
                for seq in self._running:
                    self.cache.free_sequence(seq.id)
                self._waiting, self._running, self._inbox = [], [], []
            self._report()

    def _drop(self, ids: set[int]) -> None:
        """Remove cancelled sequences (lock held) and free their blocks."""
        if not ids:
            return
        self._waiting = [s for s in self._waiting if s.id not in ids]
        for seq in [s for s in self._running if s.id in ids]:
            self._running.remove(seq)
            self.cache.free_sequence(seq.id)

    def _wait_for_static_batch(self) -> None:
        deadline = time.monotonic() + self.static_window
        with self._lock:
            while (len(self._waiting) + len(self._inbox) < self.max_batch
                   and not self._stopping and (left := deadline - time.monotonic()) > 0):
                self._lock.wait(left)
            self._waiting.extend(self._inbox)
            self._inbox.clear()
            cancelled, self._cancelled = self._cancelled, set()
            self._drop(cancelled)

    @staticmethod
    def _emit(items: list[tuple[_Sequence, Any]]) -> None:
        """Hand items to their clients' event loops: one wake-up per loop, not per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        for seq, item in items:
            by_loop.setdefault(seq.loop, []).append((seq.queue, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # that loop has closed: nobody is listening any more
                pass

    def _sample(self, seqs: list[_Sequence], logits: torch.Tensor) -> list[int]:
        """One token per row of ``logits`` [B, vocab]; the greedy rows in one argmax."""
        tokens = logits.argmax(dim=-1).tolist()
        for b, seq in enumerate(seqs):
            if seq.temperature > 0:
                tokens[b] = int(sample_next(logits[b:b + 1], seq.temperature, None,
                                            seq.top_p, seq.generator)[0])
        return tokens

    def _push(self, seqs: list[_Sequence], tokens: list[int]) -> None:
        """Hand new tokens to their clients and retire what has ended.

        Continuous batching frees an ended sequence's blocks at once. A static batch keeps
        every row (and its blocks) until its longest reply has ended, then frees them all.
        """
        for seq, token in zip(seqs, tokens, strict=True):
            seq.output.append(token)
            seq.finished = len(seq.output) >= seq.max_tokens
        if self.mode == "static":
            retire = self._running if all(s.finished for s in self._running) else []
        else:
            retire = [s for s in seqs if s.finished]
        if retire:
            with self._lock:
                for seq in retire:
                    self.cache.free_sequence(seq.id)
                self._running = [s for s in self._running if s not in retire]
        self._emit([(seq, (token, seq.finished)) for seq, token in zip(seqs, tokens, strict=True)])

    def step(self) -> None:
        """One scheduling iteration: admit and prefill, preempt, decode, retire."""
        cache = self.cache
        admitting = self.mode == "continuous" or not self._running
        while (admitting and self._waiting and len(self._running) < self.max_batch
               and cache.can_admit(len(self._waiting[0].context) + 1)):
            with self._lock:
                seq = self._waiting.pop(0)
                self._running.append(seq)
            context = seq.context
            cached = cache.add_sequence(seq.id, context)  # a remembered prefix, if any
            try:
                logits = prefill(self.model, cache, seq.id, context[cached:])
            except BaseException:
                cache.free_sequence(seq.id)
                raise
            cache.remember_prefix(seq.id, context)
            self._push([seq], self._sample([seq], logits[None]))
        batch = [s for s in self._running if not s.finished]
        while sum(cache.blocks_needed(s.id, 1) for s in batch) > cache.num_free_blocks:
            victim = batch.pop()  # the youngest: first come, first served
            with self._lock:
                self._running.remove(victim)
                cache.free_sequence(victim.id)
                victim.preempted += 1
                self.preemptions += 1
                self._waiting.insert(0, victim)
        if batch:
            padding = {s.id: s.context[cache.length(s.id) - 1]
                       for s in self._running if s.finished}  # static batching only
            logits = decode_step(self.model, cache, [s.id for s in batch],
                                 [s.output[-1] for s in batch], padding=padding)
            self.steps += 1  # before the tokens go out: their clients find the step counted
            self._push(batch, self._sample(batch, logits))
        self._report()

    def _report(self) -> None:
        if self.on_step is not None:
            self.on_step(self.stats())


# =============================================================================== the service


class LLMService:
    """The GPT models a server runs: one :class:`LLMEngine` per model, its production version.

    ``max_tokens`` is the server's cap on a reply; ``num_blocks=None`` sizes each pool
    for ``max_batch`` full-context sequences.
    """

    def __init__(self, store, metrics=None, *, models: list[str] | None = None,
                 max_tokens: int = 256, num_blocks: int | None = None, block_size: int = 16,
                 max_batch: int = 16, mode: str = "continuous",
                 prefix_caching: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
        self.store = store
        self.metrics = metrics
        self.models = models
        self.max_tokens = max_tokens
        self.options = {"num_blocks": num_blocks, "block_size": block_size,
                        "max_batch": max_batch, "mode": mode,
                        "prefix_caching": prefix_caching}
        self.engines: dict[str, LLMEngine] = {}
        self.versions: dict[str, int] = {}
        self.created: dict[str, int] = {}

    def is_gpt(self, name: str) -> bool:
        """Whether the production version of ``name`` is a GPT (reads its config only)."""
        from aimodels.checkpoint import CONFIG

        try:
            folder = self.store.path(name, "production")
            config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
        except (LookupError, OSError, ValueError):
            return False
        return isinstance(config, dict) and config.get("architecture") == GPT_ARCHITECTURE

    def load(self, name: str) -> LLMEngine:
        """Load the production version of ``name`` with its tokenizer and start an engine."""
        from aimodels.checkpoint import load_extra_file

        stored = self.store.load(name, "production")
        fields = {k: v for k, v in stored.config.items() if k != "architecture"}
        model = GPT(GPTConfig.from_dict(fields))
        model.load_state_dict(stored.tensors, strict=True)
        folder = self.store.path(name, stored.version)
        tokenizer = load_tokenizer(load_extra_file(folder, TOKENIZER_FILE))
        options = dict(self.options)
        if options["num_blocks"] is None:
            per_sequence = math.ceil(model.config.context_length / options["block_size"])
            options["num_blocks"] = options["max_batch"] * per_sequence
        engine = LLMEngine(model, tokenizer, on_step=self._gauges(name), **options)
        self.engines[name] = engine.start()
        self.versions[name] = stored.version
        self.created[name] = int(time.time())
        if self.metrics is not None:
            self.metrics.set_model_version(name, stored.version)
        logger.info("serving %s version %d on /v1 (%s batching, %d KV blocks)", name,
                    stored.version, engine.mode, engine.cache.num_blocks)
        return engine

    def start(self) -> None:
        names = self.models if self.models is not None else self.store.models()
        for name in names:
            if self.is_gpt(name):
                self.load(name)

    def stop(self) -> None:
        for engine in self.engines.values():
            engine.stop()

    def _gauges(self, name: str) -> Callable[[dict[str, int]], None] | None:
        if self.metrics is None:
            return None
        m = self.metrics
        counted = {"preemptions": 0}  # what the counter already holds

        def update(stats: dict[str, int]) -> None:
            m.llm_running.labels(name).set(stats["running"])
            m.llm_waiting.labels(name).set(stats["waiting"])
            m.llm_kv_blocks_used.labels(name).set(stats["blocks_used"])
            m.llm_kv_blocks_free.labels(name).set(stats["blocks_free"])
            m.llm_preemptions.labels(name).inc(stats["preemptions"] - counted["preemptions"])
            counted["preemptions"] = stats["preemptions"]

        return update


# =============================================================================== the routes


class OpenAIError(Exception):
    """An error the client gets in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status, message, param, code, type)

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type,
                                       "param": self.param, "code": self.code}}, self.status)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


def _number(body: dict, name: str, default: float, low: float, high: float,
            low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > high or value < low or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise OpenAIError(400, f"'{name}' must be a number in {interval}, got {value!r}", name,
                          "invalid_value")
    return float(value)


@dataclass
class CompletionRequest:
    model: str
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool


def parse_completion_request(body: Any, service: LLMService) -> CompletionRequest:
    """Validate a ``/v1/completions`` body; raise :class:`OpenAIError` naming the parameter."""
    if not isinstance(body, dict):
        raise OpenAIError(400, f"the request body must be a JSON object, got {_kind(body)}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise OpenAIError(400, f"'model' must be a model name (a string), got {model!r}",
                          "model")
    if model not in service.engines:
        raise OpenAIError(404, f"the model {model!r} does not exist or is not served; "
                          f"served models: {sorted(service.engines)}", "model",
                          "model_not_found")
    engine = service.engines[model]
    context = engine.config.context_length
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        ids = engine.tokenizer.encode(prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                          for t in prompt):
        ids = list(prompt)
        vocab = engine.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise OpenAIError(400, f"token ids in 'prompt' must be in [0, {vocab})", "prompt",
                              "invalid_value")
    else:
        raise OpenAIError(400, "'prompt' must be a string or an array of token ids (one "
                          f"prompt per request), got {_kind(prompt)}", "prompt")
    if not ids:
        raise OpenAIError(400, "'prompt' is empty; send at least one token", "prompt")
    if len(ids) >= context:
        raise OpenAIError(400, f"this model's maximum context length is {context} tokens; the "
                          f"prompt has {len(ids)} tokens, which leaves no room for a reply",
                          "prompt", "context_length_exceeded")
    max_tokens = body.get("max_tokens", 16)
    if max_tokens is None:
        max_tokens = service.max_tokens
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise OpenAIError(400, f"'max_tokens' must be an integer >= 1, got {max_tokens!r}",
                          "max_tokens", "invalid_value")
    max_tokens = min(max_tokens, service.max_tokens, context - len(ids))
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else ([] if stop is None else stop)
    if (not isinstance(stop, list) or len(stop) > 4
            or not all(isinstance(s, str) and s for s in stop)):
        raise OpenAIError(400, f"'stop' must be a non-empty string or an array of up to 4 of "
                          f"them, got {body.get('stop')!r}", "stop")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise OpenAIError(400, f"'seed' must be an integer, got {seed!r}", "seed")
    n = body.get("n", 1)
    if n != 1:
        raise OpenAIError(400, f"only 'n' = 1 is supported, got {n!r}", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool | None):
        raise OpenAIError(400, f"'stream' must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    include_usage = bool(options.get("include_usage")) if isinstance(options, dict) else False
    return CompletionRequest(model, ids, max_tokens, temperature, top_p, stop, seed,
                             bool(stream), include_usage)


def add_openai_routes(app, service: LLMService, metrics, read_json: Callable,
                      limit: int) -> None:
    """Add ``/v1/models`` and ``/v1/completions`` to ``app`` (see the module docstring)."""
    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": service.created[name],
             "owned_by": "aimodels"} for name in sorted(service.engines)]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        received = time.perf_counter()
        try:
            try:
                body = await read_json(request, limit)
            except Exception as exc:  # the v2 ProtocolError: re-shaped for OpenAI clients
                status = getattr(exc, "status", 400)
                raise OpenAIError(status, getattr(exc, "message", str(exc))) from None
            req = parse_completion_request(body, service)
        except OpenAIError as exc:
            return exc.response()
        engine = service.engines[req.model]
        tokens = engine.submit(req.prompt, req.max_tokens, req.temperature, req.top_p,
                               req.stop, req.seed)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": req.model}
        timing = _Timing(metrics, req.model, received)
        if req.stream:
            return StreamingResponse(_sse(tokens, head, req, timing),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        text, count, reason = [], 0, "length"
        try:
            async for token in tokens:
                timing.token()
                text.append(token.text)
                count += 1
                reason = token.finish_reason or reason
        finally:
            await tokens.aclose()
        return JSONResponse({**head, "choices": [
            {"text": "".join(text), "index": 0, "logprobs": None, "finish_reason": reason}],
            "usage": _usage(len(req.prompt), count)})


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


class _Timing:
    """Time to first token and inter-token latency, into the metrics (if any)."""

    def __init__(self, metrics, model: str, start: float) -> None:
        self.metrics, self.model, self.last = metrics, model, start
        self.first = True

    def token(self) -> None:
        now = time.perf_counter()
        if self.metrics is not None:
            histogram = self.metrics.llm_ttft if self.first else self.metrics.llm_itl
            histogram.labels(self.model).observe(now - self.last)
            self.metrics.llm_generated_tokens.labels(self.model).inc()
        self.first, self.last = False, now


async def _sse(tokens: AsyncIterator[Token], head: dict[str, Any], req: CompletionRequest,
               timing: _Timing) -> AsyncIterator[bytes]:
    """The Server-Sent Events of a streamed completion, ending with ``data: [DONE]``."""

    def event(data: Any) -> bytes:
        return f"data: {json.dumps(data)}\n\n".encode()

    count = 0
    try:
        async for token in tokens:
            timing.token()
            count += 1
            if token.text or token.finish_reason:
                yield event({**head, "choices": [{"text": token.text, "index": 0,
                                                  "logprobs": None,
                                                  "finish_reason": token.finish_reason}]})
        if req.include_usage:
            yield event({**head, "choices": [], "usage": _usage(len(req.prompt), count)})
    except RuntimeError as exc:
        yield event({"error": {"message": str(exc), "type": "server_error", "param": None,
                               "code": None}})
    finally:
        await tokens.aclose()  # a client that went away: cancel and free the blocks
    yield b"data: [DONE]\n\n"
