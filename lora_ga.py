"""
LoRA-GA: Low-Rank Adaptation with Gradient Approximation (Wang et al., NeurIPS 2024, arXiv 2407.05000).

Plain LoRA, y = W0 x + s (B A - B0 A0) x with s = alpha / sqrt(r) (rsLoRA), initialised so that its first step
equals a full fine-tuning step projected to rank 2r (Algorithm 1):

    G = gradient of the loss w.r.t. W over `init_samples` examples (fp32; train.py computes it)
    G = U S V^T                                   # fp32 SVD
    A0 = c V[:, :r]^T   (r, d_in)                 # top-r right singular vectors ("ArB2r")
    B0 = c U[:, r:2r]   (d_out, r)                # the next r left singular vectors
    c  = d_out^(1/4) / sqrt(gamma)                # stable scaling, gamma = 16 (a figure's "/gamma" is a typo)
    A, B start at A0, B0 and train; the model starts exactly at W0 (B A - B0 A0 = 0)

Why: one SGD step of size eta from (A0, B0) changes s B A by -eta s^2 (G A0^T A0 + B0 B0^T G)
= -eta s^2 c^2 (U_r S_r V_r^T + U_{r:2r} S_{r:2r} V_{r:2r}^T) = -eta s^2 c^2 G_2r, the best rank-2r
approximation of the full fine-tuning step; a random init only captures a random projection of it. Every
direction option takes 2r distinct singular vectors, so each has this property.

Where we differ from the paper's and the official code's bookkeeping, not their math: they subtract s B0 A0 from
the base weight (W0' = W0 - s B0 A0) so the model starts at W0. On a bf16 base that offset is rounded: the
starting point moves by ~3e-3 relative (the official code does the same). We leave W0 untouched and add
s (B A - B0 A0) x, computed as s [(B - B0) A x + B0 (A - A0) x]: the differences are formed in fp32 before
autocast casts them, so the output is exactly zero at init and an update much smaller than A and B themselves
is not rounded away by their cast to bf16 (it costs two more skinny matmuls per layer). A0, B0 are kept (frozen) in
the adapter, and the result exports as a standard rank-2r LoRA on the untouched base: A' = [A; A0],
B' = [B, -B0], the same scale (the official exporter doubles alpha, which is wrong under rsLoRA).
We follow the paper, not PEFT's LoraGAConfig, which puts the singular values into B and scales only B, and so does
not reproduce the first-step property. The init gradient is train.py's: the mean over every target token of the
init examples, accumulated in fp32 (the official code sums per-batch mean losses' gradients in bf16).
`rslora=false` gives the official example script's s = alpha / r.
Trainable parameters per layer: r (d_in + d_out). Learning rates are full-fine-tuning-like (paper: 2e-5).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_xs import truncated_svd
from cli import UserError
from model import adapted_linear, load_strict, merge_linears, swap_linears

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_LR = 2e-5  # the paper's
CUDA_GRAPH = True  # its forward keeps no per-step Python state: a step can be one CUDA graph
GRADIENT_INIT = True  # apply() needs the fp32 gradients of Config.init_samples examples
NESTED_RANKS = False  # one rank per adapter


@dataclass
class Config:
    rank: int = 8  # r, the rank of B A (the init uses 2r singular vectors)
    alpha: float = 16.0  # the update is scaled by s = alpha / sqrt(r) (or alpha / r, --rslora false)
    gamma: float = 16.0  # stable scaling: A0, B0 are multiplied by d_out^(1/4) / sqrt(gamma)
    rslora: bool = True  # s = alpha / sqrt(r) (the paper's Algorithm 1); false: alpha / r (the official example)
    direction: str = "ArB2r"  # which singular vectors: ArB2r (paper) | A2rBr | ArBr | random (official options)
    init_samples: int = 64  # training examples whose mean gradient defines the init (official example: 128)
    init_offload: bool = False  # accumulate the init gradients on the CPU (large models)
    init_stream: bool = False  # one process: one backward over the init examples, each layer initialised as soon as
    # its gradient is complete, then freed: at most a layer's gradient at once, not every layer's (step.stream_init)
    svd: str = "exact"  # exact | lowrank (randomized, q = 2r + 16)
    svd_niter: int = 4  # power iterations of --svd lowrank
    targets: tuple = TARGETS  # the adapted nn.Linear names (HF module names), comma-separated
    seed: int = 0  # the randomized SVD's sketch


DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")


def direction(cfg: Config, gen):
    """Which of the top-2r singular vectors A (rows: right vectors) and B (columns: left vectors) take; every
    option gives A and B disjoint halves of the top 2r, so the first step reaches rank 2r.
    ArB2r (paper): A the first r, B the next r. A2rBr: the reverse. ArBr (the official code's): interleaved, B the
    even-numbered vectors (U[:, 0:2r:2]) and A the odd-numbered ones (V^T[1:2r:2]). random: a random split."""
    r = cfg.rank
    first, second = torch.arange(r), torch.arange(r, 2 * r)
    if cfg.direction == "ArB2r":
        return first, second
    if cfg.direction == "A2rBr":
        return second, first
    if cfg.direction == "ArBr":
        return torch.arange(1, 2 * r, 2), torch.arange(0, 2 * r, 2)
    p = torch.randperm(2 * r, generator=gen)  # random: a random split of the top 2r between A and B
    return p[:r].sort().values, p[r:].sort().values


class Linear(nn.Linear):
    def __init__(self, base: nn.Linear, A0, B0, scale):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # W0 itself: never offset
        self.scale = scale
        self.lora_A = nn.Parameter(A0.clone())  # (r, d_in), fp32, trained
        self.lora_B = nn.Parameter(B0.clone())  # (d_out, r), fp32, trained
        self.register_buffer("lora_A0", A0)  # frozen copies of the init
        self.register_buffer("lora_B0", B0)

    def delta(self, x):
        """s (B A - B0 A0) x = s [(B - B0) A x + B0 (A - A0) x]: zero at init, and the small differences are formed
        in fp32 before the compute dtype sees them."""
        dA, dB = self.lora_A - self.lora_A0, self.lora_B - self.lora_B0  # (r, d_in), (d_out, r)
        return self.scale * (F.linear(F.linear(x, self.lora_A), dB) + F.linear(F.linear(x, dA), self.lora_B0))

    def forward(self, x):
        return adapted_linear(x, self.weight, self.bias, self.delta(x))  # delta added inside the base GEMM

    def merged_weight(self):
        A, B, A0, B0 = (t.float() for t in (self.lora_A, self.lora_B, self.lora_A0, self.lora_B0))
        return self.weight.float() + self.scale * (B @ A - B0 @ A0)  # (d_out, d_in)

    def lora_pair(self):
        """Rank-2r PEFT LoRA on the untouched W0 with scale 1: [A; A0] and s [B, -B0]."""
        A = torch.cat([self.lora_A, self.lora_A0], 0).float()  # (2r, d_in)
        B = self.scale * torch.cat([self.lora_B, -self.lora_B0], 1).float()  # (d_out, 2r)
        return A, B


def apply(model, cfg: Config, grads=None, init=True, first_lr=0.0):
    """Freeze the model; wrap every targeted nn.Linear as LoRA initialised from the SVD of its gradient.
    `grads` (module name -> fp32 gradient) is consumed as layers are built. init=False builds zero layers for
    load_adapter_state_dict."""
    r = cfg.rank
    scale = cfg.alpha / (math.sqrt(r) if cfg.rslora else r)
    if init and grads is None:
        raise UserError("LoRA-GA initialises from gradients: run it through train.py (init_samples > 0)")
    if cfg.svd not in ("exact", "lowrank"):
        raise UserError(f"--svd must be exact or lowrank, got {cfg.svd!r}")
    if cfg.direction not in DIRECTIONS:
        raise UserError(f"--direction must be one of {', '.join(DIRECTIONS)}, got {cfg.direction!r}")
    model.requires_grad_(False)

    def build(name, lin):
        gen = torch.Generator().manual_seed(cfg.seed)  # per layer: its init does not depend on the others' order
        dev, d_out, d_in = lin.weight.device, lin.out_features, lin.in_features
        dtype = torch.promote_types(lin.weight.dtype, torch.float32)  # fp32 (fp64 for an fp64 model)
        if not 1 <= 2 * r <= min(d_out, d_in):
            raise UserError(f"LoRA-GA needs 2 * rank <= {min(d_out, d_in)} for {name}, got rank {r}")
        if not init:
            return Linear(lin, torch.zeros(r, d_in, device=dev, dtype=dtype),
                          torch.zeros(d_out, r, device=dev, dtype=dtype), scale)
        if name not in grads:
            raise UserError(f"LoRA-GA: no init gradient for {name}")
        G = grads.pop(name).to(dev, dtype)  # (d_out, d_in)
        U, _, Vh = truncated_svd(G, 2 * r, cfg.svd, cfg.svd_niter, gen)  # top 2r of G
        a, b = direction(cfg, gen)  # indices of the singular vectors for A's rows and B's columns
        c = d_out ** 0.25 / math.sqrt(cfg.gamma)  # stable scaling (Algorithm 1)
        return Linear(lin, (c * Vh[a]).contiguous(), (c * U[:, b]).contiguous(), scale)
    return swap_linears(model, cfg.targets, build)


ADAPTER_KEYS = ("lora_A", "lora_B", "lora_A0", "lora_B0")


def adapter_state_dict(model):
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in ADAPTER_KEYS}


def load_adapter_state_dict(model, sd):
    load_strict(adapter_state_dict(model), sd)


def merge(model):
    return merge_linears(model, Linear)


def on_step(model, cfg, step):
    pass
