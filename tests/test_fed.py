import pytest
import torch

import data
import fed
import lora
import lora_sb
import runs
from conftest import script, hf_tiny
from cli import UserError
from model import Llama, ModelConfig

train = script("train")  # train.py is a script: its main() is run, never imported


def common(tmp_path, tiny_dir, gsm_file, *extra, name="f"):
    return ["--model", tiny_dir, "--data", gsm_file, "--val_size", "8", "--max_len", "384", "--batch_size", "4",
            "--out_dir", str(tmp_path), "--run_name", name, "--device", "cpu", "--rank", "4", *extra]


def tiny():
    hf = hf_tiny()
    model = Llama(ModelConfig.from_hf(hf.config.to_dict()))
    model.load_state_dict(hf.state_dict())
    return model


def adapted(method):
    model = tiny()
    if method == "sb":
        g = torch.Generator().manual_seed(0)
        grads = {n: torch.randn(m.weight.shape, generator=g) for n, m in model.named_modules()
                 if type(m) is torch.nn.Linear and n.split(".")[-1] in lora_sb.TARGETS}
        lora_sb.apply(model, lora_sb.Config(rank=4, lr_1=1e-3), grads)
    else:
        lora.apply(model, lora.Config(rank=4))
        if method == "fedex":
            fed.add_fedex_residuals(model)
        if method == "ffa":
            for m in model.modules():
                if isinstance(m, lora.Linear):
                    m.lora_A.requires_grad_(False)
    return model


def effective(model):
    return {n: m.merged_weight().clone() for n, m in model.named_modules() if hasattr(m, "merged_weight")}


@pytest.mark.parametrize("method,exact", [("sb", True), ("ffa", True), ("fedex", True), ("fedit", False)])
def test_aggregation_exactness(method, exact):
    """fp32, non-square weights (64 x 96, 32 x 64, ...): the aggregate equals W0 + sum_k w_k dW_k iff exact."""
    model = adapted(method)
    cfg = fed.FedConfig(method=method)
    start = {n: p.detach().clone() for n, p in fed.trainable(model).items()}
    W_start = effective(model)
    g = torch.Generator().manual_seed(1)
    states, deltas, weights = [], [], [0.5, 0.3, 0.2]
    for k in range(3):  # three clients, each moved somewhere else
        client = {n: v + 0.1 * torch.randn(v.shape, generator=g) for n, v in start.items()}
        fed.load_state(model, client)
        deltas.append({n: W - W_start[n] for n, W in effective(model).items()})
        states.append(client)
    fed.load_state(model, fed.aggregate(model, cfg, states, weights))
    want = {n: W_start[n] + sum(w * d[n] for w, d in zip(weights, deltas)) for n in W_start}
    err = max((effective(model)[n] - want[n]).abs().max().item() for n in want)
    assert (err < 1e-5) if exact else (err > 1e-3)


def test_llama_3_2_1b_accounting():
    cfg = ModelConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, hidden_dim=8192)
    with torch.device("meta"):
        model = Llama(cfg).to(torch.bfloat16)
    fedit = fed.communication(model, fed.FedConfig(method="fedit"), lora.Config(rank=32))
    sb = fed.communication(model, fed.FedConfig(method="sb"), lora_sb.Config(rank=200))
    ffa = fed.communication(model, fed.FedConfig(method="ffa"), lora.Config(rank=32))
    fedex = fed.communication(model, fed.FedConfig(method="fedex"), lora.Config(rank=32))
    assert fedit["up_params"] == fedit["down_params"] == 22_544_384 and fedit["up_bytes"] == 4 * 22_544_384
    assert sb["up_params"] == sb["down_params"] == 4_480_000
    assert sb["setup_down_params"] == 200 * 44032 * 16  # B and A, once
    assert ffa["up_params"] == 32 * (2048 + 512 + 512 + 2048 + 8192 + 8192 + 2048) * 16
    residual = (2048 * 2048 * 2 + 2048 * 512 * 2 + 2048 * 8192 * 3) * 16  # every adapted weight, d_out d_in
    assert fedex["up_params"] == 22_544_384 and fedex["down_params"] == 22_544_384 + residual
    assert fedex["down_bytes"] == 4 * (22_544_384 + residual)  # the residual in fp32, as it is kept and sent
    assert ffa["paper"]["up_params"] == ffa["paper"]["down_params"] == 11_272_192  # the paper's P/2 ...
    assert ffa["up_params"] == 12_058_624  # ... where FFA-LoRA's B really is r d_out
    assert fedit["paper"] == dict(up_params=22_544_384, down_params=22_544_384, setup_down_params=0)
    assert sb["paper"] == dict(up_params=4_480_000, down_params=4_480_000, setup_down_params=0)


