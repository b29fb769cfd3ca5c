"""GSM8K scoring speed on a GPU: all test problems, greedy, 256 new tokens, eval.py's default batch (as many as fit),
for several values of model.SPAN_STEP (how far past the current slot a decode step reads the KV cache; 10**6 reads
all of it, as generate did before spans). With ADAPTER_RUN_DIR the fine-tuned model is scored as train.py scores it
(adapter unmerged, bf16 autocast). A warm-up of 64 problems first; each variant runs once; then one run under
torch.profiler, whose kernel table (the 15 costliest kernels) goes in the JSON. Environment: SPANS (comma-separated,
default 1000000,128,64,32), REPEAT (runs of each, default 1: their walls and median are recorded), PROFILE=0 (no
profiled run).

    python tools/scoring_speed.py OUT.json MODEL_DIR GSM8K_TEST.jsonl [ADAPTER_RUN_DIR]
"""
import json, os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch, cli, eval as ev, model as model_mod, runs
from model import Llama, Tokenizer
out_path, model_dir, test = sys.argv[1:4]
adapter = runs.load_adapter(sys.argv[4]) if len(sys.argv) > 4 else None
cli.device("cuda")  # as eval.py and train.py set it up (SDPA's cuDNN backend off)
tok = Tokenizer.from_pretrained(model_dir)
model = Llama.from_pretrained(model_dir, device="cuda", dtype=torch.bfloat16)
if adapter:
    method, cfg, sd, meta = adapter
    method.apply(model, cfg, init=False)
    method.load_adapter_state_dict(model, sd)
rows = ev.load_gsm8k(test)
ev.run_eval(model.eval(), tok, rows[:64], ev.TEMPLATE, ev.SUFFIX, 0, 256, desc="warm-up")
res = dict(model=model_dir, adapter=sys.argv[4] if adapter else None, gpu=torch.cuda.get_device_name(),
           torch=torch.__version__, variants={})
for span in [int(x) for x in os.environ.get("SPANS", "1000000,128,64,32").split(",")]:
    model_mod.SPAN_STEP = span
    walls = []
    for _ in range(max(1, int(os.environ.get("REPEAT", "1")))):
        _, s = ev.run_eval(model, tok, rows, ev.TEMPLATE, ev.SUFFIX, 0, 256, desc=f"span {span}")
        walls.append(round(s["wall_s"], 3))
    res["variants"][str(span)] = {k: s[k] for k in ("wall_s", "tok_s", "generated_tokens", "accuracy",
                                                    "invalid_rate", "batch_size")}
    res["variants"][str(span)].update(walls=walls, median_wall_s=sorted(walls)[len(walls) // 2])
    print(span, res["variants"][str(span)], flush=True)
if os.environ.get("PROFILE", "1") == "0":
    json.dump(res, open(out_path, "w"), indent=1)
    sys.exit()
model_mod.SPAN_STEP = 64  # then one run under torch.profiler: where the GPU's time goes (kernels, graphs included)
from torch.profiler import ProfilerActivity, profile
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    ev.run_eval(model, tok, rows, ev.TEMPLATE, ev.SUFFIX, 0, 256, desc="profiled")
kern = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
by = {}
for e in kern:
    by.setdefault(e.name[:90], [0, 0.0])
    by[e.name[:90]][0] += 1
    by[e.name[:90]][1] += e.time_range.elapsed_us() / 1e3
res["profile"] = dict(kernel_ms=round(sum(v[1] for v in by.values()), 1), kernels=sum(v[0] for v in by.values()),
                      top=[dict(name=k, n=n, ms=round(ms, 1)) for k, (n, ms) in
                           sorted(by.items(), key=lambda kv: -kv[1][1])[:15]])
print(json.dumps(res["profile"], indent=1))
json.dump(res, open(out_path, "w"), indent=1)
