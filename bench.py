"""
Training speed, memory and MFU of every method at real model shapes, and (--hf) of Hugging Face transformers +
PEFT on the same GPU in the same run.

    python bench.py                                    # every shape x method on the GPU, one table
    python bench.py --shapes llama-3.2-1b --methods lora,sb --hf
    python bench.py --gsm8k --model PATH --data train.jsonl --methods sb   # train.py's real GSM8K epoch, timed
    python bench.py --smoke                            # tiny shape, 2 steps, CPU (CI keeps this path working)

Synthetic mode: random-init weights at the shape's real dimensions (nothing downloaded), batches of random
tokens (batch x seq, every token a target), the step exactly as train.py runs it (make_step: bf16 autocast,
chunked cross-entropy, clipping, fused AdamW; --compile and --cuda_graph as in train.py). A row reports real
tokens per second over the timed steps, the step time, the peak of torch.cuda.max_memory_allocated (weights
included), the init time of methods that initialise from gradients (sb, ga: init_samples examples of seq tokens)
and MFU = tok/s x FLOPs/token / peak, with FLOPs/token = 6N for full fine-tuning and 4N for a frozen base
(forward 2N + input gradients 2N; adapter FLOPs not counted), N = weights of every matmul (lm_head included),
plus attention 12 L H d_head T (PaLM's convention, no causal discount); peak = 989 TFLOP/s (H100 SXM bf16 dense).
"""
import json
import sys
import time

import torch

import train
from model import Llama, ModelConfig, UserError

SHAPES = {  # the published configs (hidden sizes, heads, vocabularies, RoPE); weights are random
    "smollm2-135m": ModelConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                                hidden_dim=1536, rope_theta=100000.0, tie_embeddings=True, max_seq_len=8192),
    "tinyllama-1.1b": ModelConfig(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, head_dim=64,
                                  hidden_dim=5632, max_seq_len=2048),
    "llama-3.2-1b": ModelConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
                                hidden_dim=8192, rope_theta=500000.0, tie_embeddings=True, max_seq_len=131072,
                                rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                                  high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "llama-2-7b": ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128,
                              hidden_dim=11008),
    "tiny": ModelConfig(vocab_size=256, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=256),
}
PEAK_FLOPS = 989e12  # H100 SXM, dense bf16


def flops_per_token(cfg, seq, full):
    """6N (full) or 4N (frozen base) + 12 L H d_head T of attention."""
    per_layer = cfg.dim * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * cfg.dim * cfg.hidden_dim
    n = cfg.n_layers * per_layer + cfg.vocab_size * cfg.dim
    return (6 if full else 4) * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq


def build(cfg, device, dtype):
    with torch.device("meta"):
        model = Llama(cfg)
    model.to_empty(device=device)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.init_weights().to(dtype).requires_grad_(False)


