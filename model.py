"""
A Llama in plain PyTorch that loads Hugging Face checkpoints (llama, mistral, qwen2).

Module names follow Hugging Face (model.layers.{i}.self_attn.q_proj, mlp.gate_proj, ...) so a checkpoint's
state dict loads as an identity, and adapter target names match every PEFT config and paper. RoPE is the
rotate-half layout HF uses, so no q/k permutation is needed anywhere.

    model = Llama.from_pretrained("path/to/hf_folder", device="cuda", dtype=torch.bfloat16)
    tok = Tokenizer.from_pretrained("path/to/hf_folder")
    out = generate(model, [tok.encode("Hello", bos=tok.add_bos)], max_new_tokens=32, eos_id=tok.eos_id)
"""
import glob
import hashlib
import json
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import nf4
from cli import UserError, device_error


# -----------------------------------------------------------------------------
# config

@dataclass
class ModelConfig:
    arch: str = "llama"
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 128
    hidden_dim: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)  # {} for "default"; else rope_type + its parameters
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False  # qwen2: bias on q/k/v only; llama attention_bias: on q/k/v/o
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int = 0  # 0: none. We do not implement it, so sequences longer than it are refused

    @classmethod
    def from_hf(cls, c: dict) -> "ModelConfig":
        """Explicit map from a transformers config.json (4.x and 5.x spellings)."""
        arch = c.get("model_type")
        if arch not in ("llama", "mistral", "qwen2"):
            raise UserError(f"config.json: model_type={arch!r} is not supported (llama, mistral, qwen2)")
        if c.get("hidden_act", "silu") != "silu":
            raise UserError(f"config.json: hidden_act={c['hidden_act']!r} is not supported (silu)")
        if c.get("partial_rotary_factor", 1.0) != 1.0:
            raise UserError("config.json: partial_rotary_factor != 1 is not supported")
        # transformers 5.x: rope_parameters = {rope_type, rope_theta, ...}; 4.x: rope_theta + rope_scaling
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", c.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise UserError(f"config.json: rope type {rope_type!r} is not supported (default, linear, llama3)")
        rope.pop("type", None)
        rope = {} if rope_type == "default" else {**rope, "rope_type": rope_type}
        n_heads = c["num_attention_heads"]
        window = c.get("sliding_window") or 0
        if arch == "qwen2" and not c.get("use_sliding_window", False):
            window = 0  # qwen2 ships a sliding_window value but only uses it when use_sliding_window is set
        attn_bias = c.get("attention_bias", False)
        return cls(
            arch=arch,
            vocab_size=c["vocab_size"],
            dim=c["hidden_size"],
            n_layers=c["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=c.get("num_key_value_heads") or n_heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // n_heads,
            hidden_dim=c["intermediate_size"],
            norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope,
            max_seq_len=c.get("max_position_embeddings", 4096),
            tie_embeddings=c.get("tie_word_embeddings", False),
            qkv_bias=arch == "qwen2" or attn_bias,
            o_bias=arch != "qwen2" and attn_bias,
            mlp_bias=c.get("mlp_bias", False),
            sliding_window=window,
        )


# -----------------------------------------------------------------------------
# layers

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalised in fp32 and rounded to x's dtype before the weight multiplies (HF's order, which matters in
        # bf16). F.rms_norm computes in fp32 whatever x's dtype and rounds once: the same numbers as spelling out
        # x.float() * rsqrt(mean(x^2) + eps), in one fused kernel on CUDA where that was six (forward alone)
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))  # (hd/2,)
    s = cfg.rope_scaling
    if s.get("rope_type") == "linear":
        inv = inv / s["factor"]
    elif s.get("rope_type") == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s.get("original_max_position_embeddings", cfg.max_seq_len)
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / hi) & ~(wavelen > old_len / lo)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def rope(pos, inv_freq, dtype):
    """cos and sin of the rotate-half layout, sin's first half negated (apply_rope's rotation is then a roll)."""
    f = pos[..., None].float() * inv_freq  # (B, T, hd/2)
    c, s = f.cos(), f.sin()
    cos, sin = torch.cat((c, c), -1), torch.cat((-s, s), -1)  # (B, T, hd)
    return cos.to(dtype)[:, None], sin.to(dtype)[:, None]  # (B, 1, T, hd)


