r"""A paged key-value cache and continuous batching for a GPT (Chapter 13).

**Why a contiguous cache wastes memory.** Chapter 9's :class:`~aimodels.gpt.KVCache`
gives every sequence one contiguous slab of ``max_len`` token slots per layer, allocated
before the first token is generated. A server does not know how long a reply will be, so
``max_len`` must be the worst case (often the context length), and the slab is held for
the whole life of the request. Three kinds of waste follow:

* *reservation*: slots for tokens that will be generated later sit idle until then;
* *internal fragmentation*: slots for tokens that are never generated (the reply stopped
  early) are never used at all;
* *external fragmentation*: slabs of different sizes, freed in any order, leave holes in
  memory that are too small for the next large slab.

Kwon et al. (2023), "Efficient Memory Management for Large Language Model Serving with
PagedAttention" (the vLLM paper), measured that existing systems used only 20-38% of
their KV-cache memory for actual token states. Since the cache, not the arithmetic, caps
how many sequences fit in one batch, wasted cache is lost throughput.

**Blocks and block tables.** The fix is the one operating systems found for process
memory: *paging*. The cache is one pool of fixed-size *blocks* (pages), each holding the
keys and values of ``block_size`` tokens in every layer. A sequence owns a *block table*,
a list that maps its logical block ``i`` (tokens ``i*block_size`` to
``(i+1)*block_size - 1``) to whichever physical block the :class:`BlockAllocator` handed
out; the blocks need not be adjacent. Token ``p`` of a sequence lives at the physical
*slot* ``table[p // block_size] * block_size + p % block_size``, exactly as a virtual
address becomes a physical one through a page table. Consequences:

* a block is allocated only when a sequence's tokens reach it, so the waste per sequence
  is at most ``block_size - 1`` slots, in its last block;
* every block has the same size, so there is no external fragmentation: any free block
  serves any sequence;
* a finished sequence returns its blocks at once, and a new sequence can take them in the
  next step. That is what makes *continuous batching* (Yu et al., 2022, Orca) cheap:
  sequences join and leave the running batch at every decoding step.

Attention must then read each sequence's keys and values through its block table:
:func:`paged_attention` does so for a batch of sequences of different lengths. vLLM's
CUDA kernel reads the blocks in place; here we gather them into a padded tensor and mask
the padding, which computes the same numbers.

**Prefix caching.** Blocks can have several owners, so sequences whose prompts start
alike can share the blocks of their common prefix instead of computing them again: the
cache indexes every whole prompt block by its tokens and all the tokens before it, as
vLLM's automatic prefix caching does, and keeps blocks that no sequence uses any more
until the pool needs them (least recently used first). vLLM also has copy-on-write for
partly shared blocks and can swap blocks to CPU memory when the pool runs out; this
module shares whole blocks only (never written again) and preempts by recomputation.

=========================== ================================================================
name                        what it does
=========================== ================================================================
:class:`BlockAllocator`     hands out and takes back physical block numbers
:class:`PagedKVCache`       the block pool, block tables, prefix caching, memory accounting
:func:`paged_attention`     one decoding step of attention for sequences of different lengths
:func:`prefill`             run a prompt through a :class:`~aimodels.gpt.GPT` into the cache
:func:`decode_step`         one new token for every sequence of a batch, each at its position
:func:`generate_continuous` greedy decoding with requests joining and leaving the batch
=========================== ================================================================
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from aimodels.attention import scaled_dot_product_attention
from aimodels.scaling import kv_cache_bytes

__all__ = [
    "BlockAllocator",
    "OutOfBlocksError",
    "PagedKVCache",
    "Request",
    "decode_step",
    "generate_continuous",
    "paged_attention",
    "prefill",
]

Tensor = torch.Tensor
SeqId = Hashable


class OutOfBlocksError(RuntimeError):
    """Raised when the block pool has fewer free blocks than a request needs.

    It is an error rather than a ``None`` return so that a caller cannot forget to check:
    a scheduler catches it (or asks :meth:`PagedKVCache.can_append` first) and then waits,
    or preempts a sequence to free its blocks. Whatever raised it left the allocator and
    the cache exactly as they were.
    """


def _check_count(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {name}={value!r}")


# --------------------------------------------------------------------------- allocator
class BlockAllocator:
    """Hands out the physical block numbers ``0 .. num_blocks - 1`` and takes them back.

    :meth:`allocate` raises :class:`OutOfBlocksError` when no block is free (it never
    returns ``None``); :meth:`allocate_many` gets several blocks all at once or none.
    Freeing a block that is not currently allocated (a double free) or that does not
    belong to this pool raises ``ValueError``: both are bugs that would otherwise let two
    sequences write into the same block.

    A block can have several owners (prefix caching shares a block between sequences with
    the same first tokens): :meth:`share` adds an owner, :meth:`free` removes one, and
    the block goes back to the pool when its last owner has freed it.
    """

    def __init__(self, num_blocks: int) -> None:
        _check_count("num_blocks", num_blocks)
        self.num_blocks = num_blocks
        # A stack of free blocks, lowest number on top, so allocation order is predictable.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._refs: dict[int, int] = {}  # allocated block -> number of owners

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._refs)

    def owners(self, block: int) -> int:
        """How many owners ``block`` has (0 if it is free)."""
        return self._refs.get(block, 0)

    def allocate(self) -> int:
        """Return a free block number, now owned by the caller."""
        return self.allocate_many(1)[0]

    def allocate_many(self, n: int) -> list[int]:
        """Return ``n`` free block numbers, or raise :class:`OutOfBlocksError` and take none."""
        _check_count("n", n, minimum=0)
        if n > len(self._free):
            raise OutOfBlocksError(f"asked for {n} block(s) but only {len(self._free)} of "
                                   f"{self.num_blocks} are free")
        blocks = [self._free.pop() for _ in range(n)]
        self._refs.update(dict.fromkeys(blocks, 1))
        return blocks

    def _check_allocated(self, block: int) -> None:
        if not isinstance(block, int) or isinstance(block, bool) \
                or not 0 <= block < self.num_blocks:
            raise ValueError(f"block {block!r} is not a block of this pool; expected an int "
                             f"in [0, {self.num_blocks})")
        if block not in self._refs:
            raise ValueError(f"block {block} is not allocated (double free?)")

    def share(self, block: int) -> None:
        """Add an owner to an allocated block."""
        self._check_allocated(block)
        self._refs[block] += 1

    def free(self, block: int) -> bool:
        """Remove one owner of ``block``; return True if that was the last (block is free)."""
        self._check_allocated(block)
        self._refs[block] -= 1
        if self._refs[block]:
            return False
        del self._refs[block]
        self._free.append(block)
        return True

    def __repr__(self) -> str:
        return f"BlockAllocator(num_blocks={self.num_blocks}, free={self.num_free})"


# --------------------------------------------------------------------------- the cache
class PagedKVCache:
    r"""Keys and values of many sequences in one pool of fixed-size blocks.

    ``keys`` and ``values`` are each ``[n_layers, n_heads, num_blocks, block_size,
    head_dim]``. A block holds ``block_size`` consecutive tokens of one sequence in every
    layer, so one allocation serves all layers of a decoding step. Putting the token axis
    next to the block axis means a (block, offset) pair flattens to one *slot* number,
    ``block * block_size + offset``, and reading or writing a set of tokens is a single
    indexing operation on the ``[n_heads, num_blocks * block_size, head_dim]`` view of a
    layer. Heads come first so that what attention reads, each head's keys of a sequence,
    lies contiguous in memory once gathered.

    A decoding step for one sequence is :meth:`reserve` (extend its length by ``t``
    tokens, allocating any blocks that needs, once for all layers) followed by one
    :meth:`write` per layer at the returned start position; :meth:`gather` reads a
    sequence back as contiguous ``[n_heads, length, head_dim]`` tensors.
    :meth:`append` does reserve-and-write for all layers in one call.

    With ``prefix_caching=True`` the cache also remembers the full blocks of the prompts
    it has seen (:meth:`remember_prefix`), keyed by all the tokens up to the end of the
    block, and a new sequence starts with the blocks of its longest remembered prefix
    (:meth:`add_sequence` with ``tokens``), shared rather than computed again. A block
    only the index holds is *evictable*: it counts as free, and is taken back, least
    recently used first, when the pool runs short.
    """

    def __init__(self, n_layers: int, n_heads: int, head_dim: int, block_size: int = 16,
                 num_blocks: int = 256, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", prefix_caching: bool = False) -> None:
        for name, value in (("n_layers", n_layers), ("n_heads", n_heads),
                            ("head_dim", head_dim), ("block_size", block_size),
                            ("num_blocks", num_blocks)):
            _check_count(name, value)
        self.n_layers, self.n_heads, self.head_dim = n_layers, n_heads, head_dim
        self.block_size, self.num_blocks = block_size, num_blocks
        shape = (n_layers, n_heads, num_blocks, block_size, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        # Reused buffers for the keys and values a decoding step gathers: allocating
        # megabytes afresh every layer of every step costs more than the attention itself.
        self._workspace = [torch.empty(0, dtype=dtype, device=device) for _ in range(2)]
        self.allocator = BlockAllocator(num_blocks)
        self._tables: dict[SeqId, list[int]] = {}
        self._lengths: dict[SeqId, int] = {}
        self.prefix_caching = bool(prefix_caching)
        # Prefix index: the tokens 0 .. end of a block -> that physical block (it owns one
        # reference), least recently used first. Counters of prompt tokens found cached.
        self._prefix: OrderedDict[tuple[int, ...], int] = OrderedDict()
        self.prefix_hits = 0  # prompt tokens whose keys and values were reused
        self.prefix_queries = 0  # prompt tokens looked up

    @classmethod
    def for_model(cls, config, num_blocks: int, block_size: int = 16,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                  prefix_caching: bool = False) -> PagedKVCache:
        """A pool shaped for a :class:`~aimodels.gpt.GPTConfig`."""
        return cls(config.n_layers, config.n_heads, config.head_dim, block_size, num_blocks,
                   dtype, device, prefix_caching)

    # ------------------------------------------------------------------ sequences
    @property
    def seq_ids(self) -> list[SeqId]:
        return list(self._tables)

    def __contains__(self, seq_id: SeqId) -> bool:
        return seq_id in self._tables

    def _require(self, seq_id: SeqId) -> None:
        if seq_id not in self._tables:
            raise KeyError(f"unknown sequence {seq_id!r}; call add_sequence first "
                           f"(known: {self.seq_ids})")

    def add_sequence(self, seq_id: SeqId, tokens: Sequence[int] = ()) -> int:
        """Register a new sequence; return how many of its ``tokens`` are already cached.

        Without prefix caching (or without ``tokens``) the sequence starts empty and its
        blocks come later, as its tokens arrive. With it, the sequence starts with the
        blocks of the longest remembered prefix of ``tokens`` (whole blocks only, and
        never all of ``tokens``: the last one must be computed to give the logits), and
        its length is the number of tokens they hold: compute only the rest.
        """
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} is already in the cache")
        blocks = self._match_prefix(tokens) if self.prefix_caching else []
        for block in blocks:
            self.allocator.share(block)
        self._tables[seq_id] = blocks
        self._lengths[seq_id] = len(blocks) * self.block_size
        if self.prefix_caching and len(tokens):
            self.prefix_queries += len(tokens)
            self.prefix_hits += self._lengths[seq_id]
        return self._lengths[seq_id]

    # ------------------------------------------------------------------ prefix caching
    def _match_prefix(self, tokens: Sequence[int]) -> list[int]:
        tokens = tuple(int(t) for t in tokens)
        blocks = []
        for i in range((len(tokens) - 1) // self.block_size):  # leave >= 1 token to compute
            key = tokens[:(i + 1) * self.block_size]
            block = self._prefix.get(key)
            if block is None:
                break
            self._prefix.move_to_end(key)  # most recently used
            blocks.append(block)
        return blocks

    def remember_prefix(self, seq_id: SeqId, tokens: Sequence[int]) -> int:
        """Index the full blocks of ``tokens``, the sequence's first tokens, now computed.

        Call it once the keys and values of ``tokens`` are in the cache in every layer
        (after the prefill). Blocks already indexed are left alone. Returns how many
        blocks the index gained. A no-op without prefix caching.
        """
        self._require(seq_id)
        if not self.prefix_caching:
            return 0
        tokens = tuple(int(t) for t in tokens)
        if len(tokens) > self._lengths[seq_id]:
            raise ValueError(f"sequence {seq_id!r} holds {self._lengths[seq_id]} tokens, "
                             f"fewer than the {len(tokens)} to remember")
        added = 0
        table = self._tables[seq_id]
        for i in range(len(tokens) // self.block_size):
            key = tokens[:(i + 1) * self.block_size]
            if key not in self._prefix:
                self._prefix[key] = table[i]
                self.allocator.share(table[i])  # the index owns a reference
                added += 1
        return added

    def clear_prefixes(self) -> int:
        """Forget every remembered prefix (sequences keep their blocks); return how many."""
        n = len(self._prefix)
        while self._prefix:
            self.allocator.free(self._prefix.popitem()[1])
        return n

    @property
    def num_evictable(self) -> int:
        """Indexed blocks no sequence uses: free for the taking, kept while they last."""
        return sum(1 for b in self._prefix.values() if self.allocator.owners(b) == 1)

    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence can get now: the free ones plus the evictable ones."""
        return self.allocator.num_free + (self.num_evictable if self._prefix else 0)

    def _allocate(self, n: int) -> list[int]:
        """``n`` blocks from the free list, evicting least recently used prefixes if short."""
        if n > self.num_free_blocks:
            raise OutOfBlocksError(f"asked for {n} block(s) but only {self.num_free_blocks} "
                                   f"of {self.num_blocks} are free")
        for key in list(self._prefix):
            if self.allocator.num_free >= n:
                break
            if self.allocator.owners(self._prefix[key]) == 1:
                self.allocator.free(self._prefix.pop(key))
        return self.allocator.allocate_many(n)

    def free_sequence(self, seq_id: SeqId) -> int:
        """Forget a sequence and return its blocks to the pool; return how many."""
        self._require(seq_id)
        table = self._tables.pop(seq_id)
        del self._lengths[seq_id]
        for block in table:
            self.allocator.free(block)
        return len(table)

    def length(self, seq_id: SeqId) -> int:
        """Tokens stored (or reserved) for the sequence."""
        self._require(seq_id)
        return self._lengths[seq_id]

    def block_table(self, seq_id: SeqId) -> list[int]:
        """A copy of the sequence's block table: logical block i -> physical block."""
        self._require(seq_id)
        return list(self._tables[seq_id])

    def blocks_for(self, n_tokens: int) -> int:
        """Blocks a new sequence of ``n_tokens`` tokens occupies (its last one partly filled)."""
        _check_count("n_tokens", n_tokens, minimum=0)
        return math.ceil(n_tokens / self.block_size)

    def can_admit(self, n_tokens: int) -> bool:
        """Whether a new sequence of ``n_tokens`` tokens fits in the free blocks now."""
        return self.blocks_for(n_tokens) <= self.num_free_blocks

    def blocks_needed(self, seq_id: SeqId, n_tokens: int) -> int:
        """New blocks the sequence must get to grow by ``n_tokens`` tokens."""
        self._require(seq_id)
        _check_count("n_tokens", n_tokens, minimum=0)
        total = math.ceil((self._lengths[seq_id] + n_tokens) / self.block_size)
        return max(total - len(self._tables[seq_id]), 0)

    def can_append(self, seq_id: SeqId, n_tokens: int) -> bool:
        """Whether the pool has the free blocks to grow the sequence by ``n_tokens``."""
        return self.blocks_needed(seq_id, n_tokens) <= self.num_free_blocks

    def reserve(self, seq_id: SeqId, n_tokens: int) -> int:
        """Grow the sequence by ``n_tokens`` slots and return the position of the first.

        Blocks are allocated here, all or none: on :class:`OutOfBlocksError` the sequence
        and the pool are unchanged. Every layer then :meth:`write`\\ s its keys and values
        for these positions; until it has, they hold stale numbers.
        """
        needed = self.blocks_needed(seq_id, n_tokens)
        if needed > self.num_free_blocks:
            raise OutOfBlocksError(
                f"sequence {seq_id!r} needs {needed} more block(s) of {self.block_size} tokens "
                f"to grow by {n_tokens} token(s), but only {self.num_free_blocks} of "
                f"{self.num_blocks} are free; free a sequence or wait")
        self._tables[seq_id].extend(self._allocate(needed))
        start = self._lengths[seq_id]
        self._lengths[seq_id] = start + n_tokens
        return start

    def slot_mapping(self, seq_id: SeqId, start: int, n_tokens: int) -> Tensor:
        """Physical slots of positions ``start .. start + n_tokens - 1`` of a sequence.

        Position p is in logical block ``p // block_size`` at offset ``p % block_size``;
        the block table turns the logical block into a physical one.
        """
        self._require(seq_id)
        end = start + n_tokens
        if start < 0 or n_tokens < 0 or end > self._lengths[seq_id]:
            raise ValueError(f"positions {start}..{end - 1} are outside sequence {seq_id!r}, "
                             f"which has {self._lengths[seq_id]} reserved positions; "
                             f"reserve them first")
        positions = torch.arange(start, end)
        table = torch.tensor(self._tables[seq_id], dtype=torch.long)
        slots = table[positions // self.block_size] * self.block_size \
            + positions % self.block_size
        return slots.to(self.keys.device)

    def slot(self, seq_id: SeqId, position: int) -> int:
        """The physical slot of one reserved position (a plain int, for a decoding step)."""
        self._require(seq_id)
        if not 0 <= position < self._lengths[seq_id]:
            raise ValueError(f"position {position} is outside sequence {seq_id!r}, which has "
                             f"{self._lengths[seq_id]} reserved positions; reserve it first")
        block, offset = divmod(position, self.block_size)
        return self._tables[seq_id][block] * self.block_size + offset

    def _flat(self, layer: int) -> tuple[Tensor, Tensor]:
        """Layer ``layer``'s keys and values as ``[n_heads, num_blocks * block_size, head_dim]``."""
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise ValueError(f"layer must be an int in [0, {self.n_layers}), got {layer!r}")
        shape = (self.n_heads, self.num_blocks * self.block_size, self.head_dim)
        return self.keys[layer].view(shape), self.values[layer].view(shape)

    def gather_slots(self, layer: int, slots: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values at ``slots`` (any shape ``[...]``) as ``[n_heads, ..., head_dim]``.

        The result lives in a buffer that the next call overwrites: use it at once.
        """
        out = []
        for i, pool in enumerate(self._flat(layer)):
            n = self.n_heads * slots.numel() * self.head_dim
            if self._workspace[i].numel() < n:
                self._workspace[i] = torch.empty(n, dtype=pool.dtype, device=pool.device)
            buffer = self._workspace[i][:n].view(self.n_heads, slots.numel(), self.head_dim)
            torch.index_select(pool, 1, slots.reshape(-1), out=buffer)
            out.append(buffer.view(self.n_heads, *slots.shape, self.head_dim))
        return out[0], out[1]

    def write_slots(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """Store tokens ``k``, ``v`` ``[n_tokens, n_heads, head_dim]`` at physical ``slots``."""
        expected = (slots.shape[0], self.n_heads, self.head_dim)
        for name, x in (("k", k), ("v", v)):
            if tuple(x.shape) != expected:
                raise ValueError(f"expected {name} of shape [n_tokens, n_heads, head_dim] = "
                                 f"{list(expected)}, got {list(x.shape)}")
        keys, values = self._flat(layer)
        keys[:, slots] = k.transpose(0, 1).to(keys.dtype)
        values[:, slots] = v.transpose(0, 1).to(values.dtype)

    def write(self, layer: int, seq_id: SeqId, k: Tensor, v: Tensor, start: int) -> None:
        """Store ``k``, ``v`` ``[n_heads, t, head_dim]`` at positions ``start .. start+t-1``."""
        for name, x in (("k", k), ("v", v)):
            if x.ndim != 3 or tuple(x.shape) != (self.n_heads, k.shape[-2], self.head_dim):
                raise ValueError(f"expected {name} of shape [n_heads, t, head_dim] = "
                                 f"[{self.n_heads}, t, {self.head_dim}] with the same t for "
                                 f"k and v, got {list(x.shape)}")
        slots = self.slot_mapping(seq_id, start, k.shape[1])
        self.write_slots(layer, slots, k.transpose(0, 1), v.transpose(0, 1))

    def append(self, seq_id: SeqId, k: Tensor, v: Tensor) -> int:
        """Reserve ``t`` positions and write every layer: ``k``, ``v`` are
        ``[n_layers, n_heads, t, head_dim]``. Returns the first new position."""
        if k.ndim != 4 or k.shape[0] != self.n_layers or k.shape != v.shape:
            raise ValueError(f"expected k and v of shape [n_layers, n_heads, t, head_dim] with "
                             f"n_layers={self.n_layers}, got {list(k.shape)} and "
                             f"{list(v.shape)}")
        start = self.reserve(seq_id, k.shape[2])
        for layer in range(self.n_layers):
            self.write(layer, seq_id, k[layer], v[layer], start)
        return start

    def gather(self, seq_id: SeqId, layer: int) -> tuple[Tensor, Tensor]:
        """A sequence's keys and values in ``layer``, contiguous ``[n_heads, length, head_dim]``."""
        slots = self.slot_mapping(seq_id, 0, self.length(seq_id))
        keys, values = self._flat(layer)
        return keys[:, slots], values[:, slots]

    def padded_block_tables(self, seq_ids: Sequence[SeqId]) -> tuple[Tensor, Tensor]:
        """Block tables ``[B, max_blocks]`` (padded with block 0) and lengths ``[B]``."""
        for seq_id in seq_ids:
            self._require(seq_id)
        width = max((len(self._tables[s]) for s in seq_ids), default=0)
        tables = torch.zeros(len(seq_ids), width, dtype=torch.long)
        for row, seq_id in enumerate(seq_ids):
            table = self._tables[seq_id]
            tables[row, :len(table)] = torch.tensor(table, dtype=torch.long)
        lengths = torch.tensor([self._lengths[s] for s in seq_ids], dtype=torch.long)
        return tables.to(self.keys.device), lengths.to(self.keys.device)

    # ------------------------------------------------------------------ memory accounting
    @property
    def bytes_per_token(self) -> int:
        """Keys plus values of one token, all layers (:func:`~aimodels.scaling.kv_cache_bytes`)."""
        return kv_cache_bytes(self.n_layers, self.n_heads, self.head_dim, tokens=1,
                              bytes_per_element=self.keys.element_size())

    @property
    def block_bytes(self) -> int:
        return self.block_size * self.bytes_per_token

    @property
    def pool_bytes(self) -> int:
        """Bytes of the whole pool, allocated or not (``keys.nbytes + values.nbytes``)."""
        return self.keys.nbytes + self.values.nbytes

    @property
    def bytes_reserved(self) -> int:
        """Bytes in blocks that are allocated to some sequence."""
        return self.allocator.num_used * self.block_bytes

    @property
    def bytes_used(self) -> int:
        """Bytes that hold a token's keys and values."""
        return sum(self._lengths.values()) * self.bytes_per_token

    def contiguous_bytes(self, max_len: int) -> int:
        """What a contiguous cache would reserve for the same sequences: ``max_len`` slots each.

        That is :class:`~aimodels.gpt.KVCache`'s layout with one row per live sequence.
        """
        _check_count("max_len", max_len)
        longest = max(self._lengths.values(), default=0)
        if longest > max_len:
            raise ValueError(f"max_len={max_len} is shorter than the longest sequence in the "
                             f"cache ({longest} tokens)")
        return len(self._tables) * max_len * self.bytes_per_token

    def __repr__(self) -> str:
        return (f"PagedKVCache(n_layers={self.n_layers}, n_heads={self.n_heads}, "
                f"head_dim={self.head_dim}, block_size={self.block_size}, "
                f"num_blocks={self.num_blocks}, sequences={len(self._tables)}, "
                f"free_blocks={self.allocator.num_free})")


# --------------------------------------------------------------------------- attention
def paged_attention(q: Tensor, cache: PagedKVCache, layer: int,
                    seq_ids: Sequence[SeqId]) -> Tensor:
    r"""Attention of one new query per sequence over that sequence's cached keys and values.

    ``q`` is ``[B, n_heads, 1, head_dim]``; row b attends to the ``cache.length(seq_ids[b])``
    tokens of its own sequence in ``layer`` (the new token's key and value included, so
    write them first). The block tables are padded to the longest sequence, the blocks
    gathered into ``[B, n_heads, S, head_dim]``, and positions beyond each sequence's
    length masked out before the softmax. Returns ``[B, n_heads, 1, head_dim]``, the same
    as ``F.scaled_dot_product_attention`` on each sequence's contiguous keys and values.
    """
    expected = (len(seq_ids), cache.n_heads, 1, cache.head_dim)
    if q.ndim != 4 or tuple(q.shape) != expected:
        raise ValueError(f"expected q of shape [B, n_heads, 1, head_dim] = {list(expected)}, "
                         f"got {list(q.shape)}")
    tables, lengths = cache.padded_block_tables(seq_ids)
    if len(seq_ids) and int(lengths.min()) == 0:
        raise ValueError("every sequence needs at least one cached token to attend to")
    batch, width, bs = tables.shape[0], tables.shape[1], cache.block_size
    # Slot of every (sequence, logical position): the block table applied to each block.
    slots = (tables[:, :, None] * bs + torch.arange(bs, device=tables.device)).view(batch, -1)
    k, v = cache.gather_slots(layer, slots)  # each [h, B, S, d], S = width * bs
    valid = torch.arange(width * bs, device=tables.device) < lengths[:, None]  # [B, S]
    q = q.transpose(0, 1)  # [h, B, 1, d]: heads outside, like the gathered keys
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(cache.head_dim)  # [h, B, 1, S]
    scores = scores.masked_fill(~valid[None, :, None, :], float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).transpose(0, 1)  # [B, h, 1, d]


# --------------------------------------------------------------------------- the model
def _check_model(model, cache: PagedKVCache) -> None:
    config = model.config
    got = (cache.n_layers, cache.n_heads, cache.head_dim)
    want = (config.n_layers, config.n_heads, config.head_dim)
    if got != want:
        raise ValueError(f"the cache has (n_layers, n_heads, head_dim) = {got} but the model "
                         f"needs {want}; build it with PagedKVCache.for_model")


def _as_ids(ids, vocab_size: int) -> Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1 or ids.numel() == 0:
        raise ValueError(f"expected prompt ids of shape [length] (or [1, length]) with "
                         f"length >= 1, got shape {list(ids.shape)}")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size}), got ids from "
                         f"{int(ids.min())} to {int(ids.max())}")
    return ids


