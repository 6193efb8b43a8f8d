"""A small Llama-style decoder (RMSNorm, RoPE, multi-head attention with a KV cache, SwiGLU)."""
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


class KVCache:
    """Keys and values of every layer for ``batch`` sequences of up to ``max_len`` tokens."""

    def __init__(self, cfg: Config, batch: int, device):
        shape = (cfg.layers, batch, cfg.heads, cfg.max_len, cfg.dim // cfg.heads)
        self.k = torch.zeros(shape, device=device)
        self.v = torch.zeros(shape, device=device)
        self.length = 0

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep the cache rows ``rows`` (beam search picks parent beams)."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]


def _rope(x: torch.Tensor, start: int) -> torch.Tensor:
    d = x.shape[-1]
    freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device=x.device).float() / d))
    angle = torch.arange(start, start + x.shape[-2], device=x.device).float()[:, None] * freq
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2)


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.heads = cfg.heads
        self.norm1, self.norm2 = nn.RMSNorm(cfg.dim), nn.RMSNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.gate_up = nn.Linear(cfg.dim, 2 * cfg.hidden, bias=False)
        self.down = nn.Linear(cfg.hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cache: KVCache, layer: int) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        start = cache.length
        q, k = _rope(q, start), _rope(k, start)
        cache.k[layer, :, :, start:start + t] = k
        cache.v[layer, :, :, start:start + t] = v
        keys, values = cache.k[layer, :, :, :start + t], cache.v[layer, :, :, :start + t]
        attn = nn.functional.scaled_dot_product_attention(q, keys, values, is_causal=start == 0 and t > 1)
        x = x + self.out(attn.transpose(1, 2).reshape(b, t, d))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, -1)
        return x + self.down(nn.functional.silu(gate) * up)


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

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        cache.length += tokens.shape[1]
        return self.head(self.norm(x[:, -1])) * 4.0  # a peaked distribution, like a trained model's
