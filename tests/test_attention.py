"""Chapter 7: attention from scratch against PyTorch's."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aimodels import attention


def _random_mask(generator, shape, kind):
    if kind == "bool":
        return torch.rand(shape, generator=generator) > 0.3
    if kind == "float":
        return torch.randn(shape, generator=generator, dtype=torch.float64)
    return None


@pytest.mark.parametrize("kind", [None, "bool", "float"])
def test_sdpa_matches_pytorch_over_random_shapes_and_masks(kind):
    g = torch.Generator().manual_seed(0)
    for _ in range(25):
        batch, heads, length, source, d_k, d_v = (int(v) for v in torch.randint(1, 7, (6,), generator=g))
        q = torch.randn(batch, heads, length, d_k, generator=g, dtype=torch.float64)
        k = torch.randn(batch, heads, source, d_k, generator=g, dtype=torch.float64)
        v = torch.randn(batch, heads, source, d_v, generator=g, dtype=torch.float64)
        shape = (length, source) if torch.rand(1, generator=g) < 0.5 else (batch, 1, length, source)
        mask = _random_mask(g, shape, kind)
        torch.testing.assert_close(
            attention.scaled_dot_product_attention(q, k, v, attn_mask=mask),
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        )


@pytest.mark.parametrize("length,source", [(5, 5), (3, 7), (6, 4)])
def test_sdpa_causal_and_scale_match_pytorch(length, source):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, length, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, source, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, source, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(attention.scaled_dot_product_attention(q, k, v, is_causal=True),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))
    torch.testing.assert_close(attention.scaled_dot_product_attention(q, k, v, scale=0.3),
                               F.scaled_dot_product_attention(q, k, v, scale=0.3))


def test_fully_masked_rows_give_zeros_like_pytorch():
    q, k, v = torch.randn(1, 3, 4), torch.randn(1, 5, 4), torch.randn(1, 5, 2)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    ours = attention.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert torch.all(ours[0, 1] == 0)


def test_sdpa_errors():
    with pytest.raises(ValueError, match="either attn_mask or is_causal"):
        attention.scaled_dot_product_attention(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3),
                                               attn_mask=torch.ones(2, 2, dtype=torch.bool), is_causal=True)
    with pytest.raises(ValueError, match=r"expected q \[..., L, d\], k \[..., S, d\]"):
        attention.scaled_dot_product_attention(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3))


def _pair(embed_dim=16, heads=4):
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(embed_dim, heads, batch_first=True)
    ours = attention.MultiHeadAttention(embed_dim, heads)
    return ours, reference


def test_mha_state_dicts_load_both_ways():
    ours, reference = _pair()
    assert list(ours.state_dict()) == ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]
    assert list(ours.state_dict()) == list(reference.state_dict())
    ours.load_state_dict(reference.state_dict())
    other = nn.MultiheadAttention(16, 4, batch_first=True)
    other.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(other(x, x, x)[0], ours(x, x, x)[0])


@pytest.mark.parametrize("masks", ["none", "padding", "bool", "float", "both", "causal"])
def test_mha_outputs_and_weights_match(masks):
    ours, reference = _pair()
    ours.load_state_dict(reference.state_dict())
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 6, 16, generator=g)
    memory = torch.randn(3, 9, 16, generator=g)
    padding = torch.zeros(3, 9, dtype=torch.bool)
    padding[0, -3:] = True
    padding[2, -1] = True
    blocked = torch.rand(6, 9, generator=g) > 0.7
    blocked[:, 0] = False
    kwargs = {
        "none": {},
        "padding": {"key_padding_mask": padding},
        "bool": {"attn_mask": blocked},
        "float": {"attn_mask": torch.randn(6, 9, generator=g)},
        "both": {"attn_mask": blocked, "key_padding_mask": padding},
        "causal": {},
    }[masks]
    if masks == "causal":
        causal = nn.Transformer.generate_square_subsequent_mask(6)
        out, weights = ours(x, x, x, attn_mask=causal)
        ref_out, ref_weights = reference(x, x, x, attn_mask=causal)
        torch.testing.assert_close(ours(x, x, x, is_causal=True)[0], ref_out)
    else:
        out, weights = ours(x, memory, memory, **kwargs)
        ref_out, ref_weights = reference(x, memory, memory, **kwargs)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(weights, ref_weights)


def test_mha_errors():
    with pytest.raises(ValueError, match="divisible by num_heads, got 10 and 3"):
        attention.MultiHeadAttention(10, 3)
    ours = attention.MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match=r"expected key of shape \[batch, length, 8\], got \[2, 5, 6\]"):
        ours(torch.zeros(2, 5, 8), torch.zeros(2, 5, 6), torch.zeros(2, 5, 8))
    with pytest.raises(ValueError, match=r"key_padding_mask of shape \[batch, source length\] = \[2, 5\]"):
        ours(torch.zeros(2, 5, 8), torch.zeros(2, 5, 8), torch.zeros(2, 5, 8),
             key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    assert ours(torch.zeros(2, 5, 8), torch.zeros(2, 5, 8), torch.zeros(2, 5, 8), need_weights=False)[1] is None


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("block_size", [1, 7, 64, 200])
@pytest.mark.parametrize("shape", [(1, 1), (13, 13), (100, 100), (5, 12), (12, 5)])
def test_tiled_attention_matches_pytorch(shape, block_size, is_causal):
    length, source = shape
    g = torch.Generator().manual_seed(length * 1000 + source)
    q = torch.randn(2, 3, length, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, 3, source, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, source, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(attention.tiled_attention(q, k, v, block_size, is_causal),
                               F.scaled_dot_product_attention(q, k, v, is_causal=is_causal))


@pytest.mark.parametrize("is_causal", [False, True])
def test_tiled_attention_float32_and_unbatched(is_causal):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(130, 64, generator=g) for _ in range(3))  # T not a multiple of 64
    ours = attention.tiled_attention(q, k, v, block_size=64, is_causal=is_causal)
    assert ours.dtype == torch.float32 and ours.shape == (130, 64)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, is_causal=is_causal))


def test_tiled_attention_broadcasts_leading_dimensions():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 9, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 4, 11, 8, generator=g, dtype=torch.float64)
    v = torch.randn(1, 4, 11, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(attention.tiled_attention(q, k, v, block_size=4),
                               F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("is_causal", [False, True])
def test_tiled_attention_gradients_match_pytorch(is_causal):
    g = torch.Generator().manual_seed(5)
    shapes = [(2, 10, 6), (2, 10, 6), (2, 10, 4)]
    ours = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    theirs = [x.detach().clone().requires_grad_() for x in ours]
    weight = torch.randn(2, 10, 4, generator=g, dtype=torch.float64)
    (attention.tiled_attention(*ours, block_size=3, is_causal=is_causal) * weight).sum().backward()
    (F.scaled_dot_product_attention(*theirs, is_causal=is_causal) * weight).sum().backward()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    assert torch.autograd.gradcheck(
        lambda q, k, v: attention.tiled_attention(q, k, v, block_size=4, is_causal=is_causal),
        [x.detach().requires_grad_() for x in ours])


def test_tiled_attention_errors():
    q = k = v = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        attention.tiled_attention(q, k, v, block_size=0)
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        attention.tiled_attention(q, k, v, block_size=2.5)
    with pytest.raises(ValueError, match=r"expected q \[..., L, d\], k \[..., S, d\]"):
        attention.tiled_attention(q, torch.zeros(4, 7), v)
    with pytest.raises(ValueError, match=r"expected q \[..., L, d\], k \[..., S, d\]"):
        attention.tiled_attention(q, k, torch.zeros(5, 8))
    with pytest.raises(ValueError, match="expected k to be a floating-point tensor"):
        attention.tiled_attention(q, torch.zeros(4, 8, dtype=torch.long), v)
    with pytest.raises(ValueError, match="expected v to be a floating-point tensor"):
        attention.tiled_attention(q, k, torch.zeros(8))


# --------------------------------------------------------------------------- the decoder
# tests/test_transformer.py already checks DecoderBlock's output against
# nn.TransformerDecoderLayer; these tests add what Chapter 7 shows about the decoder.
def _decoder_pair(seed=0):
    from aimodels.transformer import DecoderBlock

    torch.manual_seed(seed)
    reference = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, norm_first=True, batch_first=True)
    ours = DecoderBlock(16, 4, 32, dropout=0.0)
    with torch.no_grad():  # LayerNorms that are not the identity, so that their place matters
        for name, p in reference.named_parameters():
            if name.startswith("norm"):
                p.add_(0.3 * torch.randn_like(p))
    ours.load_state_dict(reference.state_dict())
    return ours, reference


def test_cross_attention_heads_match_pytorch():
    """Queries from the decoder [B, T_dec, d], keys and values from the encoder [B, T_enc, d]:
    per-head weights [B, h, T_dec, T_enc] equal nn.MultiheadAttention's."""
    ours, reference = _decoder_pair()
    g = torch.Generator().manual_seed(6)
    query, memory = torch.randn(3, 5, 16, generator=g), torch.randn(3, 8, 16, generator=g)
    padding = torch.zeros(3, 8, dtype=torch.bool)
    padding[1, -3:] = True
    q, k, v = ours.multihead_attn.project_heads(query, memory, memory)
    assert q.shape == (3, 4, 5, 4) and k.shape == v.shape == (3, 4, 8, 4)
    weights = attention.attention_weights(q, k, attn_mask=~padding[:, None, None, :])
    out, ref_weights = reference.multihead_attn(query, memory, memory, key_padding_mask=padding,
                                                average_attn_weights=False)
    assert weights.shape == ref_weights.shape == (3, 4, 5, 8)
    torch.testing.assert_close(weights, ref_weights)
    torch.testing.assert_close(ours.multihead_attn.merge_heads(weights @ v), out)
    assert torch.all(weights[1, ..., -3:] == 0)


