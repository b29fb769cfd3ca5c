"""DP-SGD throughput of fed.py's private local training (per-example gradients, clipping, noise): examples per
second over 20 logical batches of 32 expected examples (the median of the last 12, once the CUDA graphs are
captured, and the mean over all 20), SmolLM2-135M-Instruct with LoRA r16 on real GSM8K examples. PATH: graph (fed.py as
it runs: on a GPU each micro-batch's book-keeping per-example gradients and clipping as a CUDA graph; the default),
book (the same, eager) or vmap (per_example_grads_vmap, the torch.func path it falls back to, eager); DEVICE:
cuda (the default) or cpu. MODEL_DIR may hold only config.json and the tokenizer: random weights of that shape.
Then 12 logical batches in ONE local_train call (as a client's round runs them), and with PROFILE=1 a torch.profiler
table of 4 more (GPU kernels and host ops by self time).

    python tools/dp_speed.py OUT.json MODEL_DIR GSM8K_TRAIN.jsonl [PATH] [DEVICE]
"""
import json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch, cli, data, fed, runs
from model import Llama, ModelConfig, Tokenizer
path, dev = (sys.argv[4:] + ["graph"])[0], (sys.argv[5:] + ["cuda"])[0]
cli.device(dev)
if path in ("book", "vmap"):  # eager, no CUDA graph
    fed.dp_micro = lambda model, params, x, y, C, rows: fed.clipped_sum(model, params, x, y, C)
if path == "vmap":
    fed.per_example_grads = fed.per_example_grads_vmap
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
tok = Tokenizer.from_pretrained(sys.argv[2])
seqs, _ = data.tokenize(data.load_examples(sys.argv[3])[:512], tok, data.TEMPLATE, 512)
dtype = torch.bfloat16 if dev == "cuda" else torch.float32
if os.path.exists(os.path.join(sys.argv[2], "model.safetensors")):
    model = Llama.from_pretrained(sys.argv[2], device=dev, dtype=dtype)
else:  # a folder with only config.json and the tokenizer: random weights of that shape (speed does not need more)
    cfg_hf = json.load(open(os.path.join(sys.argv[2], "config.json")))
    model = Llama(ModelConfig.from_hf(cfg_hf)).init_weights(seed=0).to(dev, dtype).requires_grad_(False)
runs.METHODS["lora"].apply(model, runs.METHODS["lora"].Config())
cfg = fed.FedConfig(batch_size=32, micro_batch_size=16, lr=2e-4, max_len=512, dp_seed=0)
shard = list(range(512))
q = 32 / 512
times = []  # one logical batch per call (each call a fresh AdamW, as each client's round has)
for i in range(max(1, int(os.environ.get("BATCHES", "20")))):
    sync()
    t = time.time()
    fed.local_train(model, cfg, seqs, shard, 1, i, tok.pad_id, dp=(1.0, q))
    sync()
    times.append(time.time() - t)
steady = sorted(times[-12:])[len(times[-12:]) // 2]  # the median of the last 12: the CUDA graphs are captured by then (most of them)
# a client's round runs many logical batches in one local_train call (one AdamW, one copy of the result back):
# 12 in one call, timed as a whole
ONE_CALL = max(1, int(os.environ.get("ONE_CALL", "12")))
sync()
t = time.time()
fed.local_train(model, cfg, seqs, shard, ONE_CALL, 100, tok.pad_id, dp=(1.0, q))
sync()
one_call = time.time() - t
res = dict(path=path, device=dev, logical_batch=32, micro=16, torch=torch.__version__,
           examples_per_s=round(32 / steady, 1), seconds_per_logical_batch=round(steady, 3),
           examples_per_s_all=round(len(times) * 32 / sum(times), 1), seconds_each=[round(x, 3) for x in times],
           examples_per_s_in_one_call=round(ONE_CALL * 32 / one_call, 1), batches_in_one_call=ONE_CALL,
           graphs=sum(1 for k, v in model.__dict__.get("_dp_graphs", {}).items() if k != "pool" and v is not None))
json.dump(res, open(sys.argv[1], "w"))
if os.environ.get("PROFILE"):  # where 4 logical batches in one call spend their time: GPU kernels, host ops
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    sync()
    t = time.time()
    with profile(activities=acts) as prof:
        fed.local_train(model, cfg, seqs, shard, 4, 200, tok.pad_id, dp=(1.0, q))
        sync()
    wall = time.time() - t
    kern = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by = {}
    for e in kern:
        v = by.setdefault(e.name[:80], [0, 0.0])
        v[0], v[1] = v[0] + 1, v[1] + e.time_range.elapsed_us() / 1e3
    host = sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)[:25]
    res["profile_4_batches"] = dict(
        wall_s=round(wall, 3), kernel_ms=round(sum(v[1] for v in by.values()), 1), kernels=sum(v[0] for v in by.values()),
        top_kernels=[dict(name=k, n=n, ms=round(ms, 2)) for k, (n, ms) in sorted(by.items(), key=lambda kv: -kv[1][1])[:20]],
        top_host_self_ms=[dict(name=a.key[:80], n=a.count, ms=round(a.self_cpu_time_total / 1e3, 2)) for a in host])
print(res)
json.dump(res, open(sys.argv[1], "w"))
