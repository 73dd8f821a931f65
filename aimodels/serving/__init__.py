"""A small, complete model service (Chapter 12).

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
paged      a paged KV cache, paged attention and continuous-batching decode (Chapter 13)
llm        the LLM engine and the OpenAI-compatible completions API (Chapter 13)
cli        the ``aimodels`` console script
========== ==============================================================

The server stack lives in the ``serve`` extra: ``pip install -e ".[serve]"``.
"""