def random_batches(n, batch, seq, vocab, device, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, vocab, (batch, seq + 1), generator=g)
        out.append((x[:, :-1].contiguous(), x[:, 1:].contiguous(), None))  # pos None: plain causal rows
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_ours(shape, name, args, device, dtype):
    """One row for our loop: build, init (timed), warm up, time `steps` optimizer steps."""
    cfg = SHAPES[shape]
    method = train.METHODS[name]
    tcfg = train.TrainConfig(method=name, lr=method.DEFAULT_LR)
    mcfg = method.Config()
    graphed = args["cuda_graph"] and device.type == "cuda" and getattr(method, "CUDA_GRAPH", True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build(cfg, device, dtype)
    model.grad_checkpoint = args["grad_checkpoint"]
    t0 = time.time()
    grads = None
    if getattr(mcfg, "init_samples", 0) > 0:
        if hasattr(mcfg, "lr_1"):  # LoRA-SB: as train.py sets it (the first step of warm-up)
            mcfg.lr_1 = train.get_lr(0, tcfg, args["warmup"] + args["steps"])
        n = -(-mcfg.init_samples // args["batch"])
        init = random_batches(n, args["batch"], args["seq"], cfg.vocab_size, device, seed=1)
        grads = train.init_grads(model, [(x, y, torch.arange(args["seq"]).expand_as(x)) for x, y, _ in init],
                                 mcfg.targets)
    method.apply(model, mcfg, grads)
    del grads
    sync(device)
    init_s = time.time() - t0 if getattr(mcfg, "init_samples", 0) > 0 else None
    if args["compile"]:
        torch._dynamo.reset()  # every row compiles afresh: past rows' graphs would count against the recompile limit
        model.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = train.make_optimizer(params, tcfg, device, graphed)
    step = train.make_step(model, opt, params, tcfg.grad_clip, graphed)
    model.train()
    data = random_batches(args["warmup"] + args["steps"], args["batch"], args["seq"], cfg.vocab_size, device, 0)
    n_tgt = args["batch"] * args["seq"]
    for i, b in enumerate(data):
        if i == args["warmup"]:
            sync(device)
            t0 = time.time()
        method.on_step(model, i)
        loss, _ = step([b], n_tgt)
    loss = loss.item()  # waits for the last step
    dt = (time.time() - t0) / args["steps"]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    tok_s = n_tgt / dt
    mfu = tok_s * flops_per_token(cfg, args["seq"], name == "full") / PEAK_FLOPS
    return dict(shape=shape, method=name, trainable=sum(p.numel() for p in params), tok_s=tok_s, step_ms=dt * 1e3,
                peak_gib=peak, mfu=mfu, init_s=init_s, loss=loss)


def bench_hf(shape, name, args, device):
    """Hugging Face transformers (+ PEFT): the same shape and batch, bf16 weights, SDPA, fused AdamW, no compile."""
    import transformers
    cfg = SHAPES[shape]
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        intermediate_size=cfg.hidden_dim, tie_word_embeddings=cfg.tie_embeddings, attn_implementation="sdpa",
        max_position_embeddings=cfg.max_seq_len)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with torch.device(device):
        model = transformers.LlamaForCausalLM(hf_cfg).to(torch.bfloat16)
    if name == "hf-full":
        model.float()  # fp32 masters, as ours
    else:
        import peft
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        pcfg = (peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets) if name == "hf-lora" else
                peft.MissConfig(r=64, target_modules=targets))
        model = peft.get_peft_model(model, pcfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=cuda)
    data = random_batches(args["warmup"] + args["steps"], args["batch"], args["seq"], cfg.vocab_size, device, 0)
    for i, (x, _, _) in enumerate(data):
        if i == args["warmup"]:
            sync(device)
            t0 = time.time()
        x = x.to(device)
        with train.autocast(device):
            loss = model(input_ids=x, labels=x).loss  # HF shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    loss = loss.item()
    dt = (time.time() - t0) / args["steps"]
    tok_s = args["batch"] * args["seq"] / dt
    mfu = tok_s * flops_per_token(cfg, args["seq"], name == "hf-full") / PEAK_FLOPS
    return dict(shape=shape, method=name, trainable=sum(p.numel() for p in params), tok_s=tok_s, step_ms=dt * 1e3,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"), mfu=mfu, init_s=None,
                loss=loss)


def bench_gsm8k(name, args):
    """train.py's real run (one GSM8K epoch by default) with the given flags; training time excludes init."""
    argv = ["--method", name, "--model", args["model"], "--data", args["data"], "--test_data=",
            "--out_dir", "/tmp/nanopeft_bench", "--run_name", name, "--eval_every", "100000",
            "--save_every", "100000", "--log_every", "50"] + args["train_args"]
    if args["compile"]:
        argv.append("--compile")
    if args["cuda_graph"]:
        argv.append("--cuda_graph")
    out = train.main(argv)
    return dict(shape="gsm8k-epoch", method=name, trainable=out["trainable_params"], tok_s=out["tok_s"],
                step_ms=out["train_s"] / out["steps"] * 1e3, peak_gib=out["peak_gib"], mfu=None,
                init_s=out["init_s"], loss=out["val_loss"], train_s=out["train_s"])


