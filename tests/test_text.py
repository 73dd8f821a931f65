"""Chapter 8: tokenizers, BPE, vocabulary, padding and the number-words data."""

import math

import pytest
import torch

from aimodels import data, text

SAMPLES = [
    "Large models as a service.",
    "大模型即服务：把模型变成一项服务。",
    "def f(x):\n    return x ** 2  # squares 🙂",
    "naïve café — façade",
    "",
    "   leading and trailing   ",
]


@pytest.fixture(scope="module")
def bpe():
    corpus = ["the model serves the request", "the server batches requests", "大模型 大模型 服务"] * 20
    return text.BPETokenizer.train(corpus, vocab_size=280)


def test_bpe_round_trips_any_unicode(bpe):
    assert bpe.vocab_size == 280
    for sample in SAMPLES:
        assert bpe.decode(bpe.encode(sample)) == sample
    rng = torch.Generator().manual_seed(0)
    for _ in range(50):  # random code points, including CJK and astral planes
        codes = torch.randint(32, 0x2FFFF, (20,), generator=rng).tolist()
        s = "".join(chr(c) for c in codes if not 0xD800 <= c <= 0xDFFF)
        assert bpe.decode(bpe.encode(s)) == s


def test_bpe_merges_compress_frequent_text(bpe):
    sentence = "the model serves the request"
    assert len(bpe.encode(sentence)) < len(sentence.encode("utf-8")) / 2
    assert len(bpe.encode("大模型")) < len("大模型".encode())
    assert "".join(bpe.token_strings(bpe.encode(sentence))) == sentence


def test_bpe_training_is_deterministic_and_checks_arguments():
    corpus = ["abab abab ab", "ba ba"]
    first = text.BPETokenizer.train(corpus, 270)
    assert first.merges == text.BPETokenizer.train(corpus, 270).merges
    assert first.merges[0] == (ord("a"), ord("b"))
    tiny = text.BPETokenizer.train(["ab"], 1000)  # one chunk: a single merge is all there is
    assert tiny.vocab_size == 257 and tiny.encode("ab") == [256]
    with pytest.raises(ValueError, match="vocab_size must be an int >= 256"):
        text.BPETokenizer.train(corpus, 100)
    with pytest.raises(ValueError, match=r"unknown token id 999; ids must be in \[0, "):
        first.decode([999])
    with pytest.raises(TypeError, match="encode expects a str, got bytes"):
        first.encode(b"abc")


def test_simple_tokenizers():
    assert text.char_tokenize("三百") == ["三", "百"]
    assert text.word_tokenize("Twenty-one, please!") == ["twenty", "-", "one", ",", "please", "!"]
    assert text.word_tokenize("Hi", lower=False) == ["Hi"]


def test_vocab_specials_unknowns_and_order():
    vocab = text.Vocab.build([["b", "a", "b"], ["c", "b", "a"], ["rare"]], min_freq=2)
    assert vocab.itos == ["<pad>", "<unk>", "<bos>", "<eos>", "b", "a"]
    assert (vocab.pad_id, vocab.unk_id, vocab.bos_id, vocab.eos_id) == (0, 1, 2, 3)
    assert vocab["rare"] == vocab.unk_id
    ids = vocab.encode(["a", "b", "zzz"], add_bos_eos=True)
    assert ids == [2, 5, 4, 1, 3]
    assert vocab.decode(ids) == ["a", "b", "<unk>"]
    assert vocab.decode([2, 5, 3, 4, 0]) == ["a"]  # stops at <eos>


