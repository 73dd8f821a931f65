"""The Transformer from our own parts (Chapters 7 and 8).

:class:`EncoderBlock` and :class:`DecoderBlock` are pre-LayerNorm blocks with the
submodule names of ``nn.TransformerEncoderLayer`` and ``nn.TransformerDecoderLayer``
(``norm_first=True, batch_first=True``, ReLU), so weights copy over with
``load_state_dict``; ``tests/test_transformer.py`` checks that the outputs match.
:class:`Seq2SeqTransformer` assembles them into an encoder-decoder model; it decodes
greedily, and :func:`beam_search` (Chapter 8) keeps the k most probable prefixes.
"""

from __future__ import annotations

import torch
from torch import nn

from aimodels.attention import MultiHeadAttention
from aimodels.positional import SinusoidalPositionalEncoding

Tensor = torch.Tensor


def feed_forward(block: nn.Module, x: Tensor) -> Tensor:
    r"""A block's feed-forward network, :math:`W_2\, \text{ReLU}(W_1 x + b_1) + b_2`."""
    return block.linear2(block.dropout(torch.relu(block.linear1(x))))


class EncoderBlock(nn.Module):
    r"""Pre-LN encoder block: :math:`x \mathrel{+}= \text{SA}(\text{LN}(x))`, then
    :math:`x \mathrel{+}= \text{FFN}(\text{LN}(x))`.

    The feed-forward network is :math:`W_2\, \text{ReLU}(W_1 x + b_1) + b_2`. Names match
    ``nn.TransformerEncoderLayer``: ``self_attn``, ``linear1``, ``linear2``, ``norm1``,
    ``norm2`` and the dropouts.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, nhead)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def feed_forward(self, x: Tensor) -> Tensor:
        return feed_forward(self, x)

    def forward(self, src: Tensor, src_mask: Tensor | None = None,
                src_key_padding_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        h = self.norm1(src)
        x = src + self.dropout1(self.self_attn(h, h, h, key_padding_mask=src_key_padding_mask,
                                               attn_mask=src_mask, need_weights=False,
                                               is_causal=is_causal)[0])
        return x + self.dropout2(self.feed_forward(self.norm2(x)))


class DecoderBlock(nn.Module):
    """Pre-LN decoder block: masked self-attention, cross-attention to the encoder, FFN.

    Names match ``nn.TransformerDecoderLayer``: ``self_attn``, ``multihead_attn``,
    ``linear1``, ``linear2``, ``norm1`` to ``norm3`` and the dropouts.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, nhead)
        self.multihead_attn = MultiHeadAttention(d_model, nhead)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Tensor | None = None,
                memory_mask: Tensor | None = None, tgt_key_padding_mask: Tensor | None = None,
                memory_key_padding_mask: Tensor | None = None,
                tgt_is_causal: bool = False) -> Tensor:
        h = self.norm1(tgt)
        x = tgt + self.dropout1(self.self_attn(h, h, h, key_padding_mask=tgt_key_padding_mask,
                                               attn_mask=tgt_mask, need_weights=False,
                                               is_causal=tgt_is_causal)[0])
        h = self.norm2(x)
        x = x + self.dropout2(self.multihead_attn(h, memory, memory,
                                                  key_padding_mask=memory_key_padding_mask,
                                                  attn_mask=memory_mask, need_weights=False)[0])
        return x + self.dropout3(feed_forward(self, self.norm3(x)))


