"""
A federated fine-tuning simulator in one process: Fed-SB against FedIT, FFA-LoRA and FedEx-LoRA.

    python fed.py --method sb --rank 120 --clients 10 --rounds 3 --split iid --model PATH --data PATH [--key=value ...]

One model lives in memory. Every sampled client starts a round from the same global adapter, trains its own
shard for `local_steps` steps with a fresh AdamW (train.py's batches, schedule and loss), and hands back its
trainable tensors; the server then aggregates that round's updates only, with weights w_k proportional to the
examples of the clients that finished the round:

    sb     R = sum_k w_k R_k            exact: B R A is linear in R  (Fed-SB, arXiv 2502.15436; LoRA-SB's B, A
                                        are initialised once, centrally, and shared)
    fedit  A = sum_k w_k A_k, B = ...   inexact: mean(B) mean(A) != mean(B A)  (FedIT: plain LoRA)
    ffa    A frozen and shared, B = sum_k w_k B_k                               exact (FFA-LoRA)
    fedex  A, B as fedit, and E += s (sum_k w_k B_k A_k - B A), with the training scale s and no transpose
                                        exact (FedEx-LoRA); the residual is full-rank and goes down to clients

LoRA-SB's central init takes one approximate full fine-tuning step, -lr_1 sign(G) (lora_sb.py); lr_1 is the first
step's lr of train.py's epoch over the pooled data, as the paper's code takes it from the pooled loader, not a
client's: 20 local steps warm up in one step, which would make lr_1 the full lr (14x train.py's on GSM8K).

FedEx-LoRA's exactness under the precision policy (frozen base in bf16): the paper folds the residual into the
base weight, but a bf16 weight cannot hold it (on weights of rms 0.15, 99% of a residual of rms 1e-5 and 24% of one
of rms 1e-3 round away). So the base is never touched: each layer keeps the accumulated residual E in an fp32 buffer
of its own (FedExLinear, 4 bytes per base weight) and equals W0 + s B A + E. The stored global state is exact in
fp32 (merged_weight() to fp32's rounding of W), and the forward adds E x to the adapter's output, inside the base
GEMM's fp32 accumulator like every adapter's (model.adapted_linear): the one bf16 rounding of each output is then
unbiased and averages out, where a rounded weight's error is the same for every token (tests/test_fed.py measures
the weight the forward acts with).

Communication per client and round, counted from the module shapes, all tensors in fp32 (the FedEx residual too:
it is what is sent): sb r^2 per module each way; fedit P = r (d_in + d_out) each way; ffa r d_out each way; fedex
P up and P plus d_out d_in down. Fed-SB's B and A (P) go down once before round 1 ("setup"); the other methods'
initial adapters are reproducible from the seed. The Fed-SB paper counts differently, and both are reported, each
labelled: ffa P/2 each way, fedex's download K P (K clients in the round: each client is sent every client's A_k,
B_k and forms the mean of B_k A_k itself), and no setup. Mistral-7B, 25 clients, FedEx r=32 against Fed-SB r=200
(tests/test_fed.py): the paper's 234x is its download ratio; ours is 399x up and down (788x down alone).

Private mode (--dp_epsilon E, a target epsilon > 0; inf, the default, trains without privacy): DP-SGD per client
at the record level, on the trainable tensors only: Poisson-sampled batches, per-example gradients (one batched
backward, book-keeping; torch.func where that cannot apply), one joint L2 clip to C, N(0, (sigma C)^2) added once
per logical batch, divided by the expected batch size. sigma is found for the target epsilon over all rounds by a
bracketing root search (dp_sigma) over Opacus's RDP (or PRV) accountant of the subsampled Gaussian, at
delta = min(1e-5, n^-1.1) for a client of n examples (below the common bound 1/n) unless --dp_delta is given.
The sampling and the noise come from a generator seeded with 64 bits of the OS's entropy, fresh per client and
round: noise that anyone could regenerate from the run's --seed would protect nothing (--dp_seed makes
it reproducible, for tests only, and says so). The accountant's history (sigma, q, steps of each round a client
trained) is saved with the run; a resumed run keeps its sigma, reports the epsilon of its whole history, and
refuses settings that would exceed the target or change its terms. Fed-SB helps here: noise on R enters W as
B xi A (linear, norm-preserving for orthonormal B, A), while noisy LoRA factors multiply. LoRA-SB's initialisation
gradients see no client's data: without --sb_init_data (a public file) a private run's init examples are the
server's own, taken out of the pool before it is shared out (a run without privacy inits from the pooled data).

Several processes (torchrun --nproc_per_node N fed.py ..., one per GPU): each process trains a contiguous share of
a round's clients; every process then receives every client's state (all_gather) and aggregates them in client
order, so all processes hold the global state that one process would compute. Rank 0 writes the files.
"""
import functools
import math
import os
import secrets
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

import cli
import data
import eval as ev
import fetch
import lora
import lora_sb
import runs
import step
from cli import UserError
from data import DataConfig
from model import Llama, Tokenizer, load_strict
from step import OptimConfig


class Strategy(NamedTuple):
    method: object  # the method file every client runs
    frozen: tuple  # the method's trainable tensors this strategy keeps at their shared init (never sent)
    up: Callable  # parameters a client sends per adapted module and round: f(r, d_in, d_out)
    down: Callable  # parameters the server sends each sampled client per module and round
    setup: Callable  # parameters sent to every client once, before round 1
    residual: bool  # the server also keeps mean(B_k A_k) - mean(B) mean(A), full rank, and sends it down
    exact: bool  # the aggregate equals the mean of the clients' updates (the model they would jointly train)
    paper: Callable  # (up, down) per module as the Fed-SB paper counts them: f(r, d_in, d_out, K clients per round)


def P(r, i, o):
    return r * (i + o)  # a LoRA adapter's parameters: A (r, d_in) and B (d_out, r)


def NONE(r, i, o):
    return 0


