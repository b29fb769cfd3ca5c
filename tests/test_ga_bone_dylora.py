import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bone
import dylora
import eval as ev
import lora_ga
import runs
from conftest import script, hf_tiny
from cli import UserError
from model import Llama, ModelConfig

train = script("train")  # train.py is a script: its main() is run, never imported


def tiny(dtype=torch.float32):
    hf = hf_tiny()
    model = Llama(ModelConfig.from_hf(hf.config.to_dict()))
    model.load_state_dict(hf.state_dict())
    return model.to(dtype).eval()


def targets_of(model, names):
    return {n: m for n, m in model.named_modules() if type(m) is nn.Linear and n.split(".")[-1] in names}


# ---------------------------------------------------------------------------------------------------- LoRA-GA

def loss_and_grads(model, idx, names):
    """The loss on one batch and its fp64 gradient w.r.t. every targeted weight."""
    ws = {n: m.weight for n, m in targets_of(model, names).items()}
    for w in ws.values():
        w.requires_grad_(True)
    loss = model(idx, idx.roll(-1, 1))[1]
    gs = torch.autograd.grad(loss, list(ws.values()))
    for w in ws.values():
        w.requires_grad_(False)
    return {n: g.detach().clone() for n, g in zip(ws, gs)}


@pytest.mark.parametrize("direction", lora_ga.DIRECTIONS)
def test_ga_init_and_first_step_property(direction):
    """Every direction takes 2r distinct singular vectors, so after one SGD step of size eta from the init,
    s (B A - B0 A0) = -eta s^2 c^2 G_2r + O(eta^2) (rank 2r), and the model starts exactly at W0."""
    r, names = 4, ("q_proj", "down_proj")
    idx = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    errors = []
    for eta in (1e-2, 1e-3):
        model = tiny(torch.float64)
        W0 = {n: m.weight.detach().clone() for n, m in targets_of(model, names).items()}
        with torch.no_grad():
            base_logits = model(idx)[0]
        G = loss_and_grads(model, idx, names)
        cfg = lora_ga.Config(rank=r, alpha=8.0, targets=names, direction=direction)
        lora_ga.apply(model, cfg, {n: g.clone() for n, g in G.items()})
        with torch.no_grad():  # B A - B0 A0 = 0: the model is where it was, and W0 is untouched
            assert torch.equal(model(idx)[0], base_logits)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, lora_ga.Linear)}
        s = 8.0 / math.sqrt(r)
        for n, m in layers.items():
            assert torch.equal(m.weight, W0[n])
            c2 = m.out_features ** 0.5 / 16.0
            U, S, Vh = torch.linalg.svd(G[n])
            assert torch.allclose(m.lora_A0 @ m.lora_A0.T, c2 * torch.eye(r, dtype=torch.float64), atol=1e-10)
            assert torch.allclose(m.lora_B0.T @ m.lora_B0, c2 * torch.eye(r, dtype=torch.float64), atol=1e-10)
            # A0's rows and B0's columns together span the top-2r singular vectors, without overlap
            PA, PB = Vh[:2 * r].T @ Vh[:2 * r], U[:, :2 * r] @ U[:, :2 * r].T
            assert torch.allclose(m.lora_A0 @ PA, m.lora_A0) and torch.allclose(PB @ m.lora_B0, m.lora_B0)
            a = (m.lora_A0 @ Vh[:2 * r].T).abs().gt(1e-6).any(0)  # which of the top 2r right vectors A uses
            b = (U[:, :2 * r].T @ m.lora_B0).abs().gt(1e-6).any(1)  # which left vectors B uses
            assert a.sum() == b.sum() == r and not (a & b).any()
        params = [p for p in model.parameters() if p.requires_grad]
        model(idx, idx.roll(-1, 1))[1].backward()
        with torch.no_grad():
            for p in params:
                p -= eta * p.grad
        for n, m in layers.items():
            c2 = m.out_features ** 0.5 / 16.0
            U, S, Vh = torch.linalg.svd(G[n])
            G2r = (U[:, :2 * r] * S[:2 * r]) @ Vh[:2 * r]
            got = s * (m.lora_B @ m.lora_A - m.lora_B0 @ m.lora_A0)
            want = -eta * s ** 2 * c2 * G2r
            errors.append(((got - want).norm() / want.norm()).item())
    big, small = errors[:len(errors) // 2], errors[len(errors) // 2:]  # per layer at eta = 1e-2, then 1e-3
    assert max(small) < 0.01 and all(s < b / 8 for s, b in zip(small, big))  # error = O(eta): -> 0 with eta


@pytest.mark.parametrize("direction,a,b", [("ArB2r", range(0, 4), range(4, 8)), ("A2rBr", range(4, 8), range(0, 4)),
                                           ("ArBr", range(1, 8, 2), range(0, 8, 2))])
def test_ga_directions(direction, a, b):
    """The singular vectors each option takes: ArBr is the official code's, A = V^T[1:2r:2], B = U[:, 0:2r:2]."""
    model = tiny(torch.float64)
    name = "model.layers.0.mlp.down_proj"
    G = torch.randn(64, 96, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lora_ga.apply(model, lora_ga.Config(rank=4, targets=("down_proj",), direction=direction),
                  {name: G, "model.layers.1.mlp.down_proj": G.clone()})
    m = model.get_submodule(name)
    U, S, Vh = torch.linalg.svd(G)
    c = 64 ** 0.25 / 4
    sign_a = torch.sign((m.lora_A0 * Vh[list(a)]).sum(1, keepdim=True))  # singular vectors up to their sign
    sign_b = torch.sign((m.lora_B0 * U[:, list(b)]).sum(0, keepdim=True))
    assert torch.allclose(m.lora_A0, c * sign_a * Vh[list(a)]) and torch.allclose(m.lora_B0, c * sign_b * U[:, list(b)])
    with pytest.raises(UserError, match="--direction must be"):
        lora_ga.apply(tiny(), lora_ga.Config(rank=4, direction="BrA"), {n: G for n in ["x"]})


def test_ga_keeps_w0_exports_rank_2r_scales_and_reloads_in_fp64():
    model = tiny()
    W0 = {n: m.weight.detach().clone() for n, m in targets_of(model, lora_ga.TARGETS).items()}
    g = torch.Generator().manual_seed(1)
    grads = {n: torch.randn(w.shape, generator=g) for n, w in W0.items()}
    lora_ga.apply(model, lora_ga.Config(rank=4), {n: v.clone() for n, v in grads.items()})
    for n, m in model.named_modules():
        if isinstance(m, lora_ga.Linear):
            assert torch.equal(m.weight, W0[n]) and m.scale == 16.0 / 2  # W0 untouched; alpha / sqrt(r)
            with torch.no_grad():
                m.lora_B.add_(0.01)
            A, B = m.lora_pair()
            assert A.shape[0] == B.shape[1] == 8
            assert torch.allclose(W0[n] + B @ A, m.merged_weight(), atol=1e-6)
    linear = tiny()
    lora_ga.apply(linear, lora_ga.Config(rank=4, rslora=False), {n: v.clone() for n, v in grads.items()})
    assert all(m.scale == 16.0 / 4 for m in linear.modules() if isinstance(m, lora_ga.Linear))  # the official alpha / r
    # an fp64 model rebuilds fp64 factors (init=False) and reloads its own adapter
    m64 = tiny(torch.float64)
    lora_ga.apply(m64, lora_ga.Config(rank=4), {n: v.double() for n, v in grads.items()})
    sd = {k: v.clone() for k, v in lora_ga.adapter_state_dict(m64).items()}
    fresh = tiny(torch.float64)
    lora_ga.apply(fresh, lora_ga.Config(rank=4), init=False)
    lora_ga.load_adapter_state_dict(fresh, sd)
    idx = torch.arange(24).view(2, 12)
    with torch.no_grad():
        assert torch.equal(fresh(idx)[0], m64(idx)[0])


# ---------------------------------------------------------------------------------------------------- Bone

def bone_layer(d_out=48, d_in=32, b=16, variant="guided", seed=0):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d_out, d_in, generator=g))
    layer = bone.Linear(base, bone.Config(block_size=b, bone_variant=variant), "test")
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return layer