class Seq2SeqTransformer(nn.Module):
    """An encoder-decoder Transformer for sequence-to-sequence tasks such as translation.

    Token embeddings scaled by :math:`\\sqrt{d}` plus sinusoidal positions, ``num_layers``
    encoder and decoder blocks, final LayerNorms (needed with pre-LN blocks) and a
    linear layer to target-vocabulary logits. ``pad_id`` marks padding in both languages.
    """

    def __init__(self, src_vocab: int, tgt_vocab: int, d_model: int = 64, nhead: int = 4,
                 num_layers: int = 2, dim_feedforward: int = 256, dropout: float = 0.1,
                 max_len: int = 64, pad_id: int = 0) -> None:
        super().__init__()
        self.d_model, self.pad_id = d_model, pad_id
        self.src_embed = nn.Embedding(src_vocab, d_model, padding_idx=pad_id)
        self.tgt_embed = nn.Embedding(tgt_vocab, d_model, padding_idx=pad_id)
        self.position = SinusoidalPositionalEncoding(d_model, max_len)
        self.dropout = nn.Dropout(dropout)
        self.encoder = nn.ModuleList(
            EncoderBlock(d_model, nhead, dim_feedforward, dropout) for _ in range(num_layers))
        self.decoder = nn.ModuleList(
            DecoderBlock(d_model, nhead, dim_feedforward, dropout) for _ in range(num_layers))
        self.encoder_norm = nn.LayerNorm(d_model)
        self.decoder_norm = nn.LayerNorm(d_model)
        self.generator = nn.Linear(d_model, tgt_vocab)

    def _embed(self, embedding: nn.Embedding, tokens: Tensor) -> Tensor:
        return self.dropout(self.position(embedding(tokens) * self.d_model**0.5))

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder states ``[B, S, d]`` and the source padding mask ``[B, S]`` (True = pad)."""
        padding = src == self.pad_id
        x = self._embed(self.src_embed, src)
        for block in self.encoder:
            x = block(x, src_key_padding_mask=padding)
        return self.encoder_norm(x), padding

    def decode(self, tgt_in: Tensor, memory: Tensor, memory_padding: Tensor) -> Tensor:
        """Logits ``[B, T, V]`` for each next target token, seeing only earlier ones."""
        x = self._embed(self.tgt_embed, tgt_in)
        for block in self.decoder:
            x = block(x, memory, tgt_key_padding_mask=tgt_in == self.pad_id,
                      memory_key_padding_mask=memory_padding, tgt_is_causal=True)
        return self.generator(self.decoder_norm(x))

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        memory, padding = self.encode(src)
        return self.decode(tgt_in, memory, padding)

    @torch.no_grad()
    def greedy_decode(self, src: Tensor, bos_id: int, eos_id: int, max_len: int = 32) -> Tensor:
        """Translate by always taking the most likely next token, until <eos> or ``max_len``.

        Returns ``[B, <= max_len]`` token ids without the leading <bos>; positions after a
        sequence's <eos> hold ``pad_id``.
        """
        was_training = self.training
        self.eval()
        memory, padding = self.encode(src)
        out = torch.full((src.shape[0], 1), bos_id, dtype=torch.long, device=src.device)
        finished = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        for _ in range(max_len):
            next_token = self.decode(out, memory, padding)[:, -1].argmax(-1)
            next_token = next_token.masked_fill(finished, self.pad_id)
            out = torch.cat([out, next_token[:, None]], dim=1)
            finished |= next_token == eos_id
            if finished.all():
                break
        self.train(was_training)
        return out[:, 1:]


def train_seq2seq(
    model: Seq2SeqTransformer,
    src: Tensor,
    tgt: Tensor,
    epochs: int,
    lr: float = 2e-3,
    batch_size: int = 32,
    seed: int = 0,
    clip_grad_norm: float = 1.0,
) -> list[float]:
    """Train with teacher forcing: the decoder reads ``tgt[:, :-1]`` and predicts ``tgt[:, 1:]``.

    ``tgt`` rows are ``<bos> ... <eos>`` padded with the model's ``pad_id``, which the
    loss ignores. The learning rate rises to ``lr`` over the first 20% of the steps and
    then falls towards zero (a one-cycle schedule); gradients are clipped. Uses the
    course's Adam. ``OneCycleLR`` also cycles Adam's :math:`\beta_1` by default
    (``cycle_momentum=True``): from 0.95 down to 0.85 while the rate rises, and back up
    while it falls. Returns the mean training loss of each epoch.
    """
    from aimodels.optim import Adam

    if src.shape[0] != tgt.shape[0]:
        raise ValueError(f"src and tgt must have the same number of rows, got {src.shape[0]} "
                         f"and {tgt.shape[0]}")
    optimizer = Adam(model.parameters(), lr=lr)
    steps = epochs * -(-src.shape[0] // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps,
                                                   pct_start=0.2)
    loss_fn = nn.CrossEntropyLoss(ignore_index=model.pad_id)
    generator = torch.Generator().manual_seed(seed)
    history = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(src.shape[0], generator=generator)
        total = 0.0
        for start in range(0, src.shape[0], batch_size):
            idx = order[start : start + batch_size]
            logits = model(src[idx], tgt[idx, :-1])
            loss = loss_fn(logits.reshape(-1, logits.shape[-1]), tgt[idx, 1:].reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            optimizer.step()
            schedule.step()
            total += loss.item() * len(idx)
        history.append(total / src.shape[0])
    return history


class EncoderTagger(nn.Module):
    """An encoder-only Transformer that predicts one output token per input position.

    Embedding (scaled by sqrt(d)) plus sinusoidal positions, ``num_layers`` of our
    :class:`EncoderBlock`, a final LayerNorm and a linear head. :meth:`attention_maps`
    returns each layer's attention weights (averaged over heads) for plotting.
    """

    def __init__(self, vocab_size: int, num_classes: int, d_model: int = 32, nhead: int = 4,
                 num_layers: int = 1, dim_feedforward: int = 64, max_len: int = 64) -> None:
        super().__init__()
        self.d_model = d_model
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = SinusoidalPositionalEncoding(d_model, max_len)
        self.blocks = nn.ModuleList(
            EncoderBlock(d_model, nhead, dim_feedforward, dropout=0.0) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``[batch, classes, length]``, the layout ``nn.CrossEntropyLoss`` expects."""
        x = self.position(self.embed(tokens) * self.d_model**0.5)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)).transpose(1, 2)

    @torch.no_grad()
    def attention_maps(self, tokens: Tensor) -> list[Tensor]:
        """Attention weights of every layer, each ``[batch, length, length]``."""
        maps = []
        x = self.position(self.embed(tokens) * self.d_model**0.5)
        for block in self.blocks:
            h = block.norm1(x)
            maps.append(block.self_attn(h, h, h, need_weights=True)[1])
            x = block(x)
        return maps


