"""The fast path: fixed-shape packing, the shared step function, bench.py's CPU smoke path, results.py."""
import json
import subprocess

import torch

import data
import lora
import step
from conftest import script
from model import Llama, ModelConfig

train = script("train")  # train.py is a script: its main() is run, never imported


def test_static_pack_keeps_examples_and_fixes_the_shape():
    seqs = [([1] + [5 + i] * (3 + i) + [2], 2) for i in range(7)]  # (ids, n_prompt)
    x, y, pos = data.pack(seqs, 16, 0)
    xs, ys, ps = data.pack(seqs, 16, 0, static=True)
    assert xs.shape == (-(-x.shape[0] // 4) * 4, 16)
    assert torch.equal(xs[:, :x.shape[1]][:x.shape[0]], x) and torch.equal(ys[:x.shape[0], :x.shape[1]], y)
    assert (ys[x.shape[0]:] == -100).all() and (ys[:, x.shape[1]:] == -100).all()  # padding never has a target
    assert (ps[:, x.shape[1]:] == 0).all()  # each padding slot is its own one-token example
    cfg = ModelConfig(vocab_size=32, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=64)
    model = Llama(cfg).init_weights()
    xs, x = xs % 32, x % 32
    assert torch.allclose(model(x, y, pos)[1], model(xs, ys, ps)[1], atol=1e-6)  # padding changes nothing


def test_make_step_is_the_mean_loss_step():
    """make_step over two micro-batches == one AdamW step on the mean target-token loss of all examples."""
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=64)
    g = torch.Generator().manual_seed(0)
    seqs = [(torch.randint(3, 64, (n,), generator=g).tolist(), p) for n, p in ((9, 3), (14, 5), (6, 2), (11, 4))]
    models = []
    for _ in range(2):
        m = Llama(cfg).init_weights(seed=1)
        lora.apply(m, lora.Config(rank=4))
        for p in m.parameters():
            if p.requires_grad:
                p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
        models.append(m)
    tcfg = step.OptimConfig(lr=1e-2)
    m = models[0]
    params = [p for p in m.parameters() if p.requires_grad]
    opt = step.make_optimizer(params, tcfg, torch.device("cpu"))
    batches, n_tgt, _ = data.micro_batches(seqs, [0, 1, 2, 3], 2, 32, 0)
    loss, norm = step.make_step(m, opt, params, 1e9)(batches, n_tgt)
    ref = models[1]
    rparams = [p for p in ref.parameters() if p.requires_grad]
    ropt = torch.optim.AdamW(rparams, lr=1e-2)
    x, y, pos = data.pack(seqs, 64, 0)  # every example in one row: the plain mean over all targets
    rloss = ref(x, y, pos)[1]
    rloss.backward()
    rnorm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in rparams]))
    ropt.step()
    assert torch.allclose(loss, rloss, atol=1e-6) and torch.allclose(norm, rnorm, atol=1e-6)
    for a, b in zip(params, rparams):  # Adam's first step is ~lr * sign(g): rounding of tiny g shows at 1e-5
        assert torch.allclose(a, b, atol=1e-4)


def test_bench_smoke():
    """bench.py's synthetic path end to end on a tiny shape (CPU), in-process."""
    rows = script("bench").main(["--smoke", "--methods", "lora,sb,dylora"])
    assert [r["method"] for r in rows] == ["lora", "sb", "dylora"]
    assert rows[1]["init_s"] > 0 and rows[0]["init_s"] is None and all(r["tok_s"] > 0 for r in rows)


def test_results_table(tmp_path, tiny_dir, gsm_file, monkeypatch):
    """results.py's table from two runs (DyLoRA scored at every rank); each train.py run is done in-process here
    (results.py starts a process per run: here that would be two torch imports), and finished runs are read back."""
    train = script("train")

    def in_process(cmd):  # [python, train.py, *argv]
        train.main(cmd[2:])
        return subprocess.CompletedProcess(cmd, 0)
    monkeypatch.setattr(subprocess, "run", in_process)
    results = script("results")
    argv = ["--model", tiny_dir, "--data", gsm_file, "--test_data", gsm_file, "--out_dir", str(tmp_path),
            "--methods", "lora,dylora", "--max_steps", "2", "--batch_size", "4", "--val_size", "8", "--max_len", "384",
            "--eval_limit", "2", "--device", "cpu"]
    rows = results.main(argv)
    assert [r["name"] for r in rows] == ["lora", "dylora"] and set(rows[1]["by_rank"]) == {1, 2, 4, 8, 16}
    table = open(tmp_path / "results.md").read()
    assert "| lora | 0.0002 | 16 |" in table and "| dylora @ rank 4 |" in table
    monkeypatch.setattr(subprocess, "run", None)  # finished runs are read back, not redone
    rows2 = results.main(argv)
    assert json.loads(json.dumps(rows2)) == json.loads(json.dumps(rows))
    cmds = []
    monkeypatch.setattr(subprocess, "run", lambda cmd: cmds.append(cmd) or in_process(cmd))
    (tmp_path / "lora" / "result.json").unlink()  # as if cut off after its checkpoint: resumed, not refused
    (tmp_path / "dylora" / "result.json").unlink()
    (tmp_path / "dylora" / "ckpt.pt").unlink()  # as if cut off before any checkpoint: started again
    rows3 = results.main(argv)
    assert "--resume" in cmds[0] and "--overwrite" in cmds[1] and [r["name"] for r in rows3] == ["lora", "dylora"]