def test_pad_batch_and_mask():
    batch, mask = text.pad_batch([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert batch.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert mask.tolist() == [[True, True, True], [True, False, False], [True, True, False]]
    with pytest.raises(ValueError, match="at least one sequence"):
        text.pad_batch([])


@pytest.mark.parametrize("n,english,chinese", [
    (0, "zero", "零"), (7, "seven", "七"), (10, "ten", "十"), (15, "fifteen", "十五"),
    (20, "twenty", "二十"), (21, "twenty-one", "二十一"), (100, "one hundred", "一百"),
    (105, "one hundred and five", "一百零五"), (110, "one hundred and ten", "一百一十"),
    (321, "three hundred and twenty-one", "三百二十一"), (1000, "one thousand", "一千"),
    (1005, "one thousand and five", "一千零五"), (1010, "one thousand and ten", "一千零一十"),
    (1100, "one thousand one hundred", "一千一百"), (2020, "two thousand and twenty", "二千零二十"),
    (9999, "nine thousand nine hundred and ninety-nine", "九千九百九十九"),
])
def test_number_words(n, english, chinese):
    assert data.english_number(n) == english
    assert data.chinese_number(n) == chinese


def test_number_pairs_hold_out_unseen_numbers():
    pairs = data.number_translation_pairs(100, 999, test_fraction=0.2, seed=0)
    train_numbers = {n for n, _, _ in pairs["train"]}
    test_numbers = {n for n, _, _ in pairs["test"]}
    assert len(test_numbers) == 180 and len(train_numbers) == 720
    assert not train_numbers & test_numbers
    assert train_numbers | test_numbers == set(range(100, 1000))
    with pytest.raises(ValueError, match="covers the integers 0..9999"):
        data.chinese_number(10000)


def test_pretokenize_covers_the_text_and_gpt2_split_matches_gpt2():
    sample = "We'll serve max_len2 requests:\n    def f(x):  大模型即服务, naïve café 42!"
    assert "".join(text.pretokenize(sample)) == sample
    assert "".join(text.GPT2_SPLIT.findall(sample)) == sample
    assert text.pretokenize("It's  3") == ["It", "'", "s", "  ", "3"]
    # GPT-2's own pattern needs the third-party regex package (installed with transformers).
    regex = pytest.importorskip("regex")
    gpt2 = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    for s in (sample, "It's   3.14", "été ٣٤ 三百\t\n x"):
        assert text.GPT2_SPLIT.findall(s) == gpt2.findall(s)


# --------------------------------------------------------------------------- BLEU
def sacrebleu_score(hypotheses, references):
    """sacreBLEU on pre-tokenised text: tokens joined by spaces, no tokenizer, no smoothing."""
    sacrebleu = pytest.importorskip("sacrebleu")
    streams = list(zip(*references, strict=True))  # one stream per reference position
    return sacrebleu.corpus_bleu([" ".join(h) for h in hypotheses],
                                 [[" ".join(r) for r in stream] for stream in streams],
                                 tokenize="none", smooth_method="none", force=True)


def random_corpus(rng, refs_per_sentence):
    vocab = rng.choice([2, 3, 6, 20])
    words = lambda: [f"w{rng.randrange(vocab)}" for _ in range(rng.randint(0, 14))]  # noqa: E731
    sentences = rng.randint(1, 8)
    return ([words() for _ in range(sentences)],
            [[words() for _ in range(refs_per_sentence)] for _ in range(sentences)])


@pytest.mark.parametrize("refs_per_sentence", [1, 3])
def test_corpus_bleu_equals_sacrebleu_on_random_corpora(refs_per_sentence):
    import random

    rng = random.Random(refs_per_sentence)
    positive = 0
    for _ in range(300):
        hyps, refs = random_corpus(rng, refs_per_sentence)
        ours_refs = [r[0] for r in refs] if refs_per_sentence == 1 else refs
        stats = text.bleu_statistics(hyps, ours_refs)
        theirs = sacrebleu_score(hyps, refs)
        assert abs(text.corpus_bleu(hyps, ours_refs) - theirs.score) <= 1e-9
        assert list(stats.matches) == theirs.counts and list(stats.totals) == theirs.totals
        assert (stats.hyp_len, stats.ref_len) == (theirs.sys_len, theirs.ref_len)
        torch.testing.assert_close(stats.brevity_penalty, theirs.bp, rtol=1e-12, atol=1e-12)
        positive += stats.score > 0
    assert positive > 50  # most corpora have some 4-gram match, so scores are not all 0


@pytest.mark.parametrize("hyps, refs, expected", [
    ([["a", "b", "c", "d"]], [["a", "b", "c", "d"]], 100.0),  # identical
    ([[]], [["a", "b"]], 0.0),  # empty hypothesis: c = 0
    ([[], ["a", "b", "c", "d", "e"]], [["x"], ["a", "b", "c", "d", "e"]], None),  # one empty
    ([["a", "b", "c"]], [["a", "b", "c"]], 0.0),  # no 4-grams at all: p_4 = 0/0
    ([["a", "b", "c", "x", "d"]], [["a", "b", "c", "d", "e"]], 0.0),  # no 4-gram matches
    ([["a", "b", "c", "d"]], [["a", "b", "c", "d", "e", "f", "g", "h"]], None),  # short: BP < 1
    ([["a", "b", "c", "d", "a", "b", "c", "d"]], [["a", "b", "c", "d"]], None),  # long: BP = 1
])
def test_corpus_bleu_edge_cases(hyps, refs, expected):
    ours = text.corpus_bleu(hyps, refs)
    assert abs(ours - sacrebleu_score(hyps, [[r] for r in refs]).score) <= 1e-9
    if expected is not None:
        assert ours == expected


def test_bleu_pieces_follow_papineni():
    # Papineni et al. (2002), section 2.1: clipping gives the candidate "the the the the the
    # the the" a modified unigram precision of 2/7 against these two references.
    candidate = "the the the the the the the".split()
    references = ["the cat is on the mat".split(), "there is a cat on the mat".split()]
    stats = text.bleu_statistics([candidate], [references], max_order=1)
    assert stats.precisions == (2 / 7,) and stats.ref_len == 7 and stats.brevity_penalty == 1.0
    # brevity penalty exp(1 - r / c) with corpus totals, and the geometric mean of p_1..p_4
    hyp, ref = "a b c d e f".split(), "a b c d e f g h i".split()
    stats = text.bleu_statistics([hyp], [ref])
    assert (stats.hyp_len, stats.ref_len) == (6, 9) and stats.precisions == (1.0,) * 4
    assert stats.brevity_penalty == pytest.approx(math.exp(1 - 9 / 6))
    assert stats.score == pytest.approx(100 * math.exp(-0.5))
    hyp = "a b c d x a b".split()
    stats = text.bleu_statistics([hyp], [ref])
    assert stats.precisions == (4 / 7, 3 / 6, 2 / 5, 1 / 4)  # "a b" twice, clipped to once
    mean_log = sum(math.log(p) for p in stats.precisions) / 4
    assert stats.score == pytest.approx(100 * math.exp(1 - 9 / 7) * math.exp(mean_log))


def test_bleu_checks_its_arguments():
    with pytest.raises(ValueError, match="one reference entry per hypothesis, got 2"):
        text.corpus_bleu([["a"], ["b"]], [["a"]])
    with pytest.raises(TypeError, match=r"hypotheses\[0\] must be a list of tokens, got str"):
        text.corpus_bleu(["a b"], [["a", "b"]])
    with pytest.raises(TypeError, match=r"references\[0\] must be a list of tokens"):
        text.corpus_bleu([["a"]], ["a b"])
    with pytest.raises(ValueError, match="max_order must be an int >= 1"):
        text.corpus_bleu([["a"]], [["a"]], max_order=0)