def apply_rope(x, cos, sin):
    # HF's x * cos + cat(-x2, x1) * sin, the same roundings, with the sign in sin: four kernels on CUDA, not five
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.nh, self.nkv, self.hd = layer, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)

    def forward(self, x, cos, sin, mask=None, cache=None):
        """mask: None (plain causal), a bool mask (B, 1, T, L), for one query per row (T = 1) fp32 0 / -inf (B, 1, 1, L),
        or for packed rows on a GPU the examples' boundaries over the flattened rows ((K + 1,) int32, doc_bounds)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nkv, L, hd): everything cached so far
        if mask is None:  # plain causal: flash kernels on GPU, GQA without copying k/v
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.nh != self.nkv)
        elif mask.dtype == torch.int32:  # packed rows on a GPU: each example its own causal sequence, GQA as is
            q, k, v = (t.transpose(1, 2).reshape(B * T, -1, self.hd) for t in (q, k, v))  # (B*T, heads, hd)
            y = FlashVarlen.apply(q, k, v, mask, T)  # (B*T, nh, hd)
            return self.o_proj(y.view(B, T, self.nh * self.hd))
        elif T == 1:  # decode: group the query heads of each kv head instead of copying the whole cache per head
            qg = q.view(B, self.nkv, self.nh // self.nkv, self.hd)  # (B, nkv, rep, hd)
            # mask is fp32 0 / -inf here: one kernel adds it to the scaled scores and casts them to fp32
            att = torch.add(mask, qg @ k.transpose(-1, -2), alpha=1 / math.sqrt(self.hd))  # (B, nkv, rep, L) fp32
            y = (att.softmax(-1).to(v.dtype) @ v).view(B, self.nh, 1, self.hd)
        else:  # masked kernels do not take GQA, so share k/v heads explicitly
            k, v = (t.repeat_interleave(self.nh // self.nkv, dim=1) for t in (k, v))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


# Packed rows: where a row holds several examples, attention must not cross from one into the next. On a CPU (and
# wherever FlashAttention is missing) that is a dense block-diagonal causal mask, (B, 1, T, T); on a GPU it is
# FlashAttention's variable-length kernel over the flattened rows, given where each example starts: no mask, no
# attention computed across examples (tools/attn_cost.py, H200, SmolLM2-135M's shapes, 8 rows of 512: 196-265 us
# per layer forward and backward against 449 us for SDPA with the mask). A CUDA graph needs fixed shapes, so the
# boundaries are a fixed number K of offsets, unused ones at the end equal to B*T (empty examples): K comes from
# this contract, which data.pack keeps: a row of T tokens holds at most max(1, T // EXAMPLE_TOKENS) examples.
EXAMPLE_TOKENS = 32


def doc_bounds(pos):
    """pos (B, T), restarting at 0 where each example starts (every row starts one) -> (K + 1,) int32 offsets of
    the examples in the flattened (B*T) rows, then B*T repeated: FlashAttention's cu_seqlens, K = B * max(1, T //
    EXAMPLE_TOKENS). Computed on the device with no host sync (a step stays capturable)."""
    B, T = pos.shape
    K = B * max(1, T // EXAMPLE_TOKENS)
    starts = pos.flatten() == 0  # (B*T,)
    torch._assert_async(starts.sum() <= K, "more examples in a packed row than one per EXAMPLE_TOKENS tokens")
    cu = torch.nonzero_static(starts, size=K + 1, fill_value=B * T).flatten()  # (K + 1,): the last is always B*T
    return cu.to(torch.int32)


class FlashVarlen(torch.autograd.Function):
    """Causal attention within each example: aten's FlashAttention variable-length forward and backward on
    q (N, nh, hd), k, v (N, nkv, hd) (N = B*T tokens, GQA as is) and boundaries cu (K + 1,). Called directly rather
    than through torch.nn.attention.varlen, which (torch 2.11) cannot be captured in a CUDA graph."""

    @staticmethod
    def forward(ctx, q, k, v, cu, max_len):
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, 0.0,
                                                                           True, False)
        ctx.save_for_backward(q, k, v, out, lse, cu, rng, unused)
        ctx.max_len = max_len
        return out  # (N, nh, hd)

    @staticmethod
    def backward(ctx, g):
        q, k, v, out, lse, cu, rng, unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(g.contiguous(), q, k, v, out, lse, cu, cu, ctx.max_len,
                                                              ctx.max_len, 0.0, True, rng, unused)
        return dq, dk, dv, None, None


def flash_varlen_ok(device, dtype, head_dim):
    """Whether packed rows on `device` in `dtype` take FlashVarlen: a CUDA GPU of compute capability 8.0 or more
    (FlashAttention 2), fp16 or bf16, head_dim <= 256."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and head_dim <= 256
            and torch.backends.cuda.is_flash_attention_available()
            and torch.cuda.get_device_capability(device) >= (8, 0))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """Preallocated keys/values for generation. valid[b, t] says whether slot t of row b holds a real token
    (False for left padding), so attention never looks at padding. The prompt is written at slots [0, len);
    each decode step then writes one token at `slot`, a tensor on the device, and attends over every slot up to
    it: fixed shapes, so a decode step can be captured once as a CUDA graph and replayed. `span` (a host int)
    is how many slots a decode step reads: generate grows it in steps of SPAN_STEP instead of reading all T
    slots from the first token on (one graph per span)."""

    def __init__(self, cfg: ModelConfig, valid, dtype):
        B, T = valid.shape
        shape = (cfg.n_layers, B, cfg.n_kv_heads, T, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=valid.device)
        self.v = torch.zeros(shape, dtype=dtype, device=valid.device)
        self.valid, self.len, self.slot, self.span = valid, 0, None, T

    def update(self, layer, k, v):
        if self.slot is not None:  # decode: (B, nkv, 1, hd) written at the device-side position
            self.k[layer].index_copy_(2, self.slot, k)
            self.v[layer].index_copy_(2, self.slot, v)
            return self.k[layer, :, :, :self.span], self.v[layer, :, :, :self.span]  # (B, nkv, span, hd)
        T = k.shape[2]
        self.k[layer, :, :, self.len:self.len + T] = k
        self.v[layer, :, :, self.len:self.len + T] = v
        return self.k[layer, :, :, :self.len + T], self.v[layer, :, :, :self.len + T]