def test_mistral_7b_communication_in_both_conventions():
    """The Fed-SB paper's headline: 25 clients, FedEx-LoRA r=32 against Fed-SB r=200 on Mistral-7B's shapes. The
    paper's 234x is FedEx's download K P over Fed-SB's r^2 per module; counted as fed.py sends (P plus the full
    residual down, P up), the ratio of the total is 399x."""
    cfg = ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336)
    with torch.device("meta"):
        model = Llama(cfg).to(torch.bfloat16)
    fedex = fed.communication(model, fed.FedConfig(method="fedex", clients=25), lora.Config(rank=32))
    sb = fed.communication(model, fed.FedConfig(method="sb", clients=25), lora_sb.Config(rank=200))
    P = 83_886_080  # 32 (d_in + d_out) summed over the 7 projections of 32 layers
    residual = (4096 * 4096 * 2 + 1024 * 4096 * 2 + 14336 * 4096 * 3) * 32  # d_out d_in of every adapted weight
    assert residual == 6_979_321_856
    assert fedex["paper"] == dict(up_params=P, down_params=25 * P, setup_down_params=0) and 25 * P == 2_097_152_000
    assert fedex["up_params"] == P and fedex["down_params"] == P + residual == 7_063_207_936
    assert sb["up_params"] == sb["down_params"] == sb["paper"]["down_params"] == 200 ** 2 * 7 * 32 == 8_960_000
    assert sb["setup_down_params"] == 200 * 81920 * 32  # B and A once, in ours only
    ratios = {"paper, down": fedex["paper"]["down_params"] / sb["paper"]["down_params"],
              "paper, up + down": (P + 25 * P) / (2 * 8_960_000),
              "ours, down": fedex["down_params"] / sb["down_params"],
              "ours, up + down": (fedex["up_params"] + fedex["down_params"]) / (sb["up_params"] + sb["down_params"])}
    print(ratios)
    assert [round(r, 2) for r in ratios.values()] == [234.06, 121.71, 788.3, 398.83]


def lstsq_weight(layer, N=2**17, chunk=2**15):
    """The weight a layer acts with under bf16 autocast, by least squares over N random bf16 inputs (seeded): the
    one rounding of each output is unbiased, so it averages out, while a bias in the weight does not."""
    g, XtX, XtY = torch.Generator().manual_seed(2), 0, 0
    for _ in range(N // chunk):
        x = torch.randn(chunk, layer.in_features, generator=g).bfloat16()  # (chunk, d_in)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x).double()  # (chunk, d_out)
        XtX, XtY = XtX + x.double().T @ x.double(), XtY + x.double().T @ y
    return torch.linalg.solve(XtX, XtY).T  # (d_out, d_in)


@pytest.mark.parametrize("rms,tol", [(1e-5, 0.4), (1e-3, 0.05)])
def test_fedex_exact_on_a_bf16_base(rms, tol):
    """The GPU precision policy on the CPU (bf16 base, fp32 adapter, bf16 autocast), with three clients whose A_k,
    B_k average back to the start: the whole update is the residual, of rms `rms`. Folded into the bf16 weight
    (the old code) it was lost: 99% at 1e-5, 24% at 1e-3. Kept in fp32 beside it, the stored state is exact, the
    merged weight exact to fp32's rounding of W, and the forward acts with it (its estimate's error is the
    estimate's noise, ~0.16 and ~0.008 here)."""
    model = tiny().to(torch.bfloat16)  # the base in bf16 BEFORE the adapter: A, B and E stay fp32
    W0 = {n: m.weight.double() for n, m in model.named_modules() if n.split(".")[-1] in lora.TARGETS}
    lora.apply(model, lora.Config(rank=4))
    fed.add_fedex_residuals(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, fed.FedExLinear)}
    start = {n: p.detach().clone() for n, p in fed.trainable(model).items()}
    g, weights = torch.Generator().manual_seed(1), [0.5, 0.3, 0.2]
    moves = [{n: torch.randn(v.shape, generator=g) for n, v in start.items()} for _ in weights]
    for n in start:  # weighted mean zero: the aggregate A, B are the start's, the update is s sum_k w_k dB_k dA_k
        mean = sum(w * d[n] for w, d in zip(weights, moves))
        for d in moves:
            d[n] -= mean
    for n, m in layers.items():  # scaled to the residual rms wanted, per layer
        U = m.scale * sum(w * d[f"{n}.lora_B"] @ d[f"{n}.lora_A"] for w, d in zip(weights, moves))
        for d in moves:
            d[f"{n}.lora_B"] *= rms / U.pow(2).mean().sqrt()
    states = [{n: start[n] + d[n] for n in start} for d in moves]
    BA = lambda s, n: s[f"{n}.lora_B"].double() @ s[f"{n}.lora_A"].double()
    want = {n: m.scale * sum(w * (BA(s, n) - BA(start, n)) for w, s in zip(weights, states))  # sum_k w_k dW_k
            for n, m in layers.items()}
    name = "model.layers.0.self_attn.q_proj"
    before = lstsq_weight(layers[name])
    fed.load_state(model, fed.aggregate(model, fed.FedConfig(method="fedex"), states, weights))
    got = {n: m.scale * (BA(fed.trainable(model), n) - BA(start, n)) + m.fedex_residual.double()
           for n, m in layers.items()}  # the stored global state's update
    rel = lambda e, w: (e.norm() / w.norm()).item()
    assert max(rel(got[n] - want[n], want[n]) for n in layers) < 1e-5
    for n, m in layers.items():  # merged_weight() (fp32) is W0 + the update, up to fp32's rounding of W itself
        assert (m.merged_weight().detach().double() - W0[n] - want[n]).abs().max() <= 2 ** -22 * W0[n].abs().max()
    err = rel(lstsq_weight(layers[name]) - before - want[name], want[name])
    print(f"residual rms {rms:g}: effective update of {name} off by {err:.4f} of itself")
    assert err < tol