@torch.no_grad()
def prefill(model, cache: PagedKVCache, seq_id: SeqId, prompt_ids) -> Tensor:
    """Run ``prompt_ids`` through a :class:`~aimodels.gpt.GPT`, storing K/V in the cache.

    Adds ``seq_id`` to the cache if it is new; if it already holds tokens, the prompt
    continues it (chunked prefill). Returns the logits ``[vocab]`` of the last position,
    from which the first new token is chosen. The model's own modules do the work, used
    as in :meth:`GPT.forward` in eval mode (no dropout). If the pool cannot hold the
    prompt, :class:`OutOfBlocksError` is raised before anything is written.
    """
    _check_model(model, cache)
    config = model.config
    ids = _as_ids(prompt_ids, config.vocab_size).to(model.tok_emb.weight.device)
    added = seq_id not in cache
    if added:
        cache.add_sequence(seq_id)
    past = cache.length(seq_id)
    if past + len(ids) > config.context_length:
        if added:
            cache.free_sequence(seq_id)
        raise ValueError(f"{past} cached + {len(ids)} new tokens exceed the context length "
                         f"{config.context_length}")
    try:
        start = cache.reserve(seq_id, len(ids))
    except OutOfBlocksError:
        if added:
            cache.free_sequence(seq_id)
        raise
    new = len(ids)
    positions = torch.arange(start, start + new, device=ids.device)
    x = (model.tok_emb(ids) + model.pos_emb(positions))[None]  # [1, T, d_model]
    # Query i (position start + i) may see keys 0 .. start + i.
    mask = torch.ones(new, start + new, dtype=torch.bool, device=ids.device).tril(start)
    for layer, block in enumerate(model.blocks):
        h = block.ln_1(x)
        q, k, v = block.attn.project_heads(h, h, h)  # each [1, heads, T, head_dim]
        cache.write(layer, seq_id, k[0], v[0], start)
        keys, values = cache.gather(seq_id, layer)  # [heads, start + T, head_dim]
        heads = scaled_dot_product_attention(q, keys[None], values[None], attn_mask=mask)
        x = x + block.attn.merge_heads(heads)
        x = x + block.mlp(block.ln_2(x))
    return model.ln_f(x[0, -1]) @ model.tok_emb.weight.T


