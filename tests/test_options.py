"""Every option of every entry point is described in --help, and the options no other test reaches do what their
help says: grad_checkpoint, val_data, data_limit, the MetaMathQA formats, epoch-based run length, init_offload,
rslora, fed's client_frac, sb_init_data and eval_gsm8k."""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

import cli
import data
import eval as ev
import fed
import lora
import step
from cli import UserError
from conftest import script, tiny_llama, write_gsm8k
from model import Llama, Tokenizer
from runs import METHODS

train, bench, results = script("train"), script("bench"), script("results")
ENTRY_POINTS = {  # script: (main, the config classes its --help lists)
    "train": (train.main, [train.TrainConfig, data.DataConfig, step.OptimConfig] + [m.Config for m in METHODS.values()]),
    "fed": (fed.main, [fed.FedConfig, data.DataConfig, step.OptimConfig] + [s.method.Config for s in fed.STRATEGIES.values()]),
    "eval": (ev.main, [ev.EvalConfig]),
    "bench": (bench.main, [bench.BenchConfig]),
    "results": (results.main, [results.ResultsConfig]),
}


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_every_option_has_help(name, capsys):
    """--help prints every option of every config the entry point reads, each with a description."""
    main, classes = ENTRY_POINTS[name]
    main(["--help"])
    out = capsys.readouterr().out
    for cls in classes:
        helps = cli.help_lines(cls)
        for f in dataclasses.fields(cls):
            assert len(helps.get(f.name, "")) > 4, f"{cls.__module__}.{cls.__name__}.{f.name} has no help text"
            assert f"--{f.name}=" in out and helps[f.name] in out, f.name


def test_fed_accepts_only_its_options(tmp_path):
    """FedConfig has none of train.py's run options but --cuda_graph; each is refused with the list of valid ones."""
    for key in ("epochs", "max_steps", "export", "save_every", "eval_every", "compile"):
        with pytest.raises(UserError, match=f"unknown option --{key}; valid: "):
            fed.main([f"--{key}=1", "--out_dir", str(tmp_path)])
    for bad, msg in (("--client_frac=0", "client_frac must be in"), ("--client_frac=1.5", "client_frac must be in"),
                     ("--clients=0", "clients and --rounds must be"), ("--drop_prob=2", "drop_prob must be in")):
        with pytest.raises(UserError, match=msg):
            fed.main([bad, "--out_dir", str(tmp_path)])


def test_grad_checkpoint_same_loss_and_gradients(monkeypatch):
    """Recomputing each block in backward changes memory, not math: the same loss and gradients, and the blocks
    really are checkpointed (once per block per forward)."""
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    out = []
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    for ckpt in (False, True):
        model = tiny_llama()
        METHODS["full"].apply(model, METHODS["full"].Config())
        model.grad_checkpoint = ckpt
        loss = model(x, x.roll(-1, 1))[1]
        loss.backward()
        out.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert len(calls) == 2  # the tiny model's two blocks, only when asked
    assert out[0][0] == pytest.approx(out[1][0], abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(out[0][1], out[1][1]))


def test_metamathqa_formats(tmp_path):
    """MetaMathQA's release is one JSON list of {query, response, type}; a jsonl of the same rows reads the same,
    the response kept as is (it already ends 'The answer is: N'), and GSM8K rows may be mixed in."""
    rows = [{"query": f"What is {i} + 1?", "response": f"{i} + 1 = {i + 1}\nThe answer is: {i + 1}",
             "type": "GSM_AnsAug"} for i in range(5)]
    (tmp_path / "mm.json").write_text(json.dumps(rows))
    (tmp_path / "mm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) +
                                       json.dumps({"question": "q?", "answer": "so 2 <<1+1=2>>2\n#### 2"}) + "\n")
    a, b = data.load_examples(str(tmp_path / "mm.json")), data.load_examples(str(tmp_path / "mm.jsonl"))
    assert a == [(r["query"], r["response"]) for r in rows] and b[:5] == a
    assert b[5] == ("q?", "so 2 2\nThe answer is: 2")
    (tmp_path / "bad.json").write_text('[{"query": "q", "response": "r"},')
    with pytest.raises(UserError, match="bad.json: not valid JSON"):
        data.load_examples(str(tmp_path / "bad.json"))
    assert fed.read_field(str(tmp_path / "mm.json"), "type") == ["GSM_AnsAug"] * 5  # the Dirichlet split's labels


