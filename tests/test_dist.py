"""torchrun on the CPU (gloo, 2 processes): data-parallel training and the federated simulator compute what one
process computes, up to the order of float sums; a run resumes under another number of processes.

The file's 2-process runs are made by one torchrun launch (the `launched` fixture): torchrun, its two processes and
their imports (torch, and torch._dynamo on a first run) take about 8 s of a 2-core machine, more than all the tiny
runs together, so each process makes the runs one after another, each in a process group of its own, and the tests
compare the files they left with what one process computes."""
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

SB = ["--method", "sb", "--rank", "4", "--init_samples", "8", "--micro_batch_size", "1"]
DY = ["--method", "dylora", "--rank", "4", "--lr", "1e-2"]
FULL = ["--method", "full", "--lr", "1e-3", "--micro_batch_size", "1"]
FED = ["sb", "fedex"]


def has_fsdp2():
    import torch.distributed.fsdp as fsdp
    return hasattr(fsdp, "fully_shard")


def args(out, tiny_dir, gsm_file, name, *extra):
    return ["--model", tiny_dir, "--data", gsm_file, "--val_size", "8", "--batch_size", "4", "--max_len", "384",
            "--out_dir", str(out), "--run_name", name, "--log_every", "1", "--eval_every", "3", "--device", "cpu",
            "--max_steps", "4", "--save_every", "2", *extra]


def fed_args(out, tiny_dir, gsm_file, method, name):
    """3 clients over 2 processes (2 + 1), one dropping out in each round."""
    return ["--model", tiny_dir, "--data", gsm_file, "--val_size", "8", "--max_len", "384", "--batch_size", "4",
            "--device", "cpu", "--rank", "4", "--method", method, "--clients", "3", "--rounds", "2", "--local_steps",
            "2", "--lr", "1e-2", "--drop_prob", "0.3", "--out_dir", str(out), "--run_name", name] + (
            ["--init_samples", "8"] if method == "sb" else [])


# What each torchrun process runs (a file: torchrun's report of a failure would quote a `-c` program whole): the
# main(argv) of train.py or fed.py for each [script, argv, crash] of the JSON file sys.argv[1], in order, each
# followed by a line on stderr saying that the run ended. crash = [method, step]: every rank raises KeyboardInterrupt
# at the start of `step` (the method's on_step), as a Ctrl-C would; the process then leaves that run's process group
# and goes on. torch names the default process group by a counter that destroy_process_group resets to 0, so a
# second group in the same torchrun job would meet the first one's keys in torchrun's store (a stale address:
# connection refused): each run's counter starts apart.
DRIVER = """
import gc, json, os, runpy, sys
import torch.distributed as dist
import fed, runs
mains = dict(train=runpy.run_path(os.path.join(sys.argv[2], 'train.py'), run_name='nanopeft_train')['main'],
             fed=fed.main)
for i, (script, argv, crash) in enumerate(json.load(open(sys.argv[1]))):
    dist.distributed_c10d._world.group_count = 1000 * (i + 1)
    how = ''
    if crash is None:
        mains[script](argv)
    else:
        m = runs.METHODS[crash[0]]
        real = m.on_step
        def on_step(model, cfg, step, real=real):
            if step == crash[1]:
                raise KeyboardInterrupt
            return real(model, cfg, step)
        m.on_step = on_step
        try:
            mains[script](argv)
        except KeyboardInterrupt:
            how = f' by KeyboardInterrupt at step {crash[1]}'
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()
        finally:
            m.on_step = real
    run = argv[argv.index('--run_name') + 1]  # one write: the other rank's lines go to the same pipe
    os.write(2, f"rank {os.environ['RANK']}: {run} ended{how}\\n".encode())
"""


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_dir, gsm_file):
    """(out_dir, torchrun's result) after the file's 2-process runs: LoRA-SB under DDP ("sb_two"); DyLoRA under
    DDP killed at step 3 ("dy_killed"); Fed-SB and FedEx-LoRA ("fed_sb_two", "fed_fedex_two"); and last, a full
    fine-tuning run that one process started here and was killed at step 3 ("full_killed"), resumed under FSDP2."""
    out = tmp_path_factory.mktemp("dist")
    jobs = [["train", args(out, tiny_dir, gsm_file, "sb_two", *SB), None],
            ["train", args(out, tiny_dir, gsm_file, "dy_killed", *DY), ["dylora", 3]]]
    jobs += [["fed", fed_args(out, tiny_dir, gsm_file, m, f"fed_{m}_two"), None] for m in FED]
    if has_fsdp2():
        def crash(model, cfg, step):
            if step == 3:
                raise KeyboardInterrupt
        with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
            mp.setattr(runs.METHODS["full"], "on_step", crash)
            train.main(args(out, tiny_dir, gsm_file, "full_killed", *FULL))
        jobs.append(["train", ["--resume", "--out_dir", str(out), "--run_name", "full_killed", "--fsdp", "--export",
                               "merged"], None])
    json.dump(jobs, open(out / "jobs.json", "w"))
    open(out / "driver.py", "w").write(DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                        str(out / "driver.py"), str(out / "jobs.json"), ROOT], capture_output=True, text=True,
                       timeout=300, env=env, cwd=ROOT)
    return out, r


def ended(launched, run, how=""):
    """The out_dir, once both processes have seen the launch's run `run` end (`how`: as it was made to)."""
    out, r = launched
    assert all(f"rank {i}: {run} ended{how}\n" in r.stderr for i in (0, 1)), r.stdout[-3000:] + r.stderr[-5000:]
    return out


