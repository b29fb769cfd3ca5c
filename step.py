"""
The training step and what surrounds it, shared by train.py, fed.py and bench.py: the learning-rate schedule, the
optimizer, the (CUDA-graph) step, the held-out loss, the gradients that LoRA-SB and LoRA-GA initialise from, and
the torchrun helpers (data parallel over processes).

Precision policy, stated once: on CUDA the frozen base stays bf16, trainable tensors are fp32, and every forward runs
under bf16 autocast (`autocast`); on CPU everything is fp32. No method may round an update into a bf16 weight
(model.adapted_linear; tests/test_precision.py).
"""
import gc
import math
import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from cli import UserError
from data import example_order, micro_batches


@dataclass
class OptimConfig:
    batch_size: int = 16  # examples per optimizer step (over all processes)
    micro_batch_size: int = 0  # examples per forward/backward; 0: batch_size (no accumulation)
    lr: float = 0.0  # peak learning rate (> 0); left out: the method's DEFAULT_LR
    min_lr_ratio: float = 0.0  # the cosine schedule decays to lr * min_lr_ratio
    warmup_steps: int = -1  # linear warm-up steps; -1: 3% of the steps
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    beta1: float = 0.9  # AdamW's decay of the gradient's running mean
    beta2: float = 0.999  # AdamW's decay of the squared gradient's running mean
    grad_clip: float = 1.0  # clip the global gradient norm to this


