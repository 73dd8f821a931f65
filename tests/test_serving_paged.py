"""Paged KV cache (Chapter 13): the allocator, block tables across block boundaries,
attention through block tables, running out of blocks, memory accounting, and greedy
generation with sequences joining and leaving the batch (continuous batching) that gives
exactly the tokens of ``GPT.generate`` run on each prompt alone."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from aimodels.gpt import GPT, GPTConfig
from aimodels.serving.paged import (
    BlockAllocator,
    OutOfBlocksError,
    PagedKVCache,
    Request,
    decode_step,
    generate_continuous,
    paged_attention,
    prefill,
)

L, H, D = 2, 3, 4  # layers, heads, head size of the small caches below


def kv(t: int, seed: int, layers: int = L) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(layers, H, t, D, generator=g, dtype=torch.float64),
            torch.randn(layers, H, t, D, generator=g, dtype=torch.float64))


def cache_of(block_size: int, num_blocks: int) -> PagedKVCache:
    return PagedKVCache(L, H, D, block_size=block_size, num_blocks=num_blocks,
                        dtype=torch.float64)


# --------------------------------------------------------------------------- allocator
def test_allocator_hands_out_distinct_blocks_and_takes_them_back():
    alloc = BlockAllocator(4)
    assert (alloc.num_free, alloc.num_used) == (4, 0)
    blocks = [alloc.allocate() for _ in range(4)]
    assert sorted(blocks) == [0, 1, 2, 3]
    assert (alloc.num_free, alloc.num_used) == (0, 4)
    with pytest.raises(OutOfBlocksError, match="only 0 of 4"):
        alloc.allocate()
    alloc.free(blocks[2])
    assert alloc.allocate() == blocks[2]  # a freed block is reused
    for b in blocks:
        alloc.free(b)
    assert (alloc.num_free, alloc.num_used) == (4, 0)


def test_allocator_rejects_double_free_and_foreign_blocks():
    alloc = BlockAllocator(3)
    b = alloc.allocate()
    alloc.free(b)
    with pytest.raises(ValueError, match="double free"):
        alloc.free(b)
    for foreign in (3, -1, 1.0, True):
        with pytest.raises(ValueError, match="not a block of this pool"):
            alloc.free(foreign)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockAllocator(0)


def test_allocate_many_is_all_or_nothing():
    alloc = BlockAllocator(5)
    alloc.allocate_many(3)
    with pytest.raises(OutOfBlocksError, match="asked for 3"):
        alloc.allocate_many(3)
    assert alloc.num_free == 2
    assert alloc.allocate_many(0) == []


# --------------------------------------------------------------------------- block tables
@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_written_tokens_come_back_across_block_boundaries(block_size):
    cache = cache_of(block_size, num_blocks=64)
    chunks = {"a": [5, 1, 1, 7], "b": [2, 9], "c": [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]}
    written = {s: ([], []) for s in chunks}
    for s in chunks:
        cache.add_sequence(s)
    # Interleave the sequences' appends so their blocks are mixed in the pool.
    for step in range(max(len(c) for c in chunks.values())):
        for s, sizes in chunks.items():
            if step < len(sizes):
                k, v = kv(sizes[step], seed=hash((s, step)) % 1000)
                assert cache.append(s, k, v) == sum(sizes[:step])
                written[s][0].append(k)
                written[s][1].append(v)
    used = []
    for s, sizes in chunks.items():
        n = sum(sizes)
        assert cache.length(s) == n
        table = cache.block_table(s)
        assert len(table) == -(-n // block_size)  # ceil: blocks only as tokens need them
        used += table
        k_all, v_all = torch.cat(written[s][0], dim=2), torch.cat(written[s][1], dim=2)
        for layer in range(L):
            k, v = cache.gather(s, layer)
            assert k.shape == (H, n, D)
            torch.testing.assert_close(k, k_all[layer], rtol=0, atol=0)
            torch.testing.assert_close(v, v_all[layer], rtol=0, atol=0)
    assert len(used) == len(set(used)) == cache.allocator.num_used  # no block is shared


def test_slot_mapping_follows_the_block_table():
    cache = cache_of(block_size=4, num_blocks=8)
    cache.add_sequence("x")
    cache.add_sequence("y")
    cache.reserve("x", 2)  # x gets block 0
    cache.reserve("y", 5)  # y gets blocks 1, 2
    cache.reserve("x", 4)  # x crosses into a new block: 3
    assert cache.block_table("x") == [0, 3]
    assert cache.block_table("y") == [1, 2]
    assert cache.slot_mapping("x", 0, 6).tolist() == [0, 1, 2, 3, 12, 13]
    assert cache.slot_mapping("y", 3, 2).tolist() == [7, 8]
    with pytest.raises(ValueError, match="reserve them first"):
        cache.slot_mapping("x", 4, 3)


def test_reserve_then_per_layer_write_allocates_once_per_step():
    cache = cache_of(block_size=2, num_blocks=8)
    cache.add_sequence(0)
    k, v = kv(3, seed=0)
    start = cache.reserve(0, 3)
    assert cache.allocator.num_used == 2
    for layer in range(L):
        cache.write(layer, 0, k[layer], v[layer], start)
    assert cache.allocator.num_used == 2  # writing all layers allocated nothing more
    torch.testing.assert_close(cache.gather(0, 1)[1], v[1])
    assert cache.blocks_needed(0, 1) == 0  # the second block has a free slot
    assert cache.blocks_needed(0, 2) == 1


def test_cache_errors_say_what_was_expected():
    cache = cache_of(block_size=4, num_blocks=4)
    with pytest.raises(KeyError, match="add_sequence"):
        cache.reserve("nope", 1)
    cache.add_sequence("s")
    with pytest.raises(ValueError, match="already"):
        cache.add_sequence("s")
    start = cache.reserve("s", 2)
    with pytest.raises(ValueError, match=r"\[n_heads, t, head_dim\]"):
        cache.write(0, "s", torch.zeros(H + 1, 2, D), torch.zeros(H + 1, 2, D), start)
    with pytest.raises(ValueError, match="layer"):
        cache.write(L, "s", torch.zeros(H, 2, D), torch.zeros(H, 2, D), start)


# --------------------------------------------------------------------------- attention
@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_paged_attention_equals_sdpa_on_each_sequence(block_size):
    cache = cache_of(block_size, num_blocks=40)
    lengths = {"s0": 1, "s1": 7, "s2": 20, "s3": 3}
    for i, (s, n) in enumerate(lengths.items()):
        cache.add_sequence(s)
        for j in range(n):  # token by token, interleaved with the others' blocks
            cache.append(s, *kv(1, seed=100 * i + j))
    seq_ids = ["s2", "s0", "s3", "s1"]
    q = torch.randn(len(seq_ids), H, 1, D, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    for layer in range(L):
        out = paged_attention(q, cache, layer, seq_ids)
        assert out.shape == q.shape
        for b, s in enumerate(seq_ids):
            k, v = cache.gather(s, layer)
            expected = F.scaled_dot_product_attention(q[b:b + 1], k[None], v[None])
            torch.testing.assert_close(out[b:b + 1], expected)
    with pytest.raises(ValueError, match=r"\[B, n_heads, 1, head_dim\]"):
        paged_attention(q[:2], cache, 0, seq_ids)


# --------------------------------------------------------------------------- out of blocks
def test_out_of_blocks_leaves_everything_intact_and_recovers_after_a_free():
    cache = cache_of(block_size=4, num_blocks=5)
    cache.add_sequence("a")
    ka, va = kv(9, seed=1)  # 3 blocks
    cache.append("a", ka, va)
    cache.add_sequence("b")
    kb, vb = kv(6, seed=2)  # 2 blocks: the pool is now full
    cache.append("b", kb, vb)
    assert cache.allocator.num_free == 0
    cache.add_sequence("c")
    assert not cache.can_append("c", 1)
    assert cache.can_append("b", 2)  # b's last block still has room for 2 tokens
    with pytest.raises(OutOfBlocksError, match="needs 1 more block"):
        cache.append("c", *kv(1, seed=3))
    with pytest.raises(OutOfBlocksError):
        cache.reserve("b", 3)  # 2 fit in b's last block, the third would need a new one
    assert cache.length("c") == 0 and cache.block_table("c") == []
    assert cache.length("b") == 6 and len(cache.block_table("b")) == 2
    for layer in range(L):  # nothing was overwritten
        torch.testing.assert_close(cache.gather("a", layer), (ka[layer], va[layer]))
        torch.testing.assert_close(cache.gather("b", layer), (kb[layer], vb[layer]))
    assert cache.free_sequence("a") == 3
    kc, vc = kv(1, seed=3)
    cache.append("c", kc, vc)
    torch.testing.assert_close(cache.gather("c", 1), (kc[1], vc[1]))
    torch.testing.assert_close(cache.gather("b", 1), (kb[1], vb[1]))


def test_free_sequence_returns_every_block():
    cache = cache_of(block_size=3, num_blocks=20)
    start = cache.allocator.num_free
    for s, n in enumerate([1, 3, 4, 10, 7]):
        cache.add_sequence(s)
        cache.append(s, *kv(n, seed=s))
    assert cache.allocator.num_free == start - (1 + 1 + 2 + 4 + 3)
    for s in range(5):
        cache.free_sequence(s)
    assert cache.allocator.num_free == start and cache.seq_ids == []
    assert cache.bytes_reserved == 0 and cache.bytes_used == 0
    with pytest.raises(KeyError):
        cache.free_sequence(0)


# --------------------------------------------------------------------------- memory
def test_paged_memory_wastes_less_than_a_block_per_sequence():
    max_len, block_size = 512, 16
    cache = PagedKVCache(4, 8, 16, block_size=block_size, num_blocks=256)
    lengths = [5, 17, 64, 100, 3, 250, 33, 16, 1, 77]
    for s, n in enumerate(lengths):
        cache.add_sequence(s)
        cache.reserve(s, n)
    per_token = cache.bytes_per_token
    assert per_token == 2 * 4 * 8 * 16 * 4  # keys and values, 4 layers, 8 heads, fp32
    assert cache.bytes_used == sum(lengths) * per_token
    assert cache.bytes_used <= cache.bytes_reserved
    assert cache.bytes_reserved <= cache.bytes_used + len(lengths) * (block_size - 1) * per_token
    contiguous = cache.contiguous_bytes(max_len)
    assert contiguous == len(lengths) * max_len * per_token
    assert cache.bytes_reserved < contiguous / 5
    assert cache.pool_bytes == cache.keys.nbytes + cache.values.nbytes
    with pytest.raises(ValueError, match="longest"):
        cache.contiguous_bytes(100)


# --------------------------------------------------------------------------- the model
@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, context_length=64, d_model=32, n_heads=4, n_layers=2)
    return GPT(config).double().eval()


PROMPTS = [[3, 14, 15, 9, 2, 6, 5], [1], [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 42],
           [10, 20, 30], [49, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12]]


def reference(model: GPT, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    out, logits = model.generate(torch.tensor([prompt]), n, temperature=0, return_logits=True)
    return out[0, len(prompt):].tolist(), logits[0]


def test_prefill_logits_match_the_model(model):
    cache = PagedKVCache.for_model(model.config, num_blocks=16, block_size=3,
                                   dtype=torch.float64)
    prompt = PROMPTS[0]
    logits = prefill(model, cache, "p", prompt)
    torch.testing.assert_close(logits, model(torch.tensor([prompt]))[0, -1])
    # A second chunk continues the same sequence (chunked prefill).
    more = [4, 4, 8]
    logits = prefill(model, cache, "p", more)
    torch.testing.assert_close(logits, model(torch.tensor([prompt + more]))[0, -1])


def test_interleaved_decoding_equals_generate_alone(model):
    """Sequences join and leave the batch at different steps; every token and every
    logit is what GPT.generate gives for that prompt alone."""
    n_new = [6, 9, 4, 8, 5]
    joins = [0, 0, 2, 3, 5]  # the step at which each prompt is prefilled
    cache = PagedKVCache.for_model(model.config, num_blocks=40, block_size=4,
                                   dtype=torch.float64)
    tokens: dict[int, list[int]] = {}
    logits: dict[int, list[torch.Tensor]] = {}
    step = 0
    sizes = []
    while len(tokens) < len(PROMPTS) or cache.seq_ids:
        for i, join in enumerate(joins):
            if join == step:
                first = prefill(model, cache, i, PROMPTS[i])
                tokens[i], logits[i] = [int(first.argmax())], [first]
        batch = [i for i in cache.seq_ids if len(tokens[i]) < n_new[i]]
        sizes.append(len(batch))
        if batch:
            out = decode_step(model, cache, batch, [tokens[i][-1] for i in batch])
            for i, row in zip(batch, out, strict=True):
                tokens[i].append(int(row.argmax()))
                logits[i].append(row)
        for i in cache.seq_ids:
            if len(tokens[i]) == n_new[i]:
                cache.free_sequence(i)
        step += 1
    assert max(sizes) >= 3 and len(set(sizes)) > 2  # the batch really changed over time
    assert cache.allocator.num_free == cache.num_blocks
    for i, prompt in enumerate(PROMPTS):
        expected_tokens, expected_logits = reference(model, prompt, n_new[i])
        assert tokens[i] == expected_tokens
        torch.testing.assert_close(torch.stack(logits[i]), expected_logits)


def test_generate_continuous_matches_generate_under_memory_pressure(model):
    requests = [Request(p, max_new_tokens=n, arrival_step=a)
                for p, n, a in zip(PROMPTS, [6, 9, 4, 8, 5], [0, 1, 1, 4, 4], strict=True)]
    requests.append(Request([2, 4, 6], max_new_tokens=1, arrival_step=2))  # prefill only
    # 8 blocks of 4 tokens: not enough for all requests at once, so some must wait.
    cache = PagedKVCache.for_model(model.config, num_blocks=8, block_size=4,
                                   dtype=torch.float64)
    trace = generate_continuous(model, cache, requests, max_batch=3)
    assert max(len(batch) for batch in trace) <= 3
    assert sum(r.preempted for r in requests) > 0  # the pool was too small for everyone
    for r in requests:
        assert r.output == reference(model, list(r.prompt), r.max_new_tokens)[0]
    assert cache.allocator.num_free == cache.num_blocks


def test_decode_step_checks_before_changing_anything(model):
    cache = PagedKVCache.for_model(model.config, num_blocks=2, block_size=4,
                                   dtype=torch.float64)
    prefill(model, cache, "a", [1, 2, 3, 4])
    prefill(model, cache, "b", [5, 6, 7, 8])
    with pytest.raises(OutOfBlocksError, match="needs 2 new block"):
        decode_step(model, cache, ["a", "b"], [1, 1])
    assert cache.length("a") == cache.length("b") == 4
    with pytest.raises(ValueError, match="one last token per sequence"):
        decode_step(model, cache, ["a", "b"], [1])
    with pytest.raises(OutOfBlocksError):
        prefill(model, cache, "c", [1])
    assert "c" not in cache
    wrong = PagedKVCache(3, 4, 8, num_blocks=2)
    with pytest.raises(ValueError, match="for_model"):
        prefill(model, wrong, "a", [1])


# --------------------------------------------------------------------------- padding rows
def test_padding_rows_cost_a_row_and_change_nothing(model):
    """A static batch keeps a finished sequence as a padding row: the other rows' logits
    are unchanged, the finished sequence's length is unchanged, and so is its cache."""
    cache = PagedKVCache.for_model(model.config, num_blocks=30, block_size=4,
                                   dtype=torch.float64)
    for i in range(3):
        prefill(model, cache, i, PROMPTS[i])
    before = [cache.gather(2, layer) for layer in range(model.config.n_layers)]
    length = cache.length(2)
    plain = decode_step(model, cache, [0, 1], [4, 5])
    for s in (0, 1):  # undo the step, then take it again with a padding row
        cache._lengths[s] -= 1
    padded = decode_step(model, cache, [0, 1], [4, 5], padding={2: PROMPTS[2][-1]})
    torch.testing.assert_close(padded, plain)
    assert padded.shape == (2, model.config.vocab_size) and cache.length(2) == length
    for layer, (k, v) in enumerate(before):
        torch.testing.assert_close(cache.gather(2, layer), (k, v))
    with pytest.raises(ValueError, match="padding rows must be other sequences"):
        decode_step(model, cache, [0, 1], [4, 5], padding={1: 3})


