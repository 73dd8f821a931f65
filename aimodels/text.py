"""From text to batches (Chapter 8): tokenizers, byte-level BPE, a vocabulary, padding.

These replace what torchtext used to provide (``get_tokenizer``,
``build_vocab_from_iterator``, padding iterators): torchtext's last release cannot be
loaded beside current PyTorch, so the course writes the few pieces it needs.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

import torch

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIALS = (PAD, UNK, BOS, EOS)


# --------------------------------------------------------------------------- simple tokenizers
def char_tokenize(text: str) -> list[str]:
    """Every Unicode character is a token."""
    return list(text)


_WORD = re.compile(r"\w+|[^\w\s]")


def word_tokenize(text: str, lower: bool = True) -> list[str]:
    """Words and single punctuation marks, optionally lower-cased.

    ``"Twenty-one, please!"`` gives ``['twenty', '-', 'one', ',', 'please', '!']``.
    """
    return _WORD.findall(text.lower() if lower else text)


# --------------------------------------------------------------------------- byte-level BPE
_CHUNK = re.compile(r" ?\w+| ?[^\w\s]+|\s+")

# GPT-2's pre-tokeniser (openai/gpt-2, src/encoder.py) is
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# compiled with the third-party ``regex`` package. Python's ``re`` has no \p{...} classes,
# so here \p{L} becomes [^\W\d_] (word characters that are not digits or "_") and \p{N}
# becomes \d. The two agree on letters, decimal digits and ordinary white space in every
# script; they differ on rare characters such as the numeral "²", a letter to \w but not
# to \p{L}. For comparison only: BPETokenizer uses _CHUNK.
GPT2_SPLIT = re.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""
)


def pretokenize(text: str) -> list[str]:
    """The chunks that BPE merges never cross: a word or a run of punctuation, each with at
    most one leading space, or a run of white space. ``"".join(pretokenize(s)) == s``.
    """
    return _CHUNK.findall(text)


class BPETokenizer:
    """Byte-level byte-pair encoding (Sennrich et al., 2016; byte-level as in GPT-2).

    Text is UTF-8 encoded, so the 256 byte values cover every possible string and
    ``decode(encode(s)) == s`` for any Unicode ``s``, Chinese and emoji included. Training
    starts from those 256 tokens and repeatedly merges the most frequent adjacent pair
    into a new token, until ``vocab_size`` tokens exist. Merges never cross the
    boundaries of pre-split chunks (a word with its leading space, a run of punctuation,
    a run of white space; see :func:`pretokenize`). The split is close to GPT-2's but
    not the same: no contraction rule, letters and digits in one run, and a run of
    spaces does not hand its last space to the next word (see ``GPT2_SPLIT``).
    """

    def __init__(self, merges: Sequence[tuple[int, int]] = ()) -> None:
        self.merges: list[tuple[int, int]] = [tuple(m) for m in merges]  # type: ignore[misc]
        self.ranks = {pair: 256 + i for i, pair in enumerate(self.merges)}
        self.pieces: dict[int, bytes] = {i: bytes([i]) for i in range(256)}
        for (a, b), new_id in self.ranks.items():
            self.pieces[new_id] = self.pieces[a] + self.pieces[b]

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.merges)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Learn ``vocab_size - 256`` merges from ``texts``."""
        if not isinstance(vocab_size, int) or vocab_size < 256:
            raise ValueError(
                f"vocab_size must be an int >= 256 (the byte tokens), got {vocab_size!r}"
            )
        chunk_counts = Counter(chunk for text in texts for chunk in pretokenize(text))
        words = {tuple(chunk.encode("utf-8")): n for chunk, n in chunk_counts.items()}
        merges: list[tuple[int, int]] = []
        while 256 + len(merges) < vocab_size:
            pairs: Counter[tuple[int, int]] = Counter()
            for word, n in words.items():
                for pair in zip(word, word[1:], strict=False):
                    pairs[pair] += n
            if not pairs:
                break  # every chunk is a single token already
            best = min(pairs, key=lambda p: (-pairs[p], p))  # most frequent; ties by id
            new_id = 256 + len(merges)
            merges.append(best)
            words = {_merge(word, best, new_id): n for word, n in words.items()}
        return cls(merges)

    def _encode_chunk(self, ids: list[int]) -> list[int]:
        while len(ids) > 1:
            ranked = [(self.ranks.get(pair, float("inf")), i)
                      for i, pair in enumerate(zip(ids, ids[1:], strict=False))]
            rank, _ = min(ranked)
            if rank == float("inf"):
                break
            ids = list(_merge(tuple(ids), self.merges[int(rank) - 256], int(rank)))
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``: its UTF-8 bytes, merged in the order they were learned."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        chunks = pretokenize(text)
        return [i for chunk in chunks for i in self._encode_chunk(list(chunk.encode("utf-8")))]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of a list of ids; exact inverse of :meth:`encode`."""
        try:
            data = b"".join(self.pieces[i] for i in ids)
        except KeyError as exc:
            raise ValueError(
                f"unknown token id {exc.args[0]}; ids must be in [0, {self.vocab_size})"
            ) from exc
        return data.decode("utf-8", errors="replace")

    def token_strings(self, ids: Iterable[int]) -> list[str]:
        """Each token's bytes shown as text (partial UTF-8 sequences shown as escapes)."""
        return [self.pieces[i].decode("utf-8", errors="backslashreplace") for i in ids]


