"""torchrun on the CPU (gloo, 2 processes): data-parallel training and the federated simulator compute what one
process computes, up to the order of float sums; a run resumes under another number of processes."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import fed
import runs
from conftest import script, ROOT

ALONE = True  # conftest.py: run after the background work (two processes in lock step crawl beside other work)
from cli import UserError

train = script("train")  # train.py is a script: its main() is run, never imported

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")


def args(tmp_path, tiny_dir, gsm_file, name, *extra):
    return ["--model", tiny_dir, "--data", gsm_file, "--val_size", "8", "--batch_size", "4", "--max_len", "384",
            "--out_dir", str(tmp_path), "--run_name", name, "--log_every", "1", "--eval_every", "3", "--device", "cpu",
            "--max_steps", "4", "--save_every", "2", *extra]


def torchrun(*cmd, n=2, ok=True):
    """`torchrun --nproc_per_node n --standalone CMD` (a script and its arguments, or --no-python ...)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--standalone",
                        *cmd], capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert (r.returncode == 0) == ok, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def crash_at(step, method):
    """torchrun arguments that run train.py with every rank killed (KeyboardInterrupt) at the start of `step`."""
    code = (f"import runpy, runs; m = runs.METHODS[{method!r}]; f = m.on_step\n"
            f"def on_step(model, cfg, step):\n    if step == {step}: raise KeyboardInterrupt\n"
            f"    return f(model, cfg, step)\n"
            f"m.on_step = on_step; runpy.run_path({os.path.join(ROOT, 'train.py')!r}, run_name='__main__')")
    return ["--no-python", sys.executable, "-c", code]


def log(tmp_path, name, keys=("step", "loss", "val_loss", "grad_norm", "lr")):
    return [{k: v for k, v in json.loads(l).items() if k in keys} for l in open(tmp_path / name / "log.jsonl")]


def assert_close_logs(a, b, tol=3e-5):  # logged values are rounded to 5 decimals
    assert [l.keys() for l in a] == [l.keys() for l in b]
    for x, y in zip(a, b):
        assert all(abs(x[k] - y[k]) <= tol * max(1, abs(x[k])) for k in x), (x, y)