def test_bone_block_formula_against_a_loop():
    layer, b = bone_layer(), 16
    W, R = layer.weight, layer.bone_R
    ref = torch.empty_like(W)
    for i in range(W.shape[0] // b):
        for j in range(W.shape[1] // b):
            Wij = W[i * b:(i + 1) * b, j * b:(j + 1) * b]
            ref[i * b:(i + 1) * b, j * b:(j + 1) * b] = Wij + Wij @ R[i] + R[i]
    assert torch.allclose(layer.merged_weight(), ref, atol=1e-5)
    x = torch.randn(5, 32)
    assert torch.allclose(layer(x), x @ ref.T, atol=1e-4)


def test_bone_gradient_closed_form():
    layer, b = bone_layer(), 16
    x, C = torch.randn(7, 32), torch.randn(7, 48)
    (layer(x) * C).sum().backward()
    G = C.T @ x  # dL/dW' for y = x W'^T
    W = layer.weight
    for i in range(3):
        want = sum((W[i * b:(i + 1) * b, j * b:(j + 1) * b].T + torch.eye(b)) @ G[i * b:(i + 1) * b, j * b:(j + 1) * b]
                   for j in range(2))
        assert torch.allclose(layer.bone_R.grad[i], want, atol=1e-3, rtol=1e-4)


def test_bone_zero_init_unmerge_shared_and_errors():
    base = nn.Linear(32, 48)
    x = torch.randn(3, 32)
    for variant in ("guided", "shared"):
        layer = bone.Linear(base, bone.Config(block_size=16, bone_variant=variant), "l")
        assert torch.equal(layer(x), base(x))  # zeros: unchanged outputs
    layer = bone_layer()
    assert torch.allclose(bone.unmerge_weight(layer.merged_weight(), layer.bone_R), layer.weight, atol=1e-5)
    shared = bone_layer(d_out=40, d_in=36, b=16, variant="shared")  # 36 is not a multiple of 16: x is padded
    xp = torch.cat([x[:, :32], x[:, :4]], 1)  # (3, 36)
    chunks = [xp[:, :16], xp[:, 16:32], F.pad(xp[:, 32:], (0, 12))]
    want = xp @ shared.weight.T + sum(chunks) @ shared.bone_D
    assert torch.allclose(shared(xp), want, atol=1e-5)
    assert torch.allclose(xp @ shared.merged_weight().T, want, atol=1e-5)
    with pytest.raises(UserError, match="Bone: model.layers.0.self_attn.k_proj is 32 x 64, not divisible by --block_size=64"):
        bone.apply(tiny(), bone.Config(block_size=64))


def test_bone_trainable_count_llama2_7b_shapes():
    shapes = dict(q_proj=(4096, 4096), k_proj=(4096, 4096), v_proj=(4096, 4096), o_proj=(4096, 4096),
                  gate_proj=(11008, 4096), up_proj=(11008, 4096), down_proj=(4096, 11008))
    with torch.device("meta"):
        per_layer = sum(p.numel() for d_out, d_in in shapes.values()
                        for p in bone.Linear(nn.Linear(d_in, d_out, bias=False).requires_grad_(False), bone.Config(),
                                             "x").parameters()
                        if p.requires_grad)
    assert 32 * per_layer == 87_031_808


# ---------------------------------------------------------------------------------------------------- DyLoRA

def test_dylora_at_rank_b_is_a_plain_lora():
    model = tiny()
    dylora.apply(model, dylora.Config(rank=6, alpha=12.0))
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 64)
    for b in range(1, 7):
        layer.eval_rank = b
        want = F.linear(x, layer.weight) + (12.0 / b) * x @ layer.lora_A[:b].T @ layer.lora_B[:, :b].T
        assert torch.allclose(layer(x), want, atol=1e-5)
        assert torch.allclose(F.linear(x, layer.merged_weight()), want, atol=1e-5)


@pytest.mark.parametrize("frozen", [True, False])
def test_dylora_gradients_reach_the_right_components(frozen):
    """Training at rank b (the masks set_train_rank writes, the shapes the same at every b) against eq. 7 written
    with slices, at every b: the same output, and the gradient of exactly the components the mode trains, with the
    slices' values (frozen: only the b-th; non-frozen: all of 1..b)."""
    model = tiny().train()
    cfg = dylora.Config(rank=6, alpha=12.0, dylora_frozen=frozen)
    dylora.apply(model, cfg)
    layer = model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 96)
    for b in range(1, 7):
        dylora.set_train_rank(model, b)
        layer.lora_A.grad = layer.lora_B.grad = None
        y = layer(x)
        y.pow(2).sum().backward()
        A, B = layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_()
        ref = F.linear(x, layer.weight) + (12.0 / b) * x @ A[:b].T @ B[:, :b].T  # eq. 7
        ref.pow(2).sum().backward()
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-4)
        trained = [(not frozen or k == b - 1) and k < b for k in range(6)]
        gA, gB = layer.lora_A.grad.abs().sum(1), layer.lora_B.grad.abs().sum(0)  # per component
        assert ((gA > 0).tolist(), (gB > 0).tolist()) == (trained, trained), b
        t = torch.tensor(trained)
        for got, want in ((layer.lora_A.grad[t], A.grad[t]), (layer.lora_B.grad[:, t], B.grad[:, t])):
            assert (got - want).norm() <= 1e-5 * want.norm(), b  # fp32 sums of large terms in another order


