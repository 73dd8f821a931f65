"""Chapter 13: the LLM engine (continuous batching on a paged KV cache) and the OpenAI API."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest
import torch

from aimodels.gpt import GPT, GPTConfig
from aimodels.serving.llm import (
    TOKENIZER_FILE,
    LLMEngine,
    TextDecoder,
    gpt_config,
    load_tokenizer,
)
from aimodels.serving.models import digits_config, train_digits_classifier
from aimodels.serving.process import start_server
from aimodels.serving.store import ModelStore
from aimodels.text import BPETokenizer

openai = pytest.importorskip("openai")

TEXT = ("def read_config(path):\n    with open(path) as f:\n        return json.load(f)\n"
        "import os\nimport sys\nprint('hello, world')\n") * 4


@pytest.fixture(scope="module")
def tokenizer() -> BPETokenizer:
    return BPETokenizer.train([TEXT], 300)


def tiny_gpt(tokenizer: BPETokenizer, context: int = 64, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, context_length=context, d_model=32,
                       n_heads=2, n_layers=2)
    return GPT(config).eval()


@pytest.fixture(scope="module")
def model(tokenizer) -> GPT:
    return tiny_gpt(tokenizer)


def greedy(model: GPT, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), n, temperature=0)
    return out[0, len(prompt):].tolist()


async def collect(engine: LLMEngine, prompt, n, **kwargs) -> tuple[list[int], str, str]:
    ids, text, reason = [], [], None
    async for token in engine.submit(prompt, n, **kwargs):
        ids.append(token.id)
        text.append(token.text)
        reason = token.finish_reason
    return ids, "".join(text), reason


# ------------------------------------------------------------------------------ engine


@pytest.mark.parametrize("mode", ["continuous", "static"])
def test_concurrent_greedy_equals_generate_alone(model, mode):
    """Different prompt and reply lengths, so few blocks that running sequences are
    preempted (and recomputed later): every reply is still the one generate() gives."""
    g = torch.Generator().manual_seed(1)
    cases = [(torch.randint(0, model.config.vocab_size, (p,), generator=g).tolist(), n)
             for p, n in [(3, 20), (17, 5), (1, 30), (9, 12), (30, 25), (5, 1), (12, 40)]]
    engine = LLMEngine(model, num_blocks=10, block_size=8, max_batch=4, mode=mode)

    async def run():
        return await asyncio.gather(*(collect(engine, p, n) for p, n in cases))

    with engine:
        results = asyncio.run(run())
        stats = engine.stats()
    assert stats.pop("preemptions") > 0  # 10 blocks of 8 cannot hold 4 of these replies
    assert stats == {"running": 0, "decoding": 0, "tokens": 0, "waiting": 0,
                     "blocks_used": 0, "blocks_free": 10}
    for (prompt, n), (ids, _, reason) in zip(cases, results, strict=True):
        assert ids == greedy(model, prompt, n)
        assert reason == "length"


def test_prefix_caching_gives_the_same_tokens_and_skips_the_shared_prompt(model):
    g = torch.Generator().manual_seed(2)
    system = torch.randint(0, model.config.vocab_size, (21,), generator=g).tolist()
    cases = [(system + torch.randint(0, model.config.vocab_size, (q,), generator=g).tolist(),
              n) for q, n in [(2, 9), (5, 4), (1, 12), (7, 6), (3, 8), (4, 3)]]
    engine = LLMEngine(model, num_blocks=24, block_size=4, max_batch=3, prefix_caching=True)

    async def run():
        first = await collect(engine, *cases[0])  # its prompt's blocks are now remembered
        return [first] + await asyncio.gather(*(collect(engine, p, n) for p, n in cases[1:]))

    with engine:
        results = asyncio.run(run())
        assert engine.stats()["running"] == 0 and engine.stats()["blocks_free"] == 24
    for (prompt, n), (ids, _, _) in zip(cases, results, strict=True):
        assert ids == greedy(model, prompt, n)
    # 5 later prompts found the system prompt's 5 whole blocks (20 of its 21 tokens).
    assert engine.cache.prefix_hits == 5 * 20


def test_static_batch_holds_its_rows_until_the_longest_reply_ends(model):
    seen = []
    engine = LLMEngine(model, num_blocks=32, block_size=8, max_batch=4, mode="static",
                       static_window=1.0, on_step=lambda stats: seen.append(stats["running"]))

    async def run():
        return await asyncio.gather(*(collect(engine, [1, 2, 3], n) for n in (2, 5, 20, 3)))

    with engine:
        results = asyncio.run(run())
    assert [len(ids) for ids, _, _ in results] == [2, 5, 20, 3]
    # 19 decoding steps after the prefills: four rows (the padding included) through the
    # 18 steps before the last, and the last retires them all at once.
    assert seen[:18] == [4] * 18 and seen[18] == 0


def test_sampling_is_reproducible_with_a_seed(model):
    prompt = [5, 6, 7]

    async def run():
        kwargs = {"temperature": 1.5, "top_p": 0.9}
        return await asyncio.gather(collect(engine, prompt, 20, seed=3, **kwargs),
                                    collect(engine, prompt, 20, seed=3, **kwargs),
                                    collect(engine, prompt, 20, seed=4, **kwargs))

    with LLMEngine(model, num_blocks=16, block_size=8) as engine:
        a, b, c = asyncio.run(run())
    assert a[0] == b[0] and a[0] != c[0]


def test_leaving_early_frees_the_blocks(model):
    async def run():
        got = 0
        async for _ in engine.submit([1, 2, 3], 60):
            got += 1
            if got == 3:
                break
        for _ in range(200):
            if engine.stats()["blocks_used"] == 0:
                break
            await asyncio.sleep(0.01)
        return got

    with LLMEngine(model, num_blocks=16, block_size=8) as engine:
        assert asyncio.run(run()) == 3
        assert engine.stats()["blocks_used"] == 0 and engine.stats()["running"] == 0
        assert engine.steps < 60


def test_engine_rejects_requests_it_can_never_serve(model):
    with LLMEngine(model, num_blocks=2, block_size=8) as engine:
        with pytest.raises(ValueError, match="more than the context length 64"):
            engine.check_request(60, 10)
        with pytest.raises(ValueError, match="more than the whole pool of 2"):
            engine.check_request(10, 10)
    with pytest.raises(ValueError, match="mode must be one of"):
        LLMEngine(model, num_blocks=2, mode="dynamic")


def test_text_decoder_holds_back_half_characters_and_stop_strings(tokenizer):
    ids = tokenizer.encode("héllo 中文 world")
    decoder = TextDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.finish()]
    assert "".join(pieces) == "héllo 中文 world" and "\ufffd" not in "".join(pieces)
    decoder = TextDecoder(tokenizer, stop=["wor"])
    out = ""
    for i in tokenizer.encode("hello world again"):
        out += decoder.push(i)
        if decoder.stopped:
            break
    assert decoder.stopped and out == "hello "


# ------------------------------------------------------------------------------ the server


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer):
    """A server with a GPT (context 256, slow enough to disconnect from) and the digits."""
    root = tmp_path_factory.mktemp("llm-store")
    store = ModelStore(root)
    model = tiny_gpt(tokenizer, context=256)
    store.publish("tiny-gpt", model.state_dict(), gpt_config(model.config),
                  aliases=["production"],
                  extra_files={TOKENIZER_FILE: json.dumps(tokenizer.merges)})
    digits, metrics = train_digits_classifier(train=False)
    store.publish("digits", digits.state_dict(), digits_config(), metrics=metrics,
                  aliases=["production"])
    with start_server(root, threads=1, extra_args=["--llm-max-tokens", "240"]) as server:
        yield server, model, tokenizer


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    found = re.search(rf'^{re.escape(name)}{{model="tiny-gpt"}} (\S+)$', text, re.M)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def test_openai_client_non_streaming_and_streaming(served):
    server, model, tokenizer = served
    api = client(server)
    assert [m.id for m in api.models.list().data] == ["tiny-gpt"]
    prompt = "def read_config(path):\n"
    ids = tokenizer.encode(prompt)
    reply = api.completions.create(model="tiny-gpt", prompt=prompt, max_tokens=24,
                                   temperature=0)
    expected = greedy(model, ids, 24)
    choice = reply.choices[0]
    assert reply.object == "text_completion" and choice.finish_reason == "length"
    assert choice.text == tokenizer.decode(expected)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens,
            reply.usage.total_tokens) == (len(ids), 24, len(ids) + 24)
    chunks = list(api.completions.create(model="tiny-gpt", prompt=prompt, max_tokens=24,
                                         temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == "length"
    # Token ids as the prompt, and a stop string: the text ends just before it.
    by_ids = api.completions.create(model="tiny-gpt", prompt=ids, max_tokens=24, temperature=0)
    assert by_ids.choices[0].text == choice.text
    stop = choice.text[5:8]
    if stop.strip() and "\ufffd" not in stop:
        stopped = api.completions.create(model="tiny-gpt", prompt=prompt, max_tokens=24,
                                         temperature=0, stop=stop)
        assert stopped.choices[0].finish_reason == "stop"
        assert stopped.choices[0].text == choice.text[:choice.text.find(stop)]
    # max_tokens beyond the server's cap is cut to it.
    capped = api.completions.create(model="tiny-gpt", prompt=ids[:3], max_tokens=10_000,
                                    temperature=0)
    assert capped.usage.completion_tokens == 240


def test_raw_sse_format(served):
    server, _, _ = served
    body = {"model": "tiny-gpt", "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-2] == "data: [DONE]" and events[-1] == ""
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(c["object"] == "text_completion" and c["model"] == "tiny-gpt" for c in chunks)
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4,
                                   "total_tokens": 7}


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "x" * 2000}, "prompt", "maximum context length is 256 tokens"),
    ({"temperature": 2.5}, "temperature", "'temperature' must be a number in [0, 2]"),
    ({"top_p": 0}, "top_p", "'top_p' must be a number in (0, 1]"),
    ({"max_tokens": 0}, "max_tokens", "'max_tokens' must be an integer >= 1"),
    ({"prompt": {"a": 1}}, "prompt", "'prompt' must be a string or an array of token ids"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "array of up to 4"),
])
def test_bad_parameters_get_openai_shaped_400(served, body, param, words):
    server, _, _ = served
    request = {"model": "tiny-gpt", "prompt": "hi", **body}
    response = httpx.post(server.url + "/v1/completions", json=request)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"]
    with pytest.raises(openai.BadRequestError):
        client(server).completions.create(**request)


def test_seed_and_top_p_over_http(served):
    server, model, tokenizer = served
    api = client(server)
    prompt = "import os\n"

    def sample(seed: int, top_p: float = 0.9) -> str:
        reply = api.completions.create(model="tiny-gpt", prompt=prompt, max_tokens=20,
                                       temperature=1.5, top_p=top_p, seed=seed)
        assert reply.choices[0].finish_reason == "length"
        return reply.choices[0].text

    first, again, other = sample(3), sample(3), sample(4)
    assert first == again  # the same seed, the same sampled text
    assert other != first  # another seed draws other tokens (near-uniform over 300)
    # A nucleus so small that it holds only the most likely token: greedy decoding.
    greedy_text = tokenizer.decode(greedy(model, tokenizer.encode(prompt), 20))
    assert sample(5, top_p=1e-9) == greedy_text != first


def test_max_tokens_is_capped_by_the_context_left(served):
    server, model, _ = served
    prompt = [7] * 250  # the context is 256 tokens: 6 are left for the reply
    reply = client(server).completions.create(model="tiny-gpt", prompt=prompt,
                                              max_tokens=100, temperature=0)
    assert reply.usage.completion_tokens == 6 and reply.choices[0].finish_reason == "length"
    assert reply.usage.total_tokens == 256


def test_unknown_model_is_404(served):
    server, _, _ = served
    with pytest.raises(openai.NotFoundError) as info:
        client(server).completions.create(model="gpt-9", prompt="hi")
    assert info.value.body["code"] == "model_not_found"
    assert "served models: ['tiny-gpt']" in info.value.body["message"]


def test_sixteen_concurrent_streams_all_complete(served):
    server, model, tokenizer = served

    async def one(api, i: int) -> str:
        stream = await api.completions.create(model="tiny-gpt", prompt=[i + 1, 7, 9],
                                              max_tokens=10 + 3 * i, temperature=0,
                                              stream=True)
        return "".join([chunk.choices[0].text async for chunk in stream])

    async def run():
        api = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        try:
            return await asyncio.gather(*(one(api, i) for i in range(16)),
                                        return_exceptions=True)
        finally:
            await api.close()

    results = asyncio.run(run())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    for i, text in enumerate(results):
        assert text == tokenizer.decode(greedy(model, [i + 1, 7, 9], 10 + 3 * i))


def test_disconnect_mid_stream_frees_the_blocks(served):
    server, _, _ = served
    before = metric(server, "aimodels_llm_generated_tokens_total")
    body = {"model": "tiny-gpt", "prompt": [1, 2, 3], "max_tokens": 240, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        # The reply holds blocks while it streams (the gauge follows after each step).
        deadline = time.monotonic() + 5
        while metric(server, "aimodels_llm_kv_blocks_used") == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert metric(server, "aimodels_llm_kv_blocks_used") > 0
        assert metric(server, "aimodels_llm_running_sequences") == 1
    deadline = time.monotonic() + 10
    while metric(server, "aimodels_llm_kv_blocks_used") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, "aimodels_llm_kv_blocks_used") == 0
    assert metric(server, "aimodels_llm_running_sequences") == 0
    assert metric(server, "aimodels_llm_kv_blocks_free") > 0
    time.sleep(0.3)
    assert metric(server, "aimodels_llm_generated_tokens_total") - before < 240


def test_metrics_and_the_v2_routes_still_work(served):
    server, _, _ = served
    client(server).completions.create(model="tiny-gpt", prompt="x", max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    for name in ("aimodels_llm_time_to_first_token_seconds_bucket",
                 "aimodels_llm_inter_token_latency_seconds_count",
                 "aimodels_llm_generated_tokens_total", "aimodels_llm_waiting_sequences",
                 "aimodels_llm_preemptions_total"):
        assert f'{name}{{' in text, name
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                        "data": [0.0] * 64}]}
    response = httpx.post(server.url + "/v2/models/digits/infer", json=body)
    assert response.status_code == 200 and response.json()["model_name"] == "digits"
    assert httpx.get(server.url + "/v2/models/tiny-gpt").status_code == 404


def test_a_small_served_pool_preempts_and_replies_are_unchanged(tmp_path, tokenizer, model):
    """Four blocks of 16 tokens for four replies of up to 58 tokens: the server preempts,
    counts it on /metrics, and every reply is still the greedy reply of its prompt alone."""
    store = ModelStore(tmp_path)
    store.publish("tiny-gpt", model.state_dict(), gpt_config(model.config),
                  aliases=["production"],
                  extra_files={TOKENIZER_FILE: json.dumps(tokenizer.merges)})
    prompts = [[i + 1, 5, 9, 2, 7, 3, 8, 4] for i in range(4)]

    async def run(url: str) -> list[str]:
        api = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        try:
            replies = await asyncio.gather(*(
                api.completions.create(model="tiny-gpt", prompt=p, max_tokens=50,
                                       temperature=0) for p in prompts))
        finally:
            await api.close()
        return [r.choices[0].text for r in replies]

    args = ["--llm-num-blocks", "4", "--llm-max-batch", "4"]
    with start_server(tmp_path, threads=1, extra_args=args) as server:
        texts = asyncio.run(run(server.url))
        assert metric(server, "aimodels_llm_preemptions_total") > 0
        assert metric(server, "aimodels_llm_kv_blocks_used") == 0
    assert texts == [tokenizer.decode(greedy(model, p, 50)) for p in prompts]


def test_tokenizer_round_trips_through_the_stored_file(tokenizer):
    restored = load_tokenizer(json.dumps(tokenizer.merges))
    assert restored.encode(TEXT) == tokenizer.encode(TEXT)