# --------------------------------------------------------------------------- beam search
from typing import NamedTuple  # noqa: E402  (appended section: earlier line numbers stay)


class Hypothesis(NamedTuple):
    """One translation found by :func:`beam_search`.

    ``tokens`` are the generated ids without the leading <bos>, ending with <eos> when
    ``finished``; ``log_prob`` is :math:`\\sum_t \\log p(y_t \\mid y_{<t}, x)` over them;
    ``score`` is ``log_prob / gnmt_length_penalty(len(tokens), alpha)``, the rank key.
    """

    tokens: list[int]
    log_prob: float
    score: float
    finished: bool


def gnmt_length_penalty(length: int, alpha: float) -> float:
    r"""Wu et al. (2016)'s length penalty :math:`lp(Y) = \left(\frac{5 + |Y|}{5 + 1}\right)^\alpha`.

    ``alpha = 0`` gives 1 (rank by the plain sum of log-probabilities); ``alpha = 1`` is
    close to dividing by the length, i.e. ranking by the average log-probability per token.
    """
    if length < 0 or alpha < 0:
        raise ValueError(f"length and alpha must be >= 0, got length={length}, alpha={alpha}")
    return ((5 + length) / 6) ** alpha


def _single_source(src: Tensor) -> Tensor:
    if src.dim() == 1:
        src = src[None]
    if src.dim() != 2 or src.shape[0] != 1:
        raise ValueError(f"expected one source sentence, shape [S] or [1, S], got "
                         f"{tuple(src.shape)}; call it once per sentence")
    if src.dtype != torch.long:
        raise TypeError(f"src must hold token ids (torch.long), got {src.dtype}")
    return src


