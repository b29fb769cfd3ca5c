"""Which lever buys throughput for many small runs on one GPU (claim 5's ~150 fed runs, each client step a batch of
16 on SmolLM2-135M)? train.py's LoRA r16 training throughput (examples/s, from each run's summary: steps x batch /
train_s, start-up and evaluations excluded) in four settings:

    one        one run at batch 16 (a fed client's step)
    batched    one run at batch 16 x N (N clients' steps as one: the ceiling of batching clients in one process)
    processes  N runs at batch 16 at once, each its own process (results.py --jobs N; the GPU time-slices them)
    mps        the same under CUDA MPS (kernels of several processes run together), where nvidia-cuda-mps-control
               exists

For the runs at once, `sum` adds each run's own rate (they overlap but for their start-ups) and `wall` divides
all their examples by the wall time from the first start to the last end, start-ups included (a lower bound).

    python tools/concurrency.py OUT.json MODEL_DIR GSM8K_TRAIN.jsonl [N] [STEPS] [DEVICE]
"""
import json, os, shutil, subprocess, sys, tempfile, time
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
out_path, model_dir, train = sys.argv[1:4]
n, steps, device = int((sys.argv[4:] + ["4"])[0]), int((sys.argv[5:] + ["300"])[0]), (sys.argv[6:] + ["cuda"])[0]
work = tempfile.mkdtemp()


def launch(name, batch, env=None):
    """One train.py run, its output to a file (a pipe read only at the end could fill and stall it)."""
    return subprocess.Popen([sys.executable, os.path.join(root, "train.py"), "--method", "lora", "--model", model_dir,
                             "--data", train, "--test_data", "", "--batch_size", str(batch), "--max_steps", str(steps),
                             "--eval_every", str(10 ** 6), "--save_every", str(10 ** 6), "--val_size", "16",
                             "--device", device, "--out_dir", work, "--run_name", name], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, name + ".log"), "w"))


def together(setting, batch, count, env=None):
    t0 = time.time()
    procs = [(f"{setting}{i}", launch(f"{setting}{i}", batch, env)) for i in range(count)]
    for name, p in procs:
        if p.wait():
            for _, q in procs:
                q.kill()
            last = (open(os.path.join(work, name + ".log")).read().strip().splitlines() or ["(no output)"])[-1]
            shutil.rmtree(work, ignore_errors=True)
            sys.exit(f"error: the {name} run failed: {last}")
    wall = time.time() - t0
    rates = [s["steps"] * batch / s["train_s"] for s in
             (json.load(open(os.path.join(work, name, "summary.json"))) for name, _ in procs)]
    row = dict(runs=count, batch=batch, steps=steps, sum_examples_s=round(sum(rates), 1),
               wall_examples_s=round(count * steps * batch / wall, 1), wall_s=round(wall, 1))
    print(setting, row, flush=True)
    return row


res = dict(model=model_dir, device=device, n=n, rows={})
res["rows"]["one"] = together("one", 16, 1)
res["rows"]["batched"] = together("batched", 16 * n, 1)
res["rows"]["processes"] = together("processes", 16, n)
mps = shutil.which("nvidia-cuda-mps-control")
res["mps_control"] = mps
if mps and device.startswith("cuda"):
    env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=os.path.join(work, "mps"), CUDA_MPS_LOG_DIRECTORY=os.path.join(
        work, "mps-log"))
    os.makedirs(env["CUDA_MPS_PIPE_DIRECTORY"]), os.makedirs(env["CUDA_MPS_LOG_DIRECTORY"])
    subprocess.run([mps, "-d"], env=env, check=True)  # (its own pipe directory: one already running elsewhere is
    # not this one, and the rows above ran without it unless the machine's default pipe had a daemon)
    try:
        res["rows"]["mps"] = together("mps", 16, n, env)
    finally:
        subprocess.run([mps], input="quit\n", env=env, text=True)
json.dump(res, open(out_path, "w"), indent=1)
shutil.rmtree(work, ignore_errors=True)