# --------------------------------------------------------------------------- prefix caching
def test_allocator_counts_owners():
    alloc = BlockAllocator(3)
    b = alloc.allocate()
    alloc.share(b)
    assert alloc.owners(b) == 2 and alloc.num_free == 2
    assert alloc.free(b) is False and alloc.num_free == 2
    assert alloc.free(b) is True and alloc.num_free == 3 and alloc.owners(b) == 0
    with pytest.raises(ValueError, match="not allocated"):
        alloc.share(b)


def test_prefix_cache_shares_whole_blocks_and_gives_the_same_logits(model):
    system = [3, 14, 15, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6]  # 19 tokens
    questions = [[26, 43], [38, 32, 7, 9, 5], [1]]
    cache = PagedKVCache.for_model(model.config, num_blocks=40, block_size=4,
                                   dtype=torch.float64, prefix_caching=True)
    cached = []
    for i, q in enumerate(questions):
        prompt = system + q
        cached.append(cache.add_sequence(i, prompt))
        logits = prefill(model, cache, i, prompt[cached[-1]:])
        cache.remember_prefix(i, prompt)
        torch.testing.assert_close(logits, model(torch.tensor([prompt]))[0, -1])
    assert cached == [0, 16, 16]  # 4 whole blocks of the 19-token system prompt
    assert cache.block_table(1)[:4] == cache.block_table(0)[:4] == cache.block_table(2)[:4]
    assert cache.prefix_hits == 32 and cache.prefix_queries == 3 * 19 + 8
    # The same prompt again: everything but its last token comes from the cache... in
    # whole blocks: 21 tokens -> 5 blocks = 20 tokens, the last one is computed.
    assert cache.add_sequence("again", system + questions[0]) == 20
    cache.free_sequence("again")
    # A prompt of exactly 4 blocks that is all cached still computes its last block.
    assert cache.add_sequence("exact", system[:16]) == 12
    cache.free_sequence("exact")
    # Decoding after a shared prefix writes new blocks only, never a shared one.
    shared = set(cache.block_table(0)[:4])
    out = decode_step(model, cache, [0, 1], [5, 6])
    assert not shared & {cache.block_table(s)[-1] for s in (0, 1)}
    for i, token in ((0, 5), (1, 6)):
        prompt = system + questions[i] + [token]
        torch.testing.assert_close(out[i], model(torch.tensor([prompt]))[0, -1])
    for i in range(3):
        cache.free_sequence(i)
    # Nothing leaks: the index keeps its blocks, but they all count as free.
    assert cache.num_free_blocks == cache.num_blocks and cache.num_evictable > 0


def test_prefix_cache_evicts_least_recently_used_blocks_when_the_pool_runs_short(model):
    cache = PagedKVCache.for_model(model.config, num_blocks=6, block_size=4,
                                   dtype=torch.float64, prefix_caching=True)
    a, b = list(range(1, 13)), list(range(20, 32))  # 3 blocks each
    for name, prompt in (("a", a), ("b", b)):
        n = cache.add_sequence(name, prompt)
        prefill(model, cache, name, prompt[n:])
        cache.remember_prefix(name, prompt)
        cache.free_sequence(name)
    assert cache.allocator.num_free == 0 and cache.num_free_blocks == 6
    assert cache.add_sequence("b2", b + [1]) == 12  # b's blocks are now the most recent
    cache.free_sequence("b2")
    # A new 5-block sequence takes the 3 evictable blocks of a first, then 2 of b's.
    cache.add_sequence("c")
    cache.reserve("c", 20)
    assert cache.add_sequence("a2", a + [1]) == 0  # a was evicted
    assert cache.num_free_blocks == 1
    with pytest.raises(OutOfBlocksError):
        cache.reserve("a2", 8)
