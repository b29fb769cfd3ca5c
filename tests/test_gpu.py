"""CUDA paths that the CPU suite cannot reach, on a GPU machine (skipped without CUDA):

    python -m pytest -q tests/test_gpu.py

- the CUDA-graph training step (train.py's default on CUDA) equals the eager step, for every method that uses it;
- CUDA-graph decoding (generate's default on CUDA) gives the eager decoding's tokens;
- the compiled model (--compile) equals the eager one up to bf16 rounding, and trains the same;
- --init_offload (init gradients accumulated on the CPU) gives the on-GPU gradients and the same init;
- DP-SGD's per-example gradients (one batched backward over the bf16 policy) equal each example's autograd gradient.
All under the CUDA precision policy: bf16 frozen base, fp32 trainable tensors, bf16 autocast.
"""
import pytest
import torch
import torch.nn as nn

import data
import nf4
import step
import model as model_mod
from model import Llama, ModelConfig, generate
from runs import METHODS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CFG = ModelConfig(vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, hidden_dim=512)
SMALL = {"lora": dict(rank=8), "xs": dict(rank=16), "sb": dict(rank=16, init_samples=8), "ga": dict(rank=8),
         "bone": dict(block_size=32), "dylora": dict(rank=8), "full": {}}
STEPS = 6
DEV = torch.device("cuda")


def build(name, seed=0, bits=16):
    """The tiny model in bf16 on the GPU (bits=4: its blocks' linear weights in NF4, as --base_bits 4), the method
    applied (a fixed random init gradient where it needs one)."""
    dev = DEV
    model = Llama(CFG).init_weights(seed=seed).to(dev, torch.bfloat16).requires_grad_(False)
    for n, p in list(model.named_parameters()):
        if bits == 4 and nf4.is_quantized(n):
            model.get_submodule(n.rsplit(".", 1)[0]).weight = nf4.quantize_weight(p.data, torch.bfloat16)
    method, mcfg = METHODS[name], METHODS[name].Config(**SMALL[name])
    grads = None
    if method.GRADIENT_INIT:
        g = torch.Generator(device=dev).manual_seed(5)
        grads = {n: torch.randn(m.weight.shape, generator=g, device=dev) for n, m in model.named_modules()
                 if type(m) is nn.Linear and n.split(".")[-1] in mcfg.targets}
    method.apply(model, mcfg, grads, first_lr=1e-4)
    return method, mcfg, model


def examples(n=32, seed=0):
    """[(ids, n_prompt)]: random token examples of 20-60 tokens, the first third a prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        T = int(torch.randint(20, 60, (1,), generator=g))
        out.append((torch.randint(3, CFG.vocab_size, (T,), generator=g).tolist(), T // 3))
    return out


def train(name, graphed, compiled=False, bits=16):
    """STEPS steps of train.py's loop (static packed shapes, as with --cuda_graph): (losses, trainable tensors)."""
    torch.manual_seed(0)
    method, mcfg, model = build(name, bits=bits)
    if compiled:
        torch._dynamo.reset()
        model.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params)  # the policy: trainable tensors in fp32
    ocfg = step.OptimConfig(lr=METHODS[name].DEFAULT_LR, warmup_steps=0)
    opt = step.make_optimizer(params, ocfg, DEV, graphed)
    train_step = step.make_step(model, opt, params, ocfg.grad_clip, graphed)
    seqs, losses = examples(), []
    model.train()
    for it in range(STEPS):
        step.set_lr(opt, step.get_lr(it, ocfg, STEPS))
        method.on_step(model, mcfg, it)
        idxs = data.example_order(len(seqs), 0, it * 8, 8)
        batches, n_tgt, _ = data.micro_batches(seqs, idxs, 4, 128, 0, static=True)  # 2 micro-batches of 4
        loss, _ = train_step(batches, n_tgt)
        losses.append(loss.item())  # read before the next replay overwrites it
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, model


def start(name, bits=16):
    return {n: p.detach().clone() for n, p in build(name, bits=bits)[2].named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name,bits", [(n, 16) for n, m in METHODS.items() if m.CUDA_GRAPH] +
                         [("lora", 4), ("sb", 4)])
def test_cuda_graph_step_equals_eager(name, bits):
    """The graph replays the eager step's kernels: the same losses and the same weights after STEPS steps, to well
    under one Adam step (each moves an entry by about lr). Also on a 4-bit base (--base_bits 4)."""
    l_eager, p_eager, _ = train(name, graphed=False, bits=bits)
    l_graph, p_graph, _ = train(name, graphed=True, bits=bits)
    p0 = start(name, bits)
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(l_eager, l_graph)), (l_eager, l_graph)
    for n in p_eager:
        moved = (p_eager[n] - p0[n]).abs().max().item()
        diff = (p_graph[n] - p_eager[n]).abs().max().item()
        assert moved > 0 and diff <= 1e-3 * moved, (n, diff, moved)