def ce_chunk(logits, t, keep):
    """One chunk of the loss, in fp32: the kept rows' summed cross-entropy and dCE/dlogits = softmax - onehot
    (zero on ignored rows) in the logits' dtype. Eager, it is six passes over a (c, V) tensor; Llama.compile
    fuses it into one kernel, which matters: with a 128k vocabulary these passes cost more than the matmuls."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (c, V)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (c, 1)
    loss = ((lse - z.gather(1, t[:, None])) * keep).sum()
    g = z.sub_(lse).exp_()  # softmax, in place of the fp32 logits
    g.scatter_add_(1, t[:, None], -torch.ones_like(lse))  # minus the one-hot
    return loss, g.mul_(keep).to(logits.dtype)  # ignored rows get no gradient


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of h W^T against t over the rows where t != -100, computed `chunk` rows at a time.
    The gradients are formed during the forward, so no (N, vocab) logits tensor outlives its chunk: with a
    large vocabulary the full fp32 logits would otherwise be the memory peak of a training step. Ignored rows
    are masked, not removed, so shapes never depend on the data: no host sync, and a step can be captured
    as a CUDA graph."""

    @staticmethod
    def forward(ctx, h, W, t, chunk, chunk_fn=ce_chunk):
        need_h, need_W = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gh = torch.empty_like(h) if need_h else None
        acc = torch.promote_types(W.dtype, torch.float32)  # sums in fp32 at least
        gW = torch.zeros(W.shape, dtype=acc, device=W.device) if need_W else None
        keep = t != -100  # (N,)
        n = keep.sum().clamp(min=1).to(acc)  # a device scalar: no sync
        t = t.clamp(min=0)
        loss = torch.zeros((), dtype=acc, device=h.device)
        for i in range(0, h.shape[0], chunk):
            hc = h[i:i + chunk]
            logits = F.linear(hc, W)  # (c, V): bf16 under autocast
            part, g = chunk_fn(logits, t[i:i + chunk], keep[i:i + chunk, None].to(acc))
            loss += part
            if need_h:
                gh[i:i + chunk] = g @ W.to(g.dtype)  # (c, C)
            if need_W:
                gW += g.t() @ hc.to(g.dtype)  # (V, C)
        ctx.save_for_backward(gh, gW, n)
        ctx.W_dtype = W.dtype
        return loss / n

    @staticmethod
    def backward(ctx, grad):
        gh, gW, n = ctx.saved_tensors
        s = grad / n
        return (gh * s.to(gh.dtype) if gh is not None else None,
                (gW * s).to(ctx.W_dtype) if gW is not None else None, None, None, None)


# -----------------------------------------------------------------------------
# the model

