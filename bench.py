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
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch

import cli
import nf4
import step
from cli import UserError
from model import Llama, ModelConfig, rope_inv_freq
from runs import METHODS

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
    "mistral-7b": ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                              hidden_dim=14336, max_seq_len=32768, sliding_window=4096),  # v0.1, the papers' model
    "tiny": ModelConfig(vocab_size=256, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=256),
}
PEAK_FLOPS = 989e12  # H100 SXM, dense bf16


@dataclass
class BenchConfig:
    shapes: str = "smollm2-135m,tinyllama-1.1b,llama-3.2-1b,llama-2-7b"  # model shapes (SHAPES), comma-separated
    methods: str = "full,lora,xs,sb,ga,bone,dylora"  # our methods to time, comma-separated
    batch: int = 8  # sequences per step
    seq: int = 1024  # tokens per sequence
    steps: int = 20  # timed optimizer steps per row
    warmup: int = 5  # untimed steps first (allocation, autotuning, graph capture)
    compile: bool = False  # torch.compile each transformer block (as train.py --compile)
    cuda_graph: bool = False  # capture each step as one CUDA graph (as train.py --cuda_graph)
    grad_checkpoint: bool = False  # recompute activations in backward
    base_bits: int = 16  # 4: the blocks' linear weights in NF4 (train.py --base_bits 4), built one tensor at a time
    rank: int = 0  # the adapters' rank; 0: each method's default
    init_stream: bool = False  # sb, ga: the layer-by-layer gradient init (train.py --init_stream)
    init_samples: int = 0  # sb, ga: sequences of the gradient init; 0: the method's default (LoRA-SB's paper: 50)
    hf: bool = False  # also time Hugging Face transformers + PEFT (hf-lora, hf-miss, hf-full) on each shape
    liger: bool = False  # with --hf: also HF + liger-kernel (hf-liger-lora, hf-liger-full; needs liger-kernel, CUDA)
    gsm8k: bool = False  # time train.py's real GSM8K run instead (needs --model, --data; other keys go to train.py)
    smoke: bool = False  # tiny shape, 2 steps, CPU: keeps this path working in CI
    model: str = ""  # --gsm8k: the model folder
    data: str = ""  # --gsm8k: GSM8K train.jsonl
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    json: str = ""  # also write the rows and settings to this JSON file


def flops_per_token(cfg, seq, full):
    """6N (full) or 4N (frozen base) + 12 L H d_head T of attention."""
    per_layer = cfg.dim * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * cfg.dim * cfg.hidden_dim
    n = cfg.n_layers * per_layer + cfg.vocab_size * cfg.dim
    return (6 if full else 4) * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq


