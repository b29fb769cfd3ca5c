import json

import pytest
import torch

import data
import lora_sb
import lora_xs
import step
from conftest import script, hf_tiny
from model import Llama, ModelConfig

train = script("train")  # train.py is a script: its main() is run, never imported


def tiny():
    hf = hf_tiny()
    model = Llama(ModelConfig.from_hf(hf.config.to_dict()))
    model.load_state_dict(hf.state_dict())
    return model


def trunc(M, r):
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def test_xs_init_is_the_truncated_svd_of_the_weight():
    model = tiny()
    W0 = {n: m.weight.detach().clone() for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    lora_xs.apply(model, lora_xs.Config(rank=6))
    for n, m in model.named_modules():
        if isinstance(m, lora_xs.Linear):
            assert torch.allclose((m.lora_B @ m.lora_A).double(), trunc(W0[n], 6), atol=1e-5)  # R = I, s = 1
            assert torch.allclose(m.lora_B.T @ m.lora_B, torch.eye(6), atol=1e-5)
            assert m.lora_R.abs().max() < 1e-4 and m.lora_R.std() > 1e-6  # N(0, 1e-5^2), not zero
            assert torch.equal(m.weight, W0[n])  # W0 untouched
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_modules() for n in [n + ".lora_R"] if n[:-7] in {
            k for k, m in model.named_modules() if isinstance(m, lora_xs.Linear)}}


def test_xs_same_seed_same_adapter():
    a, b = tiny(), tiny()
    lora_xs.apply(a, lora_xs.Config(rank=4, svd="lowrank", seed=3))
    lora_xs.apply(b, lora_xs.Config(rank=4, svd="lowrank", seed=3))
    sa, sb = lora_xs.adapter_state_dict(a), lora_xs.adapter_state_dict(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("update", ["sign", "grad"])
@pytest.mark.parametrize("svd", ["exact", "lowrank"])
def test_sb_init_is_the_truncated_first_update(update, svd):
    model = tiny()
    g = torch.Generator().manual_seed(0)
    grads = {n: torch.randn(m.weight.shape, generator=g) for n, m in model.named_modules()
             if type(m) is torch.nn.Linear and n.split(".")[-1] in lora_sb.TARGETS}
    kept = {n: G.clone() for n, G in grads.items()}
    W0 = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in grads}
    lr_1 = 3e-4
    lora_sb.apply(model, lora_sb.Config(rank=5, lr_1=lr_1, sb_update=update, svd=svd, svd_niter=8), grads)
    assert not grads  # consumed while building: memory freed during init
    for n, m in model.named_modules():
        if isinstance(m, lora_sb.Linear):
            dW = -lr_1 * (torch.sign(kept[n]) if update == "sign" else kept[n])
            ref = trunc(dW, 5)
            got = (m.lora_B @ m.lora_R @ m.lora_A).double()
            tol = 1e-6 if svd == "exact" else 0.05 * ref.norm()  # random matrix: flat spectrum, the hard case
            assert (got - ref).norm() <= tol
            assert torch.allclose(m.lora_B.T @ m.lora_B, torch.eye(5), atol=1e-5)  # orthonormal columns
            assert torch.allclose(m.lora_A @ m.lora_A.T, torch.eye(5), atol=1e-5)  # orthonormal rows
            assert torch.equal(m.weight, W0[n]) and m.scale == 1.0


def test_randomized_svd_truncation_error_within_one_percent_on_a_real_shape():
    """SmolLM2-135M's MLP shape (1536 x 576) and a first-update-like matrix: the sign of a summed per-token
    gradient (rank 256 before the sign, full rank after it)."""
    g = torch.Generator().manual_seed(0)
    G = torch.randn(1536, 256, generator=g) @ torch.randn(256, 576, generator=g)
    dW = -1e-4 * torch.sign(G + 0.5 * G.std() * torch.randn(G.shape, generator=g))
    r = 64
    U, S, Vh = lora_xs.truncated_svd(dW, r, "lowrank", niter=4, gen=torch.Generator().manual_seed(1))
    exact = (dW.double() - trunc(dW, r)).norm()
    fast = (dW.double() - ((U * S) @ Vh).double()).norm()
    assert exact <= fast <= 1.01 * exact


