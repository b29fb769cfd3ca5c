"""
LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021, arXiv 2106.09685). The baseline.

    y = W0 x + s * B (A x),        s = alpha / r        (rsLoRA, arXiv 2312.03732: s = alpha / sqrt(r))

- W0 (d_out, d_in) is frozen. A (r, d_in) starts Kaiming-uniform (a = sqrt 5, as nn.Linear and PEFT do),
  B (d_out, r) starts at zero, so the adapted model equals the base model at step 0; both train.
- Trainable parameters per layer: r (d_in + d_out). Defaults r = 16, alpha = 32, all seven projections.
- Merge: W = W0 + s B A (fp32).
- Precision: on a bf16 base the adapter's output s B A x is added inside the base GEMM (model.adapted_linear),
  before its one bf16 rounding, so a small update is not rounded away by the output either.
- Optional dropout on the adapter's input x (not on the base path), as in the paper's code and PEFT.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import UserError
from model import adapted_linear, load_strict, merge_linears, swap_linears

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_LR = 2e-4  # a common LoRA learning rate for 7B-scale math fine-tuning
CUDA_GRAPH = True  # its forward keeps no per-step Python state: a step can be one CUDA graph
GRADIENT_INIT = False  # apply() needs no gradients
NESTED_RANKS = False  # one rank per adapter


@dataclass
class Config:
    rank: int = 16  # r, the rank of B A
    alpha: float = 32.0  # the update is scaled by s = alpha / r
    dropout: float = 0.0  # dropout on the adapter's input x (training only)
    rslora: bool = False  # s = alpha / sqrt(r) (rsLoRA) instead of alpha / r
    targets: tuple = TARGETS  # the adapted nn.Linear names (HF module names), comma-separated
    seed: int = 0  # draws A (its random init)


class Linear(nn.Linear):
    def __init__(self, base: nn.Linear, cfg: Config, gen: torch.Generator):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the frozen base Parameters themselves
        r, dev = cfg.rank, base.weight.device
        if r > min(base.weight.shape):  # B A could not have rank r: only parameters would be added
            d_out, d_in = base.weight.shape
            raise UserError(f"--rank={r} exceeds {min(d_out, d_in)}, the smaller side of a {d_out} x {d_in} "
                            "target layer")
        self.scale = cfg.alpha / (math.sqrt(r) if cfg.rslora else r)
        self.dropout = cfg.dropout
        A = torch.empty(r, self.in_features)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=gen)  # drawn on the CPU: same A on any device
        self.lora_A = nn.Parameter(A.to(dev))  # (r, d_in), fp32
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev))  # (d_out, r), fp32

    def delta(self, x):
        """The adapter's output s B A x (dropout on its input while training)."""
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout)
        return self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)  # two skinny matmuls: x -> r -> d_out

    def forward(self, x):
        return adapted_linear(x, self.weight, self.bias, self.delta(x))  # delta added inside the base GEMM

    def merged_weight(self):
        return self.weight.float() + self.scale * self.lora_B.float() @ self.lora_A.float()  # (d_out, d_in)

    def lora_pair(self):
        """(A, B) of the equivalent PEFT LoRA with scale 1 (the scale folded into B)."""
        return self.lora_A.float(), self.scale * self.lora_B.float()


def apply(model, cfg: Config, grads=None, init=True, first_lr=0.0):
    """Freeze the model and swap every targeted nn.Linear for a LoRA Linear (init=False: the same layers, to be
    filled by load_adapter_state_dict; drawing A is cheap, so it is drawn anyway)."""
    if cfg.rank < 1:
        raise UserError(f"--rank must be >= 1, got {cfg.rank}")
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(cfg.seed)
    return swap_linears(model, cfg.targets, lambda name, lin: Linear(lin, cfg, gen).train(lin.training))


ADAPTER_KEYS = ("lora_A", "lora_B")


def adapter_state_dict(model):
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in ADAPTER_KEYS}


def load_adapter_state_dict(model, sd):
    load_strict(adapter_state_dict(model), sd)


def merge(model):
    return merge_linears(model, Linear)


def on_step(model, cfg, step):
    pass
