"""A plain Llama with LoRA on every linear, extra input-only embedding rows and the KVLink mask."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool = True
    name: str = ""
    rope_freq_factors: Optional[list[float]] = None  # llama.cpp rope_freqs (Llama-3 scaling)

    def to_dict(self) -> dict:
        return asdict(self)


def kvlink_mask(seg: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask [B,1,L,L] (True = may attend) from segment ids [B,L].

    Query t may attend key s iff s <= t and (seg[t] == seg[s] or seg[t] == 0) (KVLINK.md §2).
    Padding (segment -1) attends only to itself and is never attended by other tokens.
    """
    L = seg.shape[-1]
    idx = torch.arange(L, device=seg.device)
    causal = idx[None, :] <= idx[:, None]  # [t, s]
    q = seg[:, :, None]
    k = seg[:, None, :]
    allowed = causal & ((q == k) | (q == 0)) & (k >= 0) & (q >= 0)
    pad_self = (q < 0) & (idx[:, None] == idx[None, :])
    return (allowed | pad_self)[:, None]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * self.weight.float()


class LoRALinear(nn.Module):
    """y = x W^T + (alpha/r) * (x A^T) B^T; W frozen, A [r,in] and B [out,r] trainable."""

    def __init__(self, in_f: int, out_f: int, r: int, alpha: float, dropout: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_f, in_f), requires_grad=False)
        self.r = r
        if r > 0:
            self.lora_A = nn.Parameter(torch.empty(r, in_f))
            self.lora_B = nn.Parameter(torch.zeros(out_f, r))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT
            self.scaling = alpha / r
            self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.r > 0:
            y = y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling
        return y


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig, r: int, alpha: float, dropout: float):
        super().__init__()
        self.nh, self.nkv, self.hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        H = c.hidden_size
        self.q_proj = LoRALinear(H, self.nh * self.hd, r, alpha, dropout)
        self.k_proj = LoRALinear(H, self.nkv * self.hd, r, alpha, dropout)
        self.v_proj = LoRALinear(H, self.nkv * self.hd, r, alpha, dropout)
        self.o_proj = LoRALinear(self.nh * self.hd, H, r, alpha, dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.nkv, self.hd).transpose(1, 2)
        dt = v.dtype
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(dt)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(dt)
        rep = self.nh // self.nkv
        if rep > 1:  # explicit GQA expansion keeps SDPA on its masked memory-efficient kernel
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(o.transpose(1, 2).reshape(B, L, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, c: LlamaConfig, r: int, alpha: float, dropout: float):
        super().__init__()
        H, I = c.hidden_size, c.intermediate_size
        self.gate_proj = LoRALinear(H, I, r, alpha, dropout)
        self.up_proj = LoRALinear(H, I, r, alpha, dropout)
        self.down_proj = LoRALinear(I, H, r, alpha, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: LlamaConfig, r: int, alpha: float, dropout: float):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c, r, alpha, dropout)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c, r, alpha, dropout)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask).float()
        return h + self.mlp(self.post_attention_layernorm(h)).float()


