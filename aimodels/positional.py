"""Position information for attention (Chapter 6): sinusoidal, learned and rotary encodings.

Attention compares every token with every other and ignores their order. These
encodings put the order back: the sinusoidal table of Vaswani et al. (2017), a learned
table, and rotary embeddings (RoPE, Su et al., 2021), which rotate queries and keys so
that their dot product depends only on the distance between positions.
"""

from __future__ import annotations

import torch
from torch import nn

Tensor = torch.Tensor


def _check_even(d_model: int) -> None:
    if not isinstance(d_model, int) or d_model < 2 or d_model % 2:
        raise ValueError(f"d_model must be an even int >= 2 (sin/cos pairs), got {d_model!r}")


def frequencies(d_model: int, base: float = 10000.0) -> Tensor:
    r"""The angular frequencies :math:`\omega_i = \text{base}^{-2i/d}` for i = 0..d/2-1."""
    _check_even(d_model)
    return base ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)


def sinusoidal_encoding(max_len: int, d_model: int, base: float = 10000.0,
                        dtype: torch.dtype = torch.float32) -> Tensor:
    r"""The table ``PE[max_len, d_model]`` of Vaswani et al. (2017).

    :math:`PE_{p,2i} = \sin(p\,\omega_i)` and :math:`PE_{p,2i+1} = \cos(p\,\omega_i)` with
    :math:`\omega_i = 10000^{-2i/d}`: each pair of dimensions is a clock running at its own
    speed, from one turn every :math:`2\pi` positions down to one every
    :math:`2\pi \cdot 10000`.
    """
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    angles = torch.arange(max_len, dtype=torch.float64)[:, None] * frequencies(d_model, base)
    table = torch.empty(max_len, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table.to(dtype)


def shift_matrix(k: int, d_model: int, base: float = 10000.0) -> Tensor:
    r"""The fixed linear map :math:`M_k` with :math:`PE(p + k) = M_k\, PE(p)` for every p.

    Block diagonal: for each frequency, the 2×2 rotation
    :math:`\begin{pmatrix}\cos k\omega & \sin k\omega \\ -\sin k\omega & \cos k\omega\end{pmatrix}`
    acting on the pair :math:`(\sin p\omega, \cos p\omega)`.
    """
    matrix = torch.zeros(d_model, d_model, dtype=torch.float64)
    for i, omega in enumerate(frequencies(d_model, base)):
        c, s = torch.cos(k * omega), torch.sin(k * omega)
        matrix[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = torch.stack([torch.stack([c, s]),
                                                                    torch.stack([-s, c])])
    return matrix


def _check_batch(x: Tensor, max_len: int, d_model: int, owner: str) -> None:
    if x.ndim != 3 or x.shape[-1] != d_model:
        raise ValueError(f"{owner} expects [batch, length, {d_model}], got {list(x.shape)}")
    if x.shape[1] > max_len:
        raise ValueError(
            f"{owner}: sequence length {x.shape[1]} exceeds max_len={max_len}; "
            f"build the encoding with a larger max_len"
        )


class SinusoidalPositionalEncoding(nn.Module):
    """Adds the sinusoidal table to a batch ``[batch, length, d_model]``, any length <= max_len.

    The table is a buffer, not a parameter: it is not trained, and it moves with the
    module between devices.
    """

    def __init__(self, d_model: int, max_len: int = 512) -> None:
        super().__init__()
        self.d_model, self.max_len = d_model, max_len
        self.register_buffer("pe", sinusoidal_encoding(max_len, d_model), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        _check_batch(x, self.max_len, self.d_model, type(self).__name__)
        return x + self.pe[: x.shape[1]].to(x.dtype)


class LearnedPositionalEmbedding(nn.Module):
    """Adds a trained vector per position, looked up by position index 0..length-1."""

    def __init__(self, d_model: int, max_len: int = 512) -> None:
        super().__init__()
        self.d_model, self.max_len = d_model, max_len
        self.embedding = nn.Embedding(max_len, d_model)

    def forward(self, x: Tensor) -> Tensor:
        _check_batch(x, self.max_len, self.d_model, type(self).__name__)
        positions = torch.arange(x.shape[1], device=x.device)
        return x + self.embedding(positions)


def apply_rotary(x: Tensor, positions: Tensor | None = None, base: float = 10000.0) -> Tensor:
    r"""Rotary position embedding (RoPE): rotate each pair of dimensions by :math:`p\,\omega_i`.

    ``x`` is ``[..., length, d]``; position p defaults to the index along ``length``.
    Pair i, :math:`(x_{2i}, x_{2i+1})`, is rotated by the angle :math:`p\,\omega_i`.
    Because rotations compose, :math:`\langle R_m q, R_n k\rangle = \langle q, R_{n-m} k\rangle`:
    the attention score depends on the offset n - m only, never on m and n themselves.
    """
    d = x.shape[-1]
    omega = frequencies(d, base).to(x.device)
    if positions is None:
        positions = torch.arange(x.shape[-2], device=x.device)
    angles = positions.to(torch.float64)[:, None] * omega  # [length, d/2]
    cos, sin = torch.cos(angles).to(x.dtype), torch.sin(angles).to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    rotated = torch.empty_like(x)
    rotated[..., 0::2] = even * cos - odd * sin
    rotated[..., 1::2] = even * sin + odd * cos
    return rotated


class PositionProbe(nn.Module):
    """A one-layer attention classifier used to test whether position information arrives.

    Embeds tokens, applies ``position`` (a module that maps ``[B, T, d]`` to ``[B, T, d]``,
    or ``None`` for no position information), runs one self-attention layer, averages
    over positions and classifies. Averaging forgets the order, so any order-dependent
    task can only be solved through the positional encoding. With
    ``position_reads_tokens=True`` the module is called as ``position(x, tokens)``, which
    lets Chapter 6 reproduce the bug of indexing positions by token id.
    """

    def __init__(self, vocab_size: int, d_model: int, num_classes: int,
                 position: nn.Module | None, num_heads: int = 4,
                 position_reads_tokens: bool = False) -> None:
        super().__init__()
        self.position_reads_tokens = position_reads_tokens
        from aimodels.attention import MultiHeadAttention

        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = position if position is not None else nn.Identity()
        self.attention = MultiHeadAttention(d_model, num_heads)
        self.feed_forward = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.ReLU(),
                                          nn.Linear(4 * d_model, d_model))
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        x = self.position(x, tokens) if self.position_reads_tokens else self.position(x)
        x = x + self.attention(x, x, x, need_weights=False)[0]
        x = x + self.feed_forward(x)
        return self.head(x.mean(dim=1))
