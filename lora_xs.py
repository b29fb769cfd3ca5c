"""
LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters (Balazy et al., arXiv 2405.17604).

    y = W0 x + s * B R A x,        W0 ~= U_r S_r V_r^T (truncated SVD of the weight itself)
                                   B = U_r (d_out, r),  A = S_r V_r^T (r, d_in),  R (r, r)

- B and A are frozen: they span the top-r singular subspaces of W0, with the singular values on A (as in the
  official code). Only R trains: r^2 parameters per layer, independent of the model's width.
- R ~ N(0, 1e-5^2): small but not zero, as in the official code. This is fidelity only: R's gradient
  dL/dR = s B^T G A^T does not depend on R (B, A are frozen), so R = 0 would train the same way; there is no
  saddle to escape, unlike LoRA's product B A.
- s = alpha / r with alpha = r by default (s = 1). No data and no gradients are needed to initialise.
- Merge: W = W0 + s B R A (fp32). PEFT export: a plain rank-r LoRA with B' = s B R and A' = A.
- The SVD runs in fp32 on the layer's device: exact (torch.linalg.svd) by default, or randomized with power
  iterations (`svd=lowrank`, seeded). B and A are stored in the checkpoint, so loading never depends on
  recomputing them and never silently drops R (the trap of the official checkpoints opened with plain PEFT).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import UserError
from model import adapted_linear, load_strict, merge_linears, swap_linears

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_LR = 4e-3  # the official math setting (r = 64); R is tiny, so it takes a large learning rate
CUDA_GRAPH = True  # its forward keeps no per-step Python state: a step can be one CUDA graph
GRADIENT_INIT = False  # apply() needs no gradients
NESTED_RANKS = False  # one rank per adapter


@dataclass
class Config:
    rank: int = 64  # r: R is r x r
    alpha: float = 0.0  # 0: alpha = rank, i.e. s = 1
    init_std: float = 1e-5  # R ~ N(0, init_std^2)
    svd: str = "exact"  # exact | lowrank (randomized, `svd_niter` power iterations)
    svd_niter: int = 4  # power iterations of --svd lowrank
    targets: tuple = TARGETS  # the adapted nn.Linear names (HF module names), comma-separated
    seed: int = 0  # draws R (and the randomized SVD's test matrix)


def truncated_svd(M, r, method="exact", niter=4, gen=None):
    """Top-r singular triplets of M (d_out, d_in) in fp32 (or fp64): U (d_out, r), S (r,), Vh (r, d_in).
    lowrank: Halko et al. 2011 (Alg. 4.4): a Gaussian sketch with r + 16 columns, `niter` power iterations
    (each re-orthonormalised), then an exact SVD of the small projected matrix. Each pair's sign, which an SVD leaves
    free, is fixed (the largest |entry| of u_i positive), so the factors are a function of M up to rounding: gradients
    summed in another order (several processes, one pass or micro-batches) give the same init."""
    M = M.to(torch.promote_types(M.dtype, torch.float32))  # fp32 at least
    if method == "exact":
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return canonical_signs(U[:, :r], S[:r], Vh[:r])
    if method != "lowrank":
        raise UserError(f"--svd must be exact or lowrank, got {method!r}")
    q = min(r + 16, *M.shape)
    omega = torch.randn(M.shape[1], q, generator=gen).to(M.device, M.dtype)  # drawn on the CPU: same on any device
    Q = torch.linalg.qr(M @ omega).Q  # (d_out, q): a basis for the range of M
    for _ in range(niter):  # power iterations sharpen it towards the top singular vectors
        Q = torch.linalg.qr(M.T @ Q).Q
        Q = torch.linalg.qr(M @ Q).Q
    U, S, Vh = torch.linalg.svd(Q.T @ M, full_matrices=False)  # (q, d_in): small
    return canonical_signs((Q @ U)[:, :r], S[:r], Vh[:r])


def canonical_signs(U, S, Vh):
    """u_i and v_i flipped together (U S Vh unchanged) so that the largest |entry| of each u_i is positive."""
    s = torch.sign(U.gather(0, U.abs().argmax(0, keepdim=True)))  # (1, r)
    s[s == 0] = 1
    return U * s, S, Vh * s.T


class Linear(nn.Linear):
    def __init__(self, base: nn.Linear, B, A, R, scale):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the frozen base Parameters themselves
        self.register_buffer("lora_B", B)  # (d_out, r), frozen, in the base weight's dtype
        self.register_buffer("lora_A", A)  # (r, d_in), frozen
        self.lora_R = nn.Parameter(R)  # (r, r), the only trainable tensor
        self.scale = scale

    def delta(self, x):
        """The adapter's output s B R A x."""
        d = F.linear(F.linear(F.linear(x, self.lora_A), self.lora_R), self.lora_B)  # x -> r -> r -> d_out
        return d if self.scale == 1 else self.scale * d  # s = 1 (LoRA-SB, LoRA-XS's default): no kernel for it

    def forward(self, x):
        return adapted_linear(x, self.weight, self.bias, self.delta(x))  # delta added inside the base GEMM

    def merged_weight(self):
        return self.weight.float() + self.scale * self.lora_B.float() @ self.lora_R.float() @ self.lora_A.float()

    def lora_pair(self):
        """(A, B) of the equivalent PEFT LoRA with scale 1: R and s folded into B."""
        return self.lora_A.float(), self.scale * self.lora_B.float() @ self.lora_R.float()


def apply(model, cfg: Config, grads=None, init=True, first_lr=0.0):
    """Freeze the model; wrap every targeted nn.Linear with B, A from its own SVD and a small random R.
    init=False builds the layers only (zeros), to be filled by load_adapter_state_dict."""
    r, scale = cfg.rank, (cfg.alpha or cfg.rank) / cfg.rank
    if cfg.svd not in ("exact", "lowrank"):
        raise UserError(f"--svd must be exact or lowrank, got {cfg.svd!r}")
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(cfg.seed)

    def build(name, lin):
        if not 1 <= r <= min(lin.weight.shape):
            raise UserError(f"--rank={r} must be between 1 and {min(lin.weight.shape)} for {name}")
        dev = lin.weight.device
        if init:
            U, S, Vh = truncated_svd(lin.weight.data, r, cfg.svd, cfg.svd_niter, gen)
            B, A = U, S[:, None] * Vh  # singular values on A (official code)
        else:
            B, A = torch.zeros(lin.out_features, r, device=dev), torch.zeros(r, lin.in_features, device=dev)
        R = (cfg.init_std * torch.randn(r, r, generator=gen)).to(dev)
        B, A = (t.to(lin.weight.dtype).contiguous() for t in (B, A))  # frozen: kept in the compute dtype
        return Linear(lin, B, A, R, scale)
    return swap_linears(model, cfg.targets, build)


ADAPTER_KEYS = ("lora_A", "lora_B", "lora_R")


def adapter_state_dict(model):
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in ADAPTER_KEYS}


def load_adapter_state_dict(model, sd):
    load_strict(adapter_state_dict(model), sd)


def merge(model):
    return merge_linears(model, Linear)


def on_step(model, cfg, step):
    pass
