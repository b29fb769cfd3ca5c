"""
Fine-tune a Llama-family model on GSM8K or MetaMathQA with any method in this repo.

    python train.py --method sb --model PATH --data train.jsonl [--key=value ...]     (--help lists every key)

One loop for every method: the method file swaps the layers (apply), says what trains (requires_grad) and
how to save, load and merge itself; this file never branches on the method.
Precision: the frozen base stays in bf16 on CUDA, trainable tensors are fp32, compute runs under bf16 autocast;
on CPU everything is fp32.
Outputs in out/<run_name>/: config.json, log.jsonl, adapter.safetensors + adapter.json, ckpt.pt (resume).

Several GPUs: torchrun --nproc_per_node N train.py ... (DDP; --fsdp shards with FSDP2). Every process trains on
its share of each step's batch_size examples; the math is one process's, up to the order of float sums.
"""
import dataclasses
import gc
import glob
import json
import math
import os
import re
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import bone
import dylora
import fetch
import full
import lora
import lora_ga
import lora_sb
import lora_xs
from model import Llama, Tokenizer, UserError

METHODS = {"full": full, "lora": lora, "xs": lora_xs, "sb": lora_sb, "ga": lora_ga, "bone": bone, "dylora": dylora}

TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\n{question}\n\n### Response:")


@dataclass
class TrainConfig:
    method: str = "sb"
    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"  # a Hugging Face folder or hub id (fetch.py resolves it)
    data: str = "gsm8k"  # GSM8K jsonl (question/answer), MetaMathQA json/jsonl (query/response), or gsm8k
    data_limit: int = 0  # > 0: only the first N examples of --data (the papers' "MetaMathQA train[:50000]")
    test_data: str = "auto"  # scored with eval.py's protocol after training; auto: GSM8K test if --data is gsm8k
    eval_limit: int = -1  # test problems to score; 0: all; -1: all on CUDA, 16 on CPU
    val_data: str = ""  # held-out file; empty: hold out val_size examples of --data
    val_size: int = -1  # -1: 256 on CUDA, 32 on CPU
    template: str = TEMPLATE  # the prompt; {question} is replaced
    max_len: int = 512  # tokens per example (prompt + answer + EOS); longer answers are truncated
    epochs: float = 1.0
    max_steps: int = -1  # > 0: stop after this many optimizer steps instead of --epochs; -1: 0 on CUDA, 8 on CPU
    batch_size: int = 16  # examples per optimizer step
    micro_batch_size: int = 0  # examples per forward/backward (0: batch_size); the rest is accumulation
    lr: float = 0.0  # 0: the method's DEFAULT_LR
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = -1  # -1: 3% of the steps
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"  # auto: cuda if available
    dtype: str = "bfloat16"  # of the frozen base on CUDA (CPU always runs fp32)
    compile: bool = False  # torch.compile each transformer block
    cuda_graph: bool = True  # on CUDA: capture each training step as one CUDA graph (fixed-shape batches)
    grad_checkpoint: bool = False  # recompute activations in backward (less memory, ~30% slower)
    fsdp: bool = False  # under torchrun: shard weights, gradients and optimizer state with FSDP2 instead of DDP
    log_every: int = 10
    eval_every: int = 100
    save_every: int = 200
    out_dir: str = "out"
    run_name: str = ""  # default: the method name
    resume: bool = False  # continue out/<run_name> from its last checkpoint
    export: str = ""  # after training: "peft" (a standard PEFT LoRA adapter) or "merged" (an HF model folder)
    export_dtype: str = "auto"  # of --export merged: auto (the checkpoint's, unless rounding to it loses > 1% of the
    # update: then float32) | float32 | bfloat16 | float16


# -----------------------------------------------------------------------------
# command line: --key=value (or --key value) for TrainConfig and the method's Config

def parse_value(field, text):
    kind = field.type if isinstance(field.type, type) else type(field.default)
    try:
        if kind is bool:
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return text.lower() in ("1", "true", "yes")
        if kind is tuple:
            return tuple(x for x in text.split(",") if x)
        return kind(text)
    except ValueError:
        raise UserError(f"--{field.name} expects {kind.__name__}, got {text!r}") from None


