"""
DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank Adaptation
(Valipour et al., arXiv 2210.07558). One training run that can be used at every rank 1..r.

    at rank b:   y = W0 x + (alpha / b) * B[:, :b] A[:b, :] x          (eq. 7)

- A (r, d_in) Kaiming-uniform and B (d_out, r) zeros, both trained, as in LoRA; max rank r (default 16).
- Every optimizer step samples one b ~ Uniform{1..r}, the same for all layers (on_step). It is a function of
  (seed, step), so a resumed run, or every process of a data-parallel run, draws the same b. In training, b enters
  the forward as masks over the r components (kept: the first b; trained: the b-th, or all kept ones in non-frozen
  mode), alpha / b folded into B's (fp32, so the scale is never rounded to bf16), in one small device tensor that
  on_step overwrites in place from a device table (no host transfer, no wait): the shapes never change, so a step's
  kernels are the same at every b (what a CUDA graph needs), and the values are eq. 7's.
- "frozen" mode (the official default): components 1..b-1 are detached, so only row b of A and column b of B
  get gradient at that step; `dylora_frozen=false` gives every component <= b its gradient. Under AdamW (ours and
  the official code's) "only the b-th trains" holds for the gradient, not the update: components that got a
  gradient at earlier steps keep moving on their momentum (m / sqrt(v) stays non-zero for a while).
- Evaluation, merge and export use `eval_rank` (default r), stored with the adapter's config; the official code
  did not save it and silently evaluated at rank 1 after loading.
- The official code writes the scale as sqrt(r / b) on each factor, times alpha / r: the same alpha / b.
- Trainable parameters per layer: r (d_in + d_out). Merge at rank b: W = W0 + (alpha / b) B[:, :b] A[:b].
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import UserError
from model import adapted_linear, load_strict, merge_linears, swap_linears

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_LR = 2e-4  # as LoRA's
CUDA_GRAPH = True  # the sampled rank enters as masks, so the step's shapes never change with b (tests/test_gpu.py)
GRADIENT_INIT = False  # apply() needs no gradients
NESTED_RANKS = True  # one adapter usable at every rank 1..r (Config.eval_rank picks one)


@dataclass
class Config:
    rank: int = 16  # the largest rank r
    alpha: float = 32.0  # the update at rank b is scaled by alpha / b
    dylora_frozen: bool = True  # only the sampled b-th component gets a gradient (AdamW momentum still moves others)
    eval_rank: int = 0  # rank used outside training (evaluation, merge, export); 0: r
    targets: tuple = TARGETS  # the adapted nn.Linear names (HF module names), comma-separated
    seed: int = 0  # draws A and the per-step ranks


def sample_rank(cfg: Config, step):
    """b ~ Uniform{1..r}, a pure function of (seed, step)."""
    return int(torch.randint(1, cfg.rank + 1, (1,), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)))


class Linear(nn.Linear):
    def __init__(self, base: nn.Linear, cfg: Config, gen: torch.Generator, masks, table):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the frozen base Parameters themselves
        r, dev = cfg.rank, base.weight.device
        if r > min(base.weight.shape):
            d_out, d_in = base.weight.shape
            raise UserError(f"--rank={r} exceeds {min(d_out, d_in)}, the smaller side of a {d_out} x {d_in} "
                            "target layer")
        A = torch.empty(r, self.in_features)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=gen)
        self.lora_A = nn.Parameter(A.to(dev))  # (r, d_in), fp32
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev))  # (d_out, r), fp32
        self.alpha = cfg.alpha
        self.eval_rank = cfg.eval_rank or r
        # shared by every layer, plain attributes (not buffers: .to(dtype) would round them; the model is not moved
        # after apply): this step's masks (4, r) and every rank's, (r, 4, r) (mask_table)
        self.masks, self.table = masks, table

    def factors(self, b):
        return self.lora_A[:b], self.lora_B[:, :b], self.alpha / b  # (b, d_in), (d_out, b), scale

    def forward(self, x):
        if not self.training:  # a fixed rank: the slices themselves
            A, B, s = self.factors(self.eval_rank)
            return adapted_linear(x, self.weight, self.bias, s * F.linear(F.linear(x, A), B))  # inside the GEMM
        # this step's b as masks (set_train_rank): components > b are zero, the kept untrained ones detached
        tA, fA, tB, fB = self.masks  # (r,) each; B's carry alpha / b
        A = self.lora_A * tA[:, None] + (self.lora_A * fA[:, None]).detach()  # (r, d_in)
        B = self.lora_B * tB + (self.lora_B * fB).detach()  # (d_out, r), scaled
        return adapted_linear(x, self.weight, self.bias, F.linear(F.linear(x, A), B))  # added inside the GEMM

    def merged_weight(self):
        A, B, s = self.factors(self.eval_rank)
        return self.weight.float() + s * B.float() @ A.float()

    def lora_pair(self):
        """(A, B) of the equivalent PEFT LoRA at eval_rank with scale 1."""
        A, B, s = self.factors(self.eval_rank)
        return A.float(), s * B.float()


def apply(model, cfg: Config, grads=None, init=True, first_lr=0.0):
    """Freeze the model and swap every targeted nn.Linear for a DyLoRA Linear of max rank r."""
    if cfg.rank < 1 or not 0 <= cfg.eval_rank <= cfg.rank:
        raise UserError(f"--rank must be >= 1 and --eval_rank between 1 and rank (0: rank), got {cfg.rank}, "
                        f"{cfg.eval_rank}")
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(cfg.seed)
    table = mask_table(cfg).to(next(model.parameters()).device)  # (r, 4, r)
    masks = table[-1].clone()  # (4, r): rank r until on_step
    swap_linears(model, cfg.targets, lambda name, lin: Linear(lin, cfg, gen, masks, table).train(lin.training))
    return model


def mask_table(cfg: Config):
    """(r, 4, r): for each rank b, A's trained and frozen masks, then B's times alpha / b. Kept: components 1..b;
    trained: the b-th (frozen mode) or all kept ones."""
    r, rows = cfg.rank, []
    for b in range(1, r + 1):
        keep = (torch.arange(r) < b).float()  # (r,)
        train = (torch.arange(r) == b - 1).float() if cfg.dylora_frozen else keep  # (r,)
        s = cfg.alpha / b
        rows.append(torch.stack([train, keep - train, s * train, s * (keep - train)]))  # (4, r)
    return torch.stack(rows)


def set_train_rank(model, b):
    """Train at rank b from the next forward on: every layer's masks, a copy on the device (no host transfer)."""
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    for m in {id(m.masks): m for m in layers}.values():  # one tensor, shared by every layer
        m.masks.copy_(m.table[b - 1])
    return b


def on_step(model, cfg, step):
    """Sample this step's rank, the same for every layer."""
    return set_train_rank(model, sample_rank(cfg, step))


ADAPTER_KEYS = ("lora_A", "lora_B")


def adapter_state_dict(model):
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in ADAPTER_KEYS}


def load_adapter_state_dict(model, sd):
    load_strict(adapter_state_dict(model), sd)


def merge(model):
    return merge_linears(model, Linear)
