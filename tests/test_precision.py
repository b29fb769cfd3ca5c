"""The CUDA precision policy, run on the CPU (which has bf16): frozen base and buffers in bf16, trainable tensors in
fp32, compute under bf16 autocast. After a few optimizer steps at each method's default learning rate, the forward
must keep the update the method's math says, merged_weight() after - merged_weight() before, computed exactly.

How it is measured: the effective weight of a layer's forward is estimated by least squares over N random bf16
inputs, y = x M^T, and the change of M over the steps is compared with the exact change of merged_weight(). The
bf16 output of a layer is rounded anyway: that rounding varies from token to token, so it is noise that least
squares averages out. It sets the estimator's floor, which we measure on the ideal forward, the exact weight applied
in fp64 and its output rounded once to bf16. A forward passes if its error is within 1.5x that floor + 0.01;
the floor itself is kept below 0.05 (N = 2^17 inputs, or 2^16 for a method whose update is larger; 10 steps, or 3
where a smaller update is still resolved: FEW_STEPS), so the test can resolve a loss of a few percent.
What fails is a systematic loss: an update rounded into a bf16 weight (the same error for every token), or a small
adapter output added to a bf16 output that is already a bf16 number (y0 + d rounds back to y0 wherever |d| is below
half an ulp). Before the fix, Bone's guided form lost 84% of its update, the shared form 38%, LoRA-GA 119% (its
bf16 base offset moved the start by 75% of the update), LoRA-SB 2.4% against a 0.3% floor.
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
N, STEPS = 2 ** 17, 10
FEW_STEPS = {"lora": 3, "sb": 3, "dylora": 3}  # a smaller update, still resolved: one that adding the adapter's
# output after the bf16 rounding would partly lose (measured: the forward then keeps 93% of it, and these cases fail);
# after 10 steps their update is too large for that loss to show. lora-rslora, xs and dylora-rank2 do not resolve it
# at 3 steps either (measured): a known gap.
SMALL_UPDATE = ("ga", "bone")  # their default lr (2e-5) moves the weight least: they need all N rows to resolve it;
# the others resolve theirs to a floor of 0.011 or less with half (measured), which is what they get (CPU time)
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
    rows = N if CASES[name][0] in SMALL_UPDATE else N // 2
    X = {n: torch.randn(rows, model.get_submodule(n).in_features, generator=g).bfloat16() for n in LAYERS}
    XtX_inv = {n: torch.linalg.inv(x.double().T @ x.double()) for n, x in X.items()}  # (d_in, d_in)

    def lsq(n, dY):  # the weight change M (d_out, d_in) whose x M^T best explains the output change dY (N, d_out)
        return (XtX_inv[n] @ (X[n].float().T @ dY).double()).T

    def ideal(n):  # the exact weight, applied in fp64, rounded once to bf16
        return (X[n].double() @ model.get_submodule(n).merged_weight().double().T).bfloat16().float()

    base = {n: (X[n].float() @ W0[n].float().T).bfloat16().float() for n in LAYERS}  # the base layer's bf16 output
    before = {n: (forward_bf16(model.get_submodule(n), X[n]), ideal(n), model.get_submodule(n).merged_weight().double())
              for n in LAYERS}
    lr = method.DEFAULT_LR
    steps = FEW_STEPS.get(name, STEPS)
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
