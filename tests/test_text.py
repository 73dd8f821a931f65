"""Chapter 8: tokenizers, BPE, vocabulary, padding and the number-words data."""

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