def test_sb_through_train_uses_init_samples_examples_and_first_step_lr(tmp_path, tiny_dir, gsm_file, monkeypatch):
    seen = {}
    real = step.example_order

    def spy(n, seed, start, count):  # the init's draw of examples (the training loop draws through data.py)
        seen["n"] = count
        return real(n, seed, start, count)
    monkeypatch.setattr(step, "example_order", spy)
    train.main(["--method", "sb", "--model", tiny_dir, "--data", gsm_file, "--val_size", "8", "--batch_size", "4",
                "--max_len", "384", "--out_dir", str(tmp_path), "--max_steps", "20", "--warmup_steps", "5",
                "--lr", "1e-3", "--init_samples", "12", "--micro_batch_size", "5", "--rank", "4", "--eval_every", "50",
                "--device", "cpu"])
    assert seen["n"] == 12
    meta = json.load(open(tmp_path / "sb" / "adapter.json"))
    assert meta["config"]["lr_1"] == pytest.approx(1e-3 / 5)  # lr after one warm-up step


def test_init_grads_is_the_mean_loss_gradient(tiny_dir):
    """init_grads over packed micro-batches equals autograd of the mean target-token loss over the examples."""
    from model import Tokenizer
    tok = Tokenizer.from_pretrained(tiny_dir)
    ex = [("How many apples?", f"{i} + 2 = {i + 2}\nThe answer is: {i + 2}") for i in range(5)]
    seqs, _ = data.tokenize(ex, tok, data.TEMPLATE, 384)
    model = Llama.from_pretrained(tiny_dir, dtype=torch.float32)
    batches, n_tgt, _ = data.micro_batches(seqs, list(range(5)), 2, 384, tok.pad_id)
    G = step.init_grads(model, batches, ("q_proj", "down_proj"))
    assert len(G) == 4 and not any(p.requires_grad for p in model.parameters())
    W = model.model.layers[1].mlp.down_proj.weight.requires_grad_(True)
    x, y, pos = data.pack(seqs, 384 * 5, tok.pad_id)  # all five in one forward
    model(x, y, pos)[1].backward()
    assert torch.allclose(G["model.layers.1.mlp.down_proj"], W.grad, atol=1e-6)


@pytest.mark.parametrize("name", ["sb", "ga"])
def test_streamed_init_equals_the_gradient_init(tiny_dir, gsm_file, name, monkeypatch):
    """step.stream_init (one backward over every init example, each layer initialised in its gradient's hook, the
    gradient then dropped) gives the factors of gradient_init + apply (fp32 accumulators for every layer, then the
    layers), and never holds more than one block's gradients."""
    import runs
    from model import Tokenizer
    tok = Tokenizer.from_pretrained(tiny_dir)
    seqs, _ = data.tokenize(data.load_examples(gsm_file), tok, data.TEMPLATE, 384)
    method = runs.METHODS[name]
    kw = dict(rank=4, init_samples=16)
    cfg = step.OptimConfig(batch_size=4)
    cfg.seed, cfg.max_len = 0, 384
    a = Llama.from_pretrained(tiny_dir, dtype=torch.float32)
    method.apply(a, method.Config(**kw), step.gradient_init(a, method, method.Config(**kw), seqs, cfg, tok.pad_id),
                 first_lr=1e-3)
    b = Llama.from_pretrained(tiny_dir, dtype=torch.float32)
    weights = [m.weight for m in b.modules() if type(m) is torch.nn.Linear and m is not b.lm_head]
    live = []
    real_apply = method.apply

    def counting(model, c, grads, **k):  # called in each layer's hook
        live.append(sum(w.grad is not None for w in weights) + 1)  # this layer's gradient is already dropped
        return real_apply(model, c, grads, **k)
    monkeypatch.setattr(method, "apply", counting)
    bcfg = method.Config(**kw)
    step.stream_init(b, method, bcfg, seqs, cfg, tok.pad_id, 1e-3)
    assert len(live) == 14 and max(live) <= 2, live  # of 14 layers' gradients at most 2 at once (measured: 1)
    sa, sb = method.adapter_state_dict(a), method.adapter_state_dict(b)
    assert sa.keys() == sb.keys()
    for k in sa:  # one backward sums the tokens in another order than micro-batches: rounding, then the SVD's
        assert torch.allclose(sa[k], sb[k], atol=1e-4, rtol=0), (k, (sa[k] - sb[k]).abs().max())
    trainable = lambda m: sorted(n for n, p in m.named_parameters() if p.requires_grad)
    assert trainable(a) == trainable(b)
    if name == "sb":
        assert bcfg.lr_1 == 1e-3  # resolved on the run's own config, as config.json records it
