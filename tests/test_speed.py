"""The fast path: fixed-shape packing, the shared step function, bench.py's CPU smoke path, results.py."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import data
import lora
import step
from cli import UserError
from conftest import script
from model import EXAMPLE_TOKENS, Llama, ModelConfig

train = script("train")  # train.py is a script: its main() is run, never imported


def test_static_pack_keeps_examples_and_fixes_the_shape():
    seqs = [([1] + [5 + i] * (30 + 9 * i) + [2], 2) for i in range(9)]  # (ids, n_prompt)
    x, y, pos = data.pack(seqs, 128, 0)
    xs, ys, ps = data.pack(seqs, 128, 0, static=True)
    assert xs.shape == (-(-x.shape[0] // 4) * 4, 128) and x.shape[0] < len(seqs) and xs.shape[0] > x.shape[0]
    assert torch.equal(xs[:, :x.shape[1]][:x.shape[0]], x) and torch.equal(ys[:x.shape[0], :x.shape[1]], y)
    assert (ys[x.shape[0]:] == -100).all() and (ys[:, x.shape[1]:] == -100).all()  # padding never has a target
    # pos restarts only where an example starts (padding goes on from the last one; an empty row is one example)
    assert int((ps == 0).sum()) == len(seqs) + xs.shape[0] - x.shape[0]
    assert ((ps == 0).sum(1) <= 128 // EXAMPLE_TOKENS).all()  # the bound of the GPU's attention (model.doc_bounds)
    cfg = ModelConfig(vocab_size=32, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=64)
    model = Llama(cfg).init_weights()
    xs, x = xs % 32, x % 32
    assert torch.allclose(model(x, y, pos)[1], model(xs, ys, ps)[1], atol=1e-6)  # padding changes nothing


def test_make_step_is_the_mean_loss_step():
    """make_step over two micro-batches == one AdamW step on the mean target-token loss of all examples."""
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=64)
    g = torch.Generator().manual_seed(0)
    seqs = [(torch.randint(3, 64, (n,), generator=g).tolist(), p) for n, p in ((39, 3), (54, 5), (36, 2), (41, 4))]
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
    batches, n_tgt, _ = data.micro_batches(seqs, [0, 1, 2, 3], 2, 128, 0)
    loss, norm = step.make_step(m, opt, params, 1e9)(batches, n_tgt)
    ref = models[1]
    rparams = [p for p in ref.parameters() if p.requires_grad]
    ropt = torch.optim.AdamW(rparams, lr=1e-2)
    x, y, pos = data.pack(seqs, 192, 0)  # every example in one row: the plain mean over all targets
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


def run_scripts_in_process(monkeypatch, main, cmds=None):
    """results.py starts a process per run ([python, script, *argv]); here each runs in-process through `main`
    (a process per run would be a torch import each), exiting as cli.run does; `cmds` collects the commands. Any
    other command (matplotlib's first import asks fc-list for the system fonts) runs for real."""
    real_run = subprocess.run

    def run(cmd, **kw):
        if cmd[0] != sys.executable:
            return real_run(cmd, **kw)
        if cmds is not None:
            cmds.append(cmd)
        try:
            main(cmd[2:])
        except UserError as e:
            return subprocess.CompletedProcess(cmd, 1, stderr=f"error: {e}\n")
        return subprocess.CompletedProcess(cmd, 0, stderr="")
    monkeypatch.setattr(subprocess, "run", run)


def forbid_runs(monkeypatch):
    """No training run may start (finished runs are read back, not redone); other commands (fc-list) run."""
    real_run = subprocess.run

    def run(cmd, **kw):
        assert cmd[0] != sys.executable, f"a run was started: {cmd}"
        return real_run(cmd, **kw)
    monkeypatch.setattr(subprocess, "run", run)


def test_results_table(tmp_path, tiny_dir, gsm_file, monkeypatch):
    """results.py's table from two runs (DyLoRA scored at every rank); each train.py run is done in-process here
    (results.py starts a process per run: here that would be two torch imports), and finished runs are read back."""
    train = script("train")
    run_scripts_in_process(monkeypatch, train.main)
    results = script("results")
    argv = ["--model", tiny_dir, "--data", gsm_file, "--test_data", gsm_file, "--out_dir", str(tmp_path),
            "--methods", "lora,dylora", "--max_steps", "2", "--batch_size", "4", "--val_size", "8", "--max_len", "384",
            "--eval_limit", "2", "--device", "cpu"]
    rows = results.main(argv)
    assert [r["name"] for r in rows] == ["lora", "dylora"] and set(rows[1]["by_rank"]) == {1, 2, 4, 8, 16}
    table = open(tmp_path / "results.md").read()
    assert "| lora | 0.0002 | 16 |" in table and "| dylora @ rank 4 |" in table
    forbid_runs(monkeypatch)  # finished runs are read back, not redone
    rows2 = results.main(argv)
    assert json.loads(json.dumps(rows2)) == json.loads(json.dumps(rows))
    cmds = []
    run_scripts_in_process(monkeypatch, train.main, cmds)
    for name in ("lora", "dylora"):  # as if cut off after its checkpoint, before its summary: resumed, not refused
        (tmp_path / name / "result.json").unlink()
        (tmp_path / name / "summary.json").unlink()
    (tmp_path / "dylora" / "ckpt.pt").unlink()  # as if cut off before any checkpoint: started again
    rows3 = results.main(argv)
    assert "--resume" in cmds[0] and "--overwrite" in cmds[1] and [r["name"] for r in rows3] == ["lora", "dylora"]
    assert "--save_every" not in cmds[0]  # train.py's checkpoints every 200 steps: a run cut off loses < 200 steps
    (tmp_path / "lora" / "result.json").unlink()  # cut off after its summary: read back, not trained or scored again
    forbid_runs(monkeypatch)
    assert results.main(argv)[0]["val_loss"] == rows3[0]["val_loss"]


def test_committed_results_rebuild(tmp_path, monkeypatch):
    """RESULTS.md as committed is what `results.py --stage report` makes from the committed records alone (no model,
    no data, no GPU): a copy of results/evidence rebuilt on this CPU gives the same text and, where matplotlib is
    installed, its figures. Without matplotlib the figure lines are the only difference."""
    import shutil
    results = script("results")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shutil.copytree(os.path.join(root, "results", "evidence"), tmp_path / "results" / "evidence",
                    ignore=shutil.ignore_patterns("*.png", "RESULTS.md"))
    shutil.copy(os.path.join(root, "results", "precision_gpu.json"), tmp_path / "results")  # claim 6's runs
    monkeypatch.chdir(tmp_path)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        matplotlib = None
    for sub, pngs in (("dylora", ["loss_vs_rank.png"]),  # claim 4's longer regime: its own records and figure
                      ("", ["fed_plane.png", "loss_vs_params.png", "loss_vs_steps.png", "loss_vs_rank.png"])):
        d = os.path.join("results", "evidence", sub)  # (the main report links the regime's report too)
        results.main(["--stage", "report", "--results_dir", d.rstrip("/")])
        got, want = open(os.path.join(d, "RESULTS.md")).read(), open(os.path.join(root, d, "RESULTS.md")).read()
        figures = [ln for ln in want.split("\n") if ln.startswith("![")]
        assert [f.split("(")[-1].rstrip(")") for f in figures] == pngs
        if matplotlib is None:  # the figure lines are the only difference: claim 5's plane is left out, the
            plane = [f for f in figures if f.endswith("(fed_plane.png)")]  # others are one placeholder line
            want = want.replace("\n\n" + plane[0], "") if plane else want
            want = want.replace("\n\n".join(f for f in figures if f not in plane),
                                "(no figure: no seeds yet, or matplotlib is not installed)")
        else:
            assert all(os.path.getsize(os.path.join(d, f)) > 10_000 for f in pngs)
        assert got == want


def test_evidence_sweep_seeds_and_report(tmp_path, tiny_dir, gsm_file, monkeypatch):
    """The evidence pipeline end to end on the tiny model: an lr sweep chosen on the held-out loss (no test set),
    seeds at the chosen lr, records written one per run; a partial stage resumes; `--stage report` rebuilds the same
    RESULTS.md from the records alone (no model, no data, no run)."""
    train = script("train")
    cmds = []
    run_scripts_in_process(monkeypatch, train.main, cmds)
    results = script("results")
    rec = tmp_path / "records"
    common = ["--model", tiny_dir, "--data", gsm_file, "--test_data", gsm_file, "--out_dir", str(tmp_path / "runs"),
              "--results_dir", str(rec), "--methods", "lora,ga", "--lr_factors", "0.5,2,1e7", "--lr_extend", "0", "--seeds", "0,1",
              "--max_steps", "2", "--batch_size", "4", "--val_size", "8", "--max_len", "384", "--eval_limit", "2",
              "--device", "cpu", "--rank", "4"]
    results.main(common + ["--stage", "sweep"])
    sweep = {f: json.load(open(rec / "sweep" / f)) for f in os.listdir(rec / "sweep")}
    assert len(sweep) == 6 and all(r.get("acc") is None for r in sweep.values())  # never scored on the test set
    # lr x 1e7 breaks LoRA-GA's run: train.py stops it, and the sweep records that and goes on
    broken = [r for r in sweep.values() if r.get("diverged")]
    assert broken and all(r["val_loss"] is None and r["lr"] > 1 for r in broken)
    assert all("--test_data=" in " ".join(c) or c[c.index("--test_data") + 1] == "" for c in cmds)
    best = min((r for r in sweep.values() if r["name"] == "lora" and r["val_loss"]), key=lambda r: r["val_loss"])["lr"]
    assert results.chosen_lr("lora", str(rec)) == best
    results.main(common + ["--stage", "seeds"])
    seeds = [json.load(open(rec / "seeds" / f)) for f in sorted(os.listdir(rec / "seeds"))]
    assert [(r["name"], r["seed"]) for r in seeds] == [("ga", 0), ("ga", 1), ("lora", 0), ("lora", 1)]
    assert all(r["acc"] is not None and r["lr"] == results.chosen_lr(r["name"], str(rec)) for r in seeds)
    assert all(r["train_curve"][-1][0] == 2 for r in seeds)  # the logged training loss too (claim 3: the fit)
    text = open(rec / "RESULTS.md").read()
    assert "| lora |" in text and " +- " in text and "Verdicts" in text and "converges 2-4x faster than LoRA (r4)" in text
    assert "diverged (stopped by train.py)" in text and "(chosen" in text
    import shutil
    first = sorted(os.listdir(rec / "seeds"))[0]
    os.remove(rec / "seeds" / first)  # a record lost, its finished run still there: recorded again, not rerun
    os.remove(rec / "seeds" / sorted(os.listdir(rec / "seeds"))[0])
    seeds_dir = next((tmp_path / "runs").glob("seeds_*"))  # the run folders of these train.py flags
    shutil.rmtree(seeds_dir / first[:-5])  # ... and a run that never finished: run again
    n = len(cmds)
    results.main(common + ["--stage", "seeds"])
    assert len(cmds) == n + 1 and len(os.listdir(rec / "seeds")) == 4
    text = open(rec / "RESULTS.md").read()
    forbid_runs(monkeypatch)
    results.main(["--report", "--results_dir", str(rec)])  # (the same as --stage report)
    assert open(rec / "RESULTS.md").read() == text
    with pytest.raises(UserError, match=r"^--report is --stage report: leave out --stage seeds"):
        results.main(["--report", "--stage", "seeds", "--results_dir", str(rec)])
    for stage, flag in (("sweep", "--lr"), ("seeds", "--seed")):  # a run's own, set by the stage: one line
        with pytest.raises(UserError, match=rf"^{flag}: --stage {stage} sets each run's lr and seed itself"):
            results.main(common + ["--stage", stage, flag, "1"])
    # the sweep's choice changed (a better lora record appeared): the seeds at the old lr stop the command, no run
    old = results.chosen_lr("lora", str(rec))
    json.dump(dict(json.load(open(next((rec / "sweep").glob("lora_*")))), lr=old * 3, val_loss=-1.0),
              open(rec / "sweep" / f"lora_lr{old * 3:g}_s0.json", "w"))
    with pytest.raises(UserError, match=rf"lora_lr{old:g}_s0.json is lora at lr {old:g}, this command runs it at "
                                        rf"{old * 3:g} \(the sweep's choice changed\)"):
        results.main(common + ["--stage", "seeds"])


def test_dylora_claim_at_every_rank(tmp_path, tiny_dir, gsm_file, monkeypatch):
    """Claim 4's pipeline: a DyLoRA seeds run is recorded with its held-out loss at every rank (its adapter re-applied
    at each rank), which equals train.py's own held-out loss at the full rank, and the report sets each rank
    against LoRA trained at that rank."""
    run_scripts_in_process(monkeypatch, script("train").main)
    results = script("results")
    rec = tmp_path / "records"
    os.makedirs(rec / "sweep")
    flags = ["--max_steps=2", "--batch_size=4", "--val_size=8", "--max_len=384", "--eval_limit=1", "--device=cpu"]
    for name in ("dylora", "lora-r1", "lora-r2"):  # the chosen lrs, as a sweep would have left them
        json.dump(dict(name=name, lr=1e-2, val_loss=1.0, flags=flags if name != "lora-r2" else flags[1:]),
                  open(rec / "sweep" / f"{name}_lr0.01_s0.json", "w"))
    common = ["--model", tiny_dir, "--data", gsm_file, "--test_data", gsm_file, "--out_dir", str(tmp_path / "runs"),
              "--results_dir", str(rec), "--methods", "dylora,lora-r1,lora-r2", "--seeds", "0,1", "--stage", "seeds"]
    # a sweep made under other train.py flags (here without --max_steps 2) chose no lr for these: stopped before any run
    with pytest.raises(UserError, match=r"lora-r2_lr0.01_s0.json was made with the flags --batch_size=4 .* this "
                                        r"command passes --max_steps=2 --batch_size=4"):
        results.main(common + flags)
    assert not os.path.isdir(rec / "seeds")
    json.dump(dict(name="lora-r2", lr=1e-2, val_loss=1.0, flags=flags), open(rec / "sweep" / "lora-r2_lr0.01_s0.json", "w"))
    results.main(common + flags)
    dy = [json.load(open(rec / "seeds" / f"dylora_lr0.01_s{k}.json")) for k in (0, 1)]
    assert all(set(r["val_loss_by_rank"]) == {"1", "2", "4", "8", "16"} for r in dy)
    assert all(r["val_loss_by_rank"]["16"] == pytest.approx(r["val_loss"], abs=1e-5) for r in dy)
    assert len({round(v, 6) for v in dy[0]["val_loss_by_rank"].values()}) > 1  # the ranks differ
    text = open(rec / "RESULTS.md").read()
    assert "Claim 4: one dylora run" in text and "| 1 |" in text and re.search(r"\(lora-r1\) \| [+-]\d\.\d{4} \([+-]"
                                                                           r"[\d.]+%\) \| \*\*(holds|does not hold|"
                                                                           r"inconclusive)\*\* \(t = ", text)
    assert "| 4 |" in text and "not run" in text and all(r["jobs"] == 1 for r in dy)
    assert re.search(r"Training cost: one dylora run [\d.]+ s, 2 steps; the 2 LoRA runs it replaces [\d.]+ s "
                     r"together, 4 steps\.", text)  # (2 steps a run: --max_steps=2)
    path = rec / "seeds" / "dylora_lr0.01_s1.json"  # as if made beside 2 other runs (--jobs 3): its time is shared
    json.dump(dict(json.load(open(path)), jobs=3), open(path, "w"))
    results.report(str(rec), str(rec / "RESULTS.md"))
    assert "together, 4 steps (runs made up to 3 at a time on one GPU, `--jobs`" in open(rec / "RESULTS.md").read()
    # the paper's regime has its own records and report in <results_dir>/dylora: the main report points there
    assert "### Claim 4 in the paper's regime (3 epochs, frozen and non-frozen)\n\nNot run yet" in open(
        rec / "RESULTS.md").read()
    os.makedirs(rec / "dylora")
    results.report(str(rec), str(rec / "dylora" / "RESULTS.md"))  # (any report: only its being there matters)
    results.report(str(rec), str(rec / "RESULTS.md"))
    assert "In [dylora/RESULTS.md](dylora/RESULTS.md)" in open(rec / "RESULTS.md").read()


def test_fed_claim_plane(tmp_path, tiny_dir, gsm_file, monkeypatch):
    """Claim 5's pipeline: each strategy's lr swept at the middle rank of its runs (here its only one; seed 0, no
    privacy) around its method's centralised choice, then the seeds at the chosen lr; fed.py runs recorded with their bytes in both conventions
    (Fed-SB: the paper counts no setup; FedEx: its download K P) and held-out loss, with DP-SGD's epsilon, and the
    report's sweep table and dominance lines."""
    import fed
    from conftest import write_gsm8k
    results = script("results")
    rec = tmp_path / "records"
    gsm_file = write_gsm8k(tmp_path / "train.jsonl", n=80)  # a private Fed-SB run's server keeps 64 for its init
    tiny = ["--clients", "2", "--rounds", "1", "--local_steps", "1", "--batch_size", "4", "--val_size", "8",
            "--max_len", "384", "--device", "cpu", "--dp_seed", "0"]
    argv = ["--model", tiny_dir, "--data", gsm_file, "--out_dir", str(tmp_path / "runs"), "--results_dir", str(rec),
            "--stage", "fed", "--fed_runs", "fed-sb-r32,fed-fedex-r4", "--seeds", "1", "--fed_lr_factors", "0.5,1",
            "--fed_dp_lr_factors", "0.25,1", "--lr_extend", "0"]
    forbid_runs(monkeypatch)  # a sweep centres on its method's centralised choice: with none, one line, no run
    with pytest.raises(UserError, match=r"no finished sweep run of lora \(whose lr centres fedex's fed sweep\) in .*: "
                                        r"run --stage sweep --methods lora first"):
        results.main(argv + tiny)
    with pytest.raises(UserError, match=r"--stage fed runs seed 0 as each strategy's lr sweep: pass other --seeds"):
        results.main(argv + tiny + ["--seeds", "0,1"])
    with pytest.raises(UserError, match=r"^fed-fedex-r4 \(fed.py --method fedex --rank 4\): unknown option "
                                        r"--init_samples"):  # LoRA-SB's option: the LoRA strategies have none
        results.main(argv + tiny + ["--init_samples", "8"])
    os.makedirs(rec / "sweep")
    for name, lr, loss in (("sb", 0.01, 1.0), ("sb", 0.02, 0.9), ("sb", 0.04, None), ("lora", 0.001, 1.0)):
        json.dump(dict(name=name, lr=lr, val_loss=loss), open(rec / "sweep" / f"{name}_lr{lr:g}_s0.json", "w"))
    cmds = []
    run_scripts_in_process(monkeypatch, fed.main, cmds)
    results.main(argv + tiny + ["--dp_epsilons", "inf,3"])
    ran = [(c[c.index("--run_name") + 1], c[c.index("--lr") + 1]) for c in cmds]  # what fed.py was given
    sweep = {r: json.load(open(rec / "fed" / f"{r}.json")) for r, _ in ran[:4]}
    assert sorted(sweep) == ["fed-fedex-r4_lr0.0005_epsinf_s0", "fed-fedex-r4_lr0.001_epsinf_s0",
                             "fed-sb-r32_lr0.01_epsinf_s0", "fed-sb-r32_lr0.02_epsinf_s0"]  # 0.02 x 0.5, 1
    assert all(r["lr_from"] == results.FED_SWEPT and r["eps"] == "inf" for r in sweep.values())
    lrs = {st: min((r for r in sweep.values() if r["strategy"] == st), key=lambda r: r["val_loss"])["lr"]
           for st in ("sb", "fedex")}
    # the private runs' lr: a second sweep at --fed_dp_sweep (3), seed 0, around the lr chosen without privacy
    dp_sweep = {r: json.load(open(rec / "fed" / f"{r}.json")) for r, _ in ran[4:8]}
    assert sorted(dp_sweep) == sorted(f"{n}_lr{lrs[st] * f:g}_eps3_s0" for n, st in
                                      (("fed-sb-r32", "sb"), ("fed-fedex-r4", "fedex")) for f in (0.25, 1))
    assert all(r["lr_from"] == results.FED_SWEPT and r["eps"] == "3" for r in dp_sweep.values())
    dp_lrs = {st: min((r for r in dp_sweep.values() if r["strategy"] == st), key=lambda r: r["val_loss"])["lr"]
              for st in ("sb", "fedex")}
    assert sorted(ran[8:]) == sorted((f"{n}_lr{lr[st]:g}_eps{e}_s1", f"{lr[st]:g}") for n, st in
                                     (("fed-sb-r32", "sb"), ("fed-fedex-r4", "fedex"))
                                     for e, lr in (("inf", lrs), ("3", dp_lrs)))
    assert [r.split("_eps")[1].split("_")[0] for r, _ in ran[8:]] == ["inf", "inf", "3", "3"]  # epsilon by epsilon
    sb = json.load(open(rec / "fed" / f"fed-sb-r32_lr{lrs['sb']:g}_epsinf_s1.json"))
    fx = json.load(open(rec / "fed" / f"fed-fedex-r4_lr{lrs['fedex']:g}_epsinf_s1.json"))
    assert sb["lr_from"] == fx["lr_from"] == "each strategy's fed sweep"
    assert sb["bytes"] > sb["paper_bytes"]  # ours counts the one-time download of B and A
    priv = json.load(open(rec / "fed" / f"fed-sb-r32_lr{dp_lrs['sb']:g}_eps3_s1.json"))
    assert priv["lr_from"] == "each strategy's private fed sweep (epsilon 3)"
    assert fx["paper_bytes"] > 0 and sb["epsilon"] is None and 0 < priv["epsilon"] <= 3
    assert priv["dp"]["init"] == "the server's own 64 examples, in no client's shard" and priv["dp"]["void"]
    # a run cut off after its last saved round (fed_state.pt, no summary yet) goes on from it, not from the start
    import glob
    cut = f"fed-fedex-r4_lr{lrs['fedex']:g}_epsinf_s1"
    os.remove(rec / "fed" / f"{cut}.json")
    os.remove(glob.glob(str(tmp_path / "runs" / "*" / cut / "summary.json"))[0])
    cmds = []
    run_scripts_in_process(monkeypatch, fed.main, cmds)
    results.main(argv + tiny + ["--dp_epsilons", "inf,3"])
    assert len(cmds) == 1 and "--resume" in cmds[0] and "--overwrite" not in cmds[0]
    assert json.load(open(rec / "fed" / f"{cut}.json"))["val_loss"] == fx["val_loss"]
    state = torch.load(glob.glob(str(tmp_path / "runs" / "*" / cut / "fed_state.pt"))[0], weights_only=True)
    assert json.load(open(rec / "fed" / f"{cut}.json"))["wall_s"] > state["wall_s"] > 0  # the parts added up
    text = open(rec / "RESULTS.md").read()
    assert "### Claim 5's lr sweeps (seed 0, held-out loss)" in text
    n = len(glob.glob(str(rec / "fed" / "*.json")))
    assert f"Cost: {n} of the {n} runs here keep their wall time (start-up included): " in text
    terms = text.split("DP-SGD, epsilon 3 per client")[1].split("| run |")[0]  # the private table's guarantee
    spent = max(json.load(open(f))["epsilon"] for f in glob.glob(str(rec / "fed" / "*_eps3_*.json")))
    assert f"Epsilon spent per client, at most {spent:.4f} (target 3) at delta <= 1.00e-05 (rdp accountant; " \
           f"clip 0.1)" in terms
    assert "LoRA-SB's init: the server's own 64 examples, in no client's shard." in terms
    assert "**No guarantee** (--dp_seed made the noise reproducible): fed-fedex-r4, fed-sb-r32." in terms
    for eps, lr, recs in (("none", lrs["sb"], sweep), ("3", dp_lrs["sb"], dp_sweep)):  # each sweep's choice
        best = min(r["val_loss"] for r in recs.values() if r["strategy"] == "sb")
        assert f"| fed-sb-r32 | {eps} | {lr:g} | {best:.4f} (chosen) |" in text
    assert "Claim 5: Fed-SB on the communication / held-out loss plane, without privacy, lr from each strategy's " \
           "fed sweep" in text
    assert f"| fed-sb-r32 | {lrs['sb']:g} |" in text and "Claim 5's protocol: `fed.py` with 2 clients" in text
    plane = text.split("without privacy, lr from")[1].split("###")[0]
    assert plane.count("| fed-sb-r32 |") == 1 and "| 1 |" in plane and "| 2 |" not in plane  # seed 1 alone: the
    # sweep's seed-0 runs are no points of the plane
    try:
        import matplotlib  # noqa: F401
        assert "(fed_plane.png)" in text and (rec / "fed_plane.png").stat().st_size > 10_000
    except ImportError:
        assert "fed_plane.png" not in text
    assert "DP-SGD, epsilon 3 per client" in text and "Fed-SB dominates fedex (the paper's bytes)" in text
    # the records stand for these fed.py flags only: under others the command stops at once, before any run
    forbid_runs(monkeypatch)
    with pytest.raises(UserError, match=r"fed-fedex-r4_lr[0-9.e-]+_eps(inf|3)_s0.json was made with the flags "
                                        r"--clients=2 --rounds=1 --local_steps=1 .* this command passes --clients=2 --rounds=1 "
                                        r"--local_steps=2"):
        results.main(argv + [a if a != "1" or i != 5 else "2" for i, a in enumerate(tiny)] + ["--dp_epsilons", "inf,3"])
    # the same flags in another order are the same protocol: read back, nothing runs
    results.main(argv + tiny[4:] + tiny[:4] + ["--dp_epsilons", "inf,3"])
    # more ranks later: the strategy's lr sweep stays the one its records hold (not a new one at the new middle rank)
    cmds = []
    run_scripts_in_process(monkeypatch, fed.main, cmds)
    fx_runs = "fed-fedex-r4,fed-fedex-r16,fed-fedex-r32"
    results.main([a if a != "fed-sb-r32,fed-fedex-r4" else fx_runs for a in argv] + tiny + ["--dp_epsilons", "inf"])
    assert sorted(c[c.index("--run_name") + 1] for c in cmds) == [
        f"fed-fedex-r{r}_lr{lrs['fedex']:g}_epsinf_s1" for r in (16, 32)]
    forbid_runs(monkeypatch)
    # the sweep's choice changed (a better sb record appeared): the seeds at the old lr stop the command
    other = 0.04 if lrs["sb"] != 0.04 else 0.08
    json.dump(dict(sweep[f"fed-sb-r32_lr{lrs['sb']:g}_epsinf_s0"], lr=other, val_loss=-1.0),
              open(rec / "fed" / f"fed-sb-r32_lr{other:g}_epsinf_s0.json", "w"))
    with pytest.raises(UserError, match=rf"fed-sb-r32_lr{lrs['sb']:g}_epsinf_s1.json is fed-sb-r32 at lr "
                                        rf"{lrs['sb']:g}, "
                                        rf"this command runs it at {other:g} \(the sweep's choice or --lr changed\)"):
        results.main(argv + tiny + ["--dp_epsilons", "inf,3"])
    os.remove(rec / "fed" / f"fed-sb-r32_lr{other:g}_epsinf_s0.json")
    # likewise the private sweep's choice: the private seeds at its old lr stop the command
    other = 1e-5 if dp_lrs["sb"] != 1e-5 else 2e-5
    json.dump(dict(dp_sweep[f"fed-sb-r32_lr{dp_lrs['sb']:g}_eps3_s0"], lr=other, val_loss=-1.0),
              open(rec / "fed" / f"fed-sb-r32_lr{other:g}_eps3_s0.json", "w"))
    with pytest.raises(UserError, match=rf"fed-sb-r32_lr{dp_lrs['sb']:g}_eps3_s1.json is fed-sb-r32 at lr "
                                        rf"{dp_lrs['sb']:g}, this command runs it at {other:g} \(the private sweep's"):
        results.main(argv + tiny + ["--dp_epsilons", "inf,3"])
    os.remove(rec / "fed" / f"fed-sb-r32_lr{other:g}_eps3_s0.json")
    # --lr: no sweep; other flags into fresh records, the runs under the old flags (same out_dir) not read back
    cmds = []
    run_scripts_in_process(monkeypatch, fed.main, cmds)
    results.main(["--model", tiny_dir, "--data", gsm_file, "--out_dir", str(tmp_path / "runs"), "--results_dir",
                  str(tmp_path / "records2"), "--stage", "fed", "--fed_runs", "fed-sb-r32", "--seeds", "1",
                  "--dp_epsilons", "inf", "--lr", "0.02"] + tiny[:5] + ["2"] + tiny[6:])
    new = json.load(open(tmp_path / "records2" / "fed" / "fed-sb-r32_lr0.02_epsinf_s1.json"))
    assert len(cmds) == 1 and "--local_steps=2" in new["flags"] and new["val_loss"] != sb["val_loss"]
    assert new["lr_from"] == "--lr" and "--lr" not in cmds[0][:cmds[0].index("--local_steps=2")]  # once, as given


def test_jobs_run_concurrently(tmp_path, monkeypatch):
    """--jobs N: N runs at once, each still its own process, every record written whole; after a failure no new
    run starts, the running ones are recorded, and the failure is the command's one line. Each process here is a
    stand-in fed.py that waits at a barrier (proof that the runs overlap) and writes the summary the record is read
    from (what the threads schedule is under test, not fed.py)."""
    import threading
    import time
    results = script("results")
    started, barrier = [], [threading.Barrier(3, timeout=20)]
    real_run = subprocess.run

    def run(cmd, **kw):
        if cmd[0] != sys.executable:
            return real_run(cmd, **kw)
        a = dict(zip(cmd[2::2], cmd[3::2]))
        started.append(a["--run_name"])
        barrier[0].wait()  # every run waits for N - 1 others: they run at once, or this times out
        if a["--method"] == "fedex" and a["--seed"] == "2":
            return subprocess.CompletedProcess(cmd, 1, stderr="error: out of memory\n")
        time.sleep(1.0 if a["--method"] == "fedex" else 0)  # s1 outlives s2's failure
        os.makedirs(os.path.join(a["--out_dir"], a["--run_name"]))
        json.dump(dict(method=a["--method"], rank=int(a["--rank"]), final_val_loss=1.0, clients=2, rounds=1, dp=None,
                       total=dict(up_bytes=10, down_bytes=20), log=[dict(clients=[0, 1])],
                       per_client_per_round=dict(paper=dict(up_params=1, down_params=1))),
                  open(os.path.join(a["--out_dir"], a["--run_name"], "summary.json"), "w"))
        return subprocess.CompletedProcess(cmd, 0, stderr="")
    monkeypatch.setattr(subprocess, "run", run)
    rec, data_file = tmp_path / "records", tmp_path / "train.jsonl"
    data_file.write_text("")
    argv = ["--model", str(tmp_path), "--data", str(data_file), "--out_dir", str(tmp_path / "runs"), "--results_dir",
            str(rec), "--stage", "fed", "--dp_epsilons", "inf", "--seeds", "1,2,3", "--clients", "2", "--lr", "0.01"]
    results.main(argv + ["--fed_runs", "fed-sb-r32,fed-fedit-r4", "--jobs", "3"])
    assert len(started) == 6 and len(os.listdir(rec / "fed")) == 6
    assert all(json.load(open(rec / "fed" / f))["flags"] == ["--clients=2", "--lr=0.01"] for f in os.listdir(rec / "fed"))
    assert {json.load(open(rec / "fed" / f))["jobs"] for f in os.listdir(rec / "fed")} == {3}
    started.clear()  # --jobs above the runs there are: a record says how many shared the GPU, not --jobs
    results.main([str(tmp_path / "rec7") if a == str(rec) else a for a in argv] + ["--fed_runs", "fed-sb-r32", "--jobs",
                                                                                   "7"])
    assert {json.load(open(tmp_path / "rec7" / "fed" / f))["jobs"] for f in os.listdir(tmp_path / "rec7" / "fed")} == {3}
    started.clear()
    barrier[0] = threading.Barrier(2, timeout=20)
    with pytest.raises(UserError, match=r"the fed-fedex-r4_lr0.01_epsinf_s2 run failed \(exit 1: error: out of memory\)"):
        results.main(argv + ["--fed_runs", "fed-fedex-r4,fed-fedex-r16,fed-ffa-r4", "--jobs", "2"])
    # s1 and s2 ran together; s2 failed while s1 ran on: s1 is recorded, and no run started after the failure
    assert sorted(started) == ["fed-fedex-r4_lr0.01_epsinf_s1", "fed-fedex-r4_lr0.01_epsinf_s2"]
    assert sorted(os.listdir(rec / "fed"))[0] == "fed-fedex-r4_lr0.01_epsinf_s1.json"
    assert not any(f.endswith(".tmp") for f in os.listdir(rec / "fed"))
    for bad, line in ((["--jobs", "0"], "--jobs must be >= 1"), (["--lr", "abc"], "--lr expects float, got 'abc'"),
                      (["--lr", "0"], "--lr must be a number > 0")):
        with pytest.raises(UserError, match=line):
            results.main(argv + bad)


def test_run_folders_ignore_the_order_of_flags():
    """A command re-run with its flags in another order reads the same committed records (same_flags) and must find
    its runs in flight in the same folder too, or every cut run would start again."""
    results = script("results")
    a, b = results.flagged("out", "seeds", ["--epochs=3", "--max_len=256"]), results.flagged(
        "out", "seeds", ["--max_len=256", "--epochs=3"])
    assert a == b != results.flagged("out", "seeds", ["--epochs=2", "--max_len=256"])


def test_fed_figure_rows_put_no_privacy_first():
    results = script("results")
    recs = [dict(eps=e, lr_from=f) for e, f in (("3", "b"), ("inf", "a"), ("1", "b"), ("7.5", "b"), ("inf", "a"))]
    assert results.plane_rows(recs) == [("inf", "a"), ("1", "b"), ("3", "b"), ("7.5", "b")]


def test_fed_dominance_verdicts():
    """Claim 5's verdict per strategy from seeds: a point is beaten only by a Fed-SB point with no more bytes whose
    loss is lower by Welch's t; a point no Fed-SB point is as cheap as is missed; a tie within noise is neither."""
    results = script("results")

    def recs(name, strategy, b, losses):
        return [dict(name=name, strategy=strategy, lr=0.01, eps="inf", seed=s, bytes=b, paper_bytes=b, val_loss=v)
                for s, v in enumerate(losses, 1)]
    sb = recs("fed-sb-r32", "sb", 10, [1.0, 1.01, 0.99])
    lines = "\n".join(results.fed_report(sb + recs("fed-fedit-r4", "fedit", 20, [1.2, 1.21, 1.19]) +
                                         recs("fed-fedex-r4", "fedex", 20, [1.0, 1.02, 0.985]) +
                                         recs("fed-ffa-r4", "ffa", 5, [1.5, 1.5, 1.5])))
    assert "Fed-SB dominates fedit (fed.py's bytes): **holds** (of its 1 points, 1 beaten and 0 missed" in lines
    assert "Fed-SB dominates fedex (fed.py's bytes): **inconclusive** (of its 1 points, 0 beaten and 0 missed" in lines
    assert "Fed-SB dominates ffa (fed.py's bytes): **does not hold** (of its 1 points, 0 beaten and 1 missed" in lines
    # each point names what it was compared with, the two mean losses and t
    assert "fed-fedit-r4 1.2000 against fed-sb-r32 1.0000, t = 24.49)" in lines
    assert "fed-ffa-r4 1.5000: no Fed-SB point moves as few bytes)" in lines
    # the gaps against what the default command runs: FED_RUNS x --dp_epsilons x 3 seeds
    gaps = lines.split("Not run yet, seeds per run (`--stage fed` runs them): without privacy: ")[1]
    assert "fed-sb-r64 (0 of 3)" in gaps and "fed-sb-r32" not in gaps and gaps.endswith(
        "; at epsilon 1: none yet; at epsilon 3: none yet; at epsilon 7.5: none yet.")
    # every run one or two seeds short is listed (not "none yet"); seeds other than 1-3 stand in for none
    part = [dict(name=n, strategy=results.FED_RUNS[n][1], lr=0.01, eps="inf", seed=sd, bytes=1, paper_bytes=1,
                 val_loss=1.0) for n in results.FED_RUNS for sd in ((1, 2) if n != "fed-sb-r32" else (4, 5, 6))]
    gaps = "\n".join(results.fed_report(part)).split("without privacy: ")[-1]
    assert gaps.startswith("fed-sb-r32 (0 of 3), fed-sb-r64 (2 of 3), ") and "none yet; at epsilon 3" in gaps
    # a run with a diverged seed (fed.py's null held-out loss) is named and counts for nothing, its other seeds too
    lines = "\n".join(results.fed_report(sb + [dict(sb[0], seed=3, val_loss=None)] +
                                         recs("fed-fedit-r4", "fedit", 20, [1.2, 1.21, 1.19])))
    assert "left out with all their seeds from the tables and verdicts below: fed-sb-r32 (lr 0.01, epsilon inf: " \
           "1 of 4 seeds)." in lines and "| fed-sb-r32 |" not in lines
    assert "fed-sb-r32 (" not in lines.split("Not run yet, seeds per run")[1]  # it ran: diverged is not missing
    assert "Fed-SB dominates fedit (fed.py's bytes): **does not hold** (of its 1 points, 0 beaten and 1 missed" in lines
    # one seed a side decides nothing, however far apart
    lines = "\n".join(results.fed_report(sb[:1] + recs("fed-fedit-r4", "fedit", 20, [5.0])))
    assert "Fed-SB dominates fedit (fed.py's bytes): **inconclusive**" in lines
    assert "a side with one seed: no t)" in lines


def test_bone_pace_verdict(tmp_path):
    """Claim 3's pace: Bone's held-out loss a quarter into the epoch against LoRA's, by Welch's t over the seeds,
    from records alone (each a copy of a committed record with its curve replaced)."""
    results = script("results")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = json.load(open(os.path.join(root, "results", "evidence", "seeds", "lora_lr0.0032_s1.json")))
    os.makedirs(tmp_path / "seeds")
    for name, early in (("lora", (0.95, 0.951, 0.949)), ("bone", (0.90, 0.902, 0.899)),
                        ("bone-shared", (0.95, 0.96, 0.94))):
        for seed, v in enumerate(early):
            curve = [[s, 1.0 if s < 100 else v if s < 200 else 0.8] for s in range(0, 453, 25)]
            rec = dict(base, name=name, method=name.split("-")[0], seed=seed, curve=curve, steps=452)
            json.dump(rec, open(tmp_path / "seeds" / f"{name}_s{seed}.json", "w"))
    results.report(str(tmp_path), str(tmp_path / "RESULTS.md"))
    text = open(tmp_path / "RESULTS.md").read()
    assert "- bone converges faster than LoRA (held-out loss at step 125 of 452): **holds**" in text
    assert "- bone-shared converges faster than LoRA (held-out loss at step 125 of 452): **inconclusive**" in text


def test_sweep_extends_past_an_edge(monkeypatch):
    """The lr grid grows beyond whichever edge holds the best held-out loss, at the grid's ratio, until the best is
    inside it, a run diverges, or --lr_extend runs out (a fake run: loss = (log4(lr) - log4(best))^2)."""
    import math
    from types import SimpleNamespace
    results = script("results")
    ran = []

    def fake(stage, name, lr, seed, args, extra, optimum=1.0, diverge=float("inf")):
        ran.append(lr)
        loss = None if lr >= diverge else (math.log(lr / optimum, 4)) ** 2
        return dict(name=name, lr=lr, val_loss=loss)
    args = SimpleNamespace(lr_extend=3)
    for optimum, diverge, expect in ((1.0, float("inf"), [1 / 16, 1 / 4, 1, 4]),  # inside: no extension
                                     (64.0, float("inf"), [1 / 16, 1 / 4, 1, 4, 16, 64, 256]),  # up, then inside
                                     (1e6, float("inf"), [1 / 16, 1 / 4, 1, 4, 16, 64, 256]),  # up, 3 at most
                                     (1e6, 20.0, [1 / 16, 1 / 4, 1, 4, 16, 64]),  # up until a run diverges
                                     (1e-3, float("inf"), [1 / 16, 1 / 4, 1, 4, 1 / 64, 1 / 256, 1 / 1024])):  # down
        ran.clear()
        monkeypatch.setitem(results.sweep.__globals__, "evidence_run",
                            lambda *a, o=optimum, d=diverge: fake(*a, optimum=o, diverge=d))
        results.sweep("lora", 1.0, [0.0625, 0.25, 1.0, 4.0], args, [])
        assert ran == pytest.approx(expect), (optimum, ran)


def test_verdict_statistics():
    results = script("results")
    assert "**holds**" in results.verdict([1.0, 1.01, 0.99], [2.0, 2.01, 1.99], "a < b")
    assert "**does not hold**" in results.verdict([2.0, 2.01, 1.99], [1.0, 1.01, 0.99], "a < b")
    assert "**inconclusive**" in results.verdict([1.0, 1.2, 0.8], [1.1, 1.3, 0.9], "a < b")  # t = 0.61
    assert results.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)


