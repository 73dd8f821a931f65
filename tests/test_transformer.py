"""Chapters 6 and 7: positional encodings and Transformer blocks against PyTorch."""

import math

import pytest
import torch
from torch import nn

from aimodels import positional, transformer


def test_sinusoidal_table_follows_the_formula():
    pe = positional.sinusoidal_encoding(50, 16)
    assert pe.shape == (50, 16)
    for p in (0, 1, 7, 49):
        for i in range(8):
            angle = p / 10000 ** (2 * i / 16)
            assert pe[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    with pytest.raises(ValueError, match="d_model must be an even int"):
        positional.sinusoidal_encoding(10, 7)


@pytest.mark.parametrize("k", [1, 3, 20])
def test_shift_is_a_fixed_rotation(k):
    pe = positional.sinusoidal_encoding(64, 32).double()
    m = positional.shift_matrix(k, 32)
    torch.testing.assert_close(pe[k:], pe[:-k] @ m.T, atol=1e-6, rtol=0)
    torch.testing.assert_close(m @ m.T, torch.eye(32, dtype=torch.float64))  # a rotation


def test_dot_product_depends_only_on_distance():
    pe = positional.sinusoidal_encoding(200, 64).double()
    gram = pe @ pe.T
    for k in (0, 1, 5, 30):
        diagonal = torch.diagonal(gram, offset=k)
        torch.testing.assert_close(diagonal, torch.full_like(diagonal, diagonal[0].item()), atol=1e-5, rtol=0)


def test_encoding_modules_add_positions_and_refuse_long_inputs():
    for module in (positional.SinusoidalPositionalEncoding(8, max_len=10),
                   positional.LearnedPositionalEmbedding(8, max_len=10)):
        x = torch.zeros(2, 10, 8)
        out = module(x)
        assert out.shape == x.shape and not torch.equal(out[:, 0], out[:, 1])
        with pytest.raises(ValueError, match="sequence length 11 exceeds max_len=10"):
            module(torch.zeros(2, 11, 8))
        with pytest.raises(ValueError, match=r"expects \[batch, length, 8\], got \[2, 5, 6\]"):
            module(torch.zeros(2, 5, 6))
    sinusoidal = positional.SinusoidalPositionalEncoding(8, max_len=10)
    torch.testing.assert_close(sinusoidal(torch.zeros(1, 4, 8))[0], positional.sinusoidal_encoding(10, 8)[:4])
    assert list(sinusoidal.state_dict()) == []  # a buffer, not a parameter


def test_rope_scores_depend_only_on_the_offset():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(16, dtype=torch.float64, generator=g)
    k = torch.randn(16, dtype=torch.float64, generator=g)
    positions = torch.arange(64)
    rq = positional.apply_rotary(q.expand(64, 16).clone(), positions)
    rk = positional.apply_rotary(k.expand(64, 16).clone(), positions)
    for offset in (0, 3, 11):
        scores = torch.stack([rq[m] @ rk[m + offset] for m in range(0, 64 - offset)])
        torch.testing.assert_close(scores, torch.full_like(scores, scores[0].item()))
    assert not torch.isclose(rq[0] @ rk[3], rq[0] @ rk[5])  # but it does depend on the offset
    torch.testing.assert_close(rq.norm(dim=-1), q.norm().expand(64))  # rotations keep lengths


def _copy(ours, reference):
    missing = ours.load_state_dict(reference.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys


def test_encoder_block_matches_nn_transformer_encoder_layer():
    torch.manual_seed(0)
    reference = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, norm_first=True, batch_first=True)
    ours = transformer.EncoderBlock(32, 4, 64, dropout=0.0)
    _copy(ours, reference)
    reference.train()  # the training path, not the fused inference kernel
    x = torch.randn(3, 7, 32)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[1, -2:] = True
    torch.testing.assert_close(ours(x), reference(x))
    torch.testing.assert_close(ours(x, src_key_padding_mask=padding)[~padding],
                               reference(x, src_key_padding_mask=padding)[~padding])
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    torch.testing.assert_close(ours(x, src_mask=causal), reference(x, src_mask=causal))
    reference.eval()
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=1e-4)


def test_decoder_block_matches_nn_transformer_decoder_layer():
    torch.manual_seed(1)
    reference = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, norm_first=True, batch_first=True)
    ours = transformer.DecoderBlock(32, 4, 64, dropout=0.0)
    _copy(ours, reference)
    tgt, memory = torch.randn(2, 5, 32), torch.randn(2, 8, 32)
    memory_padding = torch.zeros(2, 8, dtype=torch.bool)
    memory_padding[0, -3:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    torch.testing.assert_close(
        ours(tgt, memory, tgt_mask=causal, memory_key_padding_mask=memory_padding),
        reference(tgt, memory, tgt_mask=causal, memory_key_padding_mask=memory_padding),
    )
    torch.testing.assert_close(ours(tgt, memory, tgt_is_causal=True),
                               reference(tgt, memory, tgt_mask=causal, tgt_is_causal=True))


def test_seq2seq_shapes_masks_and_greedy_decoding():
    torch.manual_seed(0)
    model = transformer.Seq2SeqTransformer(src_vocab=12, tgt_vocab=9, d_model=16, nhead=2,
                                           num_layers=1, dim_feedforward=32, dropout=0.0)
    src = torch.tensor([[5, 6, 7, 0], [4, 4, 0, 0]])
    tgt_in = torch.tensor([[2, 5, 6], [2, 7, 0]])
    assert model(src, tgt_in).shape == (2, 3, 9)
    # Causality: changing a later target token does not change earlier predictions.
    changed = tgt_in.clone()
    changed[0, 2] = 8
    torch.testing.assert_close(model(src, changed)[0, :2], model(src, tgt_in)[0, :2])
    # Padding: extra padding at the end of the source changes nothing.
    longer = torch.cat([src, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(longer, tgt_in), model(src, tgt_in))
    out = model.greedy_decode(src, bos_id=2, eos_id=3, max_len=6)
    assert out.shape[0] == 2 and out.shape[1] <= 6


def test_train_seq2seq_learns_to_copy():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    body = torch.randint(4, 10, (1024, 4), generator=g)
    src = body
    tgt = torch.cat([torch.full((1024, 1), 2), body, torch.full((1024, 1), 3)], dim=1)
    model = transformer.Seq2SeqTransformer(10, 10, d_model=32, nhead=4, num_layers=1,
                                           dim_feedforward=64, dropout=0.0)
    history = transformer.train_seq2seq(model, src, tgt, epochs=12, lr=3e-3)
    assert history[-1] < history[0] / 10
    out = model.greedy_decode(src[:32], bos_id=2, eos_id=3, max_len=5)
    # chance would be (1/6)**4 < 0.1%; a trained model copies most sequences exactly
    assert (out[:, :4] == body[:32]).all(dim=1).float().mean() > 0.6