class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.dim),
            layers=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers)),
            norm=RMSNorm(cfg.dim, cfg.norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.loss_chunk = 4096  # rows of logits per chunk of the loss
        self.ce_chunk = ce_chunk  # the loss's softmax epilogue (compiled by Llama.compile)
        self.grad_checkpoint = False  # recompute each block in backward instead of storing its activations

    def compile(self, **kwargs):
        """torch.compile each block (they share one compiled graph) and the loss's softmax epilogue."""
        for block in self.model.layers:
            block.compile(**kwargs)
        self.ce_chunk = torch.compile(ce_chunk, **kwargs)
        return self

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # .to(), .float(), .cuda(), ... then put back exact fp32 RoPE frequencies
        self.inv_freq = rope_inv_freq(self.cfg).to(self.inv_freq.device)
        return self

    def init_weights(self, seed=0):
        """Random init (tests, benchmarks): N(0, 0.02) like HF, norms at 1, biases at 0."""
        g = torch.Generator(device=self.lm_head.weight.device).manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                nn.init.ones_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=0.02, generator=g)
        return self

    def forward(self, idx, targets=None, pos=None, cache=None):
        """idx (B, T) token ids. Returns (logits, loss), as nanoGPT's model does:
        - with `targets` (B, T) (-100: no loss): (None, the mean cross-entropy over the targets); the (B*T, V)
          logits are never held whole (ChunkedCrossEntropy);
        - without: (logits (B, T, V), None); with a KV `cache` (generation) only the last position's, (B, 1, V)
          in fp32, since nothing else is read.
        pos (B, T): positions; where a row packs several examples, pos restarts at 0 for each, and attention
        never crosses from one example into another (on a GPU a row of T tokens holds at most max(1, T //
        EXAMPLE_TOKENS) examples: doc_bounds)."""
        B, T = idx.shape
        mask = None
        if cache is not None and cache.slot is not None:  # decode step: every valid slot up to this one
            slots = torch.arange(cache.span, device=idx.device)
            mask = cache.valid[:, None, None, :cache.span] & (slots <= cache.slot)  # (B, 1, 1, span)
        elif cache is not None:  # prefill: causal over the prompt, never attending to left padding
            L = cache.len + T
            causal = torch.ones(T, L, dtype=torch.bool, device=idx.device).tril(cache.len)
            mask = cache.valid[:, None, None, :L] & causal  # (B, 1, T, L)
            # a padding query would see no key at all (NaN): let it see itself, nothing reads it anyway
            slot = torch.arange(L, device=idx.device)
            mask = mask | (slot == cache.len + torch.arange(T, device=idx.device)[:, None])
        if self.cfg.sliding_window and (cache.k.shape[3] if cache is not None else T) > self.cfg.sliding_window:
            raise UserError(f"sequence longer than {self.cfg.arch}'s sliding_window={self.cfg.sliding_window}: "
                            f"sliding-window attention is not implemented; use shorter sequences")
        x = self.model.embed_tokens(idx)  # (B, T, C)
        dtype = x.dtype if not torch.is_autocast_enabled(x.device.type) else torch.get_autocast_dtype(x.device.type)
        if cache is None and pos is not None:  # packed rows: attention stays within each example
            if flash_varlen_ok(idx.device, dtype, self.cfg.head_dim):
                mask = doc_bounds(pos)  # (K + 1,) int32
            else:  # block-diagonal causal mask from where positions restart
                doc = (pos == 0).cumsum(1)  # (B, T) example index within the row
                mask = (doc[:, :, None] == doc[:, None, :]).tril()[:, None]  # (B, 1, T, T)
        if T == 1 and mask is not None and mask.dtype == torch.bool:  # one query per row (a decode step): Attention
            mask = torch.zeros(mask.shape, device=idx.device).masked_fill_(~mask, float("-inf"))  # adds it to scores
        if pos is None:
            pos = torch.arange(T, device=idx.device).expand(B, T)
        cos, sin = rope(pos, self.inv_freq, dtype)
        for block in self.model.layers:
            if self.grad_checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache)
        x = self.model.norm(x)
        if cache is not None:
            cache.len += T if cache.slot is None else 0
            return self.lm_head(x[:, -1:]).float(), None  # (B, 1, V)
        if targets is None:
            return self.lm_head(x), None  # (B, T, V)
        h, t = x.flatten(0, 1), targets.flatten()  # (B*T, C), (B*T,)
        return None, ChunkedCrossEntropy.apply(h, self.lm_head.weight, t, self.loss_chunk, self.ce_chunk)

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.bfloat16, base_bits=16):
        """A Hugging Face folder: config.json + model.safetensors, or shards + model.safetensors.index.json.
        Built on the meta device and filled tensor by tensor in the target dtype: one copy of the weights.
        base_bits=4: every linear weight of the blocks is stored in NF4 (nf4.py) as soon as it is read, so the
        whole model never exists in `dtype`; the rest stays in `dtype`, and compute runs in it."""
        from safetensors import safe_open
        if not os.path.isdir(path):
            raise UserError(f"model folder not found: {path}")
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise UserError(f"no config.json in {path}: point --model at a Hugging Face checkpoint folder")
        with open(cfg_path) as f:
            cfg = ModelConfig.from_hf(json.load(f))
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.isfile(os.path.join(path, "model.safetensors")):
            files = ["model.safetensors"]
        else:
            bins = glob.glob(os.path.join(path, "*.bin"))
            raise UserError(f"no model.safetensors or model.safetensors.index.json in {path}"
                            + (" (.bin files are not loaded: convert them to safetensors)" if bins else ""))
        with torch.device("meta"):
            model = cls(cfg)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        if cfg.tie_embeddings:
            expected.pop("lm_head.weight")
        sd = {}
        for name in files:
            fpath = os.path.join(path, name)
            if not os.path.isfile(fpath):
                raise UserError(f"missing shard {name} listed in {index}: is the download complete?")
            try:
                with safe_open(fpath, framework="pt", device=str(device)) as f:
                    for k in f.keys():
                        if k.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and k == "lm_head.weight"):
                            continue  # recomputed / tied
                        if k not in expected:
                            raise UserError(f"{name}: unexpected tensor {k}: does config.json match the weights?")
                        shape = tuple(f.get_slice(k).get_shape())
                        if shape != tuple(expected[k]):
                            raise UserError(f"{name}: {k} has shape {shape}, config.json implies "
                                            f"{tuple(expected[k])}: config.json does not match the weights")
                        sd[k] = f.get_tensor(k).to(dtype)
                        if not torch.isfinite(sd[k]).all():  # else it trains from NaN and blames the lr
                            raise UserError(f"{path}: {k} holds NaN or inf values: the checkpoint is damaged; "
                                            f"download it again")
                        if base_bits == 4 and nf4.is_quantized(k):
                            sd[k] = nf4.quantize_weight(sd[k], dtype)
            except UserError:
                raise
            except Exception as e:  # safetensors raises its own error types for broken files
                if device_error(e):  # the GPU, not the file (out of memory, a busy device): cli.run's line
                    raise
                raise UserError(f"cannot read {fpath} ({type(e).__name__}: {str(e).splitlines()[0][:120]}): "
                                f"the file is truncated or corrupt; download it again") from None
        missing = sorted(set(expected) - set(sd))
        if missing:
            raise UserError(f"checkpoint in {path} lacks {len(missing)} tensors (e.g. {missing[0]}): "
                            f"is the download complete?")
        if cfg.tie_embeddings:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        model.load_state_dict(sd, strict=True, assign=True)
        if cfg.tie_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight  # one Parameter, as in the checkpoint
        model.inv_freq = rope_inv_freq(cfg).to(device)
        return model.eval().requires_grad_(False)