def assert_close(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


def adapter(tmp_path, name):
    return load_file(tmp_path / name / "adapter.safetensors")


def test_ddp_lora_sb_equals_one_process(tmp_path, tiny_dir, gsm_file):
    """The same global batch of 4 split 2 + 2, micro-batches of 1 (gradient accumulation, no_sync), LoRA-SB's
    init from 8 examples split 4 + 4 and summed over the ranks."""
    sb = ["--method", "sb", "--rank", "4", "--init_samples", "8", "--micro_batch_size", "1"]
    train.main(args(tmp_path, tiny_dir, gsm_file, "one", *sb))
    assert not torch.distributed.is_initialized()  # one process never touches torch.distributed
    torchrun(os.path.join(ROOT, "train.py"), *args(tmp_path, tiny_dir, gsm_file, "two", *sb))
    assert_close_logs(log(tmp_path, "one"), log(tmp_path, "two"))
    assert_close(adapter(tmp_path, "one"), adapter(tmp_path, "two"))
    init = next(l for l in map(json.loads, open(tmp_path / "two" / "log.jsonl")) if "init_s" in l)
    assert init["processes"] == 2 and init["init_rank_diff"] == 0.0  # B, A, R0 identical on both ranks


def test_resume_with_another_number_of_processes(tmp_path, tiny_dir, gsm_file):
    """DyLoRA (its rank per step is a function of the seed and step, the same on every rank): 2 processes killed
    after the step-2 checkpoint, resumed by 1 process, end where 1 uninterrupted process does."""
    dy = ["--method", "dylora", "--rank", "4", "--lr", "1e-2"]
    train.main(args(tmp_path, tiny_dir, gsm_file, "straight", *dy))
    r = torchrun(*crash_at(3, "dylora"), *args(tmp_path, tiny_dir, gsm_file, "killed", *dy), ok=False)
    assert "KeyboardInterrupt" in r.stderr
    assert torch.load(tmp_path / "killed" / "ckpt.pt", weights_only=True)["step"] == 2
    train.main(["--resume", "--out_dir", str(tmp_path), "--run_name", "killed"])
    assert_close(adapter(tmp_path, "straight"), adapter(tmp_path, "killed"))
    assert_close_logs(log(tmp_path, "straight"), log(tmp_path, "killed"))


def test_fsdp_resumes_a_one_process_run(tmp_path, tiny_dir, gsm_file, monkeypatch):
    """Full fine-tuning: 1 process killed after the step-2 checkpoint; 2 FSDP2 processes load it (whole tensors ->
    shards, optimizer moments included), finish, save whole tensors and export from rank 0."""
    import torch.distributed.fsdp as fsdp
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    full = ["--method", "full", "--lr", "1e-3", "--micro_batch_size", "1"]
    train.main(args(tmp_path, tiny_dir, gsm_file, "straight", *full))

    def crash(model, cfg, step):
        if step == 3:
            raise KeyboardInterrupt
    monkeypatch.setattr(runs.METHODS["full"], "on_step", crash)
    with pytest.raises(KeyboardInterrupt):
        train.main(args(tmp_path, tiny_dir, gsm_file, "killed", *full))
    monkeypatch.undo()
    torchrun(os.path.join(ROOT, "train.py"), "--resume", "--out_dir", str(tmp_path), "--run_name", "killed", "--fsdp",
             "--export", "merged")
    a, b = adapter(tmp_path, "straight"), adapter(tmp_path, "killed")
    assert_close(a, b)
    assert_close_logs(log(tmp_path, "straight"), log(tmp_path, "killed"))
    oa, ob = (torch.load(tmp_path / n / "ckpt.pt", weights_only=True)["optimizer"] for n in ("straight", "killed"))
    assert oa["param_groups"][0]["params"] == ob["param_groups"][0]["params"]
    for i in oa["state"]:
        assert_close(oa["state"][i], ob["state"][i])
    merged = load_file(tmp_path / "killed" / "merged" / "model.safetensors")
    assert_close({k: b[k] for k in merged}, merged)


@pytest.mark.parametrize("method", ["sb", "fedex"])
def test_fed_clients_on_two_processes(tmp_path, tiny_dir, gsm_file, method):
    """3 clients over 2 processes (2 + 1), one dropping out in each round; Fed-SB's init split over the ranks,
    FedEx-LoRA's residuals accumulated on every rank: the same global state as one process. The one process runs
    with one thread, as torchrun's processes do (OMP_NUM_THREADS=1), so a client's float sums add in the same order
    in both: with conftest's threads they did not, and a 2-core machine saw FedEx tensors 1.6e-4 apart after a few
    Adam steps at lr 1e-2 (with one thread each they are bit-identical here)."""
    fa = ["--model", tiny_dir, "--data", gsm_file, "--val_size", "8", "--max_len", "384", "--batch_size", "4",
          "--device", "cpu", "--rank", "4", "--method", method, "--clients", "3", "--rounds", "2", "--local_steps",
          "2", "--lr", "1e-2", "--drop_prob", "0.3", "--out_dir", str(tmp_path)] + (
          ["--init_samples", "8"] if method == "sb" else [])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = fed.main([*fa, "--run_name", "one"])
    finally:
        torch.set_num_threads(threads)
    torchrun(os.path.join(ROOT, "fed.py"), *fa, "--run_name", "two")
    two = json.load(open(tmp_path / "two" / "summary.json"))
    assert [l["survivors"] for l in one["log"][1:]] == [l["survivors"] for l in two["log"][1:]] != [3, 3]
    assert all(abs(x["val_loss"] - y["val_loss"]) < 1e-5 for x, y in zip(one["log"], two["log"]))
    a, b = (torch.load(tmp_path / n / "fed_state.pt", weights_only=True) for n in ("one", "two"))
    assert_close(a["adapter"], b["adapter"])
    assert_close(a["residual"], b["residual"])  # FedEx-LoRA's residuals (none for Fed-SB)


def test_batch_must_split_evenly(tmp_path, tiny_dir, gsm_file, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(UserError, match=r"^--batch_size=4 must be divisible by the number of processes \(3\)$"):
        train.main(args(tmp_path, tiny_dir, gsm_file, "odd", "--method", "lora"))