@torch.no_grad()
def decode_step(model, cache: PagedKVCache, seq_ids: Sequence[SeqId], last_tokens,
                padding: dict[SeqId, int] | None = None) -> Tensor:
    """One decoding step for a batch of sequences of any lengths: logits ``[B, vocab]``.

    ``last_tokens[b]`` is the newest token of ``seq_ids[b]``; it goes in at position
    ``cache.length(seq_ids[b])``, its keys and values are written through the sequence's
    block table (one slot per sequence, one write per layer for the whole batch), and it
    attends to its own sequence only (:func:`paged_attention`). Every sequence needs at
    most one new block; if the pool has fewer free blocks than the batch needs,
    :class:`OutOfBlocksError` is raised before anything changes.

    ``padding`` maps finished sequences that still hold a row of a fixed-shape batch
    (static batching) to the token at their last cached position. Each such row computes
    that position again, the same work as a real row: its keys and values are written
    over the slot they already occupy, the cache length does not change, and its logits
    are dropped. This is what a padded batch costs, without a second model.
    """
    _check_model(model, cache)
    config = model.config
    seq_ids = list(seq_ids)
    if len(set(seq_ids)) != len(seq_ids):
        raise ValueError(f"each sequence may appear once in a batch, got {seq_ids}")
    tokens = torch.as_tensor(last_tokens, dtype=torch.long).reshape(-1)
    if tokens.numel() != len(seq_ids) or not seq_ids:
        raise ValueError(f"expected one last token per sequence ({len(seq_ids)}), got "
                         f"{tokens.numel()}; the batch must not be empty")
    _as_ids(tokens, config.vocab_size)
    positions = [cache.length(s) for s in seq_ids]
    too_long = [s for s, p in zip(seq_ids, positions, strict=True) if p >= config.context_length]
    if too_long:
        raise ValueError(f"sequences {too_long} already fill the context length "
                         f"{config.context_length}")
    needed = sum(cache.blocks_needed(s, 1) for s in seq_ids)
    if needed > cache.num_free_blocks:
        raise OutOfBlocksError(f"this step needs {needed} new block(s) but only "
                               f"{cache.num_free_blocks} are free; free or preempt a "
                               f"sequence first")
    padding = dict(padding or {})
    pads = list(padding)
    if set(pads) & set(seq_ids) or any(cache.length(s) == 0 for s in pads):
        raise ValueError(f"padding rows must be other sequences with at least one cached "
                         f"token; got {pads} for a batch of {seq_ids}")
    if pads:
        _as_ids(list(padding.values()), config.vocab_size)
    positions += [cache.length(s) - 1 for s in pads]
    for s in seq_ids:
        cache.reserve(s, 1)
    rows = seq_ids + pads
    slots = torch.tensor([cache.slot(s, p) for s, p in zip(rows, positions, strict=True)],
                         dtype=torch.long, device=cache.keys.device)
    device = model.tok_emb.weight.device
    tokens = torch.cat([tokens, torch.tensor([padding[s] for s in pads], dtype=torch.long)])
    tokens = tokens.to(device)
    x = model.tok_emb(tokens) + model.pos_emb(torch.tensor(positions, device=device))
    x = x[:, None]  # [B, 1, d_model]: one token per sequence
    for layer, block in enumerate(model.blocks):
        h = block.ln_1(x)
        q, k, v = block.attn.project_heads(h, h, h)  # each [B, heads, 1, head_dim]
        cache.write_slots(layer, slots, k[:, :, 0], v[:, :, 0])
        x = x + block.attn.merge_heads(paged_attention(q, cache, layer, rows))
        x = x + block.mlp(block.ln_2(x))
    return model.ln_f(x[:len(seq_ids), 0]) @ model.tok_emb.weight.T