@pytest.mark.parametrize("method,plain", [("sb", "sb"), ("fedit", "lora")])
def test_one_client_equals_plain_training(tmp_path, tiny_dir, gsm_file, method, plain):
    extra = ["--init_samples", "8"] if method == "sb" else []
    fed.main(common(tmp_path, tiny_dir, gsm_file, "--method", method, "--clients", "1", "--rounds", "1",
                    "--local_steps", "3", "--split", "contiguous", "--lr", "1e-2", *extra, name="fed"))
    train.main(["--method", plain, "--max_steps", "3", "--lr", "1e-2", *extra,
                *common(tmp_path, tiny_dir, gsm_file, name="plain")])
    a = torch.load(tmp_path / "fed" / "fed_state.pt", weights_only=True)["adapter"]
    from safetensors.torch import load_file
    b = load_file(tmp_path / "plain" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_sb_init_step_is_train_pys(tmp_path, tiny_dir):
    """Fed-SB's central init takes its step lr_1 from train.py's epoch over the pooled data (as the paper's code,
    from the pooled loader), not from a client's 1-step schedule, whose one-step warm-up made lr_1 the full lr: 112
    pooled examples at batch 1 are 112 steps, a warm-up of 3, so lr_1 = lr / 3 for train.py and fed.py alike."""
    from conftest import write_gsm8k
    path = write_gsm8k(tmp_path / "d.jsonl", n=120)
    fed.main(common(tmp_path, tiny_dir, path, "--method", "sb", "--init_samples", "8", "--clients", "2", "--rounds",
                    "1", "--local_steps", "1", "--batch_size", "1", "--lr", "1e-2"))
    got = torch.load(tmp_path / "f" / "fed_state.pt", weights_only=True)["method_config"]["lr_1"]
    import step
    assert got == pytest.approx(1e-2 / 3) == step.get_lr(0, fed.FedConfig(lr=1e-2), 112)  # train.py's first step


def test_round_mechanics(tmp_path, tiny_dir, gsm_file, monkeypatch):
    """Clients start byte-identical; weights follow shard sizes; a round aggregates only its own updates."""
    starts, sizes, rounds = [], [], []
    real_train, real_agg = fed.local_train, fed.aggregate

    def spy_train(model, cfg, data, shard, *a):
        starts.append({n: p.detach().clone() for n, p in fed.trainable(model).items()})
        sizes.append(len(shard))
        return real_train(model, cfg, data, shard, *a)

    def spy_agg(model, cfg, states, weights):
        rounds.append(([{n: v.clone() for n, v in s.items()} for s in states], weights))
        return real_agg(model, cfg, states, weights)
    monkeypatch.setattr(fed, "local_train", spy_train)
    monkeypatch.setattr(fed, "aggregate", spy_agg)
    fed.main(common(tmp_path, tiny_dir, gsm_file, "--method", "sb", "--init_samples", "8", "--clients", "3",
                    "--rounds", "2", "--local_steps", "2", "--lr", "1e-2", "--split", "dirichlet", "--dirichlet_field",
                    "kind", "--dirichlet_beta", "0.5"))
    same = lambda a, b: all(torch.equal(a[n], b[n]) for n in a)
    assert same(starts[0], starts[1]) and same(starts[0], starts[2])  # round 1: identical starts
    assert same(starts[3], starts[4]) and same(starts[3], starts[5]) and not same(starts[0], starts[3])
    assert len(set(sizes[:3])) > 1 and rounds[1][1] == [s / sum(sizes[3:]) for s in sizes[3:]]  # by shard size
    final = torch.load(tmp_path / "f" / "fed_state.pt", weights_only=True)["adapter"]
    for n in rounds[1][0][0]:  # the global R is the weighted mean of round 2's states alone
        assert torch.allclose(final[n], sum(w * s[n] for s, w in zip(*rounds[1])), atol=1e-6)


def test_dirichlet_split_and_errors(tmp_path):
    labels = ["a"] * 30 + ["b"] * 30 + ["c"] * 40
    shards = fed.split_clients(100, fed.FedConfig(clients=4, split="dirichlet", dirichlet_beta=0.3), labels)
    assert sorted(i for s in shards for i in s) == list(range(100)) and len({len(s) for s in shards}) > 1
    assert shards == fed.split_clients(100, fed.FedConfig(clients=4, split="dirichlet", dirichlet_beta=0.3), labels)
    iid = fed.split_clients(10, fed.FedConfig(clients=3, split="iid"))
    assert sorted(i for s in iid for i in s) == list(range(10))
    assert fed.split_clients(10, fed.FedConfig(clients=3, split="contiguous")) == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    with pytest.raises(UserError, match="--split must be"):
        fed.split_clients(10, fed.FedConfig(split="random"))
    p = tmp_path / "d.jsonl"
    p.write_text('{"question": "q", "answer": "#### 1"}\n')
    with pytest.raises(UserError, match="needs a field 'type'"):
        fed.read_field(str(p), "type")


@pytest.mark.parametrize("method", ["fedit", "fedex"])
def test_dropped_clients_and_resume(tmp_path, tiny_dir, gsm_file, monkeypatch, method):
    args = ["--method", method, "--clients", "3", "--rounds", "3", "--local_steps", "2", "--lr", "1e-2"]
    full = fed.main(common(tmp_path, tiny_dir, gsm_file, *args, "--drop_prob", "0.5", name="straight"))
    assert [l["survivors"] for l in full["log"][1:]] != [3, 3, 3]  # some clients dropped, the run went on
    real, calls = fed.local_train, []

    def crash(*a, **k):
        calls.append(1)
        if len(calls) > 4:  # killed inside round 2 or 3, after round 1 was saved
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(fed, "local_train", crash)
    with pytest.raises(KeyboardInterrupt):
        fed.main(common(tmp_path, tiny_dir, gsm_file, *args, "--drop_prob", "0.5", name="killed"))
    monkeypatch.undo()
    resumed = fed.main(["--resume", "--out_dir", str(tmp_path), "--run_name", "killed"])  # its saved settings
    a = torch.load(tmp_path / "straight" / "fed_state.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "fed_state.pt", weights_only=True)
    assert a["round"] == b["round"] == 3 and all(torch.equal(a["adapter"][k], b["adapter"][k]) for k in a["adapter"])
    assert a["residual"].keys() == b["residual"].keys() and (len(a["residual"]) > 0) == (method == "fedex")
    assert all(torch.equal(a["residual"][k], b["residual"][k]) for k in a["residual"])  # FedEx's E, restored
    assert resumed["total"] == full["total"]
    none = fed.main(common(tmp_path, tiny_dir, gsm_file, *args, "--drop_prob", "1.0", name="none"))
    assert [l["survivors"] for l in none["log"][1:]] == [0, 0, 0] and none["total"]["up_params"] == 0


def test_resuming_a_run_started_with_overwrite_keeps_it(tmp_path, tiny_dir, gsm_file, monkeypatch):
    """results.py starts every fed run with --overwrite; resumed after a cut, the saved --overwrite must not come
    back and clear the run's fed_state.pt: cut again at once, it still goes on from its last round, not round 0."""
    args = common(tmp_path, tiny_dir, gsm_file, "--method", "fedit", "--clients", "2", "--rounds", "3",
                  "--local_steps", "1", "--lr", "1e-2", "--overwrite", name="cut")
    real, calls = fed.local_train, []

    def crash_at(n):
        def local_train(*a, **k):
            calls.append(1)
            if len(calls) > n:
                raise KeyboardInterrupt
            return real(*a, **k)
        return local_train
    monkeypatch.setattr(fed, "local_train", crash_at(2))  # round 1 done and saved, killed in round 2
    with pytest.raises(KeyboardInterrupt):
        fed.main(args)
    calls.clear()
    monkeypatch.setattr(fed, "local_train", crash_at(0))  # resumed, and killed again before its first round ends
    with pytest.raises(KeyboardInterrupt):
        fed.main(["--resume", "--out_dir", str(tmp_path), "--run_name", "cut"])
    assert torch.load(tmp_path / "cut" / "fed_state.pt", weights_only=True)["round"] == 1


# ---------------------------------------------------------------------------------------------------- privacy

def test_accountant_pinned_values_and_sigma_search():
    pytest.importorskip("opacus")
    assert fed.dp_epsilon(1.5, 0.04, 2250, 1e-5, "rdp") == pytest.approx(7.32911, abs=1e-5)  # Opacus's pinned RDP
    from opacus.accountants import PRVAccountant
    acc = PRVAccountant()
    acc.history = [(1.5, 0.04, 2250)]
    lo, est, hi = acc._get_dprv(eps_error=0.01, delta_error=1e-8).compute_epsilon(1e-5, 1e-8, 0.01)
    assert lo <= 6.77740 <= hi and fed.dp_epsilon(1.5, 0.04, 2250, 1e-5, "prv") == pytest.approx(hi)
    for eps in (1.0, 3.0):
        sigma = fed.dp_sigma(eps, 0.04, 500, 1e-5)
        assert eps - 1e-3 < fed.dp_epsilon(sigma, 0.04, 500, 1e-5) <= eps  # round trip, never above the target
        assert fed.dp_epsilon(sigma * 0.99, 0.04, 500, 1e-5) > eps


@pytest.mark.parametrize("method", ["sb", "fedit", "ffa", "fedex", "bone"])
def test_per_example_grads_clipping_and_noise(method, monkeypatch):
    """Rows of different lengths, right-padded (pad tokens, -100 targets) in one micro-batch: each row's gradient
    equals the autograd gradient of that row alone and unpadded, and the clipped sum is the sum of those gradients
    each clipped to C (some rows are clipped, some not). fed.py's strategies take the one-backward book-keeping
    path (their trainable tensors are linear weights only); Bone's R is not, so it must take torch.func's."""
    if method == "bone":
        model = tiny()
        runs.METHODS["bone"].apply(model, runs.METHODS["bone"].Config(block_size=16))
    else:
        model = adapted(method)
    vmap_path, fell_back = fed.per_example_grads_vmap, []
    monkeypatch.setattr(fed, "per_example_grads_vmap", lambda *a: fell_back.append(1) or vmap_path(*a))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # away from the init (LoRA's B = 0 would zero A's gradient), FedEx's residual nonzero
        for n, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.requires_grad or n.endswith("fedex_residual"):
                t.normal_(0, 0.05, generator=g)
    params = fed.trainable(model)
    lengths = [12, 7, 10, 5]
    x = torch.randint(0, 128, (4, 12), generator=g)
    y = x.roll(-1, 1)
    y[:, :3] = -100  # the prompt
    for i, n in enumerate(lengths):
        x[i, n:], y[i, n - 1:] = 0, -100  # padding
    pe = fed.per_example_grads(model, params, x, y)
    assert bool(fell_back) == (method == "bone") and all(p.grad is None for p in params.values())
    ref = [torch.autograd.grad(model(x[i:i + 1, :n], y[i:i + 1, :n])[1], list(params.values()))
           for i, n in enumerate(lengths)]  # each row alone
    for i in range(4):
        assert all(torch.allclose(pe[k][i], r, rtol=1e-4, atol=1e-6) for k, r in zip(params, ref[i])), (method, i)
    norms = [torch.sqrt(sum(r.pow(2).sum() for r in row)) for row in ref]
    C = sorted(norms)[1] * 1.01  # between the norms: the two smallest rows pass unclipped
    want = [sum(min(1.0, C / (nrm + 1e-6)) * row[j] for row, nrm in zip(ref, norms)) for j in range(len(params))]
    got = fed.clip_per_example(pe, C)
    # to fp32 rounding of the tensor's scale (elementwise rtol fails on entries near zero, where sums of four
    # rows cancel); a wrong clip factor is off by more than 1%
    assert all((got[k] - w).abs().max() <= 1e-5 * w.abs().max() for k, w in zip(params, want))
    for i in range(4):
        one = fed.clip_per_example({n: v[i:i + 1] for n, v in pe.items()}, C)
        assert torch.sqrt(sum(v.pow(2).sum() for v in one.values())) <= C * (1 + 1e-5)
    # an overflowed row counts as zero, not NaN for the whole sum (a NaN model would show it was sampled)
    bad = {n: torch.cat([v[:1] * float("inf"), v[1:]]) for n, v in pe.items()}
    rest = fed.clip_per_example({n: v[1:] for n, v in pe.items()}, C)
    assert all(torch.equal(v, rest[n]) for n, v in fed.clip_per_example(bad, C).items())
    zeros = {"w": torch.zeros(200_000)}
    noisy = fed.noisy_mean(zeros, sigma=1.5, C=0.1, expected_batch=8, gen=torch.Generator().manual_seed(0))
    assert noisy["w"].std().item() == pytest.approx(1.5 * 0.1 / 8, rel=0.02)
    two = fed.noisy_mean({"a": torch.zeros(3, 500), "b": torch.zeros(1000)}, 1.5, 0.1, 8, torch.Generator())
    a, b = two["a"].flatten()[:1000], two["b"]  # one draw for both tensors: each gets its own part of it
    assert two["a"].shape == (3, 500) and abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < 0.15


def test_per_example_grads_are_fp32_under_autocast(monkeypatch):
    """Under the policy's bf16 autocast (the backward runs under the forward's autocast), the book-keeping path's
    per-row gradients are still fp32, and equal the fp32 model's up to the forward's bf16 rounding."""
    monkeypatch.setattr(fed, "per_example_grads_vmap", None)  # the book-keeping path, not torch.func's fallback
    model = adapted("fedit")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05, generator=g)
    params = fed.trainable(model)
    x = torch.randint(0, 128, (3, 12), generator=g)
    y = x.roll(-1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pe = fed.per_example_grads(model, params, x, y)
    assert all(v.dtype == torch.float32 for v in pe.values())
    ref = fed.per_example_grads(model, params, x, y)  # fp32 throughout
    for k in params:
        assert (pe[k] - ref[k]).norm() <= 0.05 * ref[k].norm(), k


def test_private_round_touches_only_trainable_tensors(tmp_path, tiny_dir, gsm_file):
    pytest.importorskip("opacus")
    model = Llama.from_pretrained(tiny_dir, dtype=torch.float32)
    lora.apply(model, lora.Config(rank=4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from model import Tokenizer
    tok = Tokenizer.from_pretrained(tiny_dir)
    seqs, _ = data.tokenize(data.load_examples(gsm_file)[:12], tok, data.TEMPLATE, 384)
    cfg = fed.FedConfig(batch_size=4, lr=1e-2, max_len=384)
    out = fed.local_train(model, cfg, seqs, list(range(12)), 2, 0, tok.pad_id, dp=(1.0, 0.5))
    after = model.state_dict()
    assert set(out) == {k for k, p in model.named_parameters() if p.requires_grad}
    for k in before:
        assert torch.equal(before[k], after[k]) != (k in out), k  # trainable changed, frozen bit-identical


def test_dp_noise_comes_from_os_entropy(tiny_dir, gsm_file):
    """The run's --seed is saved with it: noise drawn from it could be regenerated and subtracted. By default two
    identical calls draw different batches and noise; only --dp_seed (tests) repeats them."""
    pytest.importorskip("opacus")
    model = Llama.from_pretrained(tiny_dir, dtype=torch.float32)
    lora.apply(model, lora.Config(rank=4))
    start = {n: p.detach().clone() for n, p in fed.trainable(model).items()}
    from model import Tokenizer
    tok = Tokenizer.from_pretrained(tiny_dir)
    seqs, _ = data.tokenize(data.load_examples(gsm_file)[:12], tok, data.TEMPLATE, 384)

    def client(dp_seed, seed=0):
        fed.load_state(model, start)
        cfg = fed.FedConfig(batch_size=4, lr=1e-2, max_len=384, dp_seed=dp_seed)
        return fed.local_train(model, cfg, seqs, list(range(12)), 2, seed, tok.pad_id, dp=(1.0, 0.5))
    a, b = client(-1), client(-1)  # the default
    assert all(not torch.equal(a[n], b[n]) for n in a)
    c, d, e = client(7), client(7), client(7, seed=1)
    assert all(torch.equal(c[n], d[n]) for n in c) and not any(torch.equal(c[n], e[n]) for n in c)  # per client/round


def test_dp_settings_are_checked_before_the_model_loads(tmp_path, tiny_dir, gsm_file, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the privacy settings were checked")
    monkeypatch.setattr(fed.Llama, "from_pretrained", no_model)
    bad = [(["--dp_epsilon", "0"], r"--dp_epsilon must be > 0, got 0.0 \(a target epsilon; inf, the default, "),
           (["--dp_epsilon", "-1"], r"--dp_epsilon must be > 0, got -1.0"),
           (["--dp_epsilon", "3", "--dp_clip", "0"], r"--dp_clip must be > 0, got 0.0"),
           (["--dp_epsilon", "3", "--dp_delta", "2"], r"--dp_delta must be in \(0, 1/n\) for clients of n examples"),
           (["--dp_epsilon", "3", "--dp_delta", "-1e-5"], r"--dp_delta must be in \(0, 1/n\)"),
           (["--dp_epsilon", "3", "--dp_delta", "0.1", "--method", "fedit"],
            r"--dp_delta .* got 0.1 with n up to 20: use < 0.05"),  # 2 x 20
           (["--dp_epsilon", "3", "--dp_accountant", "gdp"], r"--dp_accountant must be rdp or prv, got 'gdp'$"),
           (["--dp_epsilon", "3"], r"a private sb run keeps --init_samples 64 of the 40 training examples as the "
                                   r"server's own \(its init sees no client's data\), which leaves 0 for 2 clients: "
                                   r"lower --init_samples or pass --sb_init_data PUBLIC.jsonl$")]
    for extra, message in bad:
        with pytest.raises(UserError, match="^" + message) as e:
            fed.main(common(tmp_path, tiny_dir, gsm_file, "--clients", "2", *extra))
        assert "\n" not in str(e.value)
    assert fed.default_delta(20) == 1e-5 and fed.default_delta(10 ** 6) == (10 ** 6) ** -1.1 < 1e-5  # below 1/n
    import sys
    monkeypatch.setitem(sys.modules, "opacus.accountants", None)  # as where Opacus is not installed
    monkeypatch.setattr(fed, "client_data", no_model)  # ... and said before any data is read
    with pytest.raises(UserError, match=r"^--dp_epsilon needs Opacus, whose privacy accountant fed.py uses: pip "
                                        r"install opacus$"):
        fed.main(common(tmp_path, tiny_dir, gsm_file, "--clients", "2", "--dp_epsilon", "3"))


def test_per_example_grads_catch_a_use_the_book_keeping_misses():
    """A trainable tensor the forward reads through a property (P.T) escapes the book-keeping of F.linear: its rows
    would be summed into P.grad and its per-example gradients left at zero (unclipped data in, nothing private out).
    The book-keeping counts a property that returns a tensor as a use (as the CUDA-graph path's probe reads it), and
    per_example_grads would also see P.grad filled: either way the generic path, every row's gradient its own."""
    torch.manual_seed(0)

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(11, 4), torch.nn.Linear(5, 11, bias=False)
            self.P = torch.nn.Parameter(torch.randn(5, 4))

        def forward(self, x):
            return (self.head(self.emb(x) @ self.P.T),)  # (N, T, 11)
    model = Toy().requires_grad_(False)
    model.P.requires_grad_(True)
    x = torch.randint(0, 11, (3, 6))
    y = x.roll(-1, 1)
    pe = fed.per_example_grads(model, {"P": model.P}, x, y)["P"]  # (3, 5, 4)
    for i in range(3):
        loss = torch.nn.functional.cross_entropy(model(x[i:i + 1])[0][0], y[i])
        assert torch.allclose(pe[i], torch.autograd.grad(loss, model.P)[0], atol=1e-6), i
    assert model.P.grad is None and pe.abs().sum() > 0
    book = fed._LinearBookkeeping({id(model.P): "P"}, 1)
    with torch.no_grad(), book:  # graphed_dp_micro's probe: a use beyond a linear weight keeps it off the graph
        model(x[:1])
    assert book.other


def test_private_sb_init_sees_no_client_data(tmp_path, tiny_dir, gsm_file, monkeypatch):
    """A private Fed-SB run without --sb_init_data inits LoRA-SB from the server's own examples: the ones a run
    without privacy would init from, taken out of the pool before it is shared, so they are in no client's shard
    and the DP guarantee covers every client's data. Without privacy the pool is whole and the init reads it."""
    pytest.importorskip("opacus")
    seen = []
    real = fed.step.init_method
    monkeypatch.setattr(fed.step, "init_method", lambda model, method, mcfg, seqs, *a, **k: (
        seen.append([list(ids) for ids, _ in seqs]), real(model, method, mcfg, seqs, *a, **k))[1])
    args = ["--method", "sb", "--clients", "2", "--rounds", "1", "--local_steps", "1", "--init_samples", "4"]
    private = fed.main(common(tmp_path, tiny_dir, gsm_file, *args, "--dp_epsilon", "3", "--dp_seed", "0", name="p"))
    fed.main(common(tmp_path, tiny_dir, gsm_file, *args, name="np"))
    assert private["dp"]["init"] == "the server's own 4 examples, in no client's shard"
    tok = fed.Tokenizer.from_pretrained(tiny_dir)
    for eps, init in (("3", seen[0]), ("inf", seen[1])):
        cfg, mcfg = fed.cli.parse_run(common(tmp_path, tiny_dir, gsm_file, *args, "--dp_epsilon", eps),
                                      fed.FedConfig, fed.FED_METHODS)
        fed.resolve_defaults(cfg, torch.device("cpu"))
        seqs, _, shards, steps, own = fed.client_data(cfg, tok, gsm_file, mcfg)
        in_shards = sorted(i for s in shards for i in s)
        if eps == "inf":  # the whole pool is shared out, and the init reads the pooled data
            assert own == [] and in_shards == list(range(len(seqs))) and len(init) == len(seqs)
            continue
        assert own == fed.data.example_order(len(seqs), cfg.seed, 0, 4)  # what the init without privacy reads first
        assert not set(own) & set(in_shards) and sorted(in_shards + own) == list(range(len(seqs)))
        assert init == [list(seqs[i][0]) for i in own]  # the init saw those four and nothing else
        assert private["dp"]["void"] and private["dp"]["dp_seed"] == 0  # --dp_seed: reproducible noise, no guarantee


def test_private_resume_keeps_the_accountant_history(tmp_path, tiny_dir, gsm_file, monkeypatch, capsys):
    """A private run killed after round 1 resumes to the same state and reports the epsilon of its whole history;
    resuming to more rounds than the noise was found for, or with other terms of the guarantee, is refused."""
    pytest.importorskip("opacus")
    args = ["--method", "fedit", "--clients", "2", "--rounds", "2", "--local_steps", "2", "--lr", "1e-2",
            "--dp_epsilon", "3", "--dp_seed", "0"]
    full = fed.main(common(tmp_path, tiny_dir, gsm_file, *args, name="straight"))
    assert "--dp_seed 0 makes the DP noise reproducible" in capsys.readouterr().out
    real, calls = fed.local_train, []

    def crash(*a, **k):
        calls.append(1)
        if len(calls) > 2:  # killed in round 2
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(fed, "local_train", crash)
    with pytest.raises(KeyboardInterrupt):
        fed.main(common(tmp_path, tiny_dir, gsm_file, *args, name="killed"))
    monkeypatch.undo()
    resume = ["--resume", "--out_dir", str(tmp_path), "--run_name", "killed"]
    resumed = fed.main(resume)
    out = capsys.readouterr().out
    state = torch.load(tmp_path / "killed" / "fed_state.pt", weights_only=True)
    sigma, q = state["dp"]["sigma"], 4 / 20  # 2 clients of 20 examples, batches of 4
    assert state["dp"]["history"] == [[(sigma, q, 2), (sigma, q, 2)]] * 2  # (sigma, q, steps) per round, per client
    assert f"noise multiplier {sigma:.4f} (the run's own)" in out and "spent in 1 rounds" in out
    eps = fed.dp_epsilon(sigma, q, 4, 1e-5)
    assert resumed["dp"] == full["dp"] and resumed["dp"]["epsilon"] == pytest.approx(eps) and 2.99 < eps <= 3
    assert resumed["dp"]["delta"] == 1e-5  # min(1e-5, n^-1.1), not 1/n = 0.05
    assert f"privacy per client: epsilon {eps:.4f} spent (target 3.0) at delta 1.00e-05" in out
    assert all(torch.equal(state["adapter"][k], v) for k, v in
               torch.load(tmp_path / "straight" / "fed_state.pt", weights_only=True)["adapter"].items())
    with pytest.raises(UserError, match=r"^resuming to --rounds 4 \(--local_steps 2\) would spend epsilon 3\.\d+ "
                                        r"> the target 3.0 of this private run: keep --rounds 2 "):
        fed.main([*resume, "--rounds", "4"])
    for key, value in (("dp_epsilon", "4"), ("dp_epsilon", "inf"), ("dp_delta", "1e-6"), ("dp_clip", "0.2"),
                       ("batch_size", "2")):
        with pytest.raises(UserError, match=f"^--{key} .* differs from this private run's"):
            fed.main([*resume, f"--{key}", value])
    fed.main(common(tmp_path, tiny_dir, gsm_file, "--clients", "2", "--rounds", "1", "--local_steps", "1",
                    name="public"))
    with pytest.raises(UserError, match="^this run trained without privacy"):
        fed.main(["--resume", "--out_dir", str(tmp_path), "--run_name", "public", "--dp_epsilon", "3"])


def test_fed_cli_prints_the_table(tmp_path, tiny_dir, gsm_file, capsys):
    s = fed.main(common(tmp_path, tiny_dir, gsm_file, "--method", "ffa", "--clients", "2", "--rounds", "1",
                        "--local_steps", "1"))
    out = capsys.readouterr().out
    assert "up / round" in out and "setup (once)" in out and s["rounds"] == 1
    assert "ours (what fed.py sends)" in out and "Fed-SB paper's convention" in out
    import json
    saved = json.load(open(tmp_path / "f" / "summary.json"))
    assert saved["per_client_per_round"]["paper"]["up_params"] == s["per_client_per_round"]["paper"]["up_params"] > 0
    assert saved["dp"] is None  # no privacy unless asked for
