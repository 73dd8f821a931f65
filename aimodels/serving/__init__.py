"""A small, complete model service (Chapters 12 and 13).

========== ==============================================================
module     holds
========== ==============================================================
models     the digits classifier, `build_model`, `Servable` (what the server runs)
store      `ModelStore`: versions, aliases, checksums, atomic publish
batching   `DynamicBatcher`: an asyncio queue that groups requests into batches
metrics    Prometheus metrics and an input-drift monitor (PSI)
server     the Open Inference Protocol (KServe v2) REST server on FastAPI
process    start and stop a server subprocess on a free 127.0.0.1 port
loadtest   closed- and open-loop load generators and latency statistics
ray_app    the same model as a Ray Serve deployment (scale-out, autoscaling)
paged      a paged KV cache with prefix caching, paged attention, batched decoding (Ch. 13)
llm        the LLM engine (static or continuous batching), the OpenAI completions API
llmbench   workloads and side-by-side measurements of the LLM engine (Chapter 13)
cli        the ``aimodels`` console script
========== ==============================================================

The server stack lives in the ``serve`` extra: ``pip install -e ".[serve]"``.
"""