def test_data_limit_and_val_data(tmp_path):
    """--data_limit keeps the first N examples of the file, and the held-out split is drawn from those N;
    --val_data holds out a file of its own, and every example of --data trains."""
    path = write_gsm8k(tmp_path / "d.jsonl", n=40)
    val_path = write_gsm8k(tmp_path / "v.jsonl", n=6, seed=1)
    every = data.load_examples(path)
    cfg = data.DataConfig(data_limit=20, val_size=5)
    tr, va, idx = data.splits(cfg, path)
    assert len(tr) == 15 and len(va) == 5 and set(tr + va) == set(every[:20]) and max(idx) < 20
    cfg = data.DataConfig(val_data=val_path, val_size=5)
    tr, va, idx = data.splits(cfg, path)
    assert tr == every and va == data.load_examples(val_path) and idx == list(range(40))


def run(tmp_path, tiny_dir, gsm_file, *extra, name="run"):
    return train.main(["--model", tiny_dir, "--data", gsm_file, "--val_size", "8", "--batch_size", "4", "--max_len",
                       "384", "--out_dir", str(tmp_path), "--run_name", name, "--device", "cpu", "--method", "lora",
                       "--rank", "4", "--eval_every", "1000", "--log_every", "1", *extra])


def test_epochs_set_the_run_length(tmp_path, tiny_dir, gsm_file):
    """--max_steps 0: the run is ceil(epochs x examples / batch) steps; each epoch sees every example once, in an
    order of its own. --val_data: the held-out loss is that file's."""
    n = len(data.load_examples(gsm_file)) - 8  # the training examples (8 held out)
    out = run(tmp_path, tiny_dir, gsm_file, "--max_steps", "0", "--epochs", "1.5", name="e")
    assert out["steps"] == math.ceil(1.5 * n / 4)
    order = data.example_order(n, 0, 0, 2 * n)
    assert sorted(order[:n]) == sorted(order[n:]) == list(range(n)) and order[:n] != order[n:]
    val = tmp_path / "val.jsonl"
    val.write_text("".join(open(gsm_file).readlines()[:3]))
    out = run(tmp_path, tiny_dir, gsm_file, "--max_steps", "1", "--val_data", str(val), name="v")
    tok = Tokenizer.from_pretrained(tiny_dir)
    model = Llama.from_pretrained(tiny_dir, dtype=torch.float32)
    m, cfg, sd, _ = __import__("runs").load_adapter(str(tmp_path / "v"))
    m.apply(model, cfg, init=False)
    m.load_adapter_state_dict(model, sd)
    seqs, _ = data.tokenize(data.load_examples(str(val)), tok, data.TEMPLATE, 384)
    assert out["val_loss"] == pytest.approx(step.evaluate(model, data.eval_batches(seqs, 4, 384, tok.pad_id)), abs=1e-5)


def test_init_offload_gives_the_same_gradients(tiny_dir, gsm_file):
    """--init_offload accumulates the init gradients in fp32 on the CPU: the same values as on the model's device
    (on a GPU machine, tests/test_gpu.py checks the same across devices)."""
    tok = Tokenizer.from_pretrained(tiny_dir)
    seqs, _ = data.tokenize(data.load_examples(gsm_file)[:8], tok, data.TEMPLATE, 384)
    model = Llama.from_pretrained(tiny_dir, dtype=torch.float32)
    batches, n_tgt, _ = data.micro_batches(seqs, list(range(8)), 4, 384, tok.pad_id)
    a = step.init_grads(model, batches, ("q_proj", "down_proj"))
    b = step.init_grads(model, batches, ("q_proj", "down_proj"), offload=True)
    assert a.keys() == b.keys() and all(b[n].device.type == "cpu" and torch.equal(a[n], b[n]) for n in a)


