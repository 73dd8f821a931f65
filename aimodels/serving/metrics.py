"""What the service measures about itself: Prometheus metrics and input drift.

A service that cannot be observed cannot be operated. Prometheus *scrapes* a plain-text
page, ``GET /metrics``, every few seconds and stores each number as a time series; the
dashboards and alerts are queries over those series. The server keeps:

==================================================  =========  ==========================
metric                                              type       answers
==================================================  =========  ==========================
``aimodels_requests_total{model,status}``           counter    how many, and how many
                                                               failed (status = HTTP code)
``aimodels_request_duration_seconds{model}``        histogram  latency seen by clients
``aimodels_inference_duration_seconds{model}``      histogram  time inside the model
``aimodels_batch_size{model}``                      histogram  is batching happening?
``aimodels_queue_depth{model,version}``             gauge      is the server overloaded?
``aimodels_model_info{model,version}``              info       which version is live?
``aimodels_input_drift_psi{model}``                 gauge      do inputs still look like
                                                               the training data?
``aimodels_llm_time_to_first_token_seconds{model}`` histogram  how long until a reply
                                                               starts (prefill + queue)
``aimodels_llm_inter_token_latency_seconds{model}`` histogram  the gap between tokens
``aimodels_llm_generated_tokens_total{model}``      counter    tokens out (rate = tokens/s)
``aimodels_llm_running_sequences{model}``           gauge      the decoding batch size
``aimodels_llm_waiting_sequences{model}``           gauge      requests not yet admitted
``aimodels_llm_kv_blocks_used{model}``, ``_free``   gauge      KV-cache memory pressure
``aimodels_llm_preemptions_total{model}``           counter    sequences sent back to wait
                                                               when KV blocks ran out
==================================================  =========  ==========================

The ``aimodels_llm_*`` metrics belong to the language models of chapter 13
(:mod:`aimodels.serving.llm`): for a streamed reply, latency is two numbers, the wait for
the first token and the pace of the following ones.

Prometheus' naming rules: base units (seconds, not milliseconds; bytes, not MiB), the
unit as a suffix (``_seconds``), counters end in ``_total``, and labels hold only a few
distinct values each (a label per user id would create a series per user). A
*histogram* counts observations into cumulative buckets, so that percentiles can be
estimated over any time window and summed across replicas, which averages cannot.

The request path and where each number comes from::

    client -> API (validate)  -> queue -> batcher -> model -> API (respond)
              drift PSI          depth    batch size  inference  requests_total,
                                                      duration   request duration

Input drift. A model is only as good as the match between its inputs and its training
data; when the world changes (a new camera, a new user group) accuracy drops silently,
because nobody sends the labels back. What can be watched is the inputs. The population
stability index compares a feature's distribution in a recent window of requests
(*actual*) with the training data (*expected*) over bins chosen as quantiles of the
training data:

    PSI = sum over bins of (actual% - expected%) * ln(actual% / expected%)

A common rule of thumb: below 0.1 no shift, 0.1-0.25 a moderate shift, above 0.25 a
large one. The digits model's summary feature is an image's mean pixel intensity.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

__all__ = ["DriftMonitor", "ServiceMetrics", "mean_intensity", "psi"]

# Latency buckets from 1 ms to 10 s, roughly x2.5 apart (base unit: seconds).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceMetrics:
    """The service's metrics, in a registry of their own (not the process-global one).

    A private `CollectorRegistry` means two apps in one process (as in the tests) do
    not share counters, and re-creating an app never raises "duplicated timeseries".
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "aimodels_requests", "Inference requests by model and HTTP status code.",
            ["model", "status"], registry=r,
        )
        self.request_duration = Histogram(
            "aimodels_request_duration_seconds",
            "Time from receiving an inference request to sending its response.",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.inference_duration = Histogram(
            "aimodels_inference_duration_seconds",
            "Time of one batched model call (worker thread), per batch.",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "aimodels_batch_size", "Requests per batched model call.",
            ["model"], buckets=BATCH_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge(
            "aimodels_queue_depth", "Requests waiting in the batch queue.",
            ["model", "version"], registry=r,
        )
        self.model_info = Info(
            "aimodels_model", "The version a model name currently serves by default.",
            ["model"], registry=r,
        )
        self.input_drift_psi = Gauge(
            "aimodels_input_drift_psi",
            "Population stability index of recent inputs against the training data.",
            ["model"], registry=r,
        )

        self.llm_ttft = Histogram(
            "aimodels_llm_time_to_first_token_seconds",
            "Time from receiving a completion request to its first generated token.",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.llm_itl = Histogram(
            "aimodels_llm_inter_token_latency_seconds",
            "Time between consecutive generated tokens of one completion.",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.llm_generated_tokens = Counter(
            "aimodels_llm_generated_tokens", "Tokens generated, by model.", ["model"],
            registry=r,
        )
        self.llm_running = Gauge(
            "aimodels_llm_running_sequences", "Sequences in the decoding batch.", ["model"],
            registry=r,
        )
        self.llm_waiting = Gauge(
            "aimodels_llm_waiting_sequences", "Requests waiting to be admitted (or preempted).",
            ["model"], registry=r,
        )
        self.llm_kv_blocks_used = Gauge(
            "aimodels_llm_kv_blocks_used", "KV-cache blocks allocated to sequences.", ["model"],
            registry=r,
        )
        self.llm_kv_blocks_free = Gauge(
            "aimodels_llm_kv_blocks_free", "KV-cache blocks free.", ["model"], registry=r,
        )
        self.llm_preemptions = Counter(
            "aimodels_llm_preemptions",
            "Running sequences preempted (blocks given back, recomputed later) for lack of "
            "KV-cache blocks.", ["model"], registry=r,
        )

    def observe_request(self, model: str, status: int, seconds: float) -> None:
        self.requests.labels(model, str(status)).inc()
        self.request_duration.labels(model).observe(seconds)

    def observe_batch(self, model: str, size: int, seconds: float) -> None:
        self.batch_size.labels(model).observe(size)
        self.inference_duration.labels(model).observe(seconds)

    def set_model_version(self, model: str, version: int | None) -> None:
        """Record the default version of `model`; None when it is unloaded."""
        state = {"version": str(version), "state": "READY"} if version is not None else {
            "version": "", "state": "UNAVAILABLE"
        }
        self.model_info.labels(model).info(state)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type, for ``GET /metrics``."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def psi(expected: np.ndarray, actual: np.ndarray, bins: int = 10, eps: float = 1e-4) -> float:
    """Population stability index of `actual` against `expected` (1-D samples).

    The bin edges are the quantiles of `expected`, so each bin holds about 1/bins of
    it; the outer bins are open-ended, so values outside the training range still
    count. Bin fractions are clipped to `eps` so that an empty bin does not give an
    infinite logarithm. Returns 0 for identical distributions; grows with the shift.
    """
    expected = _as_1d("expected", expected)
    actual = _as_1d("actual", actual)
    if not isinstance(bins, int) or bins < 2:
        raise ValueError(f"bins must be an int >= 2, got {bins!r}")
    edges = np.unique(np.quantile(expected, np.linspace(0, 1, bins + 1)[1:-1]))
    expected_frac = _fractions(expected, edges, eps)
    actual_frac = _fractions(actual, edges, eps)
    return float(np.sum((actual_frac - expected_frac) * np.log(actual_frac / expected_frac)))


def _as_1d(name: str, values: np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size == 0:
        raise ValueError(f"{name}: expected at least one value, got an empty array")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return array


def _fractions(values: np.ndarray, edges: np.ndarray, eps: float) -> np.ndarray:
    """Fraction of `values` in each bin defined by the inner `edges` (open outer bins)."""
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return np.clip(counts / len(values), eps, None)


def mean_intensity(inputs: np.ndarray) -> np.ndarray:
    """The digits model's drift feature: each image's mean pixel value (one per row)."""
    array = np.asarray(inputs, dtype=np.float64)
    return array.reshape(len(array), -1).mean(axis=1)


class DriftMonitor:
    """PSI of a rolling window of recent feature values against a reference sample.

    `update(values)` adds one value per input row (already summarised, e.g. by
    `mean_intensity`) and returns the PSI of the last `window` values, or None while
    fewer than `min_samples` have been seen (a PSI of five values is noise).
    Thread-safe.
    """

    def __init__(
        self,
        reference: np.ndarray | Sequence[float],
        window: int = 256,
        bins: int = 10,
        *,
        min_samples: int | None = None,
    ) -> None:
        self.reference = _as_1d("reference", np.asarray(reference))
        if not isinstance(window, int) or window < bins:
            raise ValueError(f"window must be an int >= bins ({bins}), got {window!r}")
        self.window = window
        self.bins = bins
        self.min_samples = window // 2 if min_samples is None else min_samples
        self._recent: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()
        self.value: float | None = None

    def update(self, values: np.ndarray | Sequence[float]) -> float | None:
        values = np.asarray(values, dtype=np.float64).ravel()
        values = values[np.isfinite(values)]
        with self._lock:
            self._recent.extend(values.tolist())
            if len(self._recent) < self.min_samples:
                return None
            self.value = psi(self.reference, np.fromiter(self._recent, float), self.bins)
            return self.value
