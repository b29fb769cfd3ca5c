"""DP-SGD throughput of fed.py's private local training (per-example gradients, clipping, noise): examples per
second over 20 logical batches of 32 expected examples (the median of the last 12, once the CUDA graphs are
captured, and the mean over all 20), SmolLM2-135M-Instruct with LoRA r16 on real GSM8K examples. PATH: graph (fed.py as
it runs: on a GPU each micro-batch's book-keeping per-example gradients and clipping as a CUDA graph; the default),
book (the same, eager) or vmap (per_example_grads_vmap, the torch.func path it falls back to, eager); DEVICE:
cuda (the default) or cpu. MODEL_DIR may hold only config.json and the tokenizer: random weights of that shape.

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
for i in range(20):
    sync()
    t = time.time()
    fed.local_train(model, cfg, seqs, shard, 1, i, tok.pad_id, dp=(1.0, q))
    sync()
    times.append(time.time() - t)
steady = sorted(times[-12:])[6]  # the median of the last 12: the CUDA graphs are captured by then (most of them)
res = dict(path=path, device=dev, logical_batch=32, micro=16, torch=torch.__version__,
           examples_per_s=round(32 / steady, 1), seconds_per_logical_batch=round(steady, 3),
           examples_per_s_all_20=round(20 * 32 / sum(times), 1), seconds_each=[round(x, 3) for x in times],
           graphs=sum(1 for k, v in model.__dict__.get("_dp_graphs", {}).items() if k != "pool" and v is not None))
print(res)
json.dump(res, open(sys.argv[1], "w"))