def fmt(v, spec):
    return "-" if v is None or v != v else format(v, spec)


def main(argv=None):
    args = dict(shapes="smollm2-135m,tinyllama-1.1b,llama-3.2-1b,llama-2-7b",
                methods="full,lora,xs,sb,ga,bone,dylora", batch=8, seq=1024, steps=20, warmup=5, compile=False,
                cuda_graph=False, grad_checkpoint=False, hf=False, gsm8k=False, smoke=False, model="", data="",
                device="auto", json="")
    argv = sys.argv[1:] if argv is None else argv
    rest, i = [], 0
    while i < len(argv):  # --key=value or --key value; anything else goes on to train.py in --gsm8k mode
        k, eq, v = argv[i][2:].partition("=")
        if not argv[i].startswith("--") or k not in args:
            rest.append(argv[i])
        elif isinstance(args[k], bool):
            args[k] = v.lower() not in ("false", "0", "no") if eq else True
        else:
            if not eq:
                i += 1
                v = argv[i] if i < len(argv) else ""
            args[k] = type(args[k])(v)
        i += 1
    args["train_args"] = rest
    if rest and not args["gsm8k"]:
        raise UserError(f"unknown argument {rest[0]}: use --key=value with keys {', '.join(args)}")
    if args["smoke"]:
        args.update(shapes="tiny", batch=2, seq=32, steps=2, warmup=1, device="cpu")
    device = torch.device("cuda" if args["device"] == "auto" and torch.cuda.is_available() else
                          "cpu" if args["device"] == "auto" else args["device"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    methods = args["methods"].split(",")
    for m in methods:
        if m not in train.METHODS:
            raise UserError(f"unknown method {m!r}: choose from {', '.join(train.METHODS)}")
    rows = []
    jobs = [("gsm8k", m) for m in methods] if args["gsm8k"] else [(s, m) for s in args["shapes"].split(",")
                                                                   for m in methods + (["hf-lora", "hf-miss", "hf-full"]
                                                                                       if args["hf"] else [])]
    for shape, m in jobs:
        if shape != "gsm8k" and shape not in SHAPES:
            raise UserError(f"unknown shape {shape!r}: choose from {', '.join(SHAPES)}")
        try:
            row = (bench_gsm8k(m, args) if shape == "gsm8k" else bench_hf(shape, m, args, device)
                   if m.startswith("hf-") else bench_ours(shape, m, args, device, dtype))
        except torch.cuda.OutOfMemoryError:
            row = dict(shape=shape, method=m, note="out of memory")
        rows.append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache() if device.type == "cuda" else None
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\n{gpu}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, batch {args['batch']} x {args['seq']}"
          f"{', compile' if args['compile'] else ''}{', CUDA graph' if args['cuda_graph'] else ''}"
          f"{', activation checkpointing' if args['grad_checkpoint'] else ''}\n")
    print("| shape | method | trainable | tok/s | step ms | peak GiB | MFU % | init s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "note" in r:
            print(f"| {r['shape']} | {r['method']} | {r['note']} | | | | | |")
            continue
        print(f"| {r['shape']} | {r['method']} | {r['trainable']:,} | {r['tok_s']:,.0f} | {r['step_ms']:.1f} | "
              f"{fmt(r['peak_gib'], '.2f')} | {fmt(r['mfu'] and 100 * r['mfu'], '.1f')} | {fmt(r['init_s'], '.2f')} |")
    if args["json"]:
        with open(args["json"], "w") as f:
            json.dump(dict(args={k: v for k, v in args.items()}, gpu=gpu, torch=torch.__version__, rows=rows), f)
    return rows


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
