import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import cli
import data
import runs
import step
from conftest import script, ROOT, hf_tiny
from cli import UserError
from model import Llama, ModelConfig

train = script("train")  # train.py is a script: its main() is run, never imported

ADAPTERS = [m for m in runs.METHODS if m != "full"]
# small settings for the tiny model (dims 64, 32 and 96); each adapter method, Bone in both forms
TEST_CFG = {"lora": dict(rank=8), "xs": dict(rank=8), "sb": dict(rank=8), "ga": dict(rank=8), "dylora": dict(rank=8),
            "bone": dict(block_size=16), "bone-shared": dict(block_size=16, bone_variant="shared")}


def tiny(seed=0):
    hf = hf_tiny(seed=seed)
    model = Llama(ModelConfig.from_hf(hf.config.to_dict()))
    model.load_state_dict(hf.state_dict())
    return model


def adapt(name, model, **overrides):
    """Apply a method with test settings (small ranks; a random gradient for gradient-initialised methods)."""
    method = runs.METHODS[name.split("-")[0]]
    cfg = method.Config(**{**TEST_CFG[name], **overrides})
    grads = None
    if method.GRADIENT_INIT:
        g = torch.Generator().manual_seed(5)
        grads = {n: torch.randn(m.weight.shape, generator=g) for n, m in model.named_modules()
                 if type(m) is torch.nn.Linear and n.split(".")[-1] in cfg.targets}
    kept = {n: g.clone() for n, g in grads.items()} if grads else None
    method.apply(model, cfg, grads, first_lr=1e-3)  # first_lr: LoRA-SB's init step
    return method, cfg, kept