# --------------------------------------------------------------------------- a scheduler
@dataclass
class Request:
    """A generation request: a prompt, how many tokens to generate, when it arrives.

    :func:`generate_continuous` fills ``output`` (the generated tokens) and counts how
    often the request was ``preempted`` (its blocks taken back to let others go on).
    """

    prompt: Sequence[int] | Tensor
    max_new_tokens: int
    arrival_step: int = 0
    output: list[int] = field(default_factory=list)
    preempted: int = 0


def generate_continuous(model, cache: PagedKVCache, requests: Sequence[Request],
                        max_batch: int = 8) -> list[tuple[int, ...]]:
    """Greedy decoding of ``requests`` with continuous batching; fills each ``output``.

    Every step, in the manner of vLLM's scheduler (first come, first served):

    1. *admit* waiting requests that have arrived, oldest first, while the batch has
       room and the pool has free blocks for their prompt and one more token;
       :func:`prefill` gives each its first token;
    2. *preempt* if the running requests need more new blocks than are free: the most
       recently admitted one gives all its blocks back and waits again. When it is
       admitted again, its prompt and the tokens it had generated are prefilled anew
       (preemption by recomputation), so its output is unchanged;
    3. *decode* one token for every running request with :func:`decode_step`;
    4. *retire* finished requests and free their blocks, for the next step to reuse.

    Returns the trace: for each step, the indices of the requests in its decoding batch.
    Sequences in the cache are named by request index, so the cache must start empty.
    """
    _check_count("max_batch", max_batch)
    model.eval()
    for i, r in enumerate(requests):
        _check_count("max_new_tokens", r.max_new_tokens)
        total = len(r.prompt) + r.max_new_tokens
        if total > model.config.context_length:
            raise ValueError(f"request {i} needs {total} positions (prompt plus new tokens), "
                             f"more than the context length {model.config.context_length}")
        if cache.blocks_for(total) > cache.num_blocks:
            raise OutOfBlocksError(f"request {i} needs {total} token slots, more than the "
                                   f"whole pool of {cache.num_blocks} blocks of "
                                   f"{cache.block_size} holds")
    if cache.seq_ids:
        raise ValueError(f"the scheduler names sequences by request index, so it needs an "
                         f"empty cache; this one holds {cache.seq_ids}")
    for r in requests:
        r.output, r.preempted = [], 0

    def context(i: int) -> list[int]:  # what must be in the cache before request i decodes
        return [int(t) for t in requests[i].prompt] + requests[i].output

    waiting = sorted(range(len(requests)), key=lambda i: requests[i].arrival_step)
    running: list[int] = []
    trace: list[tuple[int, ...]] = []
    step = 0
    while waiting or running:
        while (waiting and len(running) < max_batch
               and requests[waiting[0]].arrival_step <= step
               and cache.can_admit(len(context(waiting[0])) + 1)):
            i = waiting.pop(0)
            logits = prefill(model, cache, i, context(i))
            requests[i].output.append(int(logits.argmax()))
            running.append(i)
        batch = [i for i in running if len(requests[i].output) < requests[i].max_new_tokens]
        while sum(cache.blocks_needed(i, 1) for i in batch) > cache.num_free_blocks:
            # The latest admitted of those still decoding: first come, first served.
            victim = next(i for i in reversed(running) if i in batch)
            running.remove(victim)
            cache.free_sequence(victim)
            requests[victim].preempted += 1
            waiting.insert(0, victim)
            batch = [i for i in batch if i != victim]
        if batch:
            last = [requests[i].output[-1] for i in batch]
            logits = decode_step(model, cache, batch, last)
            for i, row in zip(batch, logits, strict=True):
                requests[i].output.append(int(row.argmax()))
        trace.append(tuple(batch))
        for i in list(running):
            if len(requests[i].output) >= requests[i].max_new_tokens:
                cache.free_sequence(i)
                running.remove(i)
        step += 1
    return trace