def test_graph_decoding_equals_eager(monkeypatch):
    """Greedy decoding with each decode step replayed as a CUDA graph gives the eager decoding's tokens (ragged
    prompts, rows finishing at different times so the batch shrinks and the graph is re-recorded; the span of
    slots read grows every 8 steps, one graph each)."""
    monkeypatch.setattr(model_mod, "SPAN_STEP", 8)
    model = Llama(CFG).init_weights(seed=1).to(DEV, torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    p, q = (torch.randint(3, CFG.vocab_size, (n,), generator=g).tolist() for n in (9, 23))
    prompts = [p, q, p, q, p, q]  # ragged, and the p rows continue alike
    o = generate(model, [p], 40, pad_id=0, cuda_graph=False)[0]
    eos = next(t for k, t in enumerate(o) if k >= 8 and t not in o[:k])  # the p rows stop mid-decoding
    eager = generate(model, prompts, 40, eos_id=eos, pad_id=0, cuda_graph=False)
    graph = generate(model, prompts, 40, eos_id=eos, pad_id=0, cuda_graph=True)
    assert sum(len(o) < 40 for o in eager) >= 3  # half the rows finished: the batch shrank mid-decoding
    assert graph == eager


def grads(model, x, y):
    """{name: gradient} of the loss of one batch for the trainable tensors, under the policy's autocast."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with step.autocast(x.device):
        loss = model(x, y)[1]
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


def test_compiled_model_equals_eager():
    """torch.compile fuses kernels differently, so outputs differ by bf16 rounding and no more: the logits and loss
    of a trained LoRA model, its gradients (to 3% of their norm: bf16 keeps 8 bits, ~0.4% per rounding), and the
    losses of STEPS training steps. (The weights after Adam steps are not compared: Adam divides each gradient by
    its own size, so for a tiny, noise-dominated entry a rounding difference becomes a full step.)"""
    l_eager, _, model = train("lora", graphed=False)  # a trained adapter, so its term is not zero
    l_comp, _, _ = train("lora", graphed=False, compiled=True)
    assert all(abs(a - b) <= 1e-3 * abs(a) for a, b in zip(l_eager, l_comp)), (l_eager, l_comp)
    torch._dynamo.reset()
    x = torch.randint(3, CFG.vocab_size, (4, 64), generator=torch.Generator().manual_seed(3)).to(DEV)
    y = x.roll(-1, 1)
    model.train()
    g_eager = grads(model, x, y)
    with torch.no_grad(), step.autocast(x.device):
        logits_e, loss_e = model(x)[0].float(), model(x, y)[1].item()
    model.compile()
    g_comp = grads(model, x, y)
    with torch.no_grad(), step.autocast(x.device):
        logits_c, loss_c = model(x)[0].float(), model(x, y)[1].item()
    assert (logits_c - logits_e).abs().max() <= 0.02 * logits_e.abs().max()
    assert abs(loss_c - loss_e) <= 1e-3 * abs(loss_e)
    for n in g_eager:
        assert (g_comp[n] - g_eager[n]).norm() <= 0.03 * g_eager[n].norm(), n


def test_packed_rows_take_flash_varlen_and_equal_the_mask(monkeypatch):
    """Packed rows on the GPU go through FlashAttention's variable-length kernel (model.FlashVarlen), not a mask:
    its logits (every real token), loss and gradients equal the dense-mask path (SDPA with the block-diagonal
    causal mask, the CPU's path) up to bf16 rounding, and each example's logits equal that example run alone; in a
    CUDA graph it replays the eager result."""
    import model as M
    _, _, model = build("lora")
    for p in model.parameters():  # a non-zero adapter, so its gradients are not trivially equal
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    seqs = examples(24, seed=4)
    x, y, pos = (t.to(DEV) for t in data.pack(seqs, 160, 0, static=True))  # (R, 160), several examples per row
    assert M.flash_varlen_ok(DEV, torch.bfloat16, CFG.head_dim) and (pos == 0).sum() > x.shape[0]
    calls = []
    monkeypatch.setattr(M.FlashVarlen, "apply", lambda *a, f=M.FlashVarlen.apply: calls.append(1) or f(*a))
    real = x != 0

    def run(varlen):
        monkeypatch.setattr(M, "flash_varlen_ok", lambda *a: varlen)
        params = [p for p in model.parameters() if p.requires_grad]
        with step.autocast(DEV):
            loss = model(x, y, pos)[1]
            with torch.no_grad():
                logits = model(x, pos=pos)[0].float()  # (R, T, V)
        return loss.item(), logits, torch.autograd.grad(loss, params)

    n = len(calls)
    loss_v, logits_v, g_v = run(True)
    assert len(calls) == n + 2 * CFG.n_layers  # both forwards, every layer, took the varlen kernel
    loss_m, logits_m, g_m = run(False)
    assert len(calls) == n + 2 * CFG.n_layers  # and the mask path none
    assert abs(loss_v - loss_m) <= 2e-3 * abs(loss_m)
    assert (logits_v - logits_m)[real].abs().max() <= 0.02 * logits_m[real].abs().max()
    for a, b in zip(g_v, g_m):
        assert (a - b).norm() <= 0.03 * b.norm()
    monkeypatch.setattr(M, "flash_varlen_ok", lambda *a: True)
    r, t = 0, 0  # the first row's examples, each alone (no pos: plain causal attention)
    starts = (pos[r] == 0).nonzero().flatten().tolist() + [int(real[r].sum())]
    with torch.no_grad(), step.autocast(DEV):
        for a, b in zip(starts, starts[1:]):
            alone = model(x[r:r + 1, a:b])[0].float()[0]  # (b - a, V)
            assert (alone - logits_v[r, a:b]).abs().max() <= 0.02 * alone.abs().max()
            t += 1
    assert t >= 2


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if m.GRADIENT_INIT])
def test_init_offload_equals_on_device(name):
    """--init_offload: the init gradients of a GPU model accumulated in fp32 on the CPU equal those accumulated on
    the GPU (the same fp32 sums), and the method initialises from them to the same adapter."""
    _, mcfg, model = build(name)
    seqs = examples(16)
    batches, n_tgt, _ = data.micro_batches(seqs, list(range(16)), 4, 128, 0)
    fresh = Llama(CFG).init_weights(seed=0).to(DEV, torch.bfloat16).requires_grad_(False)
    on_gpu = step.init_grads(fresh, batches, mcfg.targets)
    on_cpu = step.init_grads(fresh, batches, mcfg.targets, offload=True)
    assert all(on_gpu[n].is_cuda and on_cpu[n].device.type == "cpu" for n in on_gpu)
    assert all(torch.allclose(on_gpu[n].cpu(), on_cpu[n], rtol=1e-6, atol=0) for n in on_gpu)
    adapters = []
    for grads in (on_gpu, on_cpu):
        m = Llama(CFG).init_weights(seed=0).to(DEV, torch.bfloat16).requires_grad_(False)
        METHODS[name].apply(m, METHODS[name].Config(**SMALL[name]), grads, first_lr=1e-4)
        adapters.append(METHODS[name].adapter_state_dict(m))
    for k in adapters[0]:
        assert torch.allclose(adapters[0][k].float().cpu(), adapters[1][k].float().cpu(), rtol=1e-4, atol=1e-6), k


def test_per_example_grads_on_cuda():
    """DP-SGD's per-example gradients (fed.per_example_grads: one batched backward under the bf16 policy) on the
    GPU: each row's equals the autograd gradient of that row alone, to bf16 noise."""
    import fed
    _, _, model = build("lora")
    model.train()
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.02, generator=torch.Generator(device=DEV).manual_seed(1))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    x = torch.randint(3, CFG.vocab_size, (4, 48), generator=torch.Generator().manual_seed(0)).to(DEV)
    y = x.roll(-1, 1)
    y[:, :10] = -100
    with step.autocast(DEV):
        g = fed.per_example_grads(model, params, x, y)
    for i in range(4):
        with step.autocast(DEV):
            loss = model(x[i:i + 1], y[i:i + 1])[1]
        ref = torch.autograd.grad(loss, list(params.values()))
        for n, r in zip(params, ref):
            # two bf16 roundings of the same math (the reference: fused attention, chunked loss from bf16 logits;
            # here: batched rows, fp32 logits) differ by ~2% (measured 2.0% on the H200); a wrong row or a lost
            # adapter term would be off by ~100%
            assert (g[n][i].float() - r.float()).norm() <= 0.05 * r.float().norm() + 1e-8, n


def test_graphed_dp_micro_on_cuda():
    """DP-SGD's micro-batch as a CUDA graph (fed.dp_micro on a GPU: rows padded to a multiple of 64 tokens and to
    the micro-batch size) gives the eager clipped sum, and a replay reads the adapter as loaded since the capture."""
    import fed
    _, _, model = build("lora")
    model.eval()  # no dropout: the graph and the eager path draw different masks
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    gen = torch.Generator(device=DEV).manual_seed(1)
    for p in params.values():
        p.data.normal_(0, 0.02, generator=gen)
    x = torch.randint(3, CFG.vocab_size, (3, 50), generator=torch.Generator().manual_seed(0)).to(DEV)
    y = x.roll(-1, 1)
    y[:, :10] = -100
    y[1, 40:] = -100  # a shorter row
    for _ in range(2):  # the capture, then a replay after the adapter changed in place
        with step.autocast(DEV):
            g = fed.per_example_grads(model, params, x, y)
        assert all(v.dtype == torch.float32 for v in g.values())  # per-row gradients in fp32 under autocast too
        ref = fed.clip_per_example(g, 0.05)  # clipped and summed in fp32, outside autocast
        got = fed.dp_micro(model, params, x, y, 0.05, rows=4)
        for n in params:
            assert got[n].dtype == torch.float32, n
            # bf16 kernels at another padded shape round differently (~1%); a lost or wrong row is off by ~100%
            assert (got[n].float() - ref[n].float()).norm() <= 0.03 * ref[n].float().norm() + 1e-8, n
        key = (4, 64, 0.05, False, tuple(p.data_ptr() for p in params.values()))  # one graph: 4 rows of 64, eval
        assert list(model.__dict__["_dp_graphs"]) == ["pool", key]
        with torch.no_grad():
            for p in params.values():
                p.mul_(-1.5)


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if m.GRADIENT_INIT])
def test_streamed_init_on_cuda(name):
    """The streamed init (one backward with activation checkpointing, each layer initialised in its gradient's hook)
    under the CUDA policy gives gradient_init + apply's adapter, to bf16 rounding of the gradient."""
    seqs = examples(32)
    ocfg = step.OptimConfig(batch_size=8)
    ocfg.seed, ocfg.max_len = 0, 128
    states = []
    for streamed in (False, True):
        model = Llama(CFG).init_weights(seed=0).to(DEV, torch.bfloat16).requires_grad_(False)
        mcfg = METHODS[name].Config(**SMALL[name], **({} if name == "sb" else dict(init_samples=8)))
        if streamed:
            step.stream_init(model, METHODS[name], mcfg, seqs, ocfg, 0, 1e-4)
        else:
            METHODS[name].apply(model, mcfg, step.gradient_init(model, METHODS[name], mcfg, seqs, ocfg, 0),
                                first_lr=1e-4)
        states.append({k: v.float().cpu() for k, v in METHODS[name].adapter_state_dict(model).items()})
    for k in states[0]:
        a, b = states
        assert (a[k] - b[k]).norm() <= 0.05 * a[k].norm() + 1e-6, (k, (a[k] - b[k]).norm() / a[k].norm())