def build(cfg, device, dtype, base_bits=16):
    """A random model at the shape, made one tensor at a time as from_pretrained loads one (N(0, 0.02), norms at 1),
    each block weight stored in NF4 as soon as it exists when base_bits=4: the whole model never exists in dtype."""
    with torch.device("meta"):
        model = Llama(cfg)
    g = torch.Generator(device=device).manual_seed(0)
    for name, p in list(model.named_parameters()):
        owner, _, attr = name.rpartition(".")
        t = torch.empty(p.shape, device=device, dtype=torch.float32)
        t.fill_(1.0) if "norm" in name else t.normal_(0, 0.02, generator=g)
        w = nf4.quantize_weight(t, dtype) if base_bits == 4 and nf4.is_quantized(name) else t.to(dtype)
        setattr(model.get_submodule(owner), attr, torch.nn.Parameter(w, requires_grad=False))
        del t
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg).to(device)
    return model


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
    method = METHODS[name]
    ocfg = step.OptimConfig(lr=method.DEFAULT_LR)  # train.py's optimizer settings
    mcfg = method.Config(**({"rank": args.rank} if args.rank and hasattr(method.Config, "rank") else {}))
    if hasattr(mcfg, "init_stream"):
        mcfg.init_stream = args.init_stream
        mcfg.init_samples = args.init_samples or mcfg.init_samples
    graphed = args.cuda_graph and device.type == "cuda" and method.CUDA_GRAPH
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build(cfg, device, dtype, args.base_bits)
    t0 = time.time()
    # the init as train.py makes it (step.init_method), from init_samples random sequences of seq tokens
    g = torch.Generator().manual_seed(1)
    seqs = [(torch.randint(0, cfg.vocab_size, (args.seq + 1,), generator=g).tolist(), 1)
            for _ in range(mcfg.init_samples if method.GRADIENT_INIT else 0)]
    icfg = SimpleNamespace(seed=0, batch_size=args.batch, micro_batch_size=args.batch, max_len=args.seq + 1)
    step.init_method(model, method, mcfg, seqs, icfg, 0, step.get_lr(0, ocfg, args.warmup + args.steps))
    model.grad_checkpoint = args.grad_checkpoint
    sync(device)
    init_s = time.time() - t0 if method.GRADIENT_INIT else None
    if args.compile:
        torch._dynamo.reset()  # every row compiles afresh: past rows' graphs would count against the recompile limit
        model.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = step.make_optimizer(params, ocfg, device, graphed)
    train_step = step.make_step(model, opt, params, ocfg.grad_clip, graphed)
    model.train()
    data = random_batches(args.warmup + args.steps, args.batch, args.seq, cfg.vocab_size, device, 0)
    n_tgt = args.batch * args.seq
    for i, b in enumerate(data):
        if i == args.warmup:
            sync(device)
            t0 = time.time()
        method.on_step(model, mcfg, i)
        loss, _ = train_step([b], n_tgt)
    loss = loss.item()  # waits for the last step
    dt = (time.time() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    tok_s = n_tgt / dt
    mfu = tok_s * flops_per_token(cfg, args.seq, name == "full") / PEAK_FLOPS
    return dict(shape=shape, method=name, trainable=sum(p.numel() for p in params), tok_s=tok_s, step_ms=dt * 1e3,
                peak_gib=peak, mfu=mfu, init_s=init_s, loss=loss)


def bench_hf(shape, name, args, device):
    """Hugging Face transformers (+ PEFT): the same shape and batch, bf16 weights, SDPA, fused AdamW, no compile.
    hf-liger-*: the same with liger-kernel's apply_liger_kernel_to_llama (fused RMSNorm, RoPE, SwiGLU and linear
    cross-entropy: the strongest HF setup a user would pick). Liger patches transformers' Llama classes for the rest
    of the process, so main() runs these rows after every plain HF row."""
    import transformers
    cfg = SHAPES[shape]
    liger = name.startswith("hf-liger-")
    if liger and device.type != "cuda":
        raise UserError("the hf-liger rows need a CUDA GPU (Liger's kernels are Triton)")
    label, name = name, name.replace("hf-liger-", "hf-")
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
    if liger:
        try:
            from liger_kernel.transformers import apply_liger_kernel_to_llama
        except ImportError:
            raise UserError("the hf-liger rows need liger-kernel: pip install liger-kernel") from None
        apply_liger_kernel_to_llama(model=model)
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
    data = random_batches(args.warmup + args.steps, args.batch, args.seq, cfg.vocab_size, device, 0)
    for i, (x, _, _) in enumerate(data):
        if i == args.warmup:
            sync(device)
            t0 = time.time()
        x = x.to(device)
        with step.autocast(device):
            loss = model(input_ids=x, labels=x).loss  # HF shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    loss = loss.item()
    dt = (time.time() - t0) / args.steps
    tok_s = args.batch * args.seq / dt
    mfu = tok_s * flops_per_token(cfg, args.seq, name == "hf-full") / PEAK_FLOPS
    return dict(shape=shape, method=label, trainable=sum(p.numel() for p in params), tok_s=tok_s, step_ms=dt * 1e3,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"), mfu=mfu, init_s=None,
                loss=loss)


def bench_gsm8k(name, args, train_args):
    """train.py's real run (one GSM8K epoch by default) with the given flags, in its own process; training time
    excludes init and evaluations. The run folder is /tmp/nanopeft_bench/<method>, replaced each time."""
    import shutil
    out_dir = "/tmp/nanopeft_bench"
    shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    argv = ["--method", name, "--model", args.model, "--data", args.data, "--test_data=", "--out_dir", out_dir,
            "--run_name", name, "--eval_every", "100000", "--save_every", "100000", "--log_every", "50",
            f"--device={args.device}"] + [f"--{k}" for k in ("compile", "cuda_graph", "grad_checkpoint")
                                          if getattr(args, k)] + train_args  # else train.py's defaults
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
    if subprocess.run([sys.executable, script] + argv).returncode:
        raise UserError(f"the train.py run of {name} failed; its output is above")
    out = json.load(open(os.path.join(out_dir, name, "summary.json")))
    return dict(shape="gsm8k-epoch", method=name, trainable=out["trainable_params"], tok_s=out["tok_s"],
                step_ms=out["train_s"] / out["steps"] * 1e3, peak_gib=out["peak_gib"], mfu=None,
                init_s=out["init_s"], loss=out["val_loss"], train_s=out["train_s"])


def fmt(v, spec):
    return "-" if v is None or v != v else format(v, spec)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if cli.wants_help(argv):
        return cli.print_help(__doc__, [("options", BenchConfig)])
    train_args = []
    args, = cli.parse(argv, BenchConfig(), rest=train_args)
    if train_args and not args.gsm8k:
        raise UserError(f"unknown option {train_args[0].partition('=')[0]} (--help lists the options; other keys "
                        "are train.py's, with --gsm8k)")
    if args.gsm8k and not (args.model and args.data):
        raise UserError("--gsm8k needs --model PATH and --data train.jsonl")
    if args.smoke:
        args.shapes, args.batch, args.seq, args.steps, args.warmup, args.device = "tiny", 2, 32, 2, 1, "cpu"
    if min(args.batch, args.seq, args.steps) < 1 or args.warmup < 0:
        raise UserError("--batch, --seq and --steps must be >= 1 and --warmup >= 0")
    device = cli.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.base_bits not in (4, 16) or args.rank < 0 or args.init_samples < 0:
        raise UserError(f"--base_bits must be 4 or 16, --rank and --init_samples >= 0 (0: each method's default), "
                        f"got {args.base_bits}, {args.rank}, {args.init_samples}")
    if args.base_bits == 4 and "full" in args.methods.split(","):
        raise UserError("--base_bits 4: full fine-tuning trains the base weights, which cannot be 4-bit; "
                        "leave full out of --methods")
    if args.liger and not (args.hf and device.type == "cuda"):
        raise UserError("--liger adds HF + Liger rows beside --hf's, on a CUDA GPU: use --hf --liger there")
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            raise UserError(f"unknown method {m!r}: choose from {', '.join(METHODS)}")
    shapes = args.shapes.split(",")
    for sh in shapes:
        if not args.gsm8k and sh not in SHAPES:
            raise UserError(f"unknown shape {sh!r}: choose from {', '.join(SHAPES)}")
    rows = []
    hf = ["hf-lora", "hf-miss", "hf-full"] if args.hf else []
    jobs = ([("gsm8k", m) for m in methods] if args.gsm8k else  # Liger's rows last: it patches transformers
            [(sh, m) for sh in shapes for m in methods + hf] + [(sh, "hf-liger-" + m[3:]) for sh in shapes
                                                                for m in hf if args.liger and m != "hf-miss"])
    for shape, m in jobs:
        try:
            row = (bench_gsm8k(m, args, train_args) if shape == "gsm8k" else bench_hf(shape, m, args, device)
                   if m.startswith("hf-") else bench_ours(shape, m, args, device, dtype))
        except torch.cuda.OutOfMemoryError:
            row = dict(shape=shape, method=m, note="out of memory")
        rows.append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache() if device.type == "cuda" else None
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\n{gpu}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, batch {args.batch} x {args.seq}"
          f"{', compile' if args.compile else ''}{', CUDA graph' if args.cuda_graph else ''}"
          f"{', activation checkpointing' if args.grad_checkpoint else ''}"
          f"{', 4-bit NF4 base' if args.base_bits == 4 else ''}{', streamed init' if args.init_stream else ''}\n")
    print("| shape | method | trainable | tok/s | step ms | peak GiB | MFU % | init s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "note" in r:
            print(f"| {r['shape']} | {r['method']} | {r['note']} | | | | | |")
            continue
        print(f"| {r['shape']} | {r['method']} | {r['trainable']:,} | {r['tok_s']:,.0f} | {r['step_ms']:.1f} | "
              f"{fmt(r['peak_gib'], '.2f')} | {fmt(r['mfu'] and 100 * r['mfu'], '.1f')} | {fmt(r['init_s'], '.2f')} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=asdict(args), train_args=train_args, gpu=gpu, torch=torch.__version__, rows=rows), f)
    return rows


if __name__ == "__main__":
    cli.run(main, "--batch or --seq")