def test_seeds_of_a_variant_take_its_methods_lr(tmp_path, monkeypatch):
    """--stage seeds: a variant (lora-r8) without sweep records of its own runs at its method's chosen lr; one with
    its own records at its own; a name with neither (xs-r16: no xs sweep) is one clear error."""
    results = script("results")
    for name, lr, loss in (("lora", 1e-3, 0.9), ("lora", 4e-3, 0.8), ("lora-r4", 1e-2, 0.7), ("lora-r4", 1e-3, 0.95)):
        os.makedirs(tmp_path / "sweep", exist_ok=True)
        json.dump(dict(name=name, lr=lr, val_loss=loss), open(tmp_path / "sweep" / f"{name}_lr{lr:g}_s0.json", "w"))
    ran = []
    monkeypatch.setitem(results.main.__globals__, "evidence_run", lambda stage, n, lr, seed, *a: ran.append((n, lr)))
    monkeypatch.setitem(results.main.__globals__, "report", lambda *a: "")
    common = ["--stage", "seeds", "--model", str(tmp_path), "--data", "d", "--test_data", "t", "--results_dir",
              str(tmp_path), "--out_dir", str(tmp_path / "runs"), "--seeds", "1"]
    results.main(common + ["--methods", "lora-r8,lora-r4,lora"])
    assert ran == [("lora-r8", 4e-3), ("lora-r4", 1e-2), ("lora", 4e-3)]
    with pytest.raises(UserError, match=r"no finished sweep run of xs \(for xs-r16\)"):
        results.main(common + ["--methods", "xs-r16"])