@torch.no_grad()
def beam_search(model: Seq2SeqTransformer, src: Tensor, bos_id: int, eos_id: int,
                beam_size: int = 4, max_len: int = 32,
                length_penalty: float = 0.0) -> list[Hypothesis]:
    r"""Translate one sentence by beam search; returns the finished hypotheses, best first.

    The beam holds the ``beam_size`` most probable prefixes (sum of token log-probabilities).
    Each step extends every prefix by every token and keeps the ``beam_size`` best of all
    extensions; an extension that ends in <eos> leaves the beam for the finished list.
    The search stops when the beam is empty, after ``max_len`` tokens, or, when
    ``length_penalty == 0``, as soon as the best finished hypothesis scores at least the
    best open prefix: extending a prefix only adds log-probabilities :math:`\le 0`, so none
    can overtake it. Finished hypotheses are ranked by
    :math:`\log P(Y \mid X) / lp(Y)` with :func:`gnmt_length_penalty` (``alpha =
    length_penalty``; :math:`|Y|` counts the <eos>). If none finished within ``max_len``
    tokens, the open ones are returned instead, with ``finished=False``. ``beam_size=1`` is
    greedy decoding.
    """
    if not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size must be an int >= 1, got {beam_size!r}")
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be an int >= 1, got {max_len!r}")
    src = _single_source(src)
    was_training = model.training
    model.eval()
    memory, padding = model.encode(src)
    prefixes = torch.full((1, 1), bos_id, dtype=torch.long, device=src.device)
    prefix_log_probs = torch.zeros(1, device=src.device)
    finished: list[Hypothesis] = []

    def hypothesis(row: int, log_prob: float, done: bool) -> Hypothesis:
        tokens = prefixes[row, 1:].tolist()
        return Hypothesis(tokens, log_prob,
                          log_prob / gnmt_length_penalty(len(tokens), length_penalty), done)

    for _ in range(max_len):
        k = prefixes.shape[0]
        logits = model.decode(prefixes, memory.expand(k, -1, -1), padding.expand(k, -1))
        log_probs = torch.log_softmax(logits[:, -1].float(), dim=-1)  # [k, V]
        vocab = log_probs.shape[-1]
        candidates = (prefix_log_probs[:, None] + log_probs).flatten()
        best, index = candidates.topk(min(beam_size, candidates.numel()))
        rows, tokens = index // vocab, index % vocab
        prefixes = torch.cat([prefixes[rows], tokens[:, None]], dim=1)
        ended = tokens == eos_id
        finished += [hypothesis(int(i), float(best[i]), True) for i in ended.nonzero().flatten()]
        prefixes, prefix_log_probs = prefixes[~ended], best[~ended]
        if prefixes.shape[0] == 0:
            break
        if length_penalty == 0 and finished and \
                max(h.log_prob for h in finished) >= float(prefix_log_probs.max()):
            break
    if not finished:  # nothing reached <eos>: return the open prefixes
        finished = [hypothesis(i, float(lp), False) for i, lp in enumerate(prefix_log_probs)]
    model.train(was_training)
    return sorted(finished, key=lambda h: h.score, reverse=True)


@torch.no_grad()
def sequence_log_prob(model: Seq2SeqTransformer, src: Tensor, tokens: list[int],
                      bos_id: int) -> float:
    r"""Teacher-forced :math:`\log P(y_1..y_T \mid x) = \sum_t \log p(y_t \mid y_{<t}, x)`.

    One forward pass reads ``<bos> y_1 .. y_{T-1}`` and scores every token at once: the
    number beam search and greedy decoding accumulate one step at a time.
    """
    src = _single_source(src)
    if len(tokens) == 0:
        return 0.0
    was_training = model.training
    model.eval()
    target = torch.tensor(tokens, dtype=torch.long, device=src.device)
    tgt_in = torch.cat([torch.tensor([bos_id], device=src.device), target[:-1]])[None]
    log_probs = torch.log_softmax(model(src, tgt_in)[0].float(), dim=-1)
    model.train(was_training)
    return float(log_probs[torch.arange(len(tokens)), target].sum())