def from_dict(cls, d):
    """A config dataclass from its saved JSON (lists back to tuples; unknown keys ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


def parse_args(argv, saved=None, cls=None, methods=None):
    """TrainConfig (or `cls`, e.g. fed.py's) and the method's Config: defaults (or a saved run's config), then the
    command line."""
    cls, methods = cls or TrainConfig, methods or METHODS
    pairs, i = [], 0
    while i < len(argv):
        a = argv[i]
        if not a.startswith("--"):
            raise UserError(f"unexpected argument {a!r}: use --key=value")
        key, eq, val = a[2:].partition("=")
        if not eq:  # --key value, or a bare boolean flag
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and not nxt.startswith("--"):
                val, i = nxt, i + 1
            else:
                val = "true"
        pairs.append((key.replace("-", "_"), val))
        i += 1
    method = dict(pairs).get("method", saved["train"]["method"] if saved else cls.method)
    if method not in methods:
        raise UserError(f"unknown method {method!r}: choose one of {', '.join(methods)}")
    if saved:
        tcfg, mcfg = from_dict(cls, saved["train"]), from_dict(methods[method].Config, saved["method_config"])
    else:
        tcfg, mcfg = cls(), methods[method].Config()
    tf, mf = {f.name: f for f in dataclasses.fields(tcfg)}, {f.name: f for f in dataclasses.fields(mcfg)}
    for key, val in pairs:
        if key not in tf and key not in mf:
            raise UserError(f"unknown option --{key}; valid: {', '.join(sorted(set(tf) | set(mf)))}")
        for cfg, fields in ((tcfg, tf), (mcfg, mf)):  # a key in both (seed) sets both
            if key in fields:
                setattr(cfg, key, parse_value(fields[key], val))
    return tcfg, mcfg


def print_help():
    print(__doc__)
    print("training options (TrainConfig):")
    for f in dataclasses.fields(TrainConfig):
        print(f"  --{f.name}={f.default!r}")
    for name, m in METHODS.items():
        fields = [f for f in dataclasses.fields(m.Config) if f.name != "seed"]
        if fields:
            print(f"--method {name} options:")
            for f in fields:
                print(f"  --{f.name}={f.default!r}")


# -----------------------------------------------------------------------------
# data: (prompt, target) pairs -> token ids -> packed rows

def gsm8k_target(answer):
    """GSM8K's worked solution without calculator annotations, the final '#### N' as 'The answer is: N'."""
    body, _, final = answer.rpartition("####")
    body = re.sub(r"<<[^>]*>>", "", body).rstrip()
    return f"{body}\nThe answer is: {final.strip()}"


def load_examples(path):
    """[(question, target)] from GSM8K jsonl or MetaMathQA json/jsonl."""
    if not os.path.isfile(path):
        raise UserError(f"data file not found: {path}")
    with open(path) as f:
        text = f.read()
    if text.lstrip().startswith("["):  # one JSON list (MetaMathQA's release format)
        try:
            rows = [(i + 1, r) for i, r in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError:
                    raise UserError(f"{path}:{n}: not a JSON object") from None
    out = []
    for n, r in rows:
        if isinstance(r, dict) and isinstance(r.get("question"), str) and isinstance(r.get("answer"), str):
            out.append((r["question"], gsm8k_target(r["answer"])))
        elif isinstance(r, dict) and isinstance(r.get("query"), str) and isinstance(r.get("response"), str):
            out.append((r["query"], r["response"]))
        else:
            raise UserError(f"{path}:{n}: expected 'question'/'answer' (GSM8K) or 'query'/'response' (MetaMathQA)")
    if not out:
        raise UserError(f"{path}: no examples")
    return out


def heldout_split(n, val_size, path):
    """(training indices, held-out indices) of n examples: one seeded split, shared by train.py and fed.py."""
    if n <= val_size:
        raise UserError(f"{path} has {n} examples, not more than --val_size={val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1234)).tolist()
    return perm[val_size:], perm[:val_size]


def tokenize(examples, tok, template, max_len):
    """[(ids, n_prompt)]: ids = [BOS] prompt ' ' target EOS, tokenized jointly as the model will read it."""
    out, cut = [], 0
    for q, target in examples:
        prompt = template.format(question=q)
        p = tok.encode(prompt, bos=tok.add_bos)
        ids = tok.encode(prompt + " " + target, bos=tok.add_bos) + [tok.eos_id]
        if ids[:len(p)] != p:  # the joint tokenization merged across the boundary: keep the prompt's own
            ids = p + tok.encode(" " + target) + [tok.eos_id]
        if len(p) >= max_len:
            raise UserError(f"a prompt has {len(p)} tokens but --max_len={max_len}: raise --max_len")
        cut += len(ids) > max_len
        out.append((ids[:max_len], len(p)))
    return out, cut


def pack(seqs, max_len, pad_id, static=False):
    """First-fit-decreasing packing of examples into rows of at most max_len tokens. Returns x, y, pos (R, T):
    y is -100 on prompt and padding; pos restarts at 0 for each example (the model masks attention by it).
    static: T = max_len and R rounded up to a multiple of 4, so a CUDA graph captured for one shape serves
    (nearly) every step."""
    rows = []  # [used, [example indices]]
    for i in sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0])):
        n = len(seqs[i][0]) - 1  # inputs are ids[:-1]
        row = next((r for r in rows if r[0] + n <= max_len), None)
        if row is None:
            row = [0, []]
            rows.append(row)
        row[0] += n
        row[1].append(i)
    R, T = (-(-len(rows) // 4) * 4, max_len) if static else (len(rows), max(r[0] for r in rows))
    x = torch.full((R, T), pad_id, dtype=torch.long)
    y = torch.full((R, T), -100, dtype=torch.long)
    pos = torch.zeros((R, T), dtype=torch.long)  # padding: every slot its own one-token example
    for r, (_, items) in enumerate(rows):
        t = 0
        for i in items:
            ids, n_prompt = seqs[i]
            n = len(ids) - 1
            x[r, t:t + n] = torch.tensor(ids[:-1])
            y[r, t + n_prompt - 1:t + n] = torch.tensor(ids[n_prompt:])  # predict the target tokens only
            pos[r, t:t + n] = torch.arange(n)
            t += n
    return x, y, pos


def example_order(n, seed, start, count):
    """Examples start..start+count of the training stream: epoch e is a permutation seeded by (seed, e)."""
    perms = {}
    for e in range(start // n, (start + count - 1) // n + 1):
        perms[e] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + e)).tolist()
    return [perms[k // n][k % n] for k in range(start, start + count)]


def micro_batches(data, idxs, micro, max_len, pad_id, static=False, rank=0, world=1):
    """Pack each group of `micro` examples of process `rank`'s contiguous share of idxs (all of them in one
    process): [(x, y, pos)], and the target and real (non-pad) tokens of all of idxs, every process's share: the
    loss is a mean over the whole step, which every process can count without asking the others."""
    mine = idxs[rank * len(idxs) // world:(rank + 1) * len(idxs) // world]
    batches = [pack([data[i] for i in mine[j:j + micro]], max_len, pad_id, static) for j in range(0, len(mine), micro)]
    n_tgt = sum(len(data[i][0]) - data[i][1] for i in idxs)  # pack's y holds ids[n_prompt:] of each example
    return batches, n_tgt, sum(len(data[i][0]) - 1 for i in idxs)


# -----------------------------------------------------------------------------
# loop helpers (also used by fed.py)

def get_lr(step, cfg, total):
    """Linear warm-up from lr/warmup to lr, then cosine decay to lr * min_lr_ratio. step counts from 0."""
    warm = cfg.warmup_steps if cfg.warmup_steps >= 0 else max(1, round(0.03 * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * min(1.0, progress)))


def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def evaluate(model, batches):
    """Mean target-token loss over packed batches [(x, y, pos)]."""
    was_training = model.training
    model.eval()
    dev = model.lm_head.weight.device
    total, count = torch.zeros((), device=dev), 0
    for x, y, pos in batches:
        n = int((y != -100).sum())
        with autocast(dev):
            total += model(x.to(dev), y.to(dev), pos.to(dev)).float() * n
        count += n
    model.train(was_training)
    return total.item() / max(1, count)


@contextmanager
def no_sync(model):
    """A backward without the data-parallel gradient exchange (DDP's all-reduce, FSDP2's reduce-scatter): the
    micro-batches of a step accumulate locally and only the last one communicates. A plain module: nothing."""
    fsdp = hasattr(model, "set_requires_gradient_sync")
    if fsdp:
        model.set_requires_gradient_sync(False)
    with model.no_sync() if hasattr(model, "no_sync") else nullcontext():
        yield
    if fsdp:
        model.set_requires_gradient_sync(True)


def make_step(model, opt, params, grad_clip, cuda_graph=False, world=1):
    """step(batches, n_tgt) -> (loss, grad_norm) as device tensors: forward and backward over the micro-batches
    [(x, y, pos)] (each one's mean loss weighted by its share of the step's n_tgt target tokens), clip, AdamW.
    Nothing in it waits for the GPU; the caller reads the tensors only when it logs.
    Data parallel (model wrapped by DDP or FSDP2, `world` processes): the batches are this process's share, n_tgt
    counts every process's targets, and DDP/FSDP2 average the processes' gradients, so each weight is world x its
    share: the average is then the gradient of the step's mean loss, as in one process (no all-reduce of n_tgt).
    cuda_graph: the whole step (every micro-batch, clipping, the optimizer) is captured once per batch shape
    as a CUDA graph and then replayed, so the CPU launches one graph per step instead of thousands of kernels:
    small models are otherwise bound by launch overhead, not by the GPU. It needs fixed shapes
    (micro_batches(static=True)), a capturable AdamW with a tensor lr (set_lr), and a method whose forward
    keeps no per-step Python state (a method file says CUDA_GRAPH = False otherwise)."""
    dev = params[0].device

    def run(batches, weights):
        total = torch.zeros((), device=dev)
        for j, ((x, y, pos), w) in enumerate(zip(batches, weights)):
            with no_sync(model) if j < len(batches) - 1 else nullcontext():  # gradients sync once, at the end
                with autocast(dev):
                    loss = model(x, y, pos) * w  # the step's loss is the mean over all its target tokens
                loss.backward()
            total += loss.detach()
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=dev.type == "cuda")
        opt.step()
        return total, norm

    def to_dev(t):
        return None if t is None else t.to(dev, non_blocking=True)  # pos None: plain causal rows

    def weights(batches, n_tgt):
        return [world * float((y != -100).sum()) / n_tgt for _, y, _ in batches]  # y is still on the CPU: no sync

    if not cuda_graph:
        def step(batches, n_tgt):
            out = run([[to_dev(t) for t in b] for b in batches], weights(batches, n_tgt))
            opt.zero_grad(set_to_none=True)
            return out
        return step

    graphs, pool = {}, []

    def capture(batches):
        static = [[to_dev(t) for t in b] for b in batches]
        w = [torch.zeros((), device=dev) for _ in batches]
        # warm up on a side stream (cuBLAS workspaces, torch.compile), then undo the warm-up's updates in place
        saved = [p.detach().clone() for p in params]
        state = {(i, k): v.clone() for i, p in enumerate(params) for k, v in opt.state.get(p, {}).items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                opt.zero_grad(set_to_none=False)
                run(static, w)
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(saved[i])
                for k, v in opt.state[p].items():
                    v.copy_(state[i, k]) if (i, k) in state else v.zero_()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool[0] if pool else None):
            opt.zero_grad(set_to_none=False)  # the gradients live outside the graph; it zeroes them first
            out = run(static, w)
        pool[:] = [graph.pool()]  # every shape's graph shares one memory pool: they never run at once
        return graph, static, w, out

    def step(batches, n_tgt):
        key = tuple(tuple(x.shape) for x, _, _ in batches)
        if key not in graphs:
            graphs[key] = capture(batches)
        graph, static, w, out = graphs[key]
        for b, sb, sw, wi in zip(batches, static, w, weights(batches, n_tgt)):
            for t, st in zip(b, sb):
                if t is not None:
                    st.copy_(t, non_blocking=True)
            sw.fill_(wi)
        graph.replay()
        return out  # overwritten by the next replay: read (or add up) before the next step
    return step


def make_optimizer(params, tcfg, device, cuda_graph=False):
    """AdamW (fused on CUDA). For a CUDA graph it must be capturable and take its lr as a device tensor."""
    lr = torch.tensor(tcfg.lr, device=device) if cuda_graph else tcfg.lr
    return torch.optim.AdamW(params, lr=lr, betas=(tcfg.beta1, tcfg.beta2), weight_decay=tcfg.weight_decay,
                             fused=device.type == "cuda", capturable=cuda_graph)


def set_lr(opt, lr):
    for g in opt.param_groups:
        if torch.is_tensor(g["lr"]):
            g["lr"].fill_(lr)  # in place: a captured graph reads this very tensor
        else:
            g["lr"] = lr


def init_grads(model, batches, targets, offload=False, n_tgt=0):
    """fp32 gradient of the mean target-token loss over `batches`, for every nn.Linear named in `targets`
    (LoRA-SB and LoRA-GA initialise from it). Only those weights get gradients; each is folded into its fp32
    accumulator as soon as it is formed (optionally on the CPU), so no second weight-sized tensor per layer
    lives on the GPU beyond one transient gradient. n_tgt: the target tokens of every process's batches (data
    parallel): each process's part is then weighted by its share of them, and the parts sum to the whole.
    So G is the gradient of the mean over every target token of the init examples, accumulated in fp32; the official
    LoRA-SB and LoRA-GA code instead sum (LoRA-GA: average) the gradients of per-batch mean losses, in bf16."""
    dev = model.lm_head.weight.device
    model.requires_grad_(False)
    weights = {n: m.weight for n, m in model.named_modules() if type(m) is nn.Linear and n.split(".")[-1] in targets}
    acc = {n: torch.zeros(w.shape, dtype=torch.float32, device="cpu" if offload else w.device)
           for n, w in weights.items()}
    hooks = []
    for n, w in weights.items():
        w.requires_grad_(True)

        def fold(p, a=acc[n]):
            a.add_(p.grad.to(a.device, torch.float32))
            p.grad = None
        hooks.append(w.register_post_accumulate_grad_hook(fold))
    total = n_tgt or sum(int((y != -100).sum()) for _, y, _ in batches)
    for x, y, pos in batches:
        with autocast(dev):
            loss = model(x.to(dev), y.to(dev), pos.to(dev)) * ((y != -100).sum().item() / total)
        loss.backward()
    for h in hooks:
        h.remove()
    model.requires_grad_(False)
    return acc


def init_distributed(device):
    """(distributed, rank, world, device). Under torchrun (it sets RANK, LOCAL_RANK, WORLD_SIZE), as in nanoGPT:
    one process per GPU (cuda:LOCAL_RANK), nccl on CUDA, gloo on CPU; rank 0 speaks for the job. One process
    (no RANK): (False, 0, 1, device), and torch.distributed is never touched."""
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    if dist.get_rank() > 0:
        sys.stdout = open(os.devnull, "w")  # every rank's errors still reach stderr
    return True, dist.get_rank(), dist.get_world_size(), device


def all_reduce_sum(tensors, device):
    """Sum each tensor over the processes, in place (nccl reduces GPU tensors: a CPU one visits `device`)."""
    for t in tensors:
        r = t.to(device)
        dist.all_reduce(r)
        t.copy_(r)


def atomic_save(obj, path, save_fn):
    tmp = path + ".tmp"
    save_fn(obj, tmp)
    os.replace(tmp, path)  # a reader sees the old file or the new one, never half of one


def save_json(obj, path):
    atomic_save(obj, path, lambda o, p: open(p, "w").write(json.dumps(o, indent=2) + "\n"))


def whole(state):
    """A (nested) state dict with FSDP2's sharded DTensors gathered into whole tensors, kept by rank 0 on the CPU
    (every process must call it, in the same order: each gather is a collective); other states as they are."""
    if isinstance(state, dict):
        return {k: whole(v) for k, v in state.items()}
    if hasattr(state, "full_tensor"):  # a DTensor
        t = state.full_tensor()
        return t.cpu() if dist.get_rank() == 0 else None
    return state


def save_adapter(sd, tcfg, mcfg, run_dir, step):
    from safetensors.torch import save_file
    sd = {k: v.detach().contiguous() for k, v in sd.items()}
    meta = dict(method=tcfg.method, config=asdict(mcfg), base_model=tcfg.model, template=tcfg.template, step=step)
    atomic_save(sd, os.path.join(run_dir, "adapter.safetensors"),
                lambda o, p: save_file(o, p, metadata={"nanopeft": json.dumps(meta)}))
    save_json(meta, os.path.join(run_dir, "adapter.json"))


def load_adapter(run_dir):
    """(method module, its Config, state dict, metadata) of a train.py run folder."""
    from safetensors.torch import load_file
    path = os.path.join(run_dir, "adapter.json")
    if not os.path.isfile(path):
        raise UserError(f"no adapter.json in {run_dir}: pass a train.py run folder (out/<run_name>)")
    meta = json.load(open(path))
    if meta["method"] not in METHODS:
        raise UserError(f"{path}: unknown method {meta['method']!r}")
    method = METHODS[meta["method"]]
    return method, from_dict(method.Config, meta["config"]), load_file(os.path.join(run_dir, "adapter.safetensors")), meta


EXPORT_LOSS = 0.01  # auto: the checkpoint's dtype only if its rounding changes the weights by < 1% of the update


def save_hf(model, src, out, dtype="auto"):
    """A Hugging Face model folder from a merged model (fp32 weights): its weights, the source's config and tokenizer.
    The weights are written in `dtype`; "auto" takes the source checkpoint's dtype unless rounding to it would
    change the weights by more than EXPORT_LOSS of the update's norm, ||round(W) - W|| / ||W - W0|| with W0 the
    source checkpoint's weights (a bf16 checkpoint after a short or low-lr run: most changed weights round back to
    W0), and then float32. Returns (the dtype written, what it loses of the update)."""
    import shutil
    from safetensors import safe_open
    from safetensors.torch import save_file
    src_cfg = json.load(open(os.path.join(src, "config.json")))
    src_dtype = getattr(torch, src_cfg.get("dtype") or src_cfg.get("torch_dtype") or "bfloat16")
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight")
    W0 = {}
    for f in sorted(glob.glob(os.path.join(src, "*.safetensors"))):
        with safe_open(f, framework="pt") as fh:
            W0.update({k: fh.get_tensor(k) for k in fh.keys() if k in sd})

    def lost(dt):  # ||round(W) - W|| / ||W - W0|| over every tensor
        err = sum(float((v.to(dt).double() - v.double()).pow(2).sum()) for v in sd.values())
        upd = sum(float((v.double() - W0[k].double()).pow(2).sum()) for k, v in sd.items() if k in W0)
        return math.sqrt(err / upd) if upd > 0 else 0.0
    if dtype == "auto":
        dt = src_dtype if lost(src_dtype) <= EXPORT_LOSS else torch.float32
        if dt != src_dtype:
            print(f"merged export in float32: rounding to the checkpoint's {str(src_dtype)[6:]} would change the "
                  f"weights by {lost(src_dtype):.1%} of the update (--export_dtype {str(src_dtype)[6:]} writes it anyway)")
    else:
        dt = getattr(torch, dtype)
    loss = lost(dt)
    print(f"merged export in {str(dt)[6:]}: its rounding changes the weights by {loss:.2%} of the update")
    os.makedirs(out, exist_ok=True)
    sd = {k: v.to(dt) for k, v in sd.items()}
    atomic_save(sd, os.path.join(out, "model.safetensors"), lambda o, p: save_file(o, p, metadata={"format": "pt"}))
    for f in os.listdir(src):
        if f.endswith((".json", ".model", ".jinja")) and not f.startswith("model.safetensors"):
            shutil.copy(os.path.join(src, f), out)
    cfg_out = dict(src_cfg, dtype=str(dt)[6:])  # transformers loads dtype="auto" from here
    cfg_out.pop("torch_dtype", None)
    save_json(cfg_out, os.path.join(out, "config.json"))
    return str(dt)[6:], loss


def save_peft(model, out, base_model):
    """A standard PEFT LoRA adapter: every method with a low-rank form gives (A, B) with its scale in B."""
    from safetensors.torch import save_file
    pairs = {n: m.lora_pair() for n, m in model.named_modules() if hasattr(m, "lora_pair")}
    if not pairs:
        raise UserError("this method has no PEFT LoRA form: use --export merged")
    ranks = {A.shape[0] for A, _ in pairs.values()}
    if len(ranks) != 1:
        raise UserError(f"PEFT export needs one rank for every layer, found {sorted(ranks)}")
    sd = {}
    for n, (A, B) in pairs.items():
        sd[f"base_model.model.{n}.lora_A.weight"] = A.contiguous()
        sd[f"base_model.model.{n}.lora_B.weight"] = B.contiguous()
    r = ranks.pop()
    os.makedirs(out, exist_ok=True)
    atomic_save(sd, os.path.join(out, "adapter_model.safetensors"), lambda o, p: save_file(o, p))
    save_json(dict(peft_type="LORA", task_type="CAUSAL_LM", r=r, lora_alpha=r, lora_dropout=0.0, bias="none",
                   target_modules=sorted({n.rsplit(".", 1)[-1] for n in pairs}), use_rslora=False,
                   fan_in_fan_out=False, inference_mode=True, base_model_name_or_path=base_model),
              os.path.join(out, "adapter_config.json"))


# -----------------------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        return print_help()
    tcfg, mcfg = parse_args(argv)
    run_dir = os.path.join(tcfg.out_dir, tcfg.run_name or tcfg.method)
    ckpt_path = os.path.join(run_dir, "ckpt.pt")
    ckpt = None
    if tcfg.resume:  # the run's saved settings, then anything this command line changes
        if not os.path.isfile(ckpt_path):
            raise UserError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        tcfg, mcfg = parse_args(argv, json.loads(ckpt["config"]))
    method = METHODS[tcfg.method]
    tcfg.lr = tcfg.lr or method.DEFAULT_LR
    if tcfg.export not in ("", "peft", "merged"):
        raise UserError(f"--export must be peft or merged, got {tcfg.export!r}")
    if tcfg.export_dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UserError(f"--export_dtype must be auto, float32, bfloat16 or float16, got {tcfg.export_dtype!r}")
    device = torch.device("cuda" if tcfg.device == "auto" and torch.cuda.is_available() else
                          tcfg.device if tcfg.device != "auto" else "cpu")
    if tcfg.batch_size % int(os.environ.get("WORLD_SIZE", 1)):
        raise UserError(f"--batch_size={tcfg.batch_size} must be divisible by the number of processes "
                        f"({os.environ['WORLD_SIZE']})")
    distributed, rank, world, device = init_distributed(device)
    if tcfg.fsdp and not distributed:
        print("--fsdp: one process, nothing to shard (launch with torchrun --nproc_per_node N to shard)")
    dtype = getattr(torch, tcfg.dtype) if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # this run's peak, even when called in-process after another
    cpu = device.type == "cpu"  # the defaults: the real experiment on CUDA, a few minutes on a CPU
    if cpu and -1 in (tcfg.max_steps, tcfg.val_size, tcfg.eval_limit):
        print("CPU: a bounded run (8 steps, 32 held-out examples, 16 test problems, where not set); "
              "--max_steps=0 --val_size=256 --eval_limit=0 give the full one")
    tcfg.max_steps = (8 if cpu else 0) if tcfg.max_steps < 0 else tcfg.max_steps
    tcfg.val_size = (32 if cpu else 256) if tcfg.val_size < 0 else tcfg.val_size
    tcfg.eval_limit = (16 if cpu else 0) if tcfg.eval_limit < 0 else tcfg.eval_limit
    if rank > 0:
        dist.barrier()  # rank 0 fetches first (downloads, conversions into the cache); the others then read its cache
    model_path, data_path = fetch.resolve_model(tcfg.model), fetch.resolve_data(tcfg.data, "train")
    test = ("gsm8k" if tcfg.data == "gsm8k" else "") if tcfg.test_data == "auto" else tcfg.test_data
    test_path = fetch.resolve_data(test, "test") if test else ""
    if distributed and rank == 0:
        dist.barrier()
    torch.manual_seed(tcfg.seed + rank)  # each rank its own dropout masks (nanoGPT's seed_offset); inits seed apart
    os.makedirs(run_dir, exist_ok=True)
    print(json.dumps(dict(train=asdict(tcfg), method_config=asdict(mcfg)), indent=2))

    # data: a seeded held-out split unless a validation file is given
    tok = Tokenizer.from_pretrained(model_path)
    examples = load_examples(data_path)[:tcfg.data_limit or None]
    if tcfg.val_data:
        train_ex, val_ex = examples, load_examples(tcfg.val_data)
    else:
        train_idx, val_idx = heldout_split(len(examples), tcfg.val_size, data_path)
        train_ex, val_ex = [examples[i] for i in train_idx], [examples[i] for i in val_idx]
    train, cut = tokenize(train_ex, tok, tcfg.template, tcfg.max_len)
    val, _ = tokenize(val_ex, tok, tcfg.template, tcfg.max_len)
    micro = tcfg.micro_batch_size or tcfg.batch_size
    val_batches = [pack(val[j:j + micro], tcfg.max_len, tok.pad_id) for j in range(0, len(val), micro)]
    total = tcfg.max_steps or math.ceil(tcfg.epochs * len(train) / tcfg.batch_size)
    print(f"{len(train)} training examples ({cut} truncated to {tcfg.max_len} tokens), {len(val)} held out, "
          f"{total} steps of {tcfg.batch_size}" + (f" over {world} processes" if distributed else ""))

    # every process holds the whole model until it is wrapped below, and evaluates the whole held-out set (the
    # same number on every rank; FSDP2 needs every rank in every forward anyway); rank 0 alone writes files
    model = Llama.from_pretrained(model_path, device=device, dtype=dtype)
    log_path = os.path.join(run_dir, "log.jsonl")
    log = []
    if ckpt is None:
        log.append(dict(step=0, val_loss=evaluate(model, val_batches), base_model=True))
        print(f"base model held-out loss {log[-1]['val_loss']:.4f}")

    # the method: initialisation (from gradients of the first examples where it needs them), timed
    t0 = time.time()
    grads = None
    if ckpt is None and getattr(mcfg, "init_samples", 0) > 0:
        if hasattr(mcfg, "lr_1"):  # LoRA-SB: the learning rate of the first optimizer step
            mcfg.lr_1 = mcfg.lr_1 or get_lr(0, tcfg, total)
        idxs = example_order(len(train), tcfg.seed, 0, mcfg.init_samples)
        batches, n_tgt, _ = micro_batches(train, idxs, micro, tcfg.max_len, tok.pad_id, False, rank, world)
        grads = init_grads(model, batches, mcfg.targets, getattr(mcfg, "init_offload", False), n_tgt)
        if distributed:  # each rank's part, weighted by its share of the targets: their sum is the whole
            all_reduce_sum(grads.values(), device)
    method.apply(model, mcfg, grads, init=ckpt is None)  # resuming: the checkpoint holds every tensor
    init_diff = None
    if distributed and grads is not None:  # every rank built the init from the same gradient: check they agree
        v = torch.cat([t.detach().flatten().float() for t in method.adapter_state_dict(model).values()])
        v0 = v.clone()
        dist.broadcast(v0, 0)
        d = (v - v0).abs().max()
        dist.all_reduce(d, dist.ReduceOp.MAX)
        init_diff = d.item()  # logged; DDP then copies rank 0's tensors to every rank regardless
    del grads
    if device.type == "cuda":
        torch.cuda.synchronize()
    init_s = time.time() - t0
    config = dict(train=asdict(tcfg), method_config=asdict(mcfg))  # resolved, lr_1 included
    if rank == 0:
        save_json(config, os.path.join(run_dir, "config.json"))
    if ckpt is not None:  # resume: whole tensors, loaded before any sharding
        method.load_adapter_state_dict(model, ckpt["adapter"])
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # data parallel: DDP keeps a whole model per GPU and averages the trainable tensors' gradients; FSDP2 shards
    # every tensor (weights, gradients, optimizer state) over the GPUs, block by block, then the rest (root)
    step_model = model  # what the training step calls; checkpoints and evaluation use `model`
    if distributed and tcfg.fsdp:  # each process loaded the whole model first: it must fit one GPU in the base dtype
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (world,))
        for block in model.model.layers:  # all-gathered in their own dtypes: the one-GPU precision policy
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif distributed:  # the constructor copies rank 0's weights to every rank; buffers never change: not re-sent
        step_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else
                                                         None, broadcast_buffers=False)
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP2: this rank's shards (DTensors)
    # no CUDA graph under torchrun: DDP and FSDP2 launch their collectives from hooks during backward, which one
    # captured graph replayed step after step would not reproduce
    graphed = tcfg.cuda_graph and device.type == "cuda" and getattr(method, "CUDA_GRAPH", True) and not distributed
    if tcfg.cuda_graph and device.type == "cuda" and not graphed:
        print(f"{tcfg.method}: no CUDA graph " + ("under torchrun" if distributed else
                                                  "(its layers change shape from step to step)"))
    opt = make_optimizer(params, tcfg, device, graphed)
    start = 0
    if ckpt is not None:  # resume: adapter, optimizer, RNG, step; the data order is a function of the step
        opt.load_state_dict(ckpt["optimizer"])
        for g in opt.param_groups:  # the lr's type (float or device tensor) is this run's, not the saved one's
            g["lr"] = torch.tensor(float(g["lr"]), device=device) if graphed else float(g["lr"])
        if distributed and tcfg.fsdp:  # whole saved moments -> this rank's shard of each (no communication)
            from torch.distributed.tensor import distribute_tensor
            for p in params:
                for k, v in opt.state[p].items():
                    if v.dim():  # not the scalar step count
                        opt.state[p][k] = distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)
        if rank == 0:  # the saved stream is rank 0's; other ranks keep their own (dropout masks only)
            torch.set_rng_state(ckpt["rng_cpu"])
            if device.type == "cuda" and "rng_cuda" in ckpt:
                torch.cuda.set_rng_state(ckpt["rng_cuda"])
        start = ckpt["step"]
        if os.path.isfile(log_path):  # forget log lines written after the checkpoint
            log = [l for l in map(json.loads, open(log_path)) if l.get("step", 0) <= start]
        print(f"resumed {run_dir} at step {start}")
    else:
        log.append(dict(step=0, init_s=round(init_s, 3), trainable_params=n_train))
        if distributed:
            log[-1]["processes"] = world
        if init_diff is not None:
            log[-1]["init_rank_diff"] = init_diff
        log.append(dict(step=0, val_loss=evaluate(model, val_batches)))
    if rank == 0:
        atomic_save(log, log_path, lambda o, p: open(p, "w").write("".join(json.dumps(l) + "\n" for l in o)))
    print(f"{tcfg.method}: {n_train:,} trainable parameters, init {init_s:.2f}s")

    def log_line(entry):
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def checkpoint(step):  # the unwrapped model's whole tensors, whatever the number of processes
        adapter, optimizer = whole(method.adapter_state_dict(model)), whole(opt.state_dict())
        if rank > 0:
            return
        save_adapter(adapter, tcfg, mcfg, run_dir, step)
        state = dict(step=step, adapter=adapter, optimizer=optimizer, rng_cpu=torch.get_rng_state(),
                     config=json.dumps(config))
        if device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state()
        atomic_save(state, ckpt_path, torch.save)

    def summed(loss_sum, slots):
        """The mean step loss (each rank's carries world x its share, see make_step) and the padded slots of every
        process: one small all-reduce, on log and save steps only."""
        if not distributed:
            return loss_sum.item(), slots
        t = torch.tensor([loss_sum.item(), slots], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t[0].item() / world, t[1].item()

    if tcfg.grad_checkpoint:
        model.grad_checkpoint = True
    if tcfg.compile:
        model.compile()
    model.train()
    train_step = make_step(step_model, opt, params, tcfg.grad_clip, graphed, world)
    bar = tqdm(range(start, total), initial=start, total=total, desc=tcfg.method, dynamic_ncols=True, disable=rank > 0)
    t_log, real_tok, slots, last_log, last_saved = time.time(), 0, 0, start, start
    t_train, t_eval, all_tok, vl = time.time(), 0.0, 0, float("nan")  # the loop's time (evaluations excluded)
    loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync until a log step
    for step in bar:
        lr = get_lr(step, tcfg, total)
        set_lr(opt, lr)
        method.on_step(model, step)
        idxs = example_order(len(train), tcfg.seed, step * tcfg.batch_size, tcfg.batch_size)  # this rank: its share
        batches, n_tgt, n_real = micro_batches(train, idxs, micro, tcfg.max_len, tok.pad_id, graphed, rank, world)
        loss, grad_norm = train_step(batches, n_tgt)
        loss_sum += loss
        real_tok += n_real
        all_tok += n_real
        slots += sum(x.numel() for x, _, _ in batches)
        done = step + 1
        if done % tcfg.log_every == 0 or done == total:
            loss_val, all_slots = summed(loss_sum, slots)  # real_tok counts every rank's tokens already
            loss_val /= done - last_log
            if not (math.isfinite(loss_val) and math.isfinite(grad_norm.item())):
                raise UserError(f"loss is {loss_val} at step {done}: training stopped; " + (
                    f"the last good checkpoint (step {last_saved}) is in {run_dir}" if last_saved else
                    "no checkpoint had been saved") + "; lower --lr or check the data")
            dt = time.time() - t_log
            entry = dict(step=done, loss=round(loss_val, 5), lr=lr, grad_norm=round(grad_norm.item(), 5),
                         tok_s=round(real_tok / dt), pad_frac=round(1 - real_tok / all_slots, 4),
                         peak_mem_gb=round(torch.cuda.max_memory_allocated() / 2**30, 3)
                         if device.type == "cuda" else None)
            log_line(entry)
            bar.set_postfix(loss=f"{loss_val:.4f}", tok_s=entry["tok_s"])
            loss_sum.zero_()
            t_log, real_tok, slots, last_log = time.time(), 0, 0, done
        if done % tcfg.eval_every == 0 or done == total:
            t = time.time()
            vl = evaluate(model, val_batches)
            t_eval += time.time() - t
            log_line(dict(step=done, val_loss=round(vl, 5)))
            bar.write(f"step {done}: held-out loss {vl:.4f}")
        if done % tcfg.save_every == 0 or done == total:
            loss_val = summed(loss_sum, slots)[0] if done % tcfg.log_every else loss_val
            if not (math.isfinite(loss_val) and math.isfinite(grad_norm.item())):  # never save a broken state
                raise UserError(f"loss is {loss_val} at step {done}: training stopped; " + (
                    f"the last good checkpoint (step {last_saved}) is in {run_dir}" if last_saved else
                    "no checkpoint had been saved") + "; lower --lr or check the data")
            checkpoint(done)
            last_saved = done
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.time() - t_train - t_eval
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None  # training's peak
    if start >= total and ckpt is not None:
        print(f"{run_dir} had already finished ({total} steps)")
    if distributed:  # what is left (export, the GSM8K score) runs on rank 0 alone, with no collective to time out
        # first free what uses the process group (DDP, FSDP2's shards) while it lives, and let every rank's last
        # collective complete: gloo can abort a process whose FSDP2 state is torn down only at exit, after it
        train_step = step_model = opt = params = grad_norm = None
        if tcfg.fsdp:
            model = None
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
        if rank > 0:
            return None
        if tcfg.fsdp and (tcfg.export or test_path):  # rank 0 holds shards: rebuild the whole model from its adapter
            model = Llama.from_pretrained(model_path, device=device, dtype=dtype)
            method.apply(model, mcfg, init=False)
            method.load_adapter_state_dict(model, load_adapter(run_dir)[2])
    summary = None
    if test_path:  # the score, with eval.py's protocol, of the model as trained: adapters unmerged, the training's
        # precision policy (a merge into a bf16 base would round most of a small update away)
        import eval as ev
        rows = ev.load_gsm8k(test_path, tcfg.eval_limit)
        records, summary = ev.run_eval(model.eval(), tok, rows, tcfg.template, ev.SUFFIX, 256, 256)
        ev.save_results(records, dict(summary, data=test_path, method=tcfg.method), os.path.join(run_dir, "gsm8k.jsonl"))
        print(f"GSM8K accuracy {summary['accuracy']:.4f} on {summary['n']} problems of {test_path} "
              f"(invalid {summary['invalid_rate']:.4f}); details in {run_dir}/gsm8k.jsonl")
    if tcfg.export == "peft":
        save_peft(model, os.path.join(run_dir, "peft"), tcfg.model)
        print(f"PEFT adapter written to {run_dir}/peft")
    if tcfg.export == "merged":
        method.merge(model)  # fp32 merged weights; save_hf picks the dtype that keeps the update
        save_hf(model, model_path, os.path.join(run_dir, "merged"), tcfg.export_dtype)
        print(f"merged model written to {run_dir}/merged")
    out = dict(run_dir=run_dir, steps=total - start, trainable_params=n_train, init_s=init_s, train_s=train_s,
               tok_s=all_tok / max(train_s, 1e-9), peak_gib=peak_gib, val_loss=vl, gsm8k=summary)
    save_json(out, os.path.join(run_dir, "summary.json"))
    return out


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
