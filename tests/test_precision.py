"""The CUDA precision policy, run on the CPU (which has bf16): frozen base and buffers in bf16, trainable tensors in
fp32, compute under bf16 autocast. After a few optimizer steps at each method's default learning rate, the forward
must keep the update the method's math says, merged_weight() after - merged_weight() before, computed exactly.

How it is measured: the effective weight of a layer's forward is estimated by least squares over N random bf16
inputs, y = x M^T, and the change of M over the steps is compared with the exact change of merged_weight(). The
bf16 output of a layer is rounded anyway: that rounding varies from token to token, so it is noise that least
squares averages out. It sets the estimator's floor, which we measure on the ideal forward, the exact weight applied
in fp64 and its output rounded once to bf16. A forward passes if its error is within 1.5x that floor + 0.01;
the floor itself is kept below 0.05 (N = 2^16 inputs), so the test can resolve a loss of a few percent.
What fails is a systematic loss: an update rounded into a bf16 weight (the same error for every token), or a small
adapter output added to a bf16 output that is already a bf16 number (y0 + d rounds back to y0 wherever |d| is below
half an ulp). The second loses more of a smaller update, while the floor grows as 1/update: each case takes the
update (STEPS) that puts its floor near 0.04, where both bugs fail in every case (measured by injecting them).
Before the fix, Bone's guided form lost 84% of its update, the shared form 38%, LoRA-GA 119% (its bf16 base offset
moved the start by 75% of the update), LoRA-SB 2.4% against a 0.3% floor.
"""
import pytest
import torch
import torch.nn as nn

import runs
from conftest import hf_tiny
from model import Llama, ModelConfig

CASES = {  # name: (method, Config overrides): small ranks for the tiny model's 64, 32 and 96 wide layers
    "lora": ("lora", dict(rank=8)),
    "lora-rslora": ("lora", dict(rank=8, rslora=True)),
    "xs": ("xs", dict(rank=8)),
    "sb": ("sb", dict(rank=8)),
    "ga": ("ga", dict(rank=4)),
    "ga-ArBr-linear": ("ga", dict(rank=4, direction="ArBr", rslora=False)),
    "dylora": ("dylora", dict(rank=8)),
    "dylora-rank2": ("dylora", dict(rank=8, eval_rank=2)),
    "bone": ("bone", dict(block_size=16)),
    "bone-shared": ("bone", dict(block_size=16, bone_variant="shared")),
}
N = 2 ** 16  # rows of X: the bf16 GEMMs over them are most of this file's CPU time
STEPS = {  # AdamW-sized steps at the method's default lr (every trainable entry moves by about steps * lr; a fraction
    # is a smaller lr). Adding the adapter's output after the bf16 rounding loses more of a smaller update, but the
    # floor grows as 1/update: each case takes the update that puts its worse layer's floor near 0.04 (measured:
    # 0.021-0.040), since the methods' updates per step differ by 100x (lr, scale, eval rank). Measured by injecting
    # the bugs: the adapter added after the rounding errs by 2.2-3.5x the tolerance in every case and layer (3 steps
    # for all of LoRA's cases had left rslora, xs and dylora-rank2 passing), the update merged into a bf16 weight by
    # 9-29x; the correct forward errs by at most 0.58x it
    "lora": 2.25, "lora-rslora": 0.8, "xs": 0.35, "sb": 2, "ga": 8, "ga-ArBr-linear": 18, "dylora": 2.25,
    "dylora-rank2": 1.2, "bone": 15, "bone-shared": 15,
}
LAYERS = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj")  # 64 x 64 and 64 x 96


def bf16_model_with(name):
    """The tiny model in bf16 (as from_pretrained loads it on CUDA), then the method applied to it, as train.py does."""
    method_name, overrides = CASES[name]
    method = runs.METHODS[method_name]
    hf = hf_tiny()
    model = Llama(ModelConfig.from_hf(hf.config.to_dict()))
    model.load_state_dict(hf.state_dict())
    model = model.to(torch.bfloat16)
    cfg = method.Config(**overrides)
    grads = None
    if method.GRADIENT_INIT:  # gradient-initialised methods: a random fp32 "gradient"
        g = torch.Generator().manual_seed(5)
        grads = {n: torch.randn(m.weight.shape, generator=g) for n, m in model.named_modules()
                 if type(m) is nn.Linear and n.split(".")[-1] in cfg.targets}
    W0 = {n: model.get_submodule(n).weight.detach().double().clone() for n in LAYERS}
    method.apply(model, cfg, grads, first_lr=3e-4)  # first_lr: LoRA-SB's init step
    return method, model.eval(), W0


def forward_bf16(layer, X):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return layer(X).float()  # (N, d_out), bf16 values


@pytest.mark.parametrize("name", list(CASES))
def test_bf16_policy_keeps_the_update(name):
    method, model, W0 = bf16_model_with(name)
    g = torch.Generator().manual_seed(0)
    X = {n: torch.randn(N, model.get_submodule(n).in_features, generator=g).bfloat16() for n in LAYERS}
    XtX_inv = {n: torch.linalg.inv(x.double().T @ x.double()) for n, x in X.items()}  # (d_in, d_in)

    def lsq(n, dY):  # the weight change M (d_out, d_in) whose x M^T best explains the output change dY (N, d_out)
        return (XtX_inv[n] @ (X[n].float().T @ dY).double()).T

    def ideal(n):  # the exact weight, applied in fp64, rounded once to bf16
        return (X[n].double() @ model.get_submodule(n).merged_weight().double().T).bfloat16().float()

    base = {n: (X[n].float() @ W0[n].float().T).bfloat16().float() for n in LAYERS}  # the base layer's bf16 output
    before = {n: (forward_bf16(model.get_submodule(n), X[n]), ideal(n), model.get_submodule(n).merged_weight().double())
              for n in LAYERS}
    lr = method.DEFAULT_LR
    steps = STEPS[name]
    with torch.no_grad():  # AdamW-sized steps: every entry moves by about lr per step
        for p in model.parameters():
            if p.requires_grad:
                assert p.dtype == torch.float32  # the policy: trainable tensors in fp32
                p.add_(steps * lr * torch.randn(p.shape, generator=g).sign())
    for n in LAYERS:
        layer = model.get_submodule(n)
        Y0, I0, W_before = before[n]
        dW = layer.merged_weight().double() - W_before  # the exact update
        err = (lsq(n, forward_bf16(layer, X[n]) - Y0) - dW).norm() / dW.norm()
        floor = (lsq(n, ideal(n) - I0) - dW).norm() / dW.norm()
        assert floor < 0.05, (n, floor)  # the test can resolve a loss of a few percent
        assert err <= 1.5 * floor + 0.01, f"{name} {n}: the forward keeps {1 - err:.1%} of the update (floor {floor:.3f})"
        # the start: the adapted forward at init is the base plus the init's exact change (zero but for LoRA-SB's
        # first step and LoRA-XS's small R), up to the same noise
        init = (lsq(n, Y0 - base[n]) - (W_before - W0[n])).norm() / dW.norm()
        assert init <= 1.5 * floor + 0.01, f"{name} {n}: the start is off by {init:.3f} of the update"
