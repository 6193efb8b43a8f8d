"""A Llama-style decoder (RMSNorm, RoPE, grouped-query attention with a KV cache, SwiGLU).

Presets: "tiny" (the default ``Config()``, for CPU tests) and "0.5b", the shape of a small real
model (Qwen2-0.5B's: 24 layers, width 896, 14 query heads sharing 2 key/value heads, vocabulary
151936), with random weights generated at start-up (nothing is downloaded).
"""
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Config:
    vocab: int = 512
    dim: int = 64
    layers: int = 2
    heads: int = 4
    hidden: int = 172
    max_len: int = 256
    seed: int = 0
    kv_heads: int = 0  # key/value heads (grouped-query attention); 0: as many as ``heads``
    tied: bool = False  # the output head shares the embedding's weights

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def kv(self) -> int:
        """The number of key/value heads."""
        return self.kv_heads or self.heads


PRESETS = {
    "tiny": Config(),
    "0.5b": Config(vocab=151936, dim=896, layers=24, heads=14, kv_heads=2, hidden=4864, tied=True),
}


def preset(name: str, **changes) -> Config:
    """The configuration ``name`` of :data:`PRESETS`, with ``changes`` (for example ``max_len``)."""
    if name not in PRESETS:
        raise ValueError(f"preset: {name!r} is not one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **changes)


class KVCache:
    """Keys and values of every layer for ``batch`` sequences of up to ``max_len`` tokens."""

    def __init__(self, cfg: Config, batch: int, device):
        shape = (cfg.layers, batch, cfg.kv, cfg.max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device)
        self.v = torch.zeros(shape, device=device)
        self.length = 0

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep the cache rows ``rows`` (beam search picks parent beams)."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]


def _rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` (..., t, d) at ``positions`` (t,) (float32)."""
    d = x.shape[-1]
    freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device=x.device).float() / d))
    angle = positions[:, None] * freq
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2)


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.heads, self.kv = cfg.heads, cfg.kv
        self.norm1, self.norm2 = nn.RMSNorm(cfg.dim), nn.RMSNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, cfg.dim + 2 * cfg.kv * cfg.head_dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.gate_up = nn.Linear(cfg.dim, 2 * cfg.hidden, bias=False)
        self.down = nn.Linear(cfg.hidden, cfg.dim, bias=False)

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor):
        """Queries (b, heads, t, hd) and keys, values (b, kv, t, hd) of x (b, t, d) at ``positions`` (t,)."""
        b, t, d = x.shape
        hd = d // self.heads
        q, k, v = self.qkv(self.norm1(x)).split((d, self.kv * hd, self.kv * hd), -1)
        q, k = (_rope(y.view(b, t, -1, hd).transpose(1, 2), positions) for y in (q, k))
        return q, k, v.view(b, t, self.kv, hd).transpose(1, 2)

    def _rest(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        x = x + self.out(attn.transpose(1, 2).reshape(b, t, d))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, -1)
        return x + self.down(nn.functional.silu(gate) * up)

    def forward(self, x: torch.Tensor, cache: KVCache, layer: int) -> torch.Tensor:
        t = x.shape[1]
        start = cache.length
        q, k, v = self._qkv(x, torch.arange(start, start + t, device=x.device).float())
        cache.k[layer, :, :, start:start + t] = k
        cache.v[layer, :, :, start:start + t] = v
        keys, values = cache.k[layer, :, :, :start + t], cache.v[layer, :, :, :start + t]
        attn = nn.functional.scaled_dot_product_attention(q, keys, values, is_causal=start == 0 and t > 1,
                                                          enable_gqa=self.kv != self.heads)
        return self._rest(x, attn)

    def decode(self, x: torch.Tensor, cache: KVCache, layer: int, position: torch.Tensor) -> torch.Tensor:
        """One token per row (x: (b, 1, d)) at ``position`` (a (1,) int64 tensor on the device):
        static shapes and no host synchronisation, so a CUDA graph can capture it."""
        q, k, v = self._qkv(x, position.float())
        cache.k[layer].index_copy_(2, position, k)
        cache.v[layer].index_copy_(2, position, v)
        visible = (torch.arange(cache.k.shape[3], device=x.device) <= position).view(1, 1, 1, -1)  # keys up to this token
        attn = nn.functional.scaled_dot_product_attention(q, cache.k[layer], cache.v[layer], attn_mask=visible,
                                                          enable_gqa=self.kv != self.heads)
        return self._rest(x, attn)


class Llama(nn.Module):
    """Random weights from ``cfg.seed``; ``forward`` returns the last position's logits (batch, vocab)."""

    def __init__(self, cfg: Config):
        super().__init__()
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        if cfg.tied:
            self.head.weight = self.embed.weight

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        cache.length += tokens.shape[1]
        return self._logits(x[:, -1])

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, cache: KVCache, position: torch.Tensor) -> torch.Tensor:
        """``forward`` for one new token per row (tokens (batch, 1)) at ``position``, a (1,) int64
        tensor on the model's device that the caller advances: every shape is fixed and nothing is
        read back to the host, so the step can be captured in a CUDA graph and replayed."""
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            x = block.decode(x, cache, i, position)
        return self._logits(x[:, -1])

    def _logits(self, last: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(last)) * 4.0  # a peaked distribution, like a trained model's