def fingerprint(model):
    """A short hash of the base weights (the first 64 rows of the embedding, rounded to bf16 so that a bf16 and an
    fp32 load agree): an adapter records it, and eval.py refuses to apply the adapter to another base model."""
    w = model.model.embed_tokens.weight[:64].detach().to("cpu", torch.bfloat16).view(torch.int16)
    return hashlib.sha256(w.numpy().tobytes()).hexdigest()[:16]


# -----------------------------------------------------------------------------
# adapter plumbing shared by the method files (lora.py, lora_sb.py, ...): the math lives there

class _AddInAccumulator(torch.autograd.Function):
    """CUDA: x W^T + delta with delta added to the fp32 product before the one rounding to bf16. cuBLAS's bf16 addmm
    rounds the product to bf16 before it adds C (measured on the H200: it keeps 4% of a small delta, as F.linear + delta
    does), so the product is taken in fp32 (mm with out_dtype), delta added, and the sum rounded once. The backward is a plain linear's:
    W is frozen, so only x and delta get gradients."""

    @staticmethod
    def forward(ctx, x, weight, delta):  # x (N, d_in), weight (d_out, d_in), delta (N, d_out), all in the compute dtype
        ctx.save_for_backward(weight)
        with torch.autocast("cuda", enabled=False):
            return torch.mm(x, weight.t(), out_dtype=torch.float32).add_(delta).to(x.dtype)  # (N, d_out)

    @staticmethod
    def backward(ctx, g):
        weight, = ctx.saved_tensors
        return g @ weight, None, g