def perturb(model, seed=1):
    """Move every trainable tensor away from its init, so adapters actually contribute."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def closed_form_trainable(name, cfg, mc):
    shapes = {"q_proj": (mc.dim, mc.n_heads * mc.head_dim), "k_proj": (mc.dim, mc.n_kv_heads * mc.head_dim),
              "v_proj": (mc.dim, mc.n_kv_heads * mc.head_dim), "o_proj": (mc.n_heads * mc.head_dim, mc.dim),
              "gate_proj": (mc.dim, mc.hidden_dim), "up_proj": (mc.dim, mc.hidden_dim),
              "down_proj": (mc.hidden_dim, mc.dim)}
    low_rank = lambda d_in, d_out: cfg.rank * (d_in + d_out)
    per_layer = {"lora": low_rank, "ga": low_rank, "dylora": low_rank, "xs": lambda d_in, d_out: cfg.rank ** 2,
                 "sb": lambda d_in, d_out: cfg.rank ** 2, "bone": lambda d_in, d_out: cfg.block_size * d_out,
                 "bone-shared": lambda d_in, d_out: cfg.block_size * d_out}[name]
    return mc.n_layers * sum(per_layer(*shapes[t]) for t in cfg.targets)


@pytest.mark.parametrize("name", list(TEST_CFG))
def test_method_contract(name, tmp_path):
    torch.manual_seed(0)
    model = tiny()
    with torch.no_grad():
        before_apply = model(torch.arange(40).view(2, 20))[0]
    W0 = {n: m.weight.detach().clone() for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    method, cfg, grads = adapt(name, model)
    with torch.no_grad():  # every method starts at the base model, but LoRA-SB (one approximate step taken)
        after_apply = model(torch.arange(40).view(2, 20))[0]  # and LoRA-XS (R is small, not zero)
    if name != "sb":
        assert (after_apply - before_apply).abs().max() < {"xs": 1e-3}.get(name, 1e-4)
    else:  # LoRA-SB starts one step away: each layer at W0 + trunc_r(-lr_1 sign(G)), and the outputs moved
        assert (after_apply - before_apply).abs().max() > 1e-3
        for n, m in model.named_modules():
            if isinstance(m, method.Linear):
                U, S, Vh = torch.linalg.svd(-cfg.lr_1 * torch.sign(grads[n]).double(), full_matrices=False)
                want = (U[:, :cfg.rank] * S[:cfg.rank]) @ Vh[:cfg.rank]
                got = m.merged_weight().double() - W0[n].double()
                # randomized SVD (each layer's sketch from the seed): a flat spectrum is its hard case, a few %
                assert (got - want).norm() < 0.08 * want.norm()
    perturb(model)
    model.eval()
    layers = [m for m in model.modules() if isinstance(m, method.Linear)]
    assert len(layers) == 2 * len(cfg.targets)
    for m in layers:  # forward == F.linear(x, merged_weight())
        xi = torch.randn(4, m.in_features)
        assert torch.allclose(m(xi), F.linear(xi, m.merged_weight(), m.bias), atol=1e-5)
    # trainable count == closed form
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n == closed_form_trainable(name, cfg, model.cfg)
    # only trainable tensors change after an optimizer step
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx = torch.randint(0, 128, (2, 16))
    model.train()
    method.on_step(model, cfg, 0)
    model(idx, idx.roll(-1, 1))[1].backward()
    opt.step()
    model.eval()
    after = model.state_dict()
    for k in before:
        if k in trainable:
            assert not torch.equal(before[k], after[k]), k
        else:
            assert torch.equal(before[k], after[k]), k
    # save/load round trip into a freshly adapted model
    with torch.no_grad():
        ref = model(idx)[0]
    sd = {k: v.clone() for k, v in method.adapter_state_dict(model).items()}
    fresh = tiny()
    method.apply(fresh, cfg, init=False)  # no gradients or SVDs to rebuild: every tensor is in the state dict
    method.load_adapter_state_dict(fresh, sd)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(idx)[0], ref)
    with pytest.raises(UserError):
        method.load_adapter_state_dict(fresh, dict(list(sd.items())[1:]))
    # merge keeps outputs and leaves plain nn.Linear layers
    method.merge(model)
    assert not any(isinstance(m, method.Linear) for m in model.modules())
    with torch.no_grad():
        assert (model(idx)[0] - ref).abs().max() < 1e-4


def test_guided_bone_has_no_peft_form_but_exports_merged(tmp_path, tiny_dir, gsm_file):
    with pytest.raises(UserError, match="no LoRA form: use --export merged"):
        run(tmp_path, tiny_dir, gsm_file, "--method", "bone", "--block_size", "16", "--max_steps", "1",
            "--export", "peft", name="b")
    run(tmp_path, tiny_dir, gsm_file, "--method", "bone", "--block_size", "16", "--max_steps", "2", "--lr", "1e-2",
        "--export", "merged", name="b2")
    method, cfg, sd, meta = runs.load_adapter(str(tmp_path / "b2"))
    ours = Llama.from_pretrained(tiny_dir, dtype=torch.float32)
    method.apply(ours, cfg, init=False)
    method.load_adapter_state_dict(ours, sd)
    merged = Llama.from_pretrained(str(tmp_path / "b2" / "merged"), dtype=torch.float32)
    idx = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (merged(idx)[0] - ours(idx)[0]).abs().max() < 1e-4


def test_full_finetuning_trains_everything():
    model = tiny()
    runs.METHODS["full"].apply(model, runs.METHODS["full"].Config())
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    assert model.inv_freq.dtype == torch.float32
    sd = runs.METHODS["full"].adapter_state_dict(model)
    assert len(sd) == len(dict(model.named_parameters()))


def test_gsm8k_target_and_prompt_masking(tiny_dir):
    from model import Tokenizer
    t = data.gsm8k_target("She sold 48/2 = <<48/2=24>>24 clips.\nSo 48+24 = <<48+24=72>>72.\n#### 72")
    assert t == "She sold 48/2 = 24 clips.\nSo 48+24 = 72.\nThe answer is: 72"
    tok = Tokenizer.from_pretrained(tiny_dir)
    (ids, n_prompt), = data.tokenize([("How many?", t)], tok, data.TEMPLATE, 512)[0]
    assert ids[:n_prompt] == tok.encode(data.TEMPLATE.format(question="How many?"), bos=tok.add_bos)
    assert ids[-1] == tok.eos_id and tok.decode(ids[n_prompt:-1]).strip() == t
    x, y, pos = data.pack([(ids, n_prompt)], 512, tok.pad_id)
    assert (y[0, :n_prompt - 1] == -100).all() and y[0, n_prompt - 1:].tolist() == ids[n_prompt:]


def test_packed_loss_equals_unpacked():
    model = tiny()
    g = torch.Generator().manual_seed(0)
    seqs = [(torch.randint(3, 128, (n,), generator=g).tolist(), p) for n, p in ((60, 6), (39, 3), (71, 10), (35, 2))]
    x, y, pos = data.pack(seqs, 110, 0)
    assert x.shape[0] < len(seqs)  # several examples share a row
    total, count = 0.0, 0
    for ids, p in seqs:
        xs, ys, _ = data.pack([(ids, p)], 110, 0)
        n = int((ys != -100).sum())
        total, count = total + model(xs, ys)[1].item() * n, count + n
    assert abs(model(x, y, pos)[1].item() - total / count) < 1e-5


def test_example_order_is_a_seeded_permutation_per_epoch():
    a = data.example_order(10, 3, 0, 25)
    assert sorted(a[:10]) == list(range(10)) and sorted(a[10:20]) == list(range(10)) and a[:10] != a[10:20]
    assert data.example_order(10, 3, 7, 9) == a[7:16]


def test_lr_schedule():
    cfg = train.TrainConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    lrs = [step.get_lr(s, cfg, 20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and abs(lrs[-1] - (0.1 + 0.9 * 0.5 * (1 + math.cos(
        math.pi * 15 / 16)))) < 1e-12
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))


def run(tmp_path, tiny_dir, gsm_file, *extra, name="run"):
    args = ["--model", tiny_dir, "--data", gsm_file, "--val_size", "8", "--batch_size", "4", "--max_len", "384",
            "--out_dir", str(tmp_path), "--run_name", name, "--log_every", "1", "--eval_every", "3", "--device", "cpu",
            *extra]
    return train.main(args)


def adapter(tmp_path, name):
    from safetensors.torch import load_file
    return load_file(os.path.join(tmp_path, name, "adapter.safetensors"))


def test_resume_equals_uninterrupted(tmp_path, tiny_dir, gsm_file, monkeypatch):
    common = ["--method", "lora", "--max_steps", "6", "--save_every", "3", "--dropout", "0.1", "--rank", "4"]
    run(tmp_path, tiny_dir, gsm_file, *common, name="straight")

    def crash(model, cfg, step):
        if step == 4:
            raise KeyboardInterrupt  # killed between checkpoints
    monkeypatch.setattr(runs.METHODS["lora"], "on_step", crash)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, tiny_dir, gsm_file, *common, name="killed")
    monkeypatch.undo()
    train.main(["--resume", "--out_dir", str(tmp_path), "--run_name", "killed"])  # the saved settings are reused
    a, b = adapter(tmp_path, "straight"), adapter(tmp_path, "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [[json.loads(l) for l in open(tmp_path / n / "log.jsonl")] for n in ("straight", "killed")]
    strip = lambda log: [{k: v for k, v in l.items() if k not in ("tok_s", "init_s")} for l in log]
    assert strip(logs[0]) == strip(logs[1])


PEFT_CASES = {"lora": ["--rank", "4"], "xs": ["--rank", "4"], "sb": ["--rank", "4", "--init_samples", "8"],
              "ga": ["--rank", "4", "--init_samples", "8"], "dylora": ["--rank", "8", "--eval_rank", "3"],
              "bone-shared": ["--block_size", "16", "--bone_variant", "shared"]}


@pytest.mark.parametrize("name", list(PEFT_CASES))
def test_peft_and_merged_export_reproduce_logits(tmp_path, tiny_dir, gsm_file, name):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    args = ["--method", name.split("-")[0], "--max_steps", "3", "--lr", "1e-2", *PEFT_CASES[name]]
    run(tmp_path, tiny_dir, gsm_file, *args, "--export", "peft", name="p")
    run(tmp_path, tiny_dir, gsm_file, *args, "--export", "merged", "--resume", name="p")  # export a finished run
    method, cfg, sd, meta = runs.load_adapter(str(tmp_path / "p"))
    ours = Llama.from_pretrained(tiny_dir, dtype=torch.float32)
    method.apply(ours, cfg, init=False)
    method.load_adapter_state_dict(ours, sd)
    ours.eval()
    idx = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(idx).logits
        ref = ours(idx)[0]
        assert (ref - base_logits).abs().max() > 1e-3  # the adapter changed something
        pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "p" / "peft")).eval()
        assert (pm(idx).logits - ref).abs().max() < 1e-4
        merged = Llama.from_pretrained(str(tmp_path / "p" / "merged"), dtype=torch.float32)
        assert (merged(idx)[0] - ref).abs().max() < 1e-4


def test_errors(tmp_path, tiny_dir, gsm_file):
    with pytest.raises(UserError, match="unknown method 'nope'"):
        cli.parse_run(["--method", "nope"], train.TrainConfig, runs.METHODS)
    with pytest.raises(UserError, match="unknown option --rnak; valid: .*rank"):
        cli.parse_run(["--method", "lora", "--rnak=4"], train.TrainConfig, runs.METHODS)
    with pytest.raises(UserError, match="--lr expects float, got 'fast'"):
        cli.parse_run(["--lr=fast"], train.TrainConfig, runs.METHODS)
    tc, mc = cli.parse_run(["--method=lora", "--seed", "7", "--compile", "--targets=q_proj,v_proj"],
                           train.TrainConfig, runs.METHODS)
    assert tc.seed == mc.seed == 7 and tc.compile and mc.targets == ("q_proj", "v_proj")
    with pytest.raises(UserError, match="data file not found"):
        data.load_examples(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a #### 1"}\n{"question": "q"}\n')
    with pytest.raises(UserError, match="bad.jsonl:2: expected"):
        data.load_examples(str(bad))
    bad.write_text('{"question": "q", "answer": "a #### 1"}\nnot json\n')
    with pytest.raises(UserError, match="bad.jsonl:2: not a JSON object"):
        data.load_examples(str(bad))
    bad.write_text("\n")
    with pytest.raises(UserError, match="no examples"):
        data.load_examples(str(bad))
    with pytest.raises(UserError, match="raise --max_len"):
        run(tmp_path, tiny_dir, gsm_file, "--method", "lora", "--max_len", "8")
    with pytest.raises(UserError, match=r"loss is nan at step 2: training stopped; no checkpoint had been saved"):
        run(tmp_path, tiny_dir, gsm_file, "--method", "full", "--lr", "1e30", "--max_steps", "6", "--warmup_steps",
            "0", "--grad_clip", "1e30", name="nan0")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_dir, gsm_file, monkeypatch):
    def poison(model, cfg, step):
        if step == 3:  # the 4th step runs on broken weights
            next(p for p in model.parameters() if p.requires_grad).data.fill_(float("nan"))
    monkeypatch.setattr(runs.METHODS["lora"], "on_step", poison)
    with pytest.raises(UserError, match=r"loss is nan at step 4: .* last good checkpoint \(step 2\) is in"):
        run(tmp_path, tiny_dir, gsm_file, "--method", "lora", "--max_steps", "8", "--save_every", "2", name="nan")
    ckpt = torch.load(tmp_path / "nan" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["adapter"].values())


@pytest.mark.parametrize("method", ["lora", "full", "sb", "xs"])
def test_run_smoke(tmp_path, tiny_dir, gsm_file, method):
    extra = {"sb": ["--init_samples", "8", "--rank", "8"], "xs": ["--rank", "8"]}.get(method, [])
    run(tmp_path, tiny_dir, gsm_file, "--method", method, "--max_steps", "3", *extra, name=method)
    log = [json.loads(l) for l in open(tmp_path / method / "log.jsonl")]
    assert log[-1]["step"] == 3 and "val_loss" in log[-1]
    assert os.path.isfile(tmp_path / method / "adapter.safetensors")


def test_cli_exit_path(tmp_path, gsm_file):
    """As a user runs it: a bad input is one line on stderr and exit status 1, before anything is loaded."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--method", "lora", "--model",
                        str(tmp_path / "none"), "--data", gsm_file, "--device", "cpu"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: model folder not found: {tmp_path}/none (pass a Hugging Face checkpoint folder or a hub id)"]


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory, tiny_dir):
    """The tiny checkpoint saved in bf16, as SmolLM2's is: a short low-lr run's update is below its rounding."""
    d = tmp_path_factory.mktemp("bf16")
    hf_tiny(vocab=256).to(torch.bfloat16).save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).write_bytes(open(os.path.join(tiny_dir, f), "rb").read())
    return str(d)


