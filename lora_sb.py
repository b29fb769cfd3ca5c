"""
LoRA-SB: Initialization Using Update Approximation is a Silver Bullet for Extreme Efficient Low-Rank
Fine-Tuning (Ponkshe et al., arXiv 2411.19557).

Architecture of LoRA-XS (lora_xs.py), with s = 1:   y = W0 x + B R A x,  only R (r, r) trains.
Initialisation from the first step full fine-tuning would take:

    G   = dL/dW over the first `init_samples` training examples (fp32; train.py computes it)
    dW  = -lr_1 * sign(G)                  # Adam's first step: m1 / sqrt(v1) = g / |g|  (sb_update=grad: -lr_1 G)
    dW ~= Q diag(S) P^T                    # rank-r truncated SVD, fp32: randomized by default (svd=lowrank)
    B = Q (d_out, r),  A = P^T (r, d_in),  R0 = diag(S);   W0 is NOT changed

so at step 0 the model already is W0 + trunc_r(dW): one approximate full fine-tuning step was taken.

Why this approximates full fine-tuning: with B, A frozen, a gradient step on R moves W by B (B^T G A^T) A, the
projection of the full gradient G onto the FIXED subspaces span(B) x span(A^T) chosen at init. The bet (the
paper's) is that full fine-tuning's later updates stay mostly within the subspaces of its first update; a later
step is then the projection of the full gradient onto those subspaces, not the best rank-r approximation of that
later gradient, and AdamW rescales it per entry of R (so it is not even the projected gradient step exactly).
B and A are orthonormal, so the projection is not rescaled by the frozen factors (as it is in LoRA-XS, where A
carries W0's singular values).

The SVD: by default a randomized one (Halko et al., `svd=lowrank`: r + 16 sketch columns, `svd_niter` = 4 power
iterations, seeded): on a SmolLM2 MLP shape (1536 x 576, r = 64) 0.10 s against 3.2 s for the exact SVD on 2 CPU
cores, at a truncation error within 1% of the exact one there (tests/test_lora_xs_sb.py); the cost is that the
factors are approximate. `svd=exact` takes torch.linalg.svd.

Deliberate difference from the official code: lr_1 is the learning rate of our run's first optimizer step
(lr / warmup_steps under linear warm-up). The official code divides lr by warmup_ratio times the length of its
gradient-estimation loader (batches of 3), which is not the optimizer's step count and makes lr_1 ~10x smaller.
Parameters per layer: r^2 (Mistral-7B, r = 96, 7 modules, 32 layers: 2,064,384).
"""
from dataclasses import dataclass

import torch

from cli import UserError
# the layer, its state and its merge are LoRA-XS's: only the initialisation differs
from lora_xs import TARGETS, Linear, adapter_state_dict, load_adapter_state_dict, merge, on_step, truncated_svd  # noqa: F401
from model import swap_linears

# Measured on SmolLM2-135M-Instruct, GSM8K, r = 64, batch 16, 14 warm-up steps (held-out loss right after the
# init / after one epoch; base 1.437): lr 1e-3: 1.246 / 0.896, 3e-3: 1.381 / 0.864, 1e-2: 2.893 / 0.853.
# R wants a larger lr than LoRA-XS's (orthonormal B, A do not carry W0's singular values), but lr_1 = lr / warm-up
# also sizes the init step -lr_1 sign(G), which hurts beyond ~2e-4; 3e-3 balances the two (or set --lr_1).
DEFAULT_LR = 3e-3
CUDA_GRAPH = True  # its forward keeps no per-step Python state: a step can be one CUDA graph
GRADIENT_INIT = True  # apply() needs the fp32 gradients of Config.init_samples examples
NESTED_RANKS = False  # one rank per adapter