def test_decoder_block_gradients_match_nn_transformer_decoder_layer():
    ours, reference = _decoder_pair(seed=1)
    g = torch.Generator().manual_seed(7)
    tgt, memory = torch.randn(2, 6, 16, generator=g), torch.randn(2, 9, 16, generator=g)
    tgt_padding = torch.zeros(2, 6, dtype=torch.bool)
    tgt_padding[0, -2:] = True  # right padding: every query still sees key 0
    memory_padding = torch.zeros(2, 9, dtype=torch.bool)
    memory_padding[1, -4:] = True
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)  # bool like the padding: True = masked
    weight = torch.randn(2, 6, 16, generator=g)
    (ours(tgt, memory, tgt_key_padding_mask=tgt_padding, memory_key_padding_mask=memory_padding,
          tgt_is_causal=True) * weight).sum().backward()
    (reference(tgt, memory, tgt_mask=causal, tgt_key_padding_mask=tgt_padding,
               memory_key_padding_mask=memory_padding, tgt_is_causal=True) * weight).sum().backward()
    theirs = dict(reference.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, msg=f"gradient of {name}")


def test_decoder_is_causal_in_the_target_and_sees_all_of_the_source():
    ours, _ = _decoder_pair(seed=2)
    g = torch.Generator().manual_seed(8)
    tgt, memory = torch.randn(2, 7, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    changed_tgt, changed_memory = tgt.clone(), memory.clone()
    changed_tgt[:, 4:] = torch.randn(2, 3, 16, generator=g)
    changed_memory[:, -1] += 1.0
    with torch.no_grad():
        base = ours(tgt, memory, tgt_is_causal=True)
        later = ours(changed_tgt, memory, tgt_is_causal=True)
        source = ours(tgt, changed_memory, tgt_is_causal=True)
        unmasked = ours(changed_tgt, memory) - ours(tgt, memory)
        prefix = ours(tgt[:, :4], memory, tgt_is_causal=True)
    torch.testing.assert_close(later[:, :4], base[:, :4])  # positions 0..3 never see 4..6
    assert ((later - base)[:, 4:].abs().amax(-1) > 1e-4).all()
    assert ((source - base).abs().amax(-1) > 1e-4).all()  # cross-attention has no causal mask
    assert (unmasked[:, :4].abs().amax(-1) > 1e-4).all()  # without the mask, the future leaks
    torch.testing.assert_close(prefix, base[:, :4])  # a prefix gives the same outputs: generation