@pytest.mark.parametrize("method", ["lora", "full", "bone"])
def test_merged_export_keeps_the_training(tmp_path, bf16_dir, gsm_file, method, monkeypatch, capsys):
    """--export merged picks float32 when the checkpoint's bf16 would round the update away; the folder, loaded with
    transformers, gives the trained model's logits. Forced to bf16 it does not. The final score runs on the model as
    trained (its adapter layers still in place), not on a merge."""
    from transformers import AutoModelForCausalLM
    import eval as ev
    scored = []
    real = ev.run_eval
    monkeypatch.setattr(ev, "run_eval", lambda model, *a, **k: scored.append(
        [type(m).__module__ for m in model.modules() if hasattr(m, "merged_weight")]) or real(model, *a, **k))
    extra = ["--block_size", "16"] if method == "bone" else ["--rank", "4"] if method == "lora" else []
    run(tmp_path, bf16_dir, gsm_file, "--method", method, "--max_steps", "3", "--lr", "1e-4", "--export", "merged",
        "--test_data", gsm_file, "--eval_limit", "2", *extra, name="m")
    assert "merged export in float32: rounding to the checkpoint's bfloat16 would change" in capsys.readouterr().out
    assert method == "full" or scored == [[runs.METHODS[method].__name__] * 14]  # unmerged while scored
    m, cfg, sd, meta = runs.load_adapter(str(tmp_path / "m"))
    ours = Llama.from_pretrained(bf16_dir, dtype=torch.float32)
    m.apply(ours, cfg, init=False)
    m.load_adapter_state_dict(ours, sd)
    idx = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, base = ours.eval()(idx)[0], AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.float32)(idx).logits
        hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m" / "merged"), dtype="auto")
        assert hf.dtype == torch.float32 and (hf(idx).logits - ref).abs().max() < 1e-4
        run(tmp_path, bf16_dir, gsm_file, "--method", method, "--max_steps", "3", "--lr", "1e-4", "--export", "merged",
            "--export_dtype", "bfloat16", "--resume", *extra, name="m")
        hf16 = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m" / "merged"), dtype=torch.float32)
        # the bf16 export is further from the trained model than the update is large: the training is lost
        assert (hf16(idx).logits - ref).abs().max() > 0.2 * (ref - base).abs().max()