@pytest.mark.parametrize("strategy", ["sb", "fedex"])
def test_fed_local_train_graph_equals_eager(strategy):
    """fed.py's local training on CUDA replays train.py's step as a CUDA graph, made once and kept for every client:
    two clients in turn, each from the same global start and a fresh AdamW, give the eager clients' adapters to well
    under one Adam step. FedEx's residuals, changed in place before each client, are what the replay reads."""
    import fed
    seqs, out, made = examples(), {}, {}
    for graphed in (False, True):
        torch.manual_seed(0)
        _, _, model = build("sb" if strategy == "sb" else "lora")
        if strategy == "fedex":
            fed.add_fedex_residuals(model)
        cfg = fed.FedConfig(method=strategy, batch_size=8, micro_batch_size=4, max_len=128, warmup_steps=0,
                            lr=METHODS["sb" if strategy == "sb" else "lora"].DEFAULT_LR, cuda_graph=graphed)
        start = {n: p.detach().clone() for n, p in fed.trainable(model).items()}
        out[graphed], made[graphed] = [], []
        for k, shard in enumerate([list(range(16)), list(range(16, 32))]):
            fed.load_state(model, start)
            g = torch.Generator(device=DEV).manual_seed(10 + k)
            for E in fed.fedex_residuals(model).values():
                E.normal_(0, 1e-2, generator=g)  # in place, as fed.aggregate updates it
            out[graphed].append(fed.local_train(model, cfg, seqs, shard, 3, k, 0))
            made[graphed].append(id(model.__dict__["_fed_step"][2]))
            assert model.__dict__["_fed_step"][0][0] == graphed  # the graphed run did replay a graph
    assert made[True][0] == made[True][1]  # one step (and its graph) for both clients
    for k in range(2):
        for n, eager in out[False][k].items():
            moved = (eager - start[n].cpu()).abs().max().item()
            diff = (out[True][k][n] - eager).abs().max().item()
            assert moved > 0 and diff <= 1e-3 * moved, (k, n, diff, moved)
    assert any((out[True][0][n] - out[True][1][n]).abs().max() > 0 for n in out[True][0])  # the clients differ