def test_init_stream_through_train(tmp_path, tiny_dir, gsm_file):
    """--init_stream: the run initialises layer by layer (step.stream_init) and trains as usual."""
    for method in ("sb", "ga"):
        args = ["--model", tiny_dir, "--data", gsm_file, "--val_size", "8", "--batch_size", "4", "--max_len", "384",
                "--out_dir", str(tmp_path), "--run_name", method, "--device", "cpu", "--method", method, "--rank", "4",
                "--init_samples", "8", "--init_stream", "--max_steps", "2"]
        assert train.main(args)["steps"] == 2
        assert json.load(open(tmp_path / method / "config.json"))["method_config"]["init_stream"] is True


def test_lora_rslora_scale():
    """rsLoRA: the update is (alpha / sqrt(r)) B A instead of (alpha / r) B A, in the forward and the merge."""
    for rslora, scale in ((False, 32 / 8), (True, 32 / math.sqrt(8))):
        model = tiny_llama()
        lora.apply(model, lora.Config(rank=8, alpha=32, rslora=rslora))
        layer = model.model.layers[0].self_attn.q_proj
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
        want = F.linear(x, layer.weight) + scale * x @ layer.lora_A.T @ layer.lora_B.T
        assert torch.allclose(layer(x), want, atol=1e-5)
        assert torch.allclose(layer.merged_weight(), layer.weight + scale * layer.lora_B @ layer.lora_A, atol=1e-6)


def fed_args(tmp_path, tiny_dir, gsm_file, *extra, name="f"):
    return ["--model", tiny_dir, "--data", gsm_file, "--val_size", "8", "--max_len", "384", "--batch_size", "4",
            "--out_dir", str(tmp_path), "--run_name", name, "--device", "cpu", "--rank", "4", "--local_steps", "1",
            *extra]


def test_client_frac_samples_clients_each_round(tmp_path, tiny_dir, gsm_file):
    """--client_frac 0.5 of 4 clients: 2 sampled per round (seeded, so rounds differ and a rerun repeats them), and
    only the sampled clients' traffic is counted."""
    s = fed.main(fed_args(tmp_path, tiny_dir, gsm_file, "--method", "fedit", "--clients", "4", "--client_frac", "0.5",
                          "--rounds", "3"))
    picked = [l["clients"] for l in s["log"][1:]]
    assert all(len(p) == 2 for p in picked) and len({tuple(p) for p in picked}) > 1
    comm = s["per_client_per_round"]
    assert s["total"]["up_params"] == 3 * 2 * comm["up_params"]
    again = fed.main(fed_args(tmp_path, tiny_dir, gsm_file, "--method", "fedit", "--clients", "4", "--client_frac",
                              "0.5", "--rounds", "3", name="g"))
    assert [l["clients"] for l in again["log"][1:]] == picked


def test_sb_init_data_and_eval_gsm8k(tmp_path, tiny_dir, gsm_file, monkeypatch):
    """--sb_init_data: Fed-SB's central init uses that (public) file's examples, not the clients' data;
    --eval_gsm8k N scores the global model on the first N problems of --test_data at the end."""
    public = write_gsm8k(tmp_path / "public.jsonl", n=10, seed=7)
    seen = []
    real = step.init_method
    monkeypatch.setattr(step, "init_method", lambda model, method, mcfg, seqs, *a: seen.append(seqs) or
                        real(model, method, mcfg, seqs, *a))
    s = fed.main(fed_args(tmp_path, tiny_dir, gsm_file, "--method", "sb", "--clients", "2", "--rounds", "1",
                          "--init_samples", "4", "--sb_init_data", public, "--eval_gsm8k", "3",
                          "--test_data", gsm_file))
    tok = Tokenizer.from_pretrained(tiny_dir)
    want, _ = data.tokenize(data.load_examples(public), tok, data.TEMPLATE, 384)
    assert seen == [want]
    assert s["gsm8k"]["n"] == 3 and 0 <= s["gsm8k"]["accuracy"] <= 1
    assert json.load(open(tmp_path / "f" / "summary.json"))["gsm8k"]["n"] == 3
