"""
Bone: Block Affine Adaptation of Large Language Models (Kang, arXiv 2409.15371), the seed paper's "Weight
Guide" form (versions 1-3; later versions and PEFT call it Bat).

Split W (d_out, d_in) into b x b blocks W_ij (row block i, column block j). One trainable R_i (b x b) per row
block, shared by that row's column blocks:

    W'_ij = W_ij + W_ij R_i + R_i = W_ij (I + R_i) + R_i            R_i = 0 at init: the model starts at W0

The update is guided by the weight itself (W_ij R_i) and its gradient is dL/dR_i = sum_j (W_ij^T + I) G_ij, with
G = dL/dW' the full weight gradient. The forward computes W x + Delta W x with Delta W = W' - W (blocks W_ij R_i +
R_i) materialised once per forward in the compute dtype (a batched product of 2 b d_out d_in FLOPs) and applied as
its own GEMM, added inside the base GEMM's accumulator (model.adapted_linear). Forming W' = W + Delta W in bf16
instead would round most of the update away: early in training |Delta W| is far below half a bf16 ulp of W
(tests/test_precision.py). That costs one more weight-sized GEMM in the forward and one in the backward; the
backward forms the weight-sized gradient G as full fine-tuning does anyway, so a step costs about what full
fine-tuning costs (which is why the paper finds it converges like it); memory stays far lower (no optimizer state
for W). Autograd keeps one compute-dtype Delta W per layer for the input gradient; --grad_checkpoint recomputes it
instead. d_in and d_out must be multiples of b.

`bone_variant=shared` is the later weight-free form (PEFT's MiSS default): a trainable D (b, d_out), zeros,
tiled across the input, Delta W = [D^T D^T ... D^T], i.e. y = W0 x + D^T (sum_j x_[j]) with x zero-padded to a
multiple of b. It is an exact rank-b LoRA (A = tiled identity, B = D^T) and exports as one.

No scale factor. Parameters per layer: b * d_out for both (Llama-2-7B, 7 modules, b = 64: 87,031,808).
Merge: W = W'. Unmerge (guided): W_ij = (W'_ij - R_i)(I + R_i)^-1 in fp32.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import UserError
from model import adapted_linear, load_strict, merge_linears, swap_linears

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_LR = 2e-5
CUDA_GRAPH = True  # its forward keeps no per-step Python state: a step can be one CUDA graph
GRADIENT_INIT = False  # apply() needs no gradients
NESTED_RANKS = False  # one rank per adapter


@dataclass
class Config:
    block_size: int = 64  # b: each R_i is b x b (it must divide every target's dimensions)
    bone_variant: str = "guided"  # guided (W'_ij = W_ij + W_ij R_i + R_i) | shared (tiled D, weight-free)
    targets: tuple = TARGETS  # the adapted nn.Linear names (HF module names), comma-separated
    seed: int = 0  # unused: the init is zeros


def blocks(W, b):
    """(d_out, d_in) -> (d_out/b, d_in/b, b, b), block [i, j] = W[i b:(i+1) b, j b:(j+1) b] (a view)."""
    return W.view(W.shape[0] // b, b, W.shape[1] // b, b).transpose(1, 2)


def unblocks(Wb):
    n, m, b, _ = Wb.shape
    return Wb.transpose(1, 2).reshape(n * b, m * b)


def unmerge_weight(Wp, R):
    """Recover W from W' = W (I + R_i) + R_i blockwise, in fp32: W_ij = (W'_ij - R_i)(I + R_i)^-1."""
    b = R.shape[-1]
    R = R.double()[:, None]  # (n, 1, b, b)
    I = torch.eye(b, dtype=torch.float64, device=R.device)
    return unblocks(torch.linalg.solve(I + R, blocks(Wp.double(), b) - R, left=False)).float()


class Linear(nn.Linear):
    def __init__(self, base: nn.Linear, cfg: Config, name: str):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the frozen base Parameters themselves
        b, d_out, d_in, dev = cfg.block_size, base.out_features, base.in_features, base.weight.device
        self.b, self.variant = b, cfg.bone_variant
        if self.variant == "guided":
            if d_in % b or d_out % b:
                raise UserError(f"Bone: {name} is {d_out} x {d_in}, not divisible by --block_size={b}; choose a "
                                f"block size dividing both, or --bone_variant=shared")
            self.bone_R = nn.Parameter(torch.zeros(d_out // b, b, b, device=dev))  # (n_out, b, b), one per row block
        elif self.variant == "shared":
            self.bone_D = nn.Parameter(torch.zeros(b, d_out, device=dev))  # (b, d_out)
        else:
            raise UserError(f"--bone_variant must be guided or shared, got {self.variant!r}")

    def guided_update(self, dtype=None):
        """Delta W = W' - W, blocks W_ij R_i + R_i, in `dtype` (None: the compute dtype, under autocast bf16)."""
        W, R = (self.weight, self.bone_R) if dtype is None else (self.weight.to(dtype), self.bone_R.to(dtype))
        Wb = blocks(W, self.b)  # (n_out, n_in, b, b)
        R = R[:, None]  # (n_out, 1, b, b): shared across the row's column blocks
        return unblocks(Wb @ R + R)  # (d_out, d_in): W'_ij - W_ij = W_ij R_i + R_i

    def fold_input(self, x):
        """sum_j x_[j]: the b-chunks of x (zero-padded to a multiple of b) added together."""
        pad = -x.shape[-1] % self.b
        return F.pad(x, (0, pad)).view(*x.shape[:-1], -1, self.b).sum(-2)  # (..., b)

    def forward(self, x):
        if self.variant == "guided":
            delta = F.linear(x, self.guided_update())  # Delta W x: its own GEMM, not rounded into W
        else:
            delta = F.linear(self.fold_input(x), self.bone_D.t())  # D^T sum_j x_[j]
        return adapted_linear(x, self.weight, self.bias, delta)  # W x + delta, added inside the base GEMM

    def merged_weight(self):
        if self.variant == "guided":
            return self.weight.float() + self.guided_update(torch.float32)
        n = -(-self.in_features // self.b)
        return self.weight.float() + self.bone_D.t().float().repeat(1, n)[:, :self.in_features]

    def lora_pair(self):
        """shared variant only: an exact rank-b PEFT LoRA, A = tiled identity (b, d_in), B = D^T."""
        if self.variant != "shared":
            raise UserError("the weight-guided Bone has no LoRA form: use --export merged")
        n = -(-self.in_features // self.b)
        A = torch.eye(self.b, device=self.weight.device).repeat(1, n)[:, :self.in_features]
        return A, self.bone_D.t().float()


def apply(model, cfg: Config, grads=None, init=True, first_lr=0.0):
    """Freeze the model and swap every targeted nn.Linear for a Bone Linear (zeros: outputs unchanged)."""
    model.requires_grad_(False)
    return swap_linears(model, cfg.targets, lambda name, lin: Linear(lin, cfg, name))


ADAPTER_KEYS = ("bone_R", "bone_D")


def adapter_state_dict(model):
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in ADAPTER_KEYS}


def load_adapter_state_dict(model, sd):
    load_strict(adapter_state_dict(model), sd)


def merge(model):
    return merge_linears(model, Linear)


def on_step(model, cfg, step):
    pass
