"""Attention from scratch (Chapter 7): scaled dot-product and multi-head attention.

:func:`scaled_dot_product_attention` follows PyTorch's
``torch.nn.functional.scaled_dot_product_attention`` (masks, causal flag, scale, fully
masked rows); :class:`MultiHeadAttention` has the
parameter names and the call of ``torch.nn.MultiheadAttention``. ``tests/test_attention.py``
compares both with PyTorch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

Tensor = torch.Tensor


def attention_bias(
    query_len: int,
    key_len: int,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> Tensor:
    """The additive bias that masks take the form of: 0 where attention is allowed, -inf where not.

    ``attn_mask`` is either boolean (True = may attend, as in ``F.scaled_dot_product_attention``)
    or a float bias that is added as it is. ``is_causal`` forbids attending to later
    positions: query i sees keys 0..i.
    """
    bias = torch.zeros(query_len, key_len, dtype=dtype, device=device)
    if is_causal:
        if attn_mask is not None:
            raise ValueError("pass either attn_mask or is_causal=True, not both")
        allowed = torch.ones(query_len, key_len, dtype=torch.bool, device=device).tril()
        bias = bias.masked_fill(~allowed, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            bias = bias.masked_fill(~attn_mask, float("-inf"))
        else:
            bias = bias + attn_mask.to(dtype)
    return bias


def safe_softmax(scores: Tensor, dim: int = -1) -> Tensor:
    """Softmax that returns zeros for a row whose entries are all -inf, instead of NaN."""
    weights = torch.softmax(scores, dim=dim)
    fully_masked = torch.isneginf(scores).all(dim=dim, keepdim=True)
    return weights.masked_fill(fully_masked, 0.0)


def attention_weights(
    q: Tensor,
    k: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    r"""The attention weights :math:`\operatorname{softmax}(QK^\top s + B)`, shape ``[..., L, S]``.

    The scale s defaults to :math:`1/\sqrt{d_k}`; ``B`` comes from ``attn_mask`` and
    ``is_causal`` (see :func:`attention_bias`) and broadcasts over leading dimensions.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    bias = attention_bias(q.shape[-2], k.shape[-2], attn_mask, is_causal, q.dtype, q.device)
    return safe_softmax(scores + bias)


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    r"""Attention :math:`\operatorname{softmax}\!\big(QK^\top / \sqrt{d_k} + B\big)\, V`.

    ``q`` is ``[..., L, d_k]``, ``k`` is ``[..., S, d_k]`` and ``v`` is ``[..., S, d_v]``;
    the result is ``[..., L, d_v]``. Same semantics as
    ``torch.nn.functional.scaled_dot_product_attention`` without dropout: a boolean
    ``attn_mask`` marks allowed pairs with True, a float one is added to the scores,
    and a query that may attend to nothing gets a zero output.
    """
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"expected q [..., L, d], k [..., S, d] and v [..., S, d_v], got {list(q.shape)}, "
            f"{list(k.shape)} and {list(v.shape)}"
        )
    return attention_weights(q, k, attn_mask, is_causal, scale) @ v


class MultiHeadAttention(nn.Module):
    r"""Multi-head attention with ``nn.MultiheadAttention``'s parameters and call.

    Queries, keys and values are projected by one stacked matrix ``in_proj_weight``
    (``[3E, E]``) and ``in_proj_bias``, split into ``num_heads`` heads of size
    :math:`E / h`, attended separately, concatenated and projected by ``out_proj``.
    State dicts load both ways with ``nn.MultiheadAttention(E, h, batch_first=True)``.

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    is_causal=False)`` uses PyTorch's conventions for this module: in ``key_padding_mask``
    (``[B, S]``) and a boolean ``attn_mask`` (``[L, S]``), True means *masked out*.
    It returns the output ``[B, L, E]`` and, if ``need_weights``, the attention
    weights averaged over heads, ``[B, L, S]``.
    """

    def __init__(self, embed_dim: int, num_heads: int, batch_first: bool = True) -> None:
        super().__init__()
        if not batch_first:
            raise ValueError("this implementation is batch-first only: pass batch_first=True")
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim must be divisible by num_heads, got {embed_dim} and {num_heads}"
            )
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.batch_first = batch_first
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _split_heads(self, x: Tensor) -> Tensor:  # [B, T, E] -> [B, h, T, E/h]
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def project_heads(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, ...]:
        """Project queries, keys and values with ``in_proj`` and split each into heads.

        Returns three tensors ``[B, h, T, E/h]``. For self-attention (the same tensor
        passed three times) one matrix product with the stacked ``[3E, E]`` weight does
        all three projections.
        """
        if query is key and key is value:
            stacked = stacked_projection(self, query)
            return tuple(self._split_heads(x) for x in stacked.chunk(3, dim=-1))
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        return (self._split_heads(query @ w_q.T + b_q), self._split_heads(key @ w_k.T + b_k),
                self._split_heads(value @ w_v.T + b_v))

    def merge_heads(self, heads: Tensor) -> Tensor:
        """Concatenate the heads ``[B, h, L, E/h]`` into ``[B, L, E]`` and apply ``out_proj``."""
        batch, _, length, _ = heads.shape
        return self.out_proj(heads.transpose(1, 2).reshape(batch, length, self.embed_dim))

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        for name, x in (("query", query), ("key", key), ("value", value)):
            if x.ndim != 3 or x.shape[-1] != self.embed_dim:
                expected = f"[batch, length, {self.embed_dim}]"
                raise ValueError(f"expected {name} of shape {expected}, got {list(x.shape)}")
        q, k, v = self.project_heads(query, key, value)

        # One additive bias [B, 1, L, S] from PyTorch's "True = masked out" conventions.
        length, source = query.shape[1], key.shape[1]
        bias = torch.zeros(query.shape[0], 1, length, source, dtype=q.dtype, device=q.device)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                bias = bias.masked_fill(attn_mask, float("-inf"))
            else:
                bias = bias + attn_mask.to(q.dtype)
        elif is_causal:
            bias = bias + attention_bias(length, source, is_causal=True, dtype=q.dtype,
                                         device=q.device)
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (query.shape[0], source):
                raise ValueError(
                    f"expected key_padding_mask of shape [batch, source length] = "
                    f"{[query.shape[0], source]}, got {list(key_padding_mask.shape)}"
                )
            bias = bias.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))

        weights = attention_weights(q, k, attn_mask=bias)  # [B, h, L, S]
        output = self.merge_heads(weights @ v)  # heads [B, h, L, E/h] -> [B, L, E]
        return output, (weights.mean(dim=1) if need_weights else None)