# The four strategies: what each client trains and sends, how the server aggregates (always the mean weighted by
# the survivors' examples; FedEx adds the residual), whether that is exact, and what crosses the network in fp32.
STRATEGIES = {
    "sb": Strategy(lora_sb, (), lambda r, i, o: r * r, lambda r, i, o: r * r, P, False, True,
                   lambda r, i, o, K: (r * r, r * r)),  # R; B R A is linear in R
    "fedit": Strategy(lora, (), P, P, NONE, False, False,
                      lambda r, i, o, K: (P(r, i, o), P(r, i, o))),  # A, B: mean(B) mean(A) != mean(B A)
    "ffa": Strategy(lora, ("lora_A",), lambda r, i, o: r * o, lambda r, i, o: r * o, NONE, False, True,
                    lambda r, i, o, K: (P(r, i, o) // 2, P(r, i, o) // 2)),  # B only: A stays the seeded init
    "fedex": Strategy(lora, (), P, lambda r, i, o: P(r, i, o) + o * i, NONE, True, True,
                      lambda r, i, o, K: (P(r, i, o), K * P(r, i, o))),  # A, B, and the residual E goes down
}
FED_METHODS = {k: s.method for k, s in STRATEGIES.items()}  # --method -> the method file (cli.parse_run)


@dataclass
class FedConfig(DataConfig, OptimConfig):
    method: str = "sb"  # the strategy: sb (Fed-SB) | fedit | ffa | fedex (each one's options: --help)
    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"  # a Hugging Face folder or hub id (fetch.py resolves it)
    clients: int = 10  # clients, each with its own shard of the training examples
    rounds: int = 3  # communication rounds
    local_steps: int = 0  # optimizer steps per client and round; 0: one pass over the client's shard
    client_frac: float = 1.0  # the fraction of clients sampled each round (at least one)
    split: str = "iid"  # iid (shuffled equal shards) | contiguous (equal shards in file order) | dirichlet
    dirichlet_field: str = "type"  # the categorical field the Dirichlet split skews (MetaMathQA: type)
    dirichlet_beta: float = 0.5  # Dirichlet concentration: smaller is more skewed
    drop_prob: float = 0.0  # each sampled client fails mid-round with this probability
    dp_epsilon: float = math.inf  # a target epsilon (> 0): DP-SGD per client; inf (the default): no privacy
    dp_delta: float = 0.0  # in (0, 1/n) for clients of n examples; 0 (the default): min(1e-5, n^-1.1) per client
    dp_clip: float = 0.1  # C, the per-example L2 clip (> 0)
    dp_accountant: str = "rdp"  # rdp | prv (Opacus's)
    dp_seed: int = -1  # -1: DP noise and sampling from OS entropy; >= 0: reproducible, which VOIDS the guarantee
    sb_init_data: str = ""  # a public file for LoRA-SB's central init; empty: the pooled training data (private:
    # the server's own init_samples examples, taken out of the pool before it is shared out)
    eval_gsm8k: int = 0  # after the last round, GSM8K accuracy on the first N problems of --test_data; 0: none
    test_data: str = "gsm8k"  # the GSM8K test file of --eval_gsm8k; gsm8k: GSM8K test (fetched)
    seed: int = 0  # shards, client sampling, data order and the method's draws
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    dtype: str = "bfloat16"  # of the frozen base on CUDA (CPU always runs fp32)
    cuda_graph: bool = True  # on CUDA without privacy: each local step as one CUDA graph (train.py's), kept across clients
    out_dir: str = "out/fed"  # runs go to <out_dir>/<run_name>
    run_name: str = ""  # default: the strategy name
    resume: bool = False  # continue <out_dir>/<run_name> after its last completed round
    overwrite: bool = False  # replace the run already in <out_dir>/<run_name> (else an existing run is refused)


class ClientDropped(Exception):
    pass


# -----------------------------------------------------------------------------
# splits, accounting and aggregation

def read_field(path, field):
    """The value of `field` in every row of a json/jsonl data file (the Dirichlet split's categories)."""
    import json
    text = open(path).read()
    rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(l) for l in text.splitlines() if l.strip()]
    if any(field not in r for r in rows):
        raise UserError(f"--split dirichlet needs a field {field!r} in every row of {path} (MetaMathQA has 'type'; "
                        f"GSM8K has none): set --dirichlet_field or use --split iid")
    return [r[field] for r in rows]


def split_clients(n, cfg: FedConfig, labels=None):
    """Client shards (lists of example indices), seeded."""
    g = torch.Generator().manual_seed(cfg.seed)
    if cfg.split == "contiguous":  # the paper's: equal shards in file order
        return [list(range(n))[k * n // cfg.clients:(k + 1) * n // cfg.clients] for k in range(cfg.clients)]
    if cfg.split == "iid":
        perm = torch.randperm(n, generator=g).tolist()
        return [perm[k * n // cfg.clients:(k + 1) * n // cfg.clients] for k in range(cfg.clients)]
    if cfg.split != "dirichlet":
        raise UserError(f"--split must be iid, contiguous or dirichlet, got {cfg.split!r}")
    import numpy as np
    rng = np.random.default_rng(cfg.seed)
    shards = [[] for _ in range(cfg.clients)]
    for c in sorted(set(labels)):  # each class spread over the clients by Dirichlet(beta) proportions
        idx = [i for i, l in enumerate(labels) if l == c]
        rng.shuffle(idx)
        cuts = (np.cumsum(rng.dirichlet([cfg.dirichlet_beta] * cfg.clients)) * len(idx)).astype(int)[:-1]
        for k, part in enumerate(np.split(idx, cuts)):
            shards[k] += part.tolist()
    if min(map(len, shards)) == 0:
        raise UserError("a client got no examples: raise --dirichlet_beta or use fewer --clients")
    return shards


def communication(model, cfg: FedConfig, mcfg):
    """Parameters and bytes per client per round, up and down, and the one-time setup download, as fed.py sends
    them (all fp32, from the strategy's table row and the base model's module shapes); and under "paper", the
    parameters as the Fed-SB paper counts them, so its ratios can be checked."""
    s, K = STRATEGIES[cfg.method], max(1, math.ceil(cfg.client_frac * cfg.clients))
    up = down = setup = paper_up = paper_down = 0
    for name, m in model.named_modules():
        if type(m) is not torch.nn.Linear or name.split(".")[-1] not in mcfg.targets:
            continue
        shape = (mcfg.rank, m.in_features, m.out_features)  # r, d_in, d_out
        up, down, setup = up + s.up(*shape), down + s.down(*shape), setup + s.setup(*shape)
        pu, pd = s.paper(*shape, K)
        paper_up, paper_down = paper_up + pu, paper_down + pd
    return dict(up_params=up, down_params=down, setup_down_params=setup, up_bytes=4 * up, down_bytes=4 * down,
                setup_down_bytes=4 * setup, paper=dict(up_params=paper_up, down_params=paper_down, setup_down_params=0))


def print_communication(comm):
    p, ours, theirs = comm["paper"], "ours (what fed.py sends)", "Fed-SB paper's convention"
    print(f"{'per client':14}{ours:>34}{theirs:>30}")
    print(f"{'':14}{'params':>18}{'bytes':>16}{'params':>30}")
    for label, key in (("up / round", "up"), ("down / round", "down"), ("setup (once)", "setup_down")):
        print(f"{label:14}{comm[key + '_params']:>18,}{comm[key + '_bytes']:>16,}{p[key + '_params']:>30,}")


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class FedExLinear(lora.Linear):
    """lora.Linear plus FedEx-LoRA's accumulated residual E (d_out, d_in) in an fp32 buffer, kept beside the base
    weight rather than folded into it (a bf16 W0 would round E away). The layer is W0 + s B A + E; E x joins the
    adapter's output, which model.adapted_linear adds inside the base GEMM's fp32 accumulator."""

    def delta(self, x):
        return super().delta(x) + F.linear(x, self.fedex_residual)  # E sees x without the adapter's dropout

    def merged_weight(self):
        return super().merged_weight() + self.fedex_residual


def add_fedex_residuals(model):
    """Every lora.Linear becomes a FedExLinear: the same module and tensors, plus a zero residual."""
    for m in model.modules():
        if type(m) is lora.Linear:
            m.__class__ = FedExLinear  # a class change: the module keeps its Parameters, nothing is copied
            m.register_buffer("fedex_residual", torch.zeros(m.out_features, m.in_features, device=m.weight.device))
    return model


def fedex_residuals(model):
    return {n: m.fedex_residual for n, m in model.named_modules() if isinstance(m, FedExLinear)}


def aggregate(model, cfg: FedConfig, states, weights):
    """The new global trainable state from this round's client states (name -> tensor), weights summing to 1."""
    new = {n: sum(w * s[n].float() for s, w in zip(states, weights)) for n in states[0]}
    if STRATEGIES[cfg.method].residual:  # add the part of mean(B_k A_k) that mean(B) mean(A) misses to E, in fp32
        for name, E in fedex_residuals(model).items():
            A, B, dev = f"{name}.lora_A", f"{name}.lora_B", E.device
            mean_BA = sum(w * s[B].to(dev, torch.float32) @ s[A].to(dev, torch.float32)
                          for s, w in zip(states, weights))  # (d_out, d_in)
            E += model.get_submodule(name).scale * (mean_BA - new[B].to(dev) @ new[A].to(dev))
    return new


def load_state(model, state):
    with torch.no_grad():
        for n, p in trainable(model).items():
            p.copy_(state[n])


# -----------------------------------------------------------------------------
# differential privacy

def history_epsilon(history, delta, accountant="rdp"):
    """epsilon at delta of DP-SGD composed over history = [(noise multiplier, sample rate, steps), ...]."""
    steps = {}
    for sigma, q, n in history:  # one entry per (sigma, q), as Opacus's own step() keeps it
        steps[(sigma, q)] = steps.get((sigma, q), 0) + n
    return accountant_epsilon(tuple((sigma, q, n) for (sigma, q), n in steps.items() if n > 0), delta, accountant)


@functools.lru_cache(maxsize=4096)
def accountant_epsilon(history, delta, accountant):
    """Opacus's epsilon (cached: one evaluation can take 0.1 s, and clients of equal shards ask the same)."""
    from opacus.accountants import PRVAccountant, RDPAccountant  # only in private mode
    acc = {"rdp": RDPAccountant, "prv": PRVAccountant}[accountant]()
    acc.history = list(history)
    return acc.get_epsilon(delta=delta) if history else 0.0


def dp_epsilon(sigma, q, steps, delta, accountant="rdp"):
    return history_epsilon([(sigma, q, steps)], delta, accountant)


def dp_sigma(epsilon, q, steps, delta, accountant="rdp"):
    """The smallest noise multiplier whose epsilon is <= the target, to 1e-6 relative. epsilon falls as sigma grows,
    and log epsilon is nearly linear in log sigma, so the bracket shrinks by interpolation (the Illinois variant of
    regula falsi: about 8 accountant evaluations where bisection takes 20, at up to 0.3 s each) with bisection
    wherever an end's epsilon is not finite."""
    f = lambda s: math.log(max(dp_epsilon(s, q, steps, delta, accountant), 1e-300) / epsilon)  # > 0: too little noise
    lo, hi, flo, fhi = 0.1, 1.0, math.inf, f(1.0)
    while fhi > 0:
        lo, hi, flo, fhi = hi, 2 * hi, fhi, f(2 * hi)
        if hi > 1e4:
            raise UserError(f"epsilon {epsilon} is out of reach for q={q:.3g}, {steps} steps")
    kept = 0  # +1: lo was kept last time, -1: hi was
    while hi - lo > 1e-6 * hi:
        x = hi - fhi * (hi - lo) / (fhi - flo) if math.isfinite(flo) and flo > fhi else (lo + hi) / 2
        mid = min(max(x, lo + 1e-3 * (hi - lo)), hi - 1e-3 * (hi - lo))  # strictly inside the bracket
        fm = f(mid)
        if fm > 0:  # too little noise: the root is above mid
            lo, flo = mid, fm
            fhi, kept = (fhi / 2 if kept == -1 else fhi), -1
        else:
            hi, fhi = mid, fm
            flo, kept = (flo / 2 if kept == 1 else flo), 1
    return hi


def default_delta(n):
    """delta for a client of n examples: below 1/n (a delta near 1/n allows releasing a whole record)."""
    return min(1e-5, n ** -1.1)


def check_options(cfg: FedConfig):
    """One clear line for a federated setting that means nothing, before anything is loaded."""
    if cfg.clients < 1 or cfg.rounds < 1 or cfg.local_steps < 0:
        raise UserError(f"--clients and --rounds must be >= 1 and --local_steps >= 0, got {cfg.clients}, "
                        f"{cfg.rounds}, {cfg.local_steps}")
    if not 0 < cfg.client_frac <= 1:
        raise UserError(f"--client_frac must be in (0, 1] (the fraction of clients sampled each round), "
                        f"got {cfg.client_frac}")
    if not 0 <= cfg.drop_prob <= 1:
        raise UserError(f"--drop_prob must be in [0, 1], got {cfg.drop_prob}")
    check_dp_options(cfg)


def check_dp_options(cfg: FedConfig):
    """One clear line for each setting that would train without the privacy it claims (no data is needed)."""
    if not cfg.dp_epsilon > 0:
        raise UserError(f"--dp_epsilon must be > 0, got {cfg.dp_epsilon} (a target epsilon; inf, the default, "
                        f"trains without privacy)")
    if not cfg.dp_clip > 0:
        raise UserError(f"--dp_clip must be > 0, got {cfg.dp_clip} (the per-example gradient clip; 0 trains nothing)")
    if cfg.dp_accountant not in ("rdp", "prv"):
        raise UserError(f"--dp_accountant must be rdp or prv, got {cfg.dp_accountant!r}")
    if not 0 <= cfg.dp_delta < 1:
        raise UserError(f"--dp_delta must be in (0, 1/n) for clients of n examples, got {cfg.dp_delta} "
                        f"(0, the default: min(1e-5, n^-1.1))")
    if math.isfinite(cfg.dp_epsilon):  # private: the accountant must be there before any data or model loads
        try:
            import opacus.accountants  # noqa: F401
        except ImportError:
            raise UserError("--dp_epsilon needs Opacus, whose privacy accountant fed.py uses: pip install "
                            "opacus") from None


def privacy_plan(cfg: FedConfig, shards, steps, saved=None):
    """DP-SGD's settings per client (sample rate q, delta), the noise multiplier and the accountant's history: a new
    run finds sigma for the target epsilon over all rounds; a resumed one (saved: its fed_state.pt) keeps its own
    and refuses settings that would change its guarantee or exceed its target."""
    n = [len(s) for s in shards]
    if cfg.dp_delta and cfg.dp_delta >= 1 / max(n):
        raise UserError(f"--dp_delta must be in (0, 1/n) for clients of n examples, got {cfg.dp_delta} with "
                        f"n up to {max(n)}: use < {1 / max(n):.3g} (or 0, the default: min(1e-5, n^-1.1))")
    q = [min(1.0, cfg.batch_size / nk) for nk in n]
    delta = [cfg.dp_delta or default_delta(nk) for nk in n]
    if saved is None:
        sigma = max(dp_sigma(cfg.dp_epsilon, qk, sk * cfg.rounds, dk, cfg.dp_accountant)
                    for qk, sk, dk in zip(q, steps, delta))  # one sigma that meets the target for every client
        return dict(sigma=sigma, q=q, delta=delta, history=[[] for _ in n], sizes=n)
    check_private_resume(cfg, saved, n)
    plan = dict(saved["dp"], q=q, delta=delta)
    left = max(0, cfg.rounds - saved["round"])
    eps = max(epsilons(plan, cfg, [s * left for s in steps]))
    if eps > cfg.dp_epsilon + 1e-9:  # sigma was found for the saved rounds; more steps cost more epsilon
        old = saved["config"]
        raise UserError(f"resuming to --rounds {cfg.rounds} (--local_steps {cfg.local_steps}) would spend epsilon "
                        f"{eps:.3f} > the target {cfg.dp_epsilon} of this private run: keep --rounds {old['rounds']} "
                        f"(--local_steps {old['local_steps']}) or start a new run")
    return plan


def check_private_resume(cfg: FedConfig, saved, sizes):
    """A resumed private run keeps the terms its guarantee is stated in, and its clients (the history is per client).
    The clip is among them though epsilon does not depend on it at a fixed sigma: one run, one mechanism."""
    old = saved["config"]
    for key in ("dp_epsilon", "dp_delta", "dp_clip", "dp_accountant", "batch_size"):
        if getattr(cfg, key) != old[key]:
            raise UserError(f"--{key} {getattr(cfg, key)} differs from this private run's {old[key]}: its guarantee "
                            f"was stated for {old[key]}; keep it or start a new run")
    if saved["dp"]["sizes"] != sizes:
        raise UserError("the clients' shards differ from this private run's (--clients, --split, --data, --seed, "
                        "--init_samples, --sb_init_data...): its accountant's history is per client; keep its "
                        "settings or start a new run")


def epsilons(dp, cfg: FedConfig, more_steps=None):
    """Each client's epsilon at its delta: its accountant's history, plus more_steps[k] steps still to run."""
    more = more_steps or [0] * len(dp["history"])
    return [history_epsilon([*h, (dp["sigma"], qk, m)], dk, cfg.dp_accountant)
            for h, qk, dk, m in zip(dp["history"], dp["q"], dp["delta"], more)]


def dp_generator(dp_seed, seed):
    """The generator of DP-SGD's Poisson sampling and noise: 64 bits of OS entropy (fresh per client and round) by
    default; --dp_seed >= 0 makes it reproducible (tests), and anyone with the saved config could remove the noise."""
    if dp_seed < 0:
        return torch.Generator().manual_seed(secrets.randbits(64))
    return torch.Generator().manual_seed((dp_seed * 2**32 + seed) % 2**63)


def per_example_grads(model, params, x, y):
    """{name: (N, *shape)}: the gradient of each row's mean target-token loss (one example per row, right-padded).
    One batched forward and backward (book-keeping, as Opacus does for linear layers): every trainable tensor P
    that the forward uses only as a linear layer's weight, F.linear(a, P), gets each row's gradient
    sum_t g_t a_t^T from that layer's input a and output gradient g, which no other row touches (causal attention
    within a row; padding sits after a row's tokens and its targets are ignored, so its g is zero). Rows never mix,
    so this is exact. A trainable tensor used any other way falls back to torch.func (vmap over rows of grad)."""
    for p in params.values():
        p.grad = None  # so that a use the book-keeping missed shows itself below
    seen = _LinearBookkeeping({id(p): n for n, p in params.items()}, x.shape[0])
    with seen:
        logits = model(x)[0]  # (N, T, V)
    if seen.other:  # a trainable tensor not (only) a linear weight: the generic path
        return per_example_grads_vmap(model, params, x, y)
    N, T = y.shape
    tok = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100, reduction="none")  # (N*T,)
    # the rows' mean losses, summed: row i's gradient is its own (one loss over all rows: indexing logits[i] row by
    # row made each row's backward fill and add a zero tensor of all the logits' size, N times)
    loss = (tok.view(N, T).sum(1) / (y != -100).sum(1).clamp(min=1)).sum()  # a row of padding alone: 0
    loss.backward(inputs=list(params.values()))  # the layers' backward fills seen.grads; P.grad stays untouched
    if any(p.grad is not None for p in params.values()):  # a use the book-keeping missed (through P.T, say): its
        for p in params.values():  # rows were summed, unclipped, into P.grad; the generic path instead
            p.grad = None
        return per_example_grads_vmap(model, params, x, y)
    return {n: seen.grads.get(n, torch.zeros((x.shape[0], *p.shape), device=p.device)) for n, p in params.items()}


class _LinearBookkeeping(torch.overrides.TorchFunctionMode):
    """While active, F.linear(a, P) with a trainable P runs as _PerRowLinear, whose backward adds each row's
    gradient of P to self.grads[name]; any other use of a trainable tensor sets self.other."""

    def __init__(self, names, rows):
        super().__init__()
        self.names, self.rows, self.grads, self.other = names, rows, {}, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and id(args[1]) in self.names and not kwargs \
                and (len(args) == 2 or args[2] is None):
            return _PerRowLinear.apply(args[0], args[1], self, self.names[id(args[1])])
        out = func(*args, **kwargs)
        # any other use of a trainable tensor's values, a property that returns a tensor (P.T) included; reading
        # .shape or .dtype is none
        if getattr(func, "__name__", "") != "__get__" or isinstance(out, torch.Tensor):
            flat = torch.utils._pytree.tree_leaves((args, kwargs))
            self.other |= any(isinstance(t, torch.Tensor) and id(t) in self.names for t in flat)
        return out


class _PerRowLinear(torch.autograd.Function):
    """F.linear(a, P) in autocast's dtype, as autograd would run it; its backward returns a's gradient and records
    P's per row (fp32), rather than their sum."""

    @staticmethod
    def forward(ctx, a, P, book, name):
        dev = a.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.promote_types(a.dtype, P.dtype)
        with torch.autocast(dev, enabled=False):
            a_, P_ = a.to(dt), P.to(dt)
            ctx.save_for_backward(a_, P_)
            ctx.book, ctx.name, ctx.a_dtype = book, name, a.dtype
            return F.linear(a_, P_)  # (..., d_out)

    @staticmethod
    def backward(ctx, g):
        a_, P_ = ctx.saved_tensors
        n, grads = ctx.book.rows, ctx.book.grads
        ga = (g.to(P_.dtype) @ P_).to(ctx.a_dtype)  # (..., d_in)
        with torch.autocast(g.device.type, enabled=False):  # the backward runs under the forward's autocast,
            # which would take this einsum in bf16: the per-row gradients are fp32, as the policy's gradients are
            per_row = torch.einsum("ntm,ntk->nmk", g.reshape(n, -1, g.shape[-1]).float(),
                                   a_.reshape(n, -1, a_.shape[-1]).float())  # (N, d_out, d_in)
        grads[ctx.name] = grads[ctx.name] + per_row if ctx.name in grads else per_row  # a weight used twice: summed
        return ga, None, None, None


def dp_micro(model, params, x, y, C, rows):
    """{name: the sum over the rows of x (N <= rows, T) of each row's gradient clipped to norm C, fp32}: the
    gradients under the training's precision policy, the clipping and the sum in fp32 (under autocast the einsum
    would run in bf16). On a GPU, when every trainable tensor is a linear weight, it runs as a CUDA graph
    (graphed_dp_micro): eager, this step is bound by launching its thousands of small kernels (and by the
    book-keeping's Python), not by the GPU."""
    if x.device.type == "cuda":
        return graphed_dp_micro(model, params, x, y, C, rows)
    return clipped_sum(model, params, x, y, C)


def clipped_sum(model, params, x, y, C):
    """dp_micro's eager path: per-example gradients under the policy's autocast, clipped and summed in fp32."""
    with step.autocast(x.device):
        g = per_example_grads(model, params, x, y)  # {name: (N, *shape)} fp32
    return clip_per_example(g, C)


def graphed_dp_micro(model, params, x, y, C, rows, multiple=64):
    """dp_micro as CUDA graphs, one per padded length, kept on the model (sharing one memory pool: they never run
    at once); each reads the model's tensors in place (fed.py's clients load their states into the same
    Parameters). x is right-padded to a multiple of `multiple` tokens (attention is causal: a row's tokens see the
    same keys) and to `rows` rows with rows of padding alone, whose gradient is zero: the clipped sum is the same."""
    graphs = model.__dict__.setdefault("_dp_graphs", {})
    N, T = x.shape
    L = -(-T // multiple) * multiple
    px, py = (F.pad(t, (0, L - T, 0, rows - N), value=v) for t, v in ((x, 0), (y, -100)))  # (rows, L)
    key = (rows, L, C, model.training, tuple(p.data_ptr() for p in params.values()))
    if key not in graphs:
        book = _LinearBookkeeping({id(p): n for n, p in params.items()}, 1)
        with torch.no_grad(), step.autocast(x.device), book:
            model(x[:1])  # which path: a trainable tensor used beyond a linear weight cannot take the graph
        graphs[key] = None if book.other else capture_dp_micro(model, params, px.clone(), py.clone(), C,
                                                                 graphs.setdefault("pool", []))
    if graphs[key] is None:  # the eager path, on the rows as given (torch.func's path has no padding rows)
        return clipped_sum(model, params, x, y, C)
    graph, sx, sy, out = graphs[key]
    sx.copy_(px)
    sy.copy_(py)
    graph.replay()
    return out  # overwritten by the next replay: the caller adds it up first


def capture_dp_micro(model, params, sx, sy, C, pool):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: cuBLAS workspaces
        clipped_sum(model, params, sx, sy, C)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool[0] if pool else None):
        out = clipped_sum(model, params, sx, sy, C)
    pool[:] = [graph.pool()]
    return graph, sx, sy, out


def per_example_grads_vmap(model, params, x, y):
    """per_example_grads by torch.func: vmap over examples of grad (model.adapted_linear takes a vmap-able path
    under it). The general path, one row at a time wherever vmap lacks a batching rule (SDPA's flash backward)."""
    from torch.func import functional_call, grad, vmap

    def loss(p, xi, yi):
        logits = functional_call(model, p, (xi[None],))[0][0].float()  # (1, T, V) -> (T, V)
        return F.cross_entropy(logits, yi, ignore_index=-100, reduction="sum") / (yi != -100).sum().clamp(min=1)
    return vmap(grad(loss), in_dims=(None, 0, 0))({n: p.detach() for n, p in params.items()}, x, y)


def clip_per_example(g, C):
    """Scale each example's gradient (all tensors jointly) to L2 norm <= C; returns the clipped sum. A non-finite
    gradient (an overflow) counts as zero: 0 x inf would make the whole sum NaN, and a NaN model would tell whether
    that example was sampled."""
    norms = torch.sqrt(sum(v.flatten(1).float().pow(2).sum(1) for v in g.values()))  # (N,)
    ok = torch.isfinite(norms)  # (N,)
    factor = torch.where(ok, (C / (norms + 1e-6)).clamp(max=1.0), 0.0)
    return {n: torch.einsum("n,n...->...", factor.to(v.dtype), torch.where(ok.view(-1, *[1] * (v.dim() - 1)), v, 0))
            for n, v in g.items()}


def noisy_mean(summed, sigma, C, expected_batch, gen):
    """(sum of clipped gradients + N(0, (sigma C)^2)) / expected batch: one draw per logical batch, for every tensor
    at once from the CPU generator `gen` (seeded from the OS), then one copy to the device, not one per tensor."""
    sizes = [v.numel() for v in summed.values()]
    z = torch.randn(sum(sizes), generator=gen)  # (total,)
    dev = next(iter(summed.values())).device
    z = z.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else z
    return {n: (v + sigma * C * zi.view(v.shape).to(v.dtype)) / expected_batch
            for (n, v), zi in zip(summed.items(), z.split(sizes))}


# -----------------------------------------------------------------------------
# one client's round

def client_step(model, cfg: FedConfig, params, public):
    """(AdamW, step, graphed) of local training, made once per model and kept for every client and round: on CUDA
    (without privacy) the step is train.py's CUDA graph, whose capture each client would otherwise pay again, and
    whose launches of thousands of kernels an eager step pays at every step. The graph reads the very tensors that
    load_state copies each client's start into (and FedEx's residuals, updated in place). Each client starts from a
    fresh AdamW: the kept one's state, step count included, is zeroed in place, which is what a fresh one holds."""
    dev = next(iter(params.values())).device
    graphed = public and cfg.cuda_graph and dev.type == "cuda" and STRATEGIES[cfg.method].method.CUDA_GRAPH
    key = (graphed, cfg.beta1, cfg.beta2, cfg.weight_decay, cfg.grad_clip, [p.data_ptr() for p in params.values()])
    if getattr(model, "_fed_step", (None,))[0] != key:  # made again only if what it was made from changed
        opt = step.make_optimizer(list(params.values()), cfg, dev, graphed)
        model._fed_step = key, opt, step.make_step(model, opt, list(params.values()), cfg.grad_clip, graphed)
    _, opt, train_step = model._fed_step
    with torch.no_grad():
        for state in opt.state.values():
            for v in state.values():
                v.zero_()
    return opt, train_step, graphed


def local_train(model, cfg: FedConfig, seqs, shard, steps, seed, pad_id, dp=None, fail_at=None):
    """Train the model's trainable tensors on one shard (indices into seqs, the tokenized examples) from a fresh
    AdamW; returns them (CPU copies). Without privacy each step is train.py's (step.make_step: packed micro-batches,
    the mean over the step's target tokens, clipping); dp = (sigma, q): DP-SGD's step instead."""
    params = trainable(model)
    dev = next(iter(params.values())).device
    opt, train_step, graphed = client_step(model, cfg, params, dp is None)
    gen = dp_generator(cfg.dp_seed, seed) if dp else None
    micro = cfg.micro_batch_size or cfg.batch_size
    model.train()
    for it in range(steps):
        if it == fail_at:
            raise ClientDropped
        step.set_lr(opt, step.get_lr(it, cfg, steps))
        if dp is None:
            idxs = [shard[i] for i in data.example_order(len(shard), seed, it * cfg.batch_size, cfg.batch_size)]
            train_step(*data.micro_batches(seqs, idxs, micro, cfg.max_len, pad_id, graphed)[:2])
            continue
        # DP-SGD: Poisson sampling, per-example clipping, one noise draw for the logical batch
        sigma, q = dp
        chosen = [shard[i] for i in (torch.rand(len(shard), generator=gen) < q).nonzero().flatten().tolist()]
        summed = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        for j in range(0, len(chosen), micro):  # one example per row (no packing): per-example gradients
            rows = [data.pack([seqs[i]], cfg.max_len, pad_id) for i in chosen[j:j + micro]]
            T = max(x.shape[1] for x, _, _ in rows)
            x = torch.cat([F.pad(x, (0, T - x.shape[1]), value=pad_id) for x, _, _ in rows]).to(dev)  # (N, T)
            y = torch.cat([F.pad(y, (0, T - y.shape[1]), value=-100) for _, y, _ in rows]).to(dev)  # (N, T)
            for n, v in dp_micro(model, params, x, y, cfg.dp_clip, micro).items():
                summed[n] += v.float()
        for n, v in noisy_mean(summed, sigma, cfg.dp_clip, q * len(shard), gen).items():
            params[n].grad = v.to(params[n].dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {n: p.detach().to("cpu", copy=True) for n, p in params.items()}


# -----------------------------------------------------------------------------

def main(argv=None, clients=None):
    # set-up: the config (a resumed run's own, then this command line), processes, device, files
    argv = sys.argv[1:] if argv is None else argv
    if cli.wants_help(argv):
        files = dict.fromkeys(s.method for s in STRATEGIES.values())  # each method file once
        return cli.print_help(__doc__, [("federated", FedConfig), ("data", DataConfig),
                                        ("optimizer (each client's)", OptimConfig)] +
                              [(f"{m.__name__}.py options (--method "
                                f"{', '.join(k for k, s in STRATEGIES.items() if s.method is m)})", m.Config)
                               for m in files])
    started = time.time()
    cfg, mcfg = cli.parse_run(argv, FedConfig, FED_METHODS)
    run_dir = os.path.join(cfg.out_dir, cfg.run_name or cfg.method)
    state_path = os.path.join(run_dir, "fed_state.pt")
    runs.prepare_run_dir(run_dir, cfg.resume, cfg.overwrite)  # an existing run is touched only when asked
    saved = runs.load_checkpoint(run_dir, "fed_state.pt") if cfg.resume else None
    if saved is not None:
        cfg, mcfg = cli.parse_run(argv, FedConfig, FED_METHODS,  # the run's settings, then this command line
                                  dict(train=saved["config"], method_config=saved["method_config"]))
    if saved is not None and saved["dp"] is None and math.isfinite(cfg.dp_epsilon):
        raise UserError("this run trained without privacy: a private run must start anew (a new --run_name)")
    check_options(cfg)
    data.check(cfg)
    step.check(cfg, lr_given="lr" in dict(cli.pairs(argv)))
    strategy = STRATEGIES[cfg.method]
    method = strategy.method
    if method.GRADIENT_INIT and mcfg.init_samples < 1:
        raise UserError(f"--init_samples must be >= 1 (the examples whose gradient initialises {cfg.method})")
    private = cfg.dp_epsilon < math.inf
    distributed, rank, world, device = step.init_distributed(cli.device(cfg.device))
    dtype = getattr(torch, cfg.dtype) if device.type == "cuda" else torch.float32
    resolve_defaults(cfg, device)
    torch.manual_seed(cfg.seed)
    with step.rank0_first(distributed, rank):  # downloads into the cache, once
        model_path, data_path = fetch.resolve_model(cfg.model), fetch.resolve_data(cfg.data, "train")
        test_path = fetch.resolve_data(cfg.test_data, "test") if cfg.eval_gsm8k else ""
    if test_path and not os.path.isfile(test_path):  # found now, not after the rounds
        raise UserError(f"--test_data {test_path}: file not found")
    runs.check_method(method, mcfg, model_path)  # its layers, on a weightless copy of the model

    # data: train.py's held-out split, then client shards of the rest
    tok = Tokenizer.from_pretrained(model_path)
    seqs, val, shards, steps, own = client_data(cfg, tok, data_path, mcfg)
    val_batches = data.eval_batches(val, cfg.micro_batch_size or cfg.batch_size, cfg.max_len, tok.pad_id)
    dp = None  # privacy_plan's errors come before the model loads
    if private or (saved is not None and saved["dp"] is not None):
        dp = privacy_plan(cfg, shards, steps, saved)

    # the model and the global adapter: a gradient init (LoRA-SB) is computed once, centrally, and shared
    model = Llama.from_pretrained(model_path, device=device, dtype=dtype)
    base_loss = step.evaluate(model, val_batches) if saved is None else None
    comm = communication(model, cfg, mcfg)  # from the base model's module shapes
    if saved is None:
        init_seqs = [seqs[i] for i in own] if own else seqs if not cfg.sb_init_data else data.tokenize(
            data.load_examples(cfg.sb_init_data), tok, cfg.template, cfg.max_len)[0]
        # lr_1, LoRA-SB's init step: train.py's first step over the pooled data, not a client's (docstring), even
        # when a private run inits from the server's own examples
        step.init_method(model, method, mcfg, init_seqs, cfg, tok.pad_id,
                         step.get_lr(0, cfg, math.ceil(len(seqs) / cfg.batch_size)), rank, world)
    else:  # the layers only: the saved state fills them
        method.apply(model, mcfg, init=False)
    for name, p in model.named_parameters():  # what the strategy keeps at its shared init (FFA-LoRA: A)
        if name.rsplit(".", 1)[-1] in strategy.frozen:
            p.requires_grad_(False)
    if strategy.residual:  # FedEx: the residuals live beside the base weights, which never change
        add_fedex_residuals(model)
    if saved is not None:  # the global state after the last completed round (and FedEx's residuals)
        method.load_adapter_state_dict(model, saved["adapter"])
        load_strict(fedex_residuals(model), saved["residual"])
    global_state = {n: p.detach().to("cpu", copy=True) for n, p in trainable(model).items()}
    if dp:
        print_privacy(dp, cfg, saved, steps)
    if rank == 0:  # the folder is made (and --overwrite clears the old run) only when the run has started
        runs.start_run_dir(run_dir, cfg.overwrite)

    # the rounds: sampled clients train from the global state; the survivors' states are aggregated
    log = saved["log"] if saved else [dict(round=0, val_loss=base_loss, base_model=True)]
    totals = saved["totals"] if saved else dict(up_bytes=0, down_bytes=comm["setup_down_bytes"] * cfg.clients,
                                                up_params=0, down_params=comm["setup_down_params"] * cfg.clients)
    for rnd in range(saved["round"] if saved else 0, cfg.rounds):
        t0 = time.time()
        g = torch.Generator().manual_seed(cfg.seed * 7919 + rnd)
        n_pick = max(1, math.ceil(cfg.client_frac * cfg.clients))
        picked = sorted(torch.randperm(cfg.clients, generator=g)[:n_pick].tolist())
        fails = {k: int(torch.randint(steps[k], (1,), generator=g)) for k in picked
                 if float(torch.rand(1, generator=g)) < cfg.drop_prob}
        if clients is not None:  # elsewhere: fed_flower.py sends the round to the clients' machines
            done = clients(rnd, picked, fails, global_state, model, dp)
        else:
            done = []  # (client, its trained state or None if it dropped out), this process's share of the clients
            for k in picked[rank * len(picked) // world:(rank + 1) * len(picked) // world]:
                load_state(model, global_state)  # every client starts from the same global adapter
                try:
                    done.append((k, local_train(model, cfg, seqs, shards[k], steps[k], client_seed(cfg, rnd, k),
                                                tok.pad_id, dp and (dp["sigma"], dp["q"][k]), fails.get(k))))
                except ClientDropped:
                    done.append((k, None))
        if distributed:  # every process gets every client's state, in the order of `picked` (CPU tensors, pickled)
            parts = [None] * world
            dist.all_gather_object(parts, done)
            done = [d for part in parts for d in part]
        states, sizes = [], []
        for k, state in done:
            if dp:  # the steps it ran, counted even when it dropped out and sent nothing (conservative)
                dp["history"][k].append((dp["sigma"], dp["q"][k], fails.get(k, steps[k])))
            if state is None:
                print(f"round {rnd + 1}: client {k} dropped out")
            else:
                states.append(state)
                sizes.append(len(shards[k]))
        if states:  # survivors only, re-weighted by their examples
            global_state = {n: v.cpu() for n, v in aggregate(model, cfg, states, [s / sum(sizes) for s in sizes]).items()}
        load_state(model, global_state)
        up, down = comm["up_params"] * len(states), comm["down_params"] * len(picked)
        totals = dict(up_params=totals["up_params"] + up, down_params=totals["down_params"] + down,
                      up_bytes=totals["up_bytes"] + comm["up_bytes"] * len(states),
                      down_bytes=totals["down_bytes"] + comm["down_bytes"] * len(picked))
        log.append(dict(round=rnd + 1, clients=picked, survivors=len(states), val_loss=step.evaluate(model, val_batches),
                        up_params=up, down_params=down, seconds=round(time.time() - t0, 2)))
        print(f"round {rnd + 1}/{cfg.rounds}: {len(states)}/{len(picked)} clients, held-out loss "
              f"{log[-1]['val_loss']:.4f}, {up:,} parameters up, {down:,} down")
        if rank == 0:
            residual = {n: E.cpu() for n, E in fedex_residuals(model).items()}
            runs.atomic_save(dict(round=rnd + 1, adapter=method.adapter_state_dict(model), residual=residual,
                                  dp=dp and dict(sigma=dp["sigma"], history=dp["history"], sizes=dp["sizes"]),
                                  log=log, totals=totals, config=asdict(cfg), method_config=asdict(mcfg),
                                  wall_s=(saved or {}).get("wall_s", 0.0) + time.time() - started),
                             state_path, torch.save)

    # the end: rank 0 alone scores the global model as trained (adapters unmerged, the training's precision)
    if distributed and not step.finish_distributed():
        return None
    privacy = dp and dict(epsilon=max(epsilons(dp, cfg)), delta=max(dp["delta"]), target_epsilon=cfg.dp_epsilon,
                          noise_multiplier=dp["sigma"], clip=cfg.dp_clip, accountant=cfg.dp_accountant,
                          dp_seed=cfg.dp_seed, void=cfg.dp_seed >= 0,  # reproducible noise: no guarantee
                          init=None if not method.GRADIENT_INIT else cfg.sb_init_data or
                          f"the server's own {len(own)} examples, in no client's shard")
    summary = dict(method=cfg.method, rank=mcfg.rank, clients=cfg.clients, rounds=cfg.rounds, split=cfg.split,
                   per_client_per_round=comm, total=totals, final_val_loss=log[-1]["val_loss"], dp=privacy, log=log)
    model.__dict__.pop("_fed_step", None)  # the kept AdamW, gradients and graph pool: not needed to score
    if cfg.eval_gsm8k:
        summary["gsm8k"] = ev.score(model, tok, test_path, cfg.eval_gsm8k, cfg.template)
    # the run's wall time, start-up included; a resumed run adds its parts up to their last saved round (what a cut
    # part did after it is redone, and counted once)
    summary["wall_s"] = (saved or {}).get("wall_s", 0.0) + time.time() - started  # unrounded: the parts add up
    runs.save_json(summary, os.path.join(run_dir, "summary.json"))
    print_communication(comm)
    print(f"total over {cfg.rounds} rounds, all clients: {totals['up_bytes'] + totals['down_bytes']:,} bytes "
          f"({totals['up_params']:,} parameters up, {totals['down_params']:,} down); final held-out loss "
          f"{summary['final_val_loss']:.4f}" + (f"; GSM8K {summary['gsm8k']['accuracy']:.4f}" if cfg.eval_gsm8k else ""))
    if privacy:
        print(f"privacy per client: epsilon {privacy['epsilon']:.4f} spent (target {cfg.dp_epsilon}) at delta "
              f"{privacy['delta']:.2e} ({cfg.dp_accountant}; noise multiplier {dp['sigma']:.4f}, clip {cfg.dp_clip})")
    return summary


def client_data(cfg, tok, data_path, mcfg):
    """(training sequences, held-out sequences, client shards, local steps per client, the server's own examples):
    train.py's held-out split, then the seeded shards of the rest. A private gradient init without --sb_init_data
    takes its init_samples examples out of the pool first: the server's own, in no client's shard, so no client's
    data enters the init (the examples a run without privacy would init from). The server and every client compute
    the same ones from the same file."""
    train_ex, val_ex, train_idx = data.splits(cfg, data_path)
    labels = None
    if cfg.split == "dirichlet":
        labels = read_field(data_path, cfg.dirichlet_field)
        labels = [labels[i] for i in train_idx]
    seqs, _ = data.tokenize(train_ex, tok, cfg.template, cfg.max_len)  # [(ids, n_prompt)]
    val, _ = data.tokenize(val_ex, tok, cfg.template, cfg.max_len)
    own = server_examples(cfg, mcfg, len(seqs))
    held = set(own)
    pool = [i for i in range(len(seqs)) if i not in held]  # what the clients share out
    if own and len(pool) < cfg.clients:
        raise UserError(f"a private {cfg.method} run keeps --init_samples {mcfg.init_samples} of the {len(seqs)} "
                        f"training examples as the server's own (its init sees no client's data), which leaves "
                        f"{len(pool)} for {cfg.clients} clients: lower --init_samples or pass --sb_init_data "
                        f"PUBLIC.jsonl")
    if len(pool) < cfg.clients:
        raise UserError(f"{len(pool)} training examples cannot make {cfg.clients} client shards: use fewer --clients")
    shards = [[pool[i] for i in s] for s in split_clients(len(pool), cfg, labels and [labels[i] for i in pool])]
    return seqs, val, shards, [cfg.local_steps or math.ceil(len(s) / cfg.batch_size) for s in shards], own


def server_examples(cfg, mcfg, n):
    """The indices of the server's own init examples: a private run's gradient init (LoRA-SB's) without a public
    --sb_init_data takes the init_samples examples its init would read, out of the clients' pool; else none."""
    if math.isfinite(cfg.dp_epsilon) and STRATEGIES[cfg.method].method.GRADIENT_INIT and not cfg.sb_init_data:
        return data.example_order(n, cfg.seed, 0, mcfg.init_samples)
    return []


def client_seed(cfg, rnd, k):
    """Client k's seed in round rnd (its data order): a function of the run's seed, so any machine can compute it."""
    return cfg.seed + 7919 * (rnd * cfg.clients + k)


def resolve_defaults(cfg, device):
    """The settings left to their defaults (lr, val_size), as the server and every client resolve them."""
    cfg.lr = cfg.lr or STRATEGIES[cfg.method].method.DEFAULT_LR
    cfg.val_size = (32 if device.type == "cpu" else 256) if cfg.val_size < 0 else cfg.val_size


def client_round(argv, k, rnd, global_state, setup=None, residual=None, dp_k=None, fail_at=None):
    """Client k's round in a process of its own (fed_flower.py's ClientApp runs it on its machine): the base model
    with the strategy's layers, the global adapter (plus what the server sends once, `setup`: LoRA-SB's B and A,
    and FedEx's residuals), then local_train on the client's shard, exactly as main()'s in-process clients do.
    Returns its trainable state, or None if it dropped out (fail_at, the simulator's failure injection)."""
    cfg, mcfg = cli.parse_run(argv, FedConfig, FED_METHODS)
    device = cli.device(cfg.device)
    resolve_defaults(cfg, device)
    strategy = STRATEGIES[cfg.method]
    dtype = getattr(torch, cfg.dtype) if device.type == "cuda" else torch.float32
    model_path, data_path = fetch.resolve_model(cfg.model), fetch.resolve_data(cfg.data, "train")
    tok = Tokenizer.from_pretrained(model_path)
    seqs, _, shards, steps, _ = client_data(cfg, tok, data_path, mcfg)
    model = Llama.from_pretrained(model_path, device=device, dtype=dtype)
    strategy.method.apply(model, mcfg, init=False)  # the layers; their tensors come from the server (or the seed)
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] in strategy.frozen:
            p.requires_grad_(False)
    if strategy.residual:
        add_fedex_residuals(model)
        load_strict(fedex_residuals(model), residual)
    if setup:
        strategy.method.load_adapter_state_dict(model, {**setup, **global_state})
    load_state(model, global_state)
    try:
        return local_train(model, cfg, seqs, shards[k], steps[k], client_seed(cfg, rnd, k), tok.pad_id, dp_k, fail_at)
    except ClientDropped:
        return None
    finally:  # the kept step refers to the model: without this the model, its graph and AdamW outlive the round
        model.__dict__.pop("_fed_step", None)


def print_privacy(dp, cfg, saved, steps):
    ran = saved["round"] if saved else 0
    left = max(0, cfg.rounds - ran)
    print(f"DP-SGD: noise multiplier {dp['sigma']:.4f}" + (" (the run's own)" if saved else "") + f", clip "
          f"{cfg.dp_clip}; per client at delta <= {max(dp['delta']):.2e} ({cfg.dp_accountant}): epsilon "
          f"{max(epsilons(dp, cfg)):.4f} spent in {ran} rounds, <= "
          f"{max(epsilons(dp, cfg, [s * left for s in steps])):.4f} after all {cfg.rounds}")
    if cfg.dp_seed >= 0:
        print(f"warning: --dp_seed {cfg.dp_seed} makes the DP noise reproducible from the saved settings: the "
              f"privacy guarantee is void (for tests only)")
    if STRATEGIES[cfg.method].method.GRADIENT_INIT and cfg.sb_init_data:
        print(f"note: LoRA-SB's initialisation gradients come from --sb_init_data {cfg.sb_init_data}, taken to be "
              f"public")
    elif STRATEGIES[cfg.method].method.GRADIENT_INIT:
        print("note: LoRA-SB's initialisation gradients come from the server's own examples, held out of every "
              "client's shard: no client's data enters them, but they are a noise-free start the other strategies "
              "do not get")


if __name__ == "__main__":
    cli.run(main, "--micro_batch_size", "--resume goes on after the run's last finished round")
