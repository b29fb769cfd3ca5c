"""fed_flower.py on real local Flower deployments (a SuperLink and 2-3 SuperNodes as processes on 127.0.0.1, started
and stopped by the test): Fed-SB and FedEx-LoRA over 2 rounds equal fed.py's in-process run with the same seed and
settings, the bytes of tensors Flower carried equal fed.py's accounting, a SuperNode killed during a round leaves
the round to the survivors, and a client that never connects gives one clear line."""
import json
import os
import pathlib
import shutil
import signal
import tempfile
import threading

import pytest
import torch

pytest.importorskip("flwr")
import fed  # noqa: E402
import fed_flower  # noqa: E402
from conftest import hf_tiny, write_bpe_tokenizer, write_gsm8k  # noqa: E402


def fed_args(tiny_dir, gsm_file, out, method, **kw):
    args = dict(method=method, rounds=2, local_steps=2, batch_size=4, rank=4, val_size=8,
                max_len=384, model=tiny_dir, data=gsm_file, device="cpu", out_dir=str(out), **kw)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def final_state(out, name):
    return torch.load(os.path.join(out, name, "fed_state.pt"), weights_only=False)


def in_process(argv, survivors=None):
    """fed.py's own run; survivors[r]: the clients that finished round r (the others dropped, as in fed.py)."""
    def clients(rnd, picked, fails, global_state, model, dp):
        setup = {k: v.cpu() for k, v in fed.STRATEGIES[model_method(argv)].method.adapter_state_dict(model).items()
                 if k not in global_state}
        residual = {k: v.cpu() for k, v in fed.fedex_residuals(model).items()}
        return [(k, fed.client_round(argv, k, rnd, global_state, setup, residual) if survivors is None or
                 k in survivors[rnd] else None) for k in picked]
    return fed.main(argv, clients=clients if survivors else None)


def model_method(argv):
    return argv[argv.index("--method") + 1]


def alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Live:
    """The live deployment of test_flower_runs_equal_fed_py (a SuperLink and 2 SuperNodes), run in the background
    from the moment the session's tests are collected (conftest.py: a test with a `background` attribute starts it
    then and runs last): a Flower run is mostly waiting (a SuperNode looks for messages every 3 s, each message
    starts a process), and the other tests' work fills that time. Two runs one after the other on it: FedEx-LoRA with
    DP-SGD, untouched; then Fed-SB, one of whose SuperNodes is stopped as soon as round 1 is sent. Their own tiny
    model and data (the session fixtures do not exist yet)."""
    root = dep = thread = None
    outs = {}

    @classmethod
    def start(cls):
        cls.root = tempfile.mkdtemp(prefix="nanopeft_flower_test_")
        cls.tiny = os.path.join(cls.root, "tiny")
        hf_tiny(vocab=256).save_pretrained(cls.tiny)
        write_bpe_tokenizer(cls.tiny, vocab=256)
        cls.gsm = write_gsm8k(os.path.join(cls.root, "train.jsonl"))
        cls.dep = fed_flower.Local(2, tempfile.mkdtemp(dir=cls.root))

        def kill(line):
            if "round 1: sent to clients" in line:
                for p in fed_flower.process_tree(cls.dep.nodes[1].pid):
                    try:
                        os.kill(p, signal.SIGTERM)
                    except ProcessLookupError:
                        pass

        def runs():
            try:
                cls.outs["fedex"] = cls.dep.run(cls.args("fedex", **PRIVATE), timeout=240)
                cls.outs["sb"] = cls.dep.run(cls.args("sb", **SB), timeout=240, on_line=kill)
            except Exception as e:  # reported by the test
                cls.outs["error"] = f"{type(e).__name__}: {e}"
        cls.thread = threading.Thread(target=runs)
        cls.thread.start()

    @classmethod
    def args(cls, method, **kw):
        return fed_args(cls.tiny, cls.gsm, cls.root, method, clients=2, run_name=method, **kw)

    @classmethod
    def join(cls):
        """Wait for both runs, stop every process; {run: its output}."""
        if cls.thread is None:
            cls.start()
        try:
            cls.thread.join()
        finally:
            cls.stop()
        return cls.outs

    @classmethod
    def stop(cls):
        if cls.dep is not None:
            cls.dep.close()


PRIVATE = dict(dp_epsilon=8, dp_seed=0)  # DP-SGD on the clients; the seed makes its noise repeatable
SB = dict(init_samples=8)


