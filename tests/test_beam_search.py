"""Chapter 8: beam search for the seq2seq Transformer, against greedy decoding, teacher
forcing and an exhaustive search."""

import itertools
import math

import pytest
import torch
from torch import nn

from aimodels import data, text
from aimodels.transformer import (
    Seq2SeqTransformer,
    beam_search,
    gnmt_length_penalty,
    sequence_log_prob,
    train_seq2seq,
)

PAD, BOS, EOS = 0, 2, 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is faster than two fighting over a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_model(seed: int, tgt_vocab: int = 6) -> Seq2SeqTransformer:
    torch.manual_seed(seed)
    model = Seq2SeqTransformer(9, tgt_vocab, d_model=16, nhead=2, num_layers=1,
                               dim_feedforward=32, dropout=0.0, pad_id=PAD)
    with torch.no_grad():  # sharper distributions than the initial near-uniform ones
        model.generator.weight.mul_(8)
    return model


def random_sources(seed: int, count: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 9, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g)
            for _ in range(count)]


def greedy_tokens(model, src, max_len):
    """The greedy row up to and including its first <eos> (all of it if none)."""
    row = model.greedy_decode(src[None], BOS, EOS, max_len=max_len)[0].tolist()
    return row[: row.index(EOS) + 1] if EOS in row else row


@pytest.fixture(scope="module")
def trained():
    """A small number translator trained briefly, so that it is right often but not always."""
    pairs = data.number_translation_pairs(100, 999, test_fraction=0.2, seed=0)
    src_vocab = text.Vocab.build(text.word_tokenize(e) for _, e, _ in pairs["train"])
    tgt_vocab = text.Vocab.build(text.char_tokenize(z) for _, _, z in pairs["train"])

    def tensors(split):
        src, _ = text.pad_batch([src_vocab.encode(text.word_tokenize(e)) for _, e, _ in split])
        tgt, _ = text.pad_batch([tgt_vocab.encode(text.char_tokenize(z), add_bos_eos=True)
                                 for _, _, z in split])
        return src, tgt

    src, tgt = tensors(pairs["train"][::3])  # 240 pairs: cheap to train, not yet perfect
    torch.manual_seed(0)
    model = Seq2SeqTransformer(len(src_vocab), len(tgt_vocab), d_model=32, nhead=4,
                               num_layers=1, dim_feedforward=64, dropout=0.0)
    train_seq2seq(model, src, tgt, epochs=4, lr=3e-3, batch_size=32)
    test_src, _ = tensors(pairs["test"][:40])
    return model, [row[row != PAD] for row in test_src]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_size_one_is_greedy_decoding(seed):
    model = random_model(seed)
    for src in random_sources(seed):
        best = beam_search(model, src, BOS, EOS, beam_size=1, max_len=7)
        assert len(best) == 1
        assert best[0].tokens == greedy_tokens(model, src, max_len=7)
        assert best[0].finished == (EOS in best[0].tokens)


def test_beam_size_one_is_greedy_on_a_trained_model(trained):
    model, sources = trained
    for src in sources:
        assert beam_search(model, src, BOS, EOS, beam_size=1, max_len=8)[0].tokens == \
            greedy_tokens(model, src, max_len=8)


@pytest.mark.parametrize("beam_size, alpha", [(1, 0.0), (3, 0.0), (4, 0.6), (8, 1.0)])
def test_scores_are_the_teacher_forced_log_probabilities(beam_size, alpha):
    model = random_model(3)
    for src in random_sources(3):
        hypotheses = beam_search(model, src, BOS, EOS, beam_size, max_len=6, length_penalty=alpha)
        for h in hypotheses:
            expected = sequence_log_prob(model, src, h.tokens, BOS)
            torch.testing.assert_close(torch.tensor(h.log_prob), torch.tensor(expected))
            lp = gnmt_length_penalty(len(h.tokens), alpha)
            torch.testing.assert_close(h.score, h.log_prob / lp)
            assert h.finished == (h.tokens[-1] == EOS) and h.tokens.count(EOS) == h.finished
        scores = [h.score for h in hypotheses]
        assert scores == sorted(scores, reverse=True)


def test_teacher_forcing_matches_a_manual_chain_rule():
    model = random_model(4).eval()
    src, tokens = torch.tensor([5, 6, 7]), [4, 5, EOS]
    total = 0.0
    for t in range(len(tokens)):
        logits = model(src[None], torch.tensor([[BOS, *tokens[:t]]]))[0, -1]
        total += torch.log_softmax(logits, -1)[tokens[t]].item()
    torch.testing.assert_close(sequence_log_prob(model, src, tokens, BOS), total, rtol=1e-5, atol=1e-5)


def finished_sequences(vocab: int, max_len: int):
    """Every sequence of at most ``max_len`` tokens that ends at its first <eos>."""
    others = [t for t in range(vocab) if t != EOS]
    for length in range(1, max_len + 1):
        for body in itertools.product(others, repeat=length - 1):
            yield [*body, EOS]