def tiled_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_size: int = 64,
    is_causal: bool = False,
) -> Tensor:
    r"""Exact attention over blocks of keys with an online softmax, never storing all scores.

    Same result as ``F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)``
    (scale :math:`1/\sqrt{d}`, query i sees keys 0..i when causal), but the keys and
    values are visited ``block_size`` at a time, so the largest intermediate is
    ``[..., L, block_size]`` instead of ``[..., L, S]``. For each row we keep a running
    maximum :math:`m`, normaliser :math:`\ell` and unnormalised output :math:`o`
    (Milakov and Gimelshein 2018, "Online normalizer calculation for softmax",
    arXiv:1805.02867; Dao et al. 2022, "FlashAttention"). For a block with scores
    :math:`s_j = q \cdot k_j / \sqrt{d}`:

    .. math::

        m' = \max(m, \max_j s_j), \qquad
        \ell' = e^{m - m'} \ell + \sum_j e^{s_j - m'}, \qquad
        o' = e^{m - m'} o + \sum_j e^{s_j - m'} v_j,

    starting from :math:`m = -\infty`, :math:`\ell = 0`, :math:`o = 0`; the output is
    :math:`o / \ell`. The factor :math:`e^{m - m'}` rescales what was summed against the
    old maximum. The maximum only keeps ``exp`` from overflowing (the result does not
    depend on it), so it is detached from autograd. A query with no key to attend to
    gets zeros. Autograd keeps every block for the backward pass; FlashAttention
    instead recomputes them.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.ndim < 2 or not x.is_floating_point():
            raise ValueError(f"expected {name} to be a floating-point tensor [..., T, d], "
                             f"got {getattr(x, 'dtype', type(x).__name__)} "
                             f"{list(getattr(x, 'shape', []))}")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"expected q [..., L, d], k [..., S, d] and v [..., S, d_v], got {list(q.shape)}, "
            f"{list(k.shape)} and {list(v.shape)}"
        )
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    length, source = q.shape[-2], k.shape[-2]
    dtype = torch.promote_types(q.dtype, v.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1])

    m = torch.full((*batch, length, 1), float("-inf"), dtype=dtype, device=q.device)
    ell = torch.zeros((*batch, length, 1), dtype=dtype, device=q.device)
    out = torch.zeros((*batch, length, v.shape[-1]), dtype=dtype, device=q.device)
    rows = torch.arange(length, device=q.device)[:, None]
    for start in range(0, source, block_size):
        if is_causal and start >= length:
            break  # every later key lies in the future of every query
        k_block = k[..., start:start + block_size, :]
        v_block = v[..., start:start + block_size, :]
        scores = (q @ k_block.transpose(-2, -1)) * scale  # [..., L, block]
        if is_causal:
            cols = torch.arange(start, start + k_block.shape[-2], device=q.device)
            scores = scores.masked_fill(cols > rows, float("-inf"))
        m_new = torch.maximum(m, scores.detach().amax(dim=-1, keepdim=True))
        m_safe = m_new.masked_fill(torch.isneginf(m_new), 0.0)  # rows that saw no key yet
        p = torch.exp(scores - m_safe)
        rescale = torch.exp(m - m_safe)
        ell = rescale * ell + p.sum(dim=-1, keepdim=True)
        out = rescale * out + p @ v_block
        m = m_new
    return out / ell.masked_fill(ell == 0, 1.0)


def stacked_projection(attn: MultiHeadAttention, x: Tensor) -> Tensor:
    """Queries, keys and values of ``x`` at once: ``x @ in_proj_weight.T + in_proj_bias``.

    A module registered as ``attn.in_proj`` takes the place of that weight and bias:
    Chapter 11's ``quantize_linears`` puts an int8 layer there. (The cross-attention path
    of :meth:`MultiHeadAttention.project_heads` still needs the float weight.)
    """
    in_proj = attn._modules.get("in_proj")
    if in_proj is not None:
        return in_proj(x)
    return x @ attn.in_proj_weight.T + attn.in_proj_bias