def check(cfg, lr_given=True):
    """One clear line for an optimizer setting that cannot work, before anything is loaded. lr_given: --lr was on
    the command line (then 0 is an error, not "the method's default")."""
    if cfg.batch_size < 1 or cfg.micro_batch_size < 0:
        raise UserError(f"--batch_size must be >= 1 and --micro_batch_size >= 0 (0: batch_size), got "
                        f"{cfg.batch_size}, {cfg.micro_batch_size}")
    if cfg.lr < 0 or (lr_given and cfg.lr == 0):
        raise UserError(f"--lr must be > 0, got {cfg.lr} (leave it out for the method's default)")
    if not (0 <= cfg.min_lr_ratio <= 1 and cfg.warmup_steps >= -1 and cfg.weight_decay >= 0):
        raise UserError(f"--min_lr_ratio must be in [0, 1], --warmup_steps >= 0 (-1: 3%) and --weight_decay >= 0, "
                        f"got {cfg.min_lr_ratio}, {cfg.warmup_steps}, {cfg.weight_decay}")
    if not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1):
        raise UserError(f"--beta1 and --beta2 must be in [0, 1), got {cfg.beta1}, {cfg.beta2}")
    if not cfg.grad_clip > 0:
        raise UserError(f"--grad_clip must be > 0 (inf: no clipping), got {cfg.grad_clip}")


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
            total += model(x.to(dev), y.to(dev), pos.to(dev))[1].float() * n
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
    keeps no per-step Python state (the method file's CUDA_GRAPH)."""
    dev = params[0].device

    def run(batches, weights):
        total = torch.zeros((), device=dev)
        for j, ((x, y, pos), w) in enumerate(zip(batches, weights)):
            with no_sync(model) if j < len(batches) - 1 else nullcontext():  # gradients sync once, at the end
                with autocast(dev):
                    loss = model(x, y, pos)[1] * w  # the step's loss is the mean over all its target tokens
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
    for x, y, pos in tqdm(batches, desc="init gradients", leave=False, disable=int(os.environ.get("RANK", 0)) > 0):
        with autocast(dev):
            loss = model(x.to(dev), y.to(dev), pos.to(dev))[1] * ((y != -100).sum().item() / total)
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


def whole(state):
    """A (nested) state dict with FSDP2's sharded DTensors gathered into whole tensors, kept by rank 0 on the CPU
    (every process must call it, in the same order: each gather is a collective); other states as they are."""
    if isinstance(state, dict):
        return {k: whole(v) for k, v in state.items()}
    if hasattr(state, "full_tensor"):  # a DTensor
        t = state.full_tensor()
        return t.cpu() if dist.get_rank() == 0 else None
    return state


def gradient_init(model, method, mcfg, seqs, cfg, pad_id, rank=0, world=1):
    """The init gradients of a method that initialises from them (method.GRADIENT_INIT; else None): fp32 dL/dW
    of every target weight over the first mcfg.init_samples examples of the training order of `seqs`, each process
    taking its share and the shares summed."""
    if not method.GRADIENT_INIT:
        return None
    idxs = example_order(len(seqs), cfg.seed, 0, mcfg.init_samples)
    micro = cfg.micro_batch_size or cfg.batch_size
    batches, n_tgt, _ = micro_batches(seqs, idxs, micro, cfg.max_len, pad_id, False, rank, world)
    grads = init_grads(model, batches, mcfg.targets, mcfg.init_offload, n_tgt)
    if world > 1:  # each rank's part, weighted by its share of the targets: their sum is the whole
        all_reduce_sum(grads.values(), model.lm_head.weight.device)
    return grads


def stream_init(model, method, mcfg, seqs, cfg, pad_id, first_lr):
    """A gradient-initialised method (method.GRADIENT_INIT) in one process, without ever holding every layer's
    gradient: all init examples go through one forward and one backward, the blocks recomputed in the backward
    (activation checkpointing), and each target layer is initialised by the method as soon as its gradient over
    all of them is complete (a post-accumulate hook), that gradient then dropped. So at most the layers of one
    block hold a gradient at once, where gradient_init holds an fp32 one for every target weight. G is the
    gradient of the mean loss over every target token, as in gradient_init; each layer's method.apply runs on that
    layer alone (its randomized SVD, if any, draws from the seed afresh for each layer)."""
    from data import pack
    idxs = example_order(len(seqs), cfg.seed, 0, mcfg.init_samples)
    x, y, pos = pack([seqs[i] for i in idxs], cfg.max_len, pad_id)  # (R, T): every init example in one batch
    dev = model.lm_head.weight.device
    model.requires_grad_(False)
    hooks = []
    for parent_name, parent in list(model.named_modules()):
        for child, lin in list(parent.named_children()):
            if type(lin) is not nn.Linear or child not in mcfg.targets:
                continue

            def init_layer(w, parent=parent, child=child, lin=lin):
                G = w.grad.float()  # (d_out, d_in): complete, one backward covers every init example
                w.grad = None
                holder = nn.Module()  # apply freezes and swaps within it: the layer's siblings are untouched
                holder.add_module(child, lin)
                targets, mcfg.targets = mcfg.targets, (child,)  # the run's own config: what apply resolves is kept
                try:
                    method.apply(holder, mcfg, {child: G}, first_lr=first_lr)
                finally:
                    mcfg.targets = targets
                setattr(parent, child, getattr(holder, child))
            lin.weight.requires_grad_(True)
            hooks.append(lin.weight.register_post_accumulate_grad_hook(init_layer))
    checkpointing, model.grad_checkpoint = model.grad_checkpoint, True
    with autocast(dev):
        loss = model(x.to(dev), y.to(dev), pos.to(dev))[1]  # the mean over every target token
    loss.backward()
    model.grad_checkpoint = checkpointing
    for h in hooks:
        h.remove()
    return model


def init_method(model, method, mcfg, seqs, cfg, pad_id, first_lr, rank=0, world=1):
    """The method applied to the model with its initialisation: from gradients of the first training examples where
    it needs them (Config.init_stream in one process: layer by layer; else all of them, summed over the processes
    under torchrun)."""
    if method.GRADIENT_INIT and mcfg.init_stream and world == 1:
        return stream_init(model, method, mcfg, seqs, cfg, pad_id, first_lr)
    grads = gradient_init(model, method, mcfg, seqs, cfg, pad_id, rank, world)
    return method.apply(model, mcfg, grads, first_lr=first_lr)


def finish_distributed():
    """Leave the process group cleanly: free what uses it first (the caller drops DDP/FSDP2 objects), then let every
    rank's last collective complete (gloo can abort a process whose FSDP2 state is torn down only at exit).
    Returns True on rank 0, which goes on alone."""
    gc.collect()
    rank = dist.get_rank()
    dist.barrier()
    dist.destroy_process_group()
    return rank == 0


@contextmanager
def rank0_first(distributed, rank):
    """Rank 0 runs the block first (downloads, conversions into the cache); the other ranks then read its cache."""
    if distributed and rank > 0:
        dist.barrier()
    yield
    if distributed and rank == 0:
        dist.barrier()


def wrap(model, device, fsdp):
    """The module the training step calls under torchrun: DDP keeps a whole model per GPU and averages the
    trainable tensors' gradients; FSDP2 shards every tensor (weights, gradients, optimizer state) over the GPUs,
    block by block, then the rest (root). Each process loaded the whole model first: it must fit one GPU."""
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for block in model.model.layers:  # all-gathered in their own dtypes: the one-GPU precision policy
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    # the constructor copies rank 0's weights to every rank; buffers never change: not re-sent
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                               broadcast_buffers=False)


def load_optimizer(opt, state, params, graphed, device):
    """A checkpoint's optimizer state into `opt`: the lr's type (float, or a device tensor for a CUDA graph) is this
    run's, and under FSDP2 each whole saved moment becomes this rank's shard of it (no communication)."""
    opt.load_state_dict(state)
    for g in opt.param_groups:
        g["lr"] = torch.tensor(float(g["lr"]), device=device) if graphed else float(g["lr"])
    for p in params:
        if hasattr(p, "device_mesh"):  # an FSDP2 DTensor
            from torch.distributed.tensor import distribute_tensor
            for k, v in opt.state[p].items():
                if v.dim():  # not the scalar step count
                    opt.state[p][k] = distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)


def rank_disagreement(tensors):
    """Max |difference| between this rank's tensors and rank 0's, over all ranks: every rank builds a gradient
    init from the same summed gradient, so this should be round-off (DDP then copies rank 0's regardless)."""
    v = torch.cat([t.detach().flatten().float() for t in tensors])
    v0 = v.clone()
    dist.broadcast(v0, 0)
    d = (v - v0).abs().max()
    dist.all_reduce(d, dist.ReduceOp.MAX)
    return d.item()


def sum_over_ranks(values, device):
    """[floats] summed over the processes (one small all-reduce; the values as they are in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
