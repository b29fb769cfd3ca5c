"""Where train.py's time goes on a GPU: per optimizer step, the GPU time of the step (CUDA events around each call)
against the wall time between calls, the number of batch shapes (CUDA graphs), and the time of batch building and
evaluations. Runs train.py's main() with those calls wrapped; the arguments after OUT.json are train.py's:

    python tools/profile_epoch.py OUT.json --method sb --model PATH --data train.jsonl [--compile] ...
"""
import json, os, sys, time, runpy
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch, step, data
rec = []
real_make = step.make_step
def make_step(*a, **k):
    f = real_make(*a, **k)
    def timed(batches, n_tgt):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t = time.perf_counter(); e0.record()
        out = f(batches, n_tgt)
        e1.record()
        rec.append(dict(t=t, call=time.perf_counter() - t, ev=(e0, e1), shape=[list(x.shape) for x, _, _ in batches]))
        return out
    return timed
step.make_step = make_step
tm = {}
for mod, name in ((data, "micro_batches"), (step, "evaluate")):
    real = getattr(mod, name); tm[name] = [0, 0.0]
    def wrap(*a, _real=real, _n=name, **k):
        t = time.perf_counter(); out = _real(*a, **k); tm[_n][0] += 1; tm[_n][1] += time.perf_counter() - t; return out
    setattr(mod, name, wrap)
g = runpy.run_path(os.path.join(sys.path[0], "train.py"), run_name="prof")  # the script, run, not imported
out = g["main"](sys.argv[2:])
torch.cuda.synchronize()
gpu = [r["ev"][0].elapsed_time(r["ev"][1]) / 1e3 for r in rec]
wall = [b["t"] - a["t"] for a, b in zip(rec, rec[1:])]
shapes = {}
for r in rec: shapes.setdefault(json.dumps(r["shape"]), 0); shapes[json.dumps(r["shape"])] += 1
res = dict(steps=len(rec), train_s=out["train_s"], tok_s=out["tok_s"], gpu_step_s=sum(gpu), wall_between_steps_s=sum(wall),
           step_call_s=sum(r["call"] for r in rec), first_calls_s=[round(r["call"], 3) for r in rec[:3]],
           shapes=len(shapes), shape_counts=sorted(shapes.values(), reverse=True)[:8], timers=tm,
           median_gpu_ms=sorted(gpu)[len(gpu)//2] * 1e3, median_wall_ms=sorted(wall)[len(wall)//2] * 1e3,
           slow_calls=sorted((round(r["call"], 3) for r in rec), reverse=True)[:12],
           gsm8k=out["gsm8k"] and {k: out["gsm8k"].get(k) for k in ("accuracy", "wall_s", "tok_s", "n")})
print(json.dumps(res, indent=1))
json.dump(res, open(sys.argv[1], "w"), indent=1)