def log(out, name, keys=("step", "loss", "val_loss", "grad_norm", "lr")):
    return [{k: v for k, v in json.loads(l).items() if k in keys} for l in open(out / name / "log.jsonl")]


def assert_close_logs(a, b, tol=3e-5):  # logged values are rounded to 5 decimals
    assert [l.keys() for l in a] == [l.keys() for l in b]
    for x, y in zip(a, b):
        assert all(abs(x[k] - y[k]) <= tol * max(1, abs(x[k])) for k in x), (x, y)


def assert_close(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


def adapter(out, name):
    return load_file(out / name / "adapter.safetensors")


def test_ddp_lora_sb_equals_one_process(launched, tiny_dir, gsm_file):
    """The same global batch of 4 split 2 + 2, micro-batches of 1 (gradient accumulation, no_sync), LoRA-SB's
    init from 8 examples split 4 + 4 and summed over the ranks."""
    out = ended(launched, "sb_two")
    train.main(args(out, tiny_dir, gsm_file, "sb_one", *SB))
    assert not torch.distributed.is_initialized()  # one process never touches torch.distributed
    assert_close_logs(log(out, "sb_one"), log(out, "sb_two"))
    assert_close(adapter(out, "sb_one"), adapter(out, "sb_two"))
    init = next(l for l in map(json.loads, open(out / "sb_two" / "log.jsonl")) if "init_s" in l)
    assert init["processes"] == 2 and init["init_rank_diff"] == 0.0  # B, A, R0 identical on both ranks


def test_resume_with_another_number_of_processes(launched, tiny_dir, gsm_file):
    """DyLoRA (its rank per step is a function of the seed and step, the same on every rank): 2 processes killed
    after the step-2 checkpoint, resumed by 1 process, end where 1 uninterrupted process does."""
    out = ended(launched, "dy_killed", " by KeyboardInterrupt at step 3")
    train.main(args(out, tiny_dir, gsm_file, "dy_straight", *DY))
    assert torch.load(out / "dy_killed" / "ckpt.pt", weights_only=True)["step"] == 2
    train.main(["--resume", "--out_dir", str(out), "--run_name", "dy_killed"])
    assert_close(adapter(out, "dy_straight"), adapter(out, "dy_killed"))
    assert_close_logs(log(out, "dy_straight"), log(out, "dy_killed"))


def test_fsdp_resumes_a_one_process_run(launched, tiny_dir, gsm_file):
    """Full fine-tuning: 1 process killed after the step-2 checkpoint; 2 FSDP2 processes load it (whole tensors ->
    shards, optimizer moments included), finish, save whole tensors and export from rank 0."""
    if not has_fsdp2():
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    out = ended(launched, "full_killed")
    train.main(args(out, tiny_dir, gsm_file, "full_straight", *FULL))
    a, b = adapter(out, "full_straight"), adapter(out, "full_killed")
    assert_close(a, b)
    assert_close_logs(log(out, "full_straight"), log(out, "full_killed"))
    oa, ob = (torch.load(out / n / "ckpt.pt", weights_only=True)["optimizer"] for n in ("full_straight", "full_killed"))
    assert oa["param_groups"][0]["params"] == ob["param_groups"][0]["params"]
    for i in oa["state"]:
        assert_close(oa["state"][i], ob["state"][i])
    merged = load_file(out / "full_killed" / "merged" / "model.safetensors")
    assert_close({k: b[k] for k in merged}, merged)


@pytest.mark.parametrize("method", FED)
def test_fed_clients_on_two_processes(launched, tiny_dir, gsm_file, method):
    """3 clients over 2 processes (2 + 1), one dropping out in each round; Fed-SB's init split over the ranks,
    FedEx-LoRA's residuals accumulated on every rank: the same global state as one process. The one process runs
    with one thread, as torchrun's processes do (OMP_NUM_THREADS=1), so a client's float sums add in the same order
    in both: with conftest's threads they did not, and a 2-core machine saw FedEx tensors 1.6e-4 apart after a few
    Adam steps at lr 1e-2 (with one thread each they are bit-identical here)."""
    out = ended(launched, f"fed_{method}_two")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = fed.main(fed_args(out, tiny_dir, gsm_file, method, f"fed_{method}_one"))
    finally:
        torch.set_num_threads(threads)
    two = json.load(open(out / f"fed_{method}_two" / "summary.json"))
    assert [l["survivors"] for l in one["log"][1:]] == [l["survivors"] for l in two["log"][1:]] != [3, 3]
    assert all(abs(x["val_loss"] - y["val_loss"]) < 1e-5 for x, y in zip(one["log"], two["log"]))
    a, b = (torch.load(out / f"fed_{method}_{n}" / "fed_state.pt", weights_only=True) for n in ("one", "two"))
    assert_close(a["adapter"], b["adapter"])
    assert_close(a["residual"], b["residual"])  # FedEx-LoRA's residuals (none for Fed-SB)


def test_batch_must_split_evenly(tmp_path, tiny_dir, gsm_file, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(UserError, match=r"^--batch_size=4 must be divisible by the number of processes \(3\)$"):
        train.main(args(tmp_path, tiny_dir, gsm_file, "odd", "--method", "lora"))


def test_the_processes_exit_cleanly(launched):
    r = launched[1]
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