class Inner(nn.Module):
    def __init__(self, c: LlamaConfig, n_extra: int, r: int, alpha: float, dropout: float):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.extra_embeddings = nn.Parameter(torch.zeros(n_extra, c.hidden_size)) if n_extra > 0 else None
        self.layers = nn.ModuleList(Block(c, r, alpha, dropout) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class KVLinkLlama(nn.Module):
    """Llama whose input vocabulary is base vocab + n_extra trainable rows (ids vocab_size..)."""

    def __init__(self, c: LlamaConfig, n_extra: int = 0, lora_r: int = 16, lora_alpha: float = 32.0,
                 lora_dropout: float = 0.0):
        super().__init__()
        self.config = c
        self.n_extra = n_extra
        self.lora_r, self.lora_alpha = lora_r, lora_alpha
        self.model = Inner(c, n_extra, lora_r, lora_alpha, lora_dropout)
        self.lm_head = None if c.tie_word_embeddings else nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if self.lm_head is not None:
            self.lm_head.weight.requires_grad_(False)
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim))
        if c.rope_freq_factors is not None:
            inv = inv / torch.tensor(c.rope_freq_factors, dtype=torch.float64)
        self.register_buffer("inv_freq", inv.float(), persistent=False)
        self.grad_checkpointing = False
        self.ce_chunk = 4096  # labelled rows per lm_head chunk in training

    # --- setup -----------------------------------------------------------------------------
    def load_base(self, state: dict[str, torch.Tensor]) -> None:
        """Load frozen base weights (HF names); every base weight must be present."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        if unexpected:
            raise KeyError(f"unexpected base weights: {unexpected[:5]}")
        base_missing = [m for m in missing if "lora_" not in m and "extra_embeddings" not in m]
        if base_missing:
            raise KeyError(f"missing base weights: {base_missing[:5]}")

    def init_extra(self, generator: Optional[torch.Generator] = None) -> None:
        """Extra rows = mean of the base rows + noise of 1/10 their per-dim spread."""
        if self.model.extra_embeddings is None:
            return
        e = self.model.embed_tokens.weight.detach().float()
        mean, std = e.mean(0), e.std(0)
        noise = torch.randn(self.n_extra, e.shape[1], generator=generator)
        with torch.no_grad():
            self.model.extra_embeddings.copy_(mean + 0.1 * std * noise.to(e.device))

    def freeze_base_to(self, dtype: torch.dtype) -> None:
        """Cast frozen (non-trainable) weights to dtype; trainable ones stay fp32."""
        for p in self.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    # --- forward ---------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        V = self.config.vocab_size
        base = self.model.embed_tokens(ids.clamp(max=V - 1)).float()
        if self.model.extra_embeddings is None:
            if bool((ids >= V).any()):
                raise ValueError("token id >= vocab_size but the model has no extra rows")
            return base
        extra = F.embedding((ids - V).clamp(min=0), self.model.extra_embeddings).float()
        return torch.where((ids >= V)[..., None], extra, base)

    def hidden(self, ids: torch.Tensor, seg: torch.Tensor, pos: torch.Tensor,
               mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final-normed hidden states [B,L,H] (fp32) under the KVLink mask of `seg`."""
        if mask is None:
            mask = kvlink_mask(seg)
        if mask.dtype == torch.bool:
            # one additive mask shared by every layer (SDPA would convert a bool mask per call,
            # and the memory-efficient kernel keeps each copy for backward)
            dev = ids.device.type
            dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.float32
            # (last dim allocated to a multiple of 16 so SDPA finds it aligned and pads nothing)
            L = mask.shape[-1]
            full = torch.zeros(*mask.shape[:-1], (L + 15) // 16 * 16, dtype=dt, device=mask.device)
            mask = full[..., :L].masked_fill_(~mask, float("-inf"))
        ang = pos.float()[..., None] * self.inv_freq  # [B,L,hd/2]
        ang = torch.cat((ang, ang), dim=-1)[:, None]  # [B,1,L,hd]
        cos, sin = ang.cos(), ang.sin()
        h = self.embed(ids)
        for layer in self.model.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(layer, h, cos, sin, mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask)
        return self.model.norm(h)

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits over the base vocabulary only (extra rows are input-only), fp32."""
        w = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, w).float()

    def forward(self, ids: torch.Tensor, seg: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.lm_logits(self.hidden(ids, seg, pos))

    def loss_sums(self, ids: torch.Tensor, seg: torch.Tensor, pos: torch.Tensor, targets: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Summed CE over rows whose target (the next token, or -100) is set.

        Returns (sum, per-row-index of each labelled row [N], per-token loss [N]); the lm_head is
        computed only at those rows."""
        return self.ce_sums(self.hidden(ids, seg, pos), targets)

    def ce_sums(self, h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[`loss_sums`] from the final hidden states [B,L,H]."""
        rows = (targets >= 0).nonzero(as_tuple=True)
        tok = self._rowwise(self._ce, h[rows], targets[rows])
        return tok.sum(), rows[0], tok

    def distill_kl(self, h_student: torch.Tensor, h_teacher: torch.Tensor) -> torch.Tensor:
        """Per-row KL(teacher || student) [M] of the next-token distributions over the base
        vocabulary, from final hidden states [M,H] of the same rows (the teacher's detached)."""
        return self._rowwise(self._kl, h_student, h_teacher.detach())

    def _rowwise(self, f, h: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled() and h.shape[0] > self.ce_chunk:
            # fp32 logits of every row at once can take many GiB: compute them in chunks
            # and again in backward
            c = self.ce_chunk
            return torch.cat([checkpoint(f, h[i:i + c], other[i:i + c], use_reentrant=False)
                              for i in range(0, h.shape[0], c)])
        return f(h, other)

    def _ce(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.lm_logits(h), t, reduction="none")

    def _kl(self, h: torch.Tensor, ht: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            lt = F.log_softmax(self.lm_logits(ht), dim=-1)
        ls = F.log_softmax(self.lm_logits(h), dim=-1)
        return (lt.exp() * (lt - ls)).sum(-1)