def adapted_linear(x, weight, bias, delta):
    """x W^T + bias + delta, where delta is an adapter's output: delta is added to the GEMM's fp32 accumulator before
    the one rounding to the output dtype. Added afterwards to a bf16 output y0, which is already a bf16 number,
    y0 + delta would round back to y0 wherever |delta| < half an ulp of y0: a systematic loss of small updates, not
    noise. Inside the GEMM the rounding is of a value that varies from token to token, so it is unbiased and averages
    out (tests/test_precision.py measures both on the CPU; the README's precision section on the GPU)."""
    x2, d2 = x.flatten(0, -2), delta.flatten(0, -2)  # (N, d_in), (N, d_out)
    dt = torch.get_autocast_dtype("cuda") if x.is_cuda and torch.is_autocast_enabled("cuda") else x.dtype
    if x.is_cuda and dt in (torch.bfloat16, torch.float16) and torch._C._are_functorch_transforms_active():
        # under torch.func (DP-SGD's per-example gradients): the same single rounding, through ops vmap batches
        y = torch.addmm(d2.to(dt).float(), x2.to(dt).float(), weight.to(dt).float().t()).to(dt)
    elif x.is_cuda and dt in (torch.bfloat16, torch.float16):
        y = _AddInAccumulator.apply(x2.to(dt), weight.to(dt), d2.to(dt))
    else:  # the CPU's addmm adds C before rounding (fp32 on CPU: nothing is rounded anyway)
        y = torch.addmm(d2, x2, weight.t())
    y = y.view(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


def swap_linears(model, targets, build):
    """Replace every nn.Linear whose attribute name is in `targets` by build(full_name, linear)."""
    names = {n for _, mod in model.named_modules() for n, c in mod.named_children() if type(c) is nn.Linear}
    unknown = [t for t in targets if t not in names]
    if unknown or not targets:
        raise UserError(f"--targets {','.join(unknown) or '(none)'}: no such layer; choose from "
                        f"{','.join(sorted(names - {'lm_head'}))}")
    for prefix, mod in list(model.named_modules()):
        for name, child in list(mod.named_children()):
            if type(child) is nn.Linear and name in targets:
                setattr(mod, name, build(f"{prefix}.{name}" if prefix else name, child))
    return model


def load_strict(own, sd):
    """Copy the tensors of `sd` into `own` (name -> tensor): the same names and shapes, or a one-line error."""
    if set(sd) != set(own):
        bad = sorted(set(sd) ^ set(own))
        raise UserError(f"checkpoint does not match the model: {len(bad)} tensors differ (e.g. {bad[0]})")
    with torch.no_grad():
        for k, v in sd.items():
            if v.shape != own[k].shape:
                raise UserError(f"checkpoint tensor {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
            own[k].copy_(v)


def merge_linears(model, cls):
    """Replace every `cls` layer by a plain nn.Linear holding its merged_weight() in fp32 (fp64 on an fp64 model).
    It is not cast back to a bf16 base's dtype: that would round most of a small update away (see save_hf in
    runs.py, which measures it before choosing an export dtype)."""
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, cls):
                merged = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                W = child.merged_weight()
                merged.weight = nn.Parameter(W.to(torch.promote_types(W.dtype, child.weight.dtype)), requires_grad=False)
                merged.bias = child.bias
                setattr(mod, name, merged)
    return model


# -----------------------------------------------------------------------------
# tokenizer

class Tokenizer:
    """sentencepiece (tokenizer.model) or Hugging Face tokenizers (tokenizer.json). Special ids come from
    tokenizer_config.json, then generation_config.json, then config.json, then the tokenizer itself."""

    def __init__(self, sp=None, hf=None, bos_id=None, eos_id=None, pad_id=None, add_bos=False, stop_ids=()):
        self.sp, self.hf = sp, hf
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self.pad_id = pad_id if pad_id is not None else eos_id
        self.stop_ids = set(stop_ids) | {eos_id}  # every id that ends a generation (Llama 3 lists several)

    @classmethod
    def from_pretrained(cls, path):
        if not os.path.isdir(path):
            raise UserError(f"tokenizer folder not found: {path}")
        files = set(os.listdir(path))
        sp = hf = None
        if "tokenizer.model" in files:
            import sentencepiece
            sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(path, "tokenizer.model"))
            to_id = lambda s: sp.piece_to_id(s) if sp.id_to_piece(sp.piece_to_id(s)) == s else None
        elif "tokenizer.json" in files:
            try:
                import tokenizers
            except ImportError:
                raise UserError("this checkpoint ships only tokenizer.json: pip install tokenizers") from None
            hf = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
            to_id = hf.token_to_id
        else:
            raise UserError(f"no tokenizer.model or tokenizer.json in {path}")
        load = lambda name: json.load(open(os.path.join(path, name))) if name in files else {}
        tc, gc, mc = load("tokenizer_config.json"), load("generation_config.json"), load("config.json")
        first = lambda v: v[0] if isinstance(v, list) else v  # eos_token_id may be a list (Llama 3)
        ids = {}
        for key in ("bos", "eos", "pad"):
            t = tc.get(f"{key}_token")
            t = t.get("content") if isinstance(t, dict) else t
            candidates = [to_id(t) if t is not None else None, first(gc.get(f"{key}_token_id")),
                          first(mc.get(f"{key}_token_id"))]
            if sp is not None:
                candidates.append(dict(bos=sp.bos_id(), eos=sp.eos_id(), pad=sp.pad_id())[key])
            ids[key] = next((i for i in candidates if i is not None and i >= 0), None)
        if "add_bos_token" in tc:
            add_bos = bool(tc["add_bos_token"])
        elif hf is not None:  # tokenizer.json: BOS is added iff its post-processor adds it
            add_bos = ids["bos"] is not None and ids["bos"] in hf.encode("a").ids
        else:
            add_bos = True  # sentencepiece Llama convention
        stop = [i for c in (gc, mc) if isinstance(c.get("eos_token_id"), list) for i in c["eos_token_id"]]
        return cls(sp, hf, ids["bos"], ids["eos"], ids["pad"], add_bos and ids["bos"] is not None, stop)

    def encode(self, text, bos=False, eos=False):
        ids = self.sp.encode(text) if self.sp else self.hf.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids):
        return self.sp.decode(list(ids)) if self.sp else self.hf.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self):
        return self.sp.get_piece_size() if self.sp else self.hf.get_vocab_size()