def test_flower_runs_equal_fed_py():
    """A deployment of a SuperLink and 2 SuperNodes (see Live), 2 rounds each: FedEx-LoRA with DP-SGD, untouched;
    Fed-SB, one of whose SuperNodes is stopped as soon as round 1 is sent, so that round and the next go on with
    the survivor. Each final adapter equals fed.py's in-process run with the same seed and settings (the dropped
    client dropped there too), and the bytes of tensors Flower carried are fed.py's accounting of them."""
    outs = Live.join()
    assert "error" not in outs, outs
    leftover = [p for proc in Live.dep.procs for p in fed_flower.process_tree(proc.pid) if alive(p)]
    assert not leftover, f"processes left running: {leftover}"
    tiny_dir, gsm_file, tmp_path = Live.tiny, Live.gsm, pathlib.Path(Live.root)
    private = PRIVATE

    # FedEx-LoRA, every client in every round
    summary = json.load(open(tmp_path / "fedex" / "summary.json"))
    assert "flower" in summary, outs["fedex"][-3000:]
    ref = in_process(fed_args(tiny_dir, gsm_file, tmp_path, "fedex", clients=2, run_name="fedex_ref", **private))
    assert 0 < summary["dp"]["epsilon"] <= 8 and summary["dp"] == ref["dp"]  # the server's accountant, as fed.py's
    a, b = final_state(tmp_path, "fedex"), final_state(tmp_path, "fedex_ref")
    assert a["adapter"].keys() == b["adapter"].keys() and a["residual"].keys() == b["residual"].keys()
    assert all(torch.allclose(a["adapter"][k], b["adapter"][k], atol=1e-5) for k in a["adapter"])
    assert all(torch.allclose(a["residual"][k], b["residual"][k], atol=1e-5) for k in a["residual"])
    assert any(v.abs().max() > 0 for v in a["residual"].values())  # the residual was formed and carried
    flw = summary["flower"]["tensor_bytes"]  # what Flower carried is what fed.py accounts for, both ways
    assert (flw["down"], flw["up"]) == (summary["total"]["down_bytes"], summary["total"]["up_bytes"]) == (
        ref["total"]["down_bytes"], ref["total"]["up_bytes"])
    records = summary["flower"]["record_bytes"]
    assert records["down"] > flw["down"] and records["up"] > flw["up"]  # Flower's count adds headers and names
    assert summary["flower"]["flowertune_budget_share"] == pytest.approx(
        (records["down"] + records["up"]) / 1e6 / 200_000)
    assert "communication budget (FlowerTune LLM: 200,000 MB" in outs["fedex"]
    assert [r["survivors"] for r in summary["flower"]["rounds"]] == [[0, 1], [0, 1]]

    # Fed-SB, one client's node stopped during round 1 (which client a node serves is the server's choice)
    summary = json.load(open(tmp_path / "sb" / "summary.json"))
    assert "flower" in summary, outs["sb"][-3000:]
    survivors = [r["survivors"] for r in summary["flower"]["rounds"]]
    assert len(survivors[1]) == 1 and set(survivors[1]) <= set(survivors[0]), outs["sb"][-3000:]
    assert [r["survivors"] for r in summary["log"][1:]] == [len(s) for s in survivors]
    ref = in_process(fed_args(tiny_dir, gsm_file, tmp_path, "sb", clients=2, run_name="sb_ref", **SB), survivors)
    a, b = final_state(tmp_path, "sb")["adapter"], final_state(tmp_path, "sb_ref")["adapter"]
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    flw, comm = summary["flower"]["tensor_bytes"], summary["per_client_per_round"]
    assert flw["up"] == summary["total"]["up_bytes"]  # survivors only, both ways of counting
    # round 2 sent nothing to the stopped node, which fed.py counts as sent to a client that then dropped out
    assert flw["down"] == summary["total"]["down_bytes"] - comm["down_bytes"]
    shutil.rmtree(Live.root, ignore_errors=True)


test_flower_runs_equal_fed_py.background = Live  # conftest.py: started at collection, run last


def test_a_client_that_never_connects_gets_one_line(tiny_dir, gsm_file, tmp_path, capsys):
    """The ServerApp waits node-wait-s for --clients SuperNodes, then stops with one line naming the fix (no
    traceback, no summary): here a Grid on which only one of two SuperNodes ever connects."""
    from types import SimpleNamespace
    grid = SimpleNamespace(get_node_ids=lambda: [7])
    argv = fed_args(tiny_dir, gsm_file, tmp_path, "sb", clients=2, run_name="missing")
    context = SimpleNamespace(run_config={"args": " ".join(argv), "node-wait-s": 0.5, "round-timeout-s": 10.0})
    fed_flower.server(grid, context)
    out = capsys.readouterr().out
    assert out.strip() == ("error: --clients 2, but 1 SuperNodes connected within 0.5 s: start one SuperNode per "
                           "client, pointed at this SuperLink, or raise node-wait-s")
    assert not os.path.exists(tmp_path / "missing")