@dataclass
class Config:
    rank: int = 64  # r: R is r x r
    init_samples: int = 64  # training examples whose gradient defines the first update (paper: 50)
    sb_update: str = "sign"  # sign: -lr_1 sign(G) (Adam's first step) | grad: -lr_1 G (SGD's)
    lr_1: float = 0.0  # the init step's learning rate; 0: the run's first optimizer step's (apply's first_lr)
    init_offload: bool = False  # accumulate the init gradients on the CPU (large models)
    init_stream: bool = False  # one process: one backward over the init examples, each layer initialised as soon as
    # its gradient is complete, then freed: at most a layer's gradient at once, not every layer's (step.stream_init)
    svd: str = "lowrank"  # lowrank (randomized, power iterations) | exact
    svd_niter: int = 4  # power iterations of --svd lowrank
    targets: tuple = TARGETS  # the adapted nn.Linear names (HF module names), comma-separated
    seed: int = 0  # the randomized SVD's sketch


def first_update(G, cfg: Config):
    """The full fine-tuning update that the init approximates: -lr_1 sign(G) or -lr_1 G."""
    if cfg.sb_update == "sign":
        return -cfg.lr_1 * torch.sign(G)
    if cfg.sb_update == "grad":
        return -cfg.lr_1 * G
    raise UserError(f"--sb_update must be sign or grad, got {cfg.sb_update!r}")


def apply(model, cfg: Config, grads=None, init=True, first_lr=0.0):
    """Freeze the model; wrap every targeted nn.Linear with B, R0, A from the truncated SVD of its first update,
    dW = -lr_1 sign(G) with lr_1 = cfg.lr_1, or first_lr (the run's first optimizer step) if that is 0. `grads`
    maps module names to fp32 gradients; each is consumed (popped) as soon as its layer is built, so their memory
    is released during the init. init=False builds zero layers for load_adapter_state_dict."""
    r = cfg.rank
    if cfg.svd not in ("exact", "lowrank") or cfg.sb_update not in ("sign", "grad"):
        raise UserError(f"--svd must be exact or lowrank and --sb_update sign or grad, got {cfg.svd!r}, "
                        f"{cfg.sb_update!r}")
    if init and grads is None:
        raise UserError("LoRA-SB initialises from gradients: run it through train.py (init_samples > 0)")
    if init:
        cfg.lr_1 = cfg.lr_1 or first_lr  # recorded in the config, so the run's config.json says what was used
    if init and cfg.lr_1 <= 0:
        raise UserError("LoRA-SB needs lr_1 > 0, the learning rate of the first optimizer step")
    if init and cfg.sb_update == "sign" and cfg.lr_1 > 1e-3:
        print(f"LoRA-SB: lr_1 = {cfg.lr_1:.2g} moves every weight by that much in the init step (-lr_1 sign(G)); "
              f"that usually hurts: more warm-up steps or --lr_1 set it apart from the learning rate of R")
    model.requires_grad_(False)

    def build(name, lin):
        gen = torch.Generator().manual_seed(cfg.seed)  # per layer: its init does not depend on the others' order
        if not 1 <= r <= min(lin.weight.shape):
            raise UserError(f"--rank={r} must be between 1 and {min(lin.weight.shape)} for {name}")
        dev, d_out, d_in = lin.weight.device, lin.out_features, lin.in_features
        if init:
            if name not in grads:
                raise UserError(f"LoRA-SB: no init gradient for {name}")
            dW = first_update(grads.pop(name).to(dev, torch.float32), cfg)  # (d_out, d_in)
            Q, S, Ph = truncated_svd(dW, r, cfg.svd, cfg.svd_niter, gen)  # dW ~= Q diag(S) Ph
            B, R, A = Q, torch.diag(S), Ph
        else:
            B, R, A = torch.zeros(d_out, r, device=dev), torch.zeros(r, r, device=dev), torch.zeros(r, d_in, device=dev)
        B, A = (t.to(lin.weight.dtype).contiguous() for t in (B, A))  # frozen: kept in the compute dtype
        return Linear(lin, B, A, R, 1.0)
    return swap_linears(model, cfg.targets, build)