# -----------------------------------------------------------------------------
# generation

# A decode step reads the cache up to a multiple of SPAN_STEP slots past the one it writes, not all of it: at large
# batches the keys and values are most of a step's memory traffic, and reading P + 256 slots when only P + 1 are
# filled is wasted. Each span is its own CUDA graph (a few per generate call). Measured on all of GSM8K test
# (README, "Speed"): a small gain, 3.18 s against 3.24 s for reading the whole cache, within run-to-run noise.
SPAN_STEP = 64

def capture_decode(model, cache, tok, pos):
    """Record one decode step as a CUDA graph: replaying it re-runs the whole step with one CPU call instead of
    hundreds of kernel launches (eager decoding of a small model is bound by those launches)."""
    tok, pos = tok.clone(), pos.clone()  # static inputs: copy each step's values into them, then replay
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up run (it writes the same cache slot the first replay will)
        model(tok, pos=pos, cache=cache)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = model(tok, pos=pos, cache=cache)[0][:, -1]  # (B, V)
    return graph, tok, pos, logits


@torch.no_grad()
def generate(model, prompts, max_new_tokens, eos_id=None, stop=(), tokenizer=None, temperature=0.0, top_p=1.0,
             pad_id=0, seed=None, stop_every=8, cuda_graph=True):
    """Batched generation with a KV cache. prompts: lists of token ids; returns the new ids of each (EOS and stop
    strings excluded). Prompts are left-padded; padding is masked out and positions start at 0 for every prompt,
    so each row computes exactly what it would alone. Greedy unless temperature > 0. Decode steps have fixed
    shapes and run as a CUDA graph on GPU. Rows that finished are dropped from the batch once they are half of it;
    EOS and stop strings are looked for every `stop_every` steps, one chunk behind the GPU (a token never depends
    on later ones, so the result is the same as checking at every step)."""
    device = model.lm_head.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    if model.cfg.sliding_window and P + max_new_tokens > model.cfg.sliding_window:
        raise UserError(f"prompt + max_new_tokens = {P + max_new_tokens} exceeds {model.cfg.arch}'s sliding_window="
                        f"{model.cfg.sliding_window}: sliding-window attention is not implemented")
    eos = set(eos_id if isinstance(eos_id, (set, list, tuple)) else [eos_id]) - {None}
    idx = torch.full((B, P), pad_id, dtype=torch.long)
    valid = torch.ones(B, P + max_new_tokens, dtype=torch.bool)
    for b, p in enumerate(prompts):
        idx[b, P - len(p):] = torch.tensor(p)
        valid[b, :P - len(p)] = False
    idx, valid = idx.to(device), valid.to(device)
    pos = (valid[:, :P].long().cumsum(1) - 1).clamp(min=0)  # (B, P)
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else \
        model.model.embed_tokens.weight.dtype  # what k and v come out as
    cache = KVCache(model.cfg, valid, dtype)
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    out, done, rows = [[] for _ in range(B)], [False] * B, list(range(B))  # rows: live row -> prompt index
    has_stop = lambda b: any(s in tokenizer.decode(out[b][-stop_every - 16:]) for s in stop)
    logits = model(idx, pos=pos, cache=cache)[0][:, -1]  # prefill: (B, V)
    cache.slot = torch.full((1,), P, device=device)  # from here on, one token per step at a device-side slot
    next_pos, graph = pos[:, -1:] + 1, None  # (B, 1)
    use_graph = cuda_graph and device.type == "cuda"
    toks = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)  # (rows, steps): what each row drew
    seen, pending = 0, []  # toks[:, :seen] are on their way to the host: [(rows then, host copy, copy done)]

    def read(rows_then, host, copied):  # one chunk of tokens on the host: ends rows at EOS or a stop string
        if copied is not None:
            copied.synchronize()
        for b, new in zip(rows_then, host.tolist()):
            for tok in new:
                if done[b]:
                    break
                done[b] = tok in eos
                out[b] += [] if done[b] else [tok]
        for b in rows_then if stop else []:
            if not done[b] and has_stop(b):
                done[b] = True
                while any(s in tokenizer.decode(out[b]) for s in stop):
                    out[b].pop()  # drop the tokens that complete the stop string (and any after it)

    for t in range(max_new_tokens):
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            if top_p < 1.0:  # nucleus: keep the smallest set of tokens whose mass reaches top_p
                p, i = probs.sort(dim=-1, descending=True)
                p[(p.cumsum(-1) - p) > top_p] = 0
                probs = torch.zeros_like(probs).scatter_(-1, i, p)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        else:
            nxt = logits.argmax(-1)  # (rows,)
        toks[:, t] = nxt
        # every stop_every steps the tokens drawn since the last time start their copy to the host, and the host
        # reads the chunk before, whose copy has had stop_every decode steps to arrive: the GPU never waits for
        # the host's checks. A row that ended computes up to 2 * stop_every tokens more, which are dropped.
        if (t + 1) % stop_every == 0 or t + 1 == max_new_tokens:
            host = toks[:, seen:t + 1].to("cpu", non_blocking=True)  # (rows, stop_every), pinned on a GPU
            copied = torch.cuda.Event() if device.type == "cuda" else None
            if copied is not None:
                copied.record()
            pending.append((rows, host, copied))
            seen = t + 1
            while len(pending) > (1 if t + 1 < max_new_tokens else 0):
                read(*pending.pop(0))
            keep = [j for j, b in enumerate(rows) if not done[b]]
            if not keep:
                break
            if len(keep) <= len(rows) // 2:  # compact: finished rows stop costing compute
                k = torch.tensor(keep, device=device)
                cache.k, cache.v, cache.valid = cache.k[:, k], cache.v[:, k], cache.valid[k]
                nxt, next_pos, rows, graph, toks = nxt[k], next_pos[k], [rows[j] for j in keep], None, toks[k]
        if t + 1 == max_new_tokens:
            break
        span = min(P + max_new_tokens, -(-(P + t + 1) // SPAN_STEP) * SPAN_STEP)  # slots up to this step's one
        if span != cache.span:
            cache.span, graph = span, None
        if use_graph:
            if graph is None:  # (re)record for this batch size and span
                graph, g_tok, g_pos, g_logits = capture_decode(model, cache, nxt[:, None], next_pos)
            g_tok.copy_(nxt[:, None])
            g_pos.copy_(next_pos)
            graph.replay()
            logits = g_logits
        else:
            logits = model(nxt[:, None], pos=next_pos, cache=cache)[0][:, -1]  # (rows, V)
        cache.slot += 1
        next_pos = next_pos + 1
    return out
