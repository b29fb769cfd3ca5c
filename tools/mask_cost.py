"""GPU time of the CUDA-graph training step (LoRA r16) on real packed GSM8K batches of 16, eager and compiled: with
the per-example (document) mask train.py uses, and the same batches with plain causal attention over the whole row
(bench.py's synthetic rows); and the padding fraction of the packed rows.

    python tools/mask_cost.py OUT.json MODEL_DIR GSM8K_TRAIN.jsonl
"""
import os, sys, json
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch, data, step, runs, cli
from model import Llama, Tokenizer
cli.device("cuda")  # train.py's SDPA backend choice
path = sys.argv[2]
tok = Tokenizer.from_pretrained(path)
seqs, _ = data.tokenize(data.load_examples(sys.argv[3])[:2000], tok, data.TEMPLATE, 512)
res = {}
for compiled in (False, True):
    for causal in (False, True):
        torch._dynamo.reset()
        model = Llama.from_pretrained(path, device="cuda", dtype=torch.bfloat16)
        m = runs.METHODS["lora"]; m.apply(model, m.Config())
        if compiled: model.compile()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = step.make_optimizer(params, step.OptimConfig(lr=1e-4), torch.device("cuda"), True)
        f = step.make_step(model, opt, params, 1.0, True)
        model.train()
        real = slots = 0
        def batch(i):
            b, n, r = data.micro_batches(seqs, data.example_order(len(seqs), 0, i * 16, 16), 16, 512, tok.pad_id, True)
            if causal: b = [(x, y, None) for x, y, _ in b]
            return b, n, r
        for i in range(5): f(*batch(i)[:2])
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        bs = [batch(i) for i in range(5, 45)]
        e0.record()
        for b, n, r in bs:
            f(b, n); real += r; slots += sum(x.numel() for x, _, _ in b)
        e1.record(); torch.cuda.synchronize()
        res[f"{'compiled' if compiled else 'eager'}, {'causal over the row' if causal else 'document mask'}"] = dict(
            ms_per_step=round(e0.elapsed_time(e1) / 40, 2), pad_frac=round(1 - real / slots, 3))
        print(res, flush=True)
json.dump(res, open(sys.argv[1], "w"), indent=1)