def _merge(word: tuple[int, ...], pair: tuple[int, int], new_id: int) -> tuple[int, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


# --------------------------------------------------------------------------- vocabulary
class Vocab:
    """Token <-> id mapping; the special tokens come first: <pad>=0, <unk>=1, <bos>=2, <eos>=3.

    Built from a stream of token lists, keeping tokens seen at least ``min_freq`` times,
    most frequent first (ties alphabetically, so the order is reproducible). An unknown
    token maps to <unk>.
    """

    def __init__(self, tokens: Sequence[str]) -> None:
        self.itos = list(SPECIALS) + [t for t in tokens if t not in SPECIALS]
        if len(set(self.itos)) != len(self.itos):
            raise ValueError("tokens must be unique")
        self.stoi = {t: i for i, t in enumerate(self.itos)}
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = range(4)

    @classmethod
    def build(cls, token_lists: Iterable[Sequence[str]], min_freq: int = 1) -> Vocab:
        counts = Counter(t for tokens in token_lists for t in tokens)
        kept = sorted((t for t, n in counts.items() if n >= min_freq),
                      key=lambda t: (-counts[t], t))
        return cls(kept)

    def __len__(self) -> int:
        return len(self.itos)

    def __getitem__(self, token: str) -> int:
        return self.stoi.get(token, self.unk_id)

    def encode(self, tokens: Sequence[str], add_bos_eos: bool = False) -> list[int]:
        ids = [self[t] for t in tokens]
        return [self.bos_id, *ids, self.eos_id] if add_bos_eos else ids

    def decode(self, ids: Iterable[int], strip_specials: bool = True) -> list[str]:
        tokens = []
        for i in ids:
            i = int(i)
            if strip_specials and i == self.eos_id:
                break
            if strip_specials and i in (self.pad_id, self.bos_id):
                continue
            tokens.append(self.itos[i])
        return tokens


# --------------------------------------------------------------------------- batching
def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack id lists of different lengths into ``[batch, longest]``, padded with ``pad_id``.

    Returns the batch and a boolean mask of the same shape, True at real tokens.
    """
    if not sequences:
        raise ValueError("pad_batch needs at least one sequence")
    longest = max(len(s) for s in sequences)
    batch = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        batch[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    mask = torch.arange(longest)[None, :] < torch.tensor([len(s) for s in sequences])[:, None]
    return batch, mask


# --------------------------------------------------------------------------- BLEU
import math  # noqa: E402  (appended section: the line numbers above stay as displayed)
from dataclasses import dataclass  # noqa: E402

Tokens = Sequence[str]


@dataclass(frozen=True)
class BleuStats:
    """The pieces of corpus BLEU: clipped n-gram matches and totals, lengths, the score."""

    matches: tuple[int, ...]  # clipped matching n-grams, n = 1..max_order, summed over the corpus
    totals: tuple[int, ...]  # n-grams in the hypotheses, n = 1..max_order
    hyp_len: int  # c: tokens in all hypotheses
    ref_len: int  # r: the closest reference length of each sentence, summed
    precisions: tuple[float, ...]  # p_n = matches / totals (0 when totals is 0)
    brevity_penalty: float  # 1 if c >= r, else exp(1 - r / c) (0 if c == 0)
    score: float  # 100 * BP * exp(mean_n log p_n); 0 when any p_n is 0


def ngram_counts(tokens: Tokens, n: int) -> Counter[tuple[str, ...]]:
    """How often each run of ``n`` consecutive tokens occurs in ``tokens``."""
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _reference_list(refs: object, i: int) -> list[Tokens]:
    """One reference (a token list) or several (a list of token lists), as a list."""
    if isinstance(refs, str) or not isinstance(refs, Sequence):
        raise TypeError(f"references[{i}] must be a list of tokens (or a list of such lists), "
                        f"got {type(refs).__name__}; split text first, e.g. list(s) or s.split()")
    if len(refs) > 0 and all(isinstance(r, Sequence) and not isinstance(r, str) for r in refs):
        return list(refs)  # several references
    return [refs]  # type: ignore[list-item]


def bleu_statistics(hypotheses: Sequence[Tokens], references: Sequence[Tokens | Sequence[Tokens]],
                    max_order: int = 4) -> BleuStats:
    r"""Corpus BLEU (Papineni et al., 2002) with all its intermediate numbers.

    For each n = 1..``max_order``, the clipped precision :math:`p_n` counts each
    hypothesis n-gram at most as often as it occurs in a reference (the most in any one
    reference), summed over the corpus, divided by the number of hypothesis n-grams. With
    :math:`c` the hypothesis length and :math:`r` the reference length closest to it (ties
    to the shorter, as sacreBLEU), both summed over the corpus,

    .. math:: \text{BLEU} = 100 \cdot BP \cdot \exp\Big(\frac{1}{N}\sum_{n=1}^{N} \log p_n\Big),
              \quad BP = \min\big(1, e^{1 - r/c}\big).

    No smoothing: the score is 0 when some :math:`p_n` is 0. Equals
    ``sacrebleu.corpus_bleu`` with ``tokenize="none", smooth_method="none"`` on the
    tokens joined by spaces.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"need one reference entry per hypothesis, got {len(hypotheses)} "
                         f"hypotheses and {len(references)} references")
    if not isinstance(max_order, int) or max_order < 1:
        raise ValueError(f"max_order must be an int >= 1, got {max_order!r}")
    matches, totals = [0] * max_order, [0] * max_order
    hyp_len = ref_len = 0
    for i, (hyp, refs) in enumerate(zip(hypotheses, references, strict=True)):
        if isinstance(hyp, str) or not isinstance(hyp, Sequence):
            raise TypeError(f"hypotheses[{i}] must be a list of tokens, got "
                            f"{type(hyp).__name__}; split text first, e.g. list(s) or s.split()")
        ref_lists = _reference_list(refs, i)
        hyp_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in ref_lists)[1]
        for n in range(1, max_order + 1):
            hyp_counts = ngram_counts(hyp, n)
            most = Counter()
            for r in ref_lists:
                most |= ngram_counts(r, n)  # elementwise max over the references
            matches[n - 1] += sum(min(k, most[g]) for g, k in hyp_counts.items())
            totals[n - 1] += sum(hyp_counts.values())
    precisions = tuple(m / t if t else 0.0 for m, t in zip(matches, totals, strict=True))
    if hyp_len >= ref_len:
        bp = 1.0
    else:
        bp = math.exp(1 - ref_len / hyp_len) if hyp_len > 0 else 0.0
    if min(precisions) == 0.0:
        score = 0.0
    else:
        score = 100 * bp * math.exp(sum(math.log(p) for p in precisions) / max_order)
    return BleuStats(tuple(matches), tuple(totals), hyp_len, ref_len, precisions, bp, score)


def corpus_bleu(hypotheses: Sequence[Tokens], references: Sequence[Tokens | Sequence[Tokens]],
                max_order: int = 4) -> float:
    """Corpus BLEU on 0..100 of tokenised ``hypotheses`` against ``references``.

    ``references[i]`` is the token list of sentence ``i``'s reference, or a list of
    several token lists. See :func:`bleu_statistics` for the formula.
    """
    return bleu_statistics(hypotheses, references, max_order).score
