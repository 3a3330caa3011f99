"""GPT-style and BERT-style example models in plain torch, as in the BitPipe paper's experiments.

- ``GPT``: token + position embedding, ``layers`` pre-LN blocks (causal self-attention, GELU MLP),
  final LayerNorm, LM head tied to the token embedding. Input: tokens (B, T) -> logits (B, T, vocab).
- ``Bert``: token + position embedding with LayerNorm, ``layers`` post-LN encoder blocks (padding-masked
  self-attention, GELU MLP), masked-LM head (dense, GELU, LayerNorm, decoder tied to the token embedding).
  Inputs: tokens (B, T), attention_mask (B, T; 1 = real token) -> logits (B, T, vocab).

Factories ``gpt(**cfg)`` / ``bert(**cfg)`` return ``(model, example_inputs)`` for ONE micro-batch of
``micro_batch`` sequences; the defaults (``GPTConfig()``, ``BertConfig()``) are tiny so tests run in seconds:
vocab 128, seq 16, dim 32, 2 heads, 4 layers, micro-batch 2. Weights are deterministic given ``seed``
(the global RNG is left untouched). Dropout defaults to 0.0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    """Sizes of the GPT-style decoder and its example micro-batch."""

    vocab: int = 128
    seq: int = 16
    dim: int = 32
    heads: int = 2
    layers: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    micro_batch: int = 2
    seed: int = 0


@dataclass(frozen=True)
class BertConfig(GPTConfig):
    """Sizes of the BERT-style encoder: the GPT-style fields plus the post-LN epsilon."""

    eps: float = 1e-12


class SelfAttention(nn.Module):
    """Multi-head self-attention; causal for the decoder, key-padding-masked for the encoder."""

    def __init__(self, dim: int, heads: int, dropout: float, causal: bool) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.heads, self.causal, self.dropout = heads, causal, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    """Two linear layers with a GELU between them."""

    def __init__(self, dim: int, ratio: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, ratio * dim)
        self.proj = nn.Linear(ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class GPTBlock(nn.Module):
    """Pre-LN decoder block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.attn = SelfAttention(cfg.dim, cfg.heads, cfg.dropout, causal=True)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.mlp = MLP(cfg.dim, cfg.mlp_ratio)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    """GPT-style causal LM with the LM head tied to the token embedding."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab, cfg.dim)
        self.pos_emb = nn.Embedding(cfg.seq, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(GPTBlock(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        self.head.weight = self.tok_emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class BertBlock(nn.Module):
    """Post-LN encoder block: ln(x + attn(x)), then ln(x + mlp(x))."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(cfg.dim, cfg.heads, cfg.dropout, causal=False)
        self.ln1 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.mlp = MLP(cfg.dim, cfg.mlp_ratio)
        self.ln2 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.drop(self.attn(x, mask)))
        return self.ln2(x + self.drop(self.mlp(x)))


class Bert(nn.Module):
    """BERT-style masked LM with the decoder tied to the token embedding."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab, cfg.dim)
        self.pos_emb = nn.Embedding(cfg.seq, cfg.dim)
        self.emb_ln = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(BertBlock(cfg) for _ in range(cfg.layers))
        self.mlm_dense = nn.Linear(cfg.dim, cfg.dim)
        self.mlm_ln = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.decoder = nn.Linear(cfg.dim, cfg.vocab)
        self.decoder.weight = self.tok_emb.weight

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.drop(self.emb_ln(self.tok_emb(tokens) + self.pos_emb(positions)))
        mask = attention_mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, T): which keys may be attended
        for block in self.blocks:
            x = block(x, mask)
        return self.decoder(self.mlm_ln(F.gelu(self.mlm_dense(x))))


def _init_weights(model: nn.Module, seed: int) -> None:
    """GPT-2 style init (normal, std 0.02; residual projections scaled by depth), from a private generator."""
    gen = torch.Generator().manual_seed(seed)
    depth = len(getattr(model, "blocks", ())) or 1
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.ones_like(p) if "ln" in name and name.endswith("weight") else torch.zeros_like(p))
            else:
                std = 0.02 / math.sqrt(2 * depth) if name.endswith("proj.weight") else 0.02
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def _config(cls: type, cfg: dict[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise TypeError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
    return replace(cls(), **cfg)


def gpt_config(**cfg: Any) -> GPTConfig:
    """GPTConfig with the given fields changed."""
    return _config(GPTConfig, cfg)


def bert_config(**cfg: Any) -> BertConfig:
    """BertConfig with the given fields changed."""
    return _config(BertConfig, cfg)


def gpt(**cfg: Any) -> tuple[GPT, tuple[torch.Tensor]]:
    """A GPT-style model and the example inputs of one micro-batch: ``(tokens,)``."""
    c = gpt_config(**cfg)
    model = GPT(c)
    _init_weights(model, c.seed)
    tokens, _ = lm_batch(c.vocab, c.micro_batch, c.seq, seed=c.seed + 1)
    return model, (tokens,)


def bert(**cfg: Any) -> tuple[Bert, tuple[torch.Tensor, torch.Tensor]]:
    """A BERT-style model and the example inputs of one micro-batch: ``(tokens, attention_mask)``."""
    c = bert_config(**cfg)
    model = Bert(c)
    _init_weights(model, c.seed)
    tokens, mask, _ = mlm_batch(c.vocab, c.micro_batch, c.seq, seed=c.seed + 1)
    return model, (tokens, mask)


def lm_batch(vocab: int, batch: int, seq: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random causal-LM data: tokens (batch, seq) and next-token targets (batch, seq)."""
    gen = torch.Generator().manual_seed(seed)
    stream = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
    return stream[:, :-1].contiguous(), stream[:, 1:].contiguous()


def mlm_batch(
    vocab: int, batch: int, seq: int, *, seed: int = 0, mask_prob: float = 0.15
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random masked-LM data: tokens, attention_mask (last quarter of each row is padding) and targets
    (the original token at masked positions, -100 elsewhere; token 0 plays [MASK])."""
    gen = torch.Generator().manual_seed(seed)
    original = torch.randint(1, vocab, (batch, seq), generator=gen)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[:, seq - seq // 4 :] = 0
    masked = (torch.rand(batch, seq, generator=gen) < mask_prob) & attention_mask.bool()
    masked[:, 0] = True  # at least one target per row
    tokens = torch.where(masked, torch.zeros_like(original), original)
    targets = torch.where(masked, original, torch.full_like(original, -100))
    return tokens, attention_mask, targets


def lm_loss(logits: Any, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the vocabulary, ignoring targets of -100 (for masked LM).

    ``logits`` is a (..., vocab) tensor, or a model output with a ``logits`` field (Hugging Face).
    """
    if not isinstance(logits, torch.Tensor):
        logits = logits["logits"] if isinstance(logits, dict) else logits.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