def test_dylora_rank_sampling_uniform_and_reproducible():
    cfg = dylora.Config(rank=8, seed=3)
    draws = [dylora.sample_rank(cfg, s) for s in range(8000)]
    counts = [draws.count(b) for b in range(1, 9)]
    assert set(draws) == set(range(1, 9)) and max(abs(c - 1000) for c in counts) < 120  # ~4 sigma
    assert draws[:50] == [dylora.sample_rank(cfg, s) for s in range(50)]
    assert draws[:50] != [dylora.sample_rank(dylora.Config(rank=8, seed=4), s) for s in range(50)]
    model = tiny()
    dylora.apply(model, cfg)
    b = dylora.on_step(model, cfg, 17)
    layers = [m for m in model.modules() if isinstance(m, dylora.Linear)]
    assert b == draws[17] and all(torch.equal(m.masks, dylora.mask_table(cfg)[b - 1]) for m in layers)
    assert len({id(m.masks) for m in layers}) == 1  # one tensor for every layer: one copy per step


def test_dylora_rank_survives_save_load_and_eval_scores_each_rank(tmp_path, tiny_dir, gsm_file):
    train.main(["--method", "dylora", "--model", tiny_dir, "--data", gsm_file, "--val_size", "8", "--batch_size",
                "4", "--max_len", "384", "--out_dir", str(tmp_path), "--max_steps", "4", "--lr", "1e-2", "--rank",
                "4", "--eval_rank", "2", "--device", "cpu"])
    method, cfg, sd, meta = runs.load_adapter(str(tmp_path / "dylora"))
    assert method is dylora and cfg.eval_rank == 2 and cfg.rank == 4
    model = Llama.from_pretrained(tiny_dir, dtype=torch.float32)
    method.apply(model, cfg, init=False)
    method.load_adapter_state_dict(model, sd)
    assert all(m.eval_rank == 2 for m in model.modules() if isinstance(m, dylora.Linear))
    out = ev.main(["--model", tiny_dir, "--adapter", str(tmp_path / "dylora"), "--data", gsm_file, "--limit", "4",
                   "--max_new_tokens", "8", "--ranks", "1,4", "--device", "cpu", "--out", str(tmp_path / "e.jsonl")])
    assert [s["rank"] for s in out] == [1, 4]
    a = [json.loads(l)["completion"] for l in open(tmp_path / "e_r1.jsonl")]
    b = [json.loads(l)["completion"] for l in open(tmp_path / "e_r4.jsonl")]
    assert a != b  # two ranks, two models
    single, = ev.main(["--model", tiny_dir, "--adapter", str(tmp_path / "dylora"), "--data", gsm_file, "--limit",
                       "4", "--max_new_tokens", "8", "--device", "cpu", "--out", str(tmp_path / "one.jsonl")])
    assert single["rank"] is None  # the stored eval_rank (2) was used