@pytest.mark.parametrize("alpha", [0.0, 0.8])
@pytest.mark.parametrize("seed", [0, 5])
def test_a_beam_as_wide_as_all_prefixes_finds_the_exact_best(seed, alpha):
    vocab, max_len = 5, 4
    model = random_model(seed, tgt_vocab=vocab)
    src = random_sources(seed, count=1)[0]
    scored = [(sequence_log_prob(model, src, seq, BOS) / gnmt_length_penalty(len(seq), alpha),
               seq) for seq in finished_sequences(vocab, max_len)]
    best_score, best_tokens = max(scored)
    found = beam_search(model, src, BOS, EOS, beam_size=vocab**max_len, max_len=max_len,
                        length_penalty=alpha)[0]
    assert found.tokens == best_tokens
    torch.testing.assert_close(found.score, best_score, rtol=1e-5, atol=1e-5)


def test_beam_search_is_not_worse_than_greedy_on_a_trained_model(trained):
    model, sources = trained
    changed = 0
    for src in sources:
        greedy = greedy_tokens(model, src, max_len=8)
        greedy_log_prob = sequence_log_prob(model, src, greedy, BOS)
        beam = beam_search(model, src, BOS, EOS, beam_size=4, max_len=8)[0]
        assert beam.log_prob >= greedy_log_prob - 1e-5
        changed += beam.tokens != greedy
    assert changed > 0  # the comparison is not vacuous: beam search did change some outputs


class ScriptedDecoder(nn.Module):
    """A stand-in model whose next-token probabilities are a table keyed by the prefix."""

    def __init__(self, table, vocab: int = 8) -> None:
        super().__init__()
        self.table, self.vocab = table, vocab

    def encode(self, src):
        return torch.zeros(src.shape[0], src.shape[1], 1), src == PAD

    def decode(self, prefixes, memory, padding):
        logits = torch.full((*prefixes.shape, self.vocab), -1e9)
        for row, prefix in enumerate(prefixes.tolist()):
            for t in range(len(prefix)):
                probs = self.table(tuple(prefix[1 : t + 1]))
                for token, p in probs.items():
                    logits[row, t, token] = math.log(p)
        return logits


def test_a_wider_beam_can_return_a_less_probable_translation():
    """Beam search is a heuristic, not an exact search: here greedy's path falls out of a
    beam of 2 at step 2, and every hypothesis left in the beam ends less probably."""
    a, b, c, d, e = 4, 5, 6, 7, 8

    def table(prefix):
        if prefix == ():
            return {a: 0.4, b: 0.35, c: 0.25}
        if prefix == (a,):
            return {b: 0.34, c: 0.33, d: 0.33}  # greedy's prefix a b: 0.136 after step 2 ...
        if prefix == (b,):
            return {d: 0.5, e: 0.5}  # ... below b d and b e (0.175 each)
        if prefix == (c,):
            return {d: 1.0}
        if prefix[0] == a:
            return {EOS: 1.0}  # greedy then ends with certainty: P(a b <eos>) = 0.136
        return {EOS: 0.5, a: 0.25, b: 0.25}  # the beam's prefixes end at 0.175 x 0.5

    model = ScriptedDecoder(table, vocab=9)
    src = torch.tensor([5])
    greedy = beam_search(model, src, BOS, EOS, beam_size=1, max_len=5)[0]
    wider = beam_search(model, src, BOS, EOS, beam_size=2, max_len=5)[0]
    assert greedy.tokens == [a, b, EOS] and greedy.log_prob == pytest.approx(math.log(0.136))
    assert wider.finished and wider.tokens[:2] in ([b, d], [b, e])
    assert wider.log_prob == pytest.approx(math.log(0.0875))
    assert wider.log_prob < greedy.log_prob
    exhaustive = beam_search(model, src, BOS, EOS, beam_size=1000, max_len=4)[0]
    assert exhaustive.tokens == greedy.tokens  # the exact best is greedy's here


def test_unfinished_hypotheses_and_argument_errors():
    model = random_model(6)
    src = torch.tensor([4, 5])
    never_ends = beam_search(model, src, BOS, eos_id=99, beam_size=3, max_len=3)
    assert len(never_ends) == 3 and all(not h.finished and len(h.tokens) == 3 for h in never_ends)
    assert gnmt_length_penalty(7, 0.0) == 1.0 and gnmt_length_penalty(1, 0.6) == 1.0
    assert gnmt_length_penalty(7, 1.0) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="beam_size must be an int >= 1, got 0"):
        beam_search(model, src, BOS, EOS, beam_size=0)
    with pytest.raises(ValueError, match="max_len must be an int >= 1"):
        beam_search(model, src, BOS, EOS, max_len=0)
    with pytest.raises(ValueError, match=r"one source sentence.*got \(2, 2\)"):
        beam_search(model, torch.tensor([[4, 5], [6, 7]]), BOS, EOS)
    with pytest.raises(TypeError, match="torch.long"):
        beam_search(model, torch.tensor([4.0, 5.0]), BOS, EOS)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        gnmt_length_penalty(3, -1.0)
    assert model.training  # beam search restores the mode it found
