"""
The README's results: every method fine-tuned the same way, scored the same way, as one table and one figure.

    python results.py --model PATH --data train.jsonl --test_data test.jsonl [--methods full,lora,...]

Each run is `python train.py --method M` at the method's defaults (one epoch of GSM8K train minus 256 held-out
examples, batch 16, seed 0, max_len 512, cosine schedule, 3% warm-up), evaluated every 50 steps on the held-out
examples and at the end on GSM8K test with eval.py's protocol (all problems on CUDA). DyLoRA is scored at ranks
1, 2, 4, 8, 16 from its one run. Runs already finished in --out_dir are read, not redone, and a run cut off is
resumed from its last checkpoint (started again if it saved none), so the command can be split across sessions
and re-run to finish. Writes <out_dir>/results.md (the table), results.json and
<out_dir>/loss.png (held-out loss against step; needs matplotlib). `--merged_check 1` (CUDA) adds, per run, the
held-out loss and GSM8K accuracy of the model as trained against the same adapter merged into a bf16 base.
"""
import functools
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass

import cli
import eval as ev
from cli import UserError

RUNS = {  # name: train.py flags beyond the shared ones (each method's own defaults otherwise)
    "full": ["--method", "full"],
    "lora": ["--method", "lora"],
    "xs": ["--method", "xs"],
    "sb": ["--method", "sb"],
    "ga": ["--method", "ga"],
    "bone": ["--method", "bone"],
    "bone-shared": ["--method", "bone", "--bone_variant", "shared"],
    "dylora": ["--method", "dylora"],
}
MAIN = list(RUNS)  # the default --methods: each method (and Bone's two forms) at its own defaults
RUNS.update({  # claim 1's figure (held-out loss against trainable parameters): ranks and block sizes around those
    **{f"lora-r{r}": ["--method", "lora", "--rank", str(r), "--alpha", str(2 * r)] for r in (1, 2, 4, 8, 64)},
    "dylora-nf": ["--method", "dylora", "--dylora_frozen", "false"],  # claim 4: every component <= b trains
    **{f"{m}-r{r}": ["--method", m, "--rank", str(r)] for m in ("xs", "sb") for r in (16, 128, 192)},  # 192: k_proj
    "bone-b32": ["--method", "bone", "--block_size", "32"],
})
DYLORA_RANKS = "1,2,4,8,16"  # the ranks a run of a method with NESTED_RANKS is scored at
FED_RUNS = {  # claim 5: fed.py strategies at several ranks (Fed-SB's R is r x r: its ranks run higher)
    **{f"fed-sb-r{r}": ["--method", "sb", "--rank", str(r)] for r in (32, 64, 128)},
    **{f"fed-{m}-r{r}": ["--method", m, "--rank", str(r)] for m in ("fedit", "ffa", "fedex") for r in (4, 16, 32)},
}
FED_LR = {"sb": "sb", "fedit": "lora", "ffa": "lora", "fedex": "lora"}  # strategy -> the centralised sweep that
# centres its own lr sweep (fed_sweep_run: at the middle rank of its runs)
FED_SWEPT = "the fed sweep (seed 0)"  # the lr_from of the sweep's own runs


@dataclass
class ResultsConfig:  # any other --key=value is passed on to every train.py run
    model: str = ""  # the base model: a Hugging Face folder (required)
    data: str = ""  # GSM8K train.jsonl (required)
    test_data: str = ""  # GSM8K test.jsonl (required)
    out_dir: str = "out/results"  # one run folder per method, plus results.md, results.json and loss.png
    methods: str = ",".join(MAIN)  # the runs to do or read, comma-separated (RUNS also has rank/block variants)
    figure: str = ""  # where the held-out loss figure goes; empty: <out_dir>/loss.png
    merged_check: bool = False  # CUDA: also score each run's adapter merged into a bf16 base (the precision table)
    stage: str = "table"  # table (one run per method) | sweep (lr grid, seed 0) | seeds (the chosen lr, --seeds) |
    # fed (claim 5: --fed_runs x --dp_epsilons x --seeds, fed.py runs) |
    # report (RESULTS.md and its figures from --results_dir alone, no run)
    report: bool = False  # the same as --stage report
    results_dir: str = "results/evidence"  # each finished sweep/seeds run's record (small JSON, committed)
    merged_json: str = "results/precision_gpu.json"  # claim 6 in the report: --merged_check's runs (README, Precision)
    lr_factors: tuple = ("0.25", "1", "4", "16")  # the sweep: each method's DEFAULT_LR times these (the defaults are
    # the papers' 7B settings; a small model often wants more)
    seeds: tuple = ("1", "2", "3")  # the seeds run at each method's chosen lr (and of each --stage fed run): not 0,
    # whose sweep run chose the lr (reusing it would favour each method by its luckiest seed)
    fed_runs: str = ",".join(FED_RUNS)  # --stage fed: the federated runs (FED_RUNS), comma-separated
    dp_epsilons: tuple = ("inf", "1", "3", "7.5")  # --stage fed: each run without privacy (inf) and at these epsilons
    # (one epsilon's runs after another, in this order)
    fed_dp_sweep: str = "3"  # --stage fed: the epsilon at which each strategy's lr for its private runs is swept
    # (seed 0, at the rank of its sweep without privacy): DP noise wants another lr than the one without
    fed_dp_lr_factors: tuple = ("0.0625", "0.25", "1")  # that sweep's grid: the lr chosen without privacy times
    # these, then past an edge (--lr_extend); Adam turns the noise into steps of about lr each, so they start lower
    fed_lr_factors: tuple = ("0.25", "1", "4")  # --stage fed: each strategy's lr sweep (fed_sweep_run, seed 0, no
    # privacy): the lr its method's centralised sweep chose (FED_LR) times these, then past an edge (--lr_extend)
    lr_extend: int = 3  # sweep: while the best lr is at the grid's edge, try this many more beyond it (same ratio)
    jobs: int = 1  # sweep, seeds, fed: runs at once, each its own process (a small model leaves a GPU idle between
    # kernels; >1 shares it, so the records' train times are then not comparable)


def train(out_dir, name, argv):
    """`python train.py argv` as run `name` in out_dir, in its own process (its peak memory and CUDA state are its
    own). It checkpoints every 200 steps (train.py's default), so a run cut off (a device call's end) is resumed
    from its last checkpoint; one cut off before any is started again."""
    out = os.path.join(out_dir, name)
    argv = argv + ["--out_dir", out_dir, "--run_name", name, "--log_every", "10"]
    if os.path.isfile(os.path.join(out, "ckpt.pt")):
        argv.append("--resume")
    elif os.path.isdir(out) and os.listdir(out):
        argv.append("--overwrite")
    run_script("train.py", name, argv)


def run_script(script, name, argv):
    """`python <script> argv` (train.py or fed.py) in its own process; its stderr passes through, and a failure
    becomes one line with the run's own last line (e.g. train.py's "training stopped")."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), script)
    proc = subprocess.run([sys.executable, path] + argv, stderr=subprocess.PIPE, text=True)
    sys.stderr.write(proc.stderr)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or [""])[-1]
        raise UserError(f"the {name} run failed (exit {proc.returncode}: {last[:300]}); its output is above")


def run(name, args, extra):
    """One train.py run in its own process (its peak memory and CUDA state are its own), or its saved result."""
    import runs
    out = os.path.join(args.out_dir, name)
    done = os.path.join(out, "result.json")
    if os.path.isfile(done):
        return json.load(open(done))
    if not os.path.isfile(os.path.join(out, "summary.json")):  # else trained and scored: not again
        train(args.out_dir, name, RUNS[name] + ["--model", args.model, "--data", args.data, "--test_data",
                                                args.test_data, "--eval_every", "50"] + extra)
    r = json.load(open(os.path.join(out, "summary.json")))
    cfg = json.load(open(os.path.join(out, "config.json")))
    res = dict(name=name, lr=cfg["train"]["lr"], rank=cfg["method_config"].get("rank"), steps=r["steps"],
               trainable=r["trainable_params"], init_s=r["init_s"], train_s=r["train_s"], tok_s=r["tok_s"],
               peak_gib=r["peak_gib"], val_loss=r["val_loss"], acc=r["gsm8k"]["accuracy"],
               invalid=r["gsm8k"]["invalid_rate"], n=r["gsm8k"]["n"])
    if runs.METHODS[cfg["train"]["method"]].NESTED_RANKS:  # one run, scored at every rank
        res["by_rank"] = {s["rank"]: (s["accuracy"], s["invalid_rate"]) for s in ev.main(
            ["--model", args.model, "--adapter", out, "--data", args.test_data, "--ranks", DYLORA_RANKS])}
    json.dump(res, open(done, "w"))
    return res


# -----------------------------------------------------------------------------
# the evidence: a learning-rate sweep on the held-out loss (never the test set), then seeds at the chosen lr

def record(out_dir, rname, name, model_path=""):
    """What a finished run contributes to the evidence: settings, held-out loss curve and end, cost, GSM8K; and for
    a method usable at several ranks (DyLoRA), the held-out loss at each rank of DYLORA_RANKS (claim 4)."""
    import runs
    s = json.load(open(os.path.join(out_dir, rname, "summary.json")))
    cfg = json.load(open(os.path.join(out_dir, rname, "config.json")))
    log = [json.loads(l) for l in open(os.path.join(out_dir, rname, "log.jsonl"))]
    curve = [(l["step"], l["val_loss"]) for l in log if l.get("val_loss") is not None and not l.get("base_model")]
    g = s.get("gsm8k") or {}
    rec = dict(name=name, method=cfg["train"]["method"], lr=cfg["train"]["lr"], seed=cfg["train"]["seed"],
               rank=cfg["method_config"].get("rank"), epochs=cfg["train"]["epochs"], trainable=s["trainable_params"],
               steps=s["steps"], init_s=s["init_s"], train_s=s["train_s"], peak_gib=s["peak_gib"],
               val_loss=s["val_loss"], curve=curve, acc=g.get("accuracy"), invalid=g.get("invalid_rate"), n=g.get("n"),
               train_curve=[(l["step"], l["loss"]) for l in log if l.get("loss") is not None])
    if runs.METHODS[rec["method"]].NESTED_RANKS and model_path:
        rec["val_loss_by_rank"] = nested_val_losses(os.path.join(out_dir, rname), model_path, cfg["train"])
    return rec


def nested_val_losses(run_dir, model_path, train_cfg):
    """{rank: held-out loss} of one run of a NESTED_RANKS method at each rank of DYLORA_RANKS up to its own, on the
    run's own held-out split (the adapter re-applied at each rank on the untouched base, as eval.py --ranks does)."""
    import torch
    import torch.nn as nn
    import data
    import fetch
    import runs
    import step
    from model import Llama, Tokenizer
    cfg = cli.from_dict(data.DataConfig, train_cfg)
    tok = Tokenizer.from_pretrained(model_path)
    _, val_ex, _ = data.splits(cfg, fetch.resolve_data(train_cfg["data"], "train"))
    val, _ = data.tokenize(val_ex, tok, cfg.template, cfg.max_len)
    batches = data.eval_batches(val, 16, cfg.max_len, tok.pad_id)
    device = cli.device(train_cfg["device"])
    method, mcfg, sd, meta = runs.load_adapter(run_dir)
    model = Llama.from_pretrained(model_path, device=device, dtype=torch.bfloat16 if device.type == "cuda" else
                                  torch.float32, base_bits=meta.get("base_bits", 16))
    base = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    out = {}
    for b in (int(r) for r in DYLORA_RANKS.split(",")):
        if b > mcfg.rank:
            continue
        mcfg.eval_rank = b
        method.apply(model, mcfg, init=False)
        method.load_adapter_state_dict(model, sd)
        out[b] = step.evaluate(model, batches)
        for n, m in base.items():  # the untouched base layers back, for the next rank
            parent, _, child = n.rpartition(".")
            setattr(model.get_submodule(parent), child, m)
    return out


def evidence_run(stage, name, lr, seed, args, extra):
    """One sweep or seeds run, or its committed record; the record is written to results_dir/stage/."""
    rname = f"{name}_lr{lr:g}_s{seed}"
    path = os.path.join(args.results_dir, stage, rname + ".json")
    if os.path.isfile(path):
        return same_flags(json.load(open(path)), path, extra)
    test = "" if stage == "sweep" else args.test_data  # the lr is chosen on the held-out loss alone
    failed = None
    runs_dir = flagged(args.out_dir, stage, extra)
    if not os.path.isfile(os.path.join(runs_dir, rname, "summary.json")):  # else finished: record it
        not_stopped(rname)
        try:
            train(runs_dir, rname, RUNS[name] + [
                "--model", args.model, "--data", args.data, "--test_data", test, "--lr", f"{lr:g}", "--seed",
                str(seed), "--eval_every", "25"] + extra)
        except UserError as e:
            if stage != "sweep" or "training stopped" not in str(e):
                raise
            failed = str(e)  # a sweep's large lr may diverge (train.py stops it): a result, not an error
    if failed:
        rec = dict(name=name, method=RUNS[name][1], lr=lr, seed=seed, val_loss=None, diverged=True)
    else:
        rec = record(runs_dir, rname, name, args.model)
    rec["flags"], rec["jobs"] = extra, AT_ONCE[0]  # jobs: runs sharing the GPU meanwhile (at most), for its times
    write_record(rec, path)
    return rec


def lr_grid(centre, factors):
    """The sweep's lrs, rounded as the names their records are filed under (:g)."""
    return sorted(float(f"{centre * f:.6g}") for f in factors)


def sweep(name, default_lr, factors, args, extra, run=None):
    """The lr grid (default_lr times each factor), then, while the lowest held-out loss sits at the grid's top or
    bottom edge, one more lr beyond that edge at the grid's own ratio (at most --lr_extend times): a small model
    often wants a larger lr than the papers' 7B settings, and an edge is no optimum. A run that diverged counts as
    worse than any finished one, so the grid never extends past a divergence. `run(lr)` makes or reads one run
    (default: train.py's, seed 0; claim 5's sweeps pass fed.py's)."""
    run = run or (lambda lr: evidence_run("sweep", name, lr, 0, args, extra))
    lrs = lr_grid(default_lr, factors)
    recs = [run(lr) for lr in lrs]
    ratio = lrs[-1] / lrs[-2] if len(lrs) > 1 else 4.0
    for _ in range(args.lr_extend):
        done = [r for r in recs if r["val_loss"] is not None]
        if not done:
            break
        best = min(done, key=lambda r: r["val_loss"])["lr"]
        top, bottom = max(lrs), min(lrs)
        if best == top and not any(r["lr"] > best and r["val_loss"] is None for r in recs):
            lr = top * ratio
        elif best == bottom and len(lrs) > 1:
            lr = bottom / ratio
        else:
            break
        lr = float(f"{lr:.6g}")  # the name a record is filed under (rname uses :g)
        lrs.append(lr)
        recs.append(run(lr))
        if recs[-1]["val_loss"] is None:
            break
    return recs


def fed_run(name, lr, eps, seed, args, extra, lr_from=FED_SWEPT):
    """One fed.py run of claim 5 at learning rate `lr` (its own process; one cut off after a round is resumed from
    it), or its committed record in results_dir/fed/: the final held-out loss, the bytes moved in fed.py's
    convention and in the Fed-SB paper's, and the epsilon spent; `lr_from` says where the lr came from (FED_SWEPT
    for a run of the lr sweep itself)."""
    rname = f"{name}_lr{lr:g}_eps{eps}_s{seed}"
    path = os.path.join(args.results_dir, "fed", rname + ".json")
    if os.path.isfile(path):
        return same_flags(json.load(open(path)), path, extra)
    out_dir = flagged(args.out_dir, "fed", extra)
    if not os.path.isfile(os.path.join(out_dir, rname, "summary.json")):
        not_stopped(rname)
        saved = os.path.isfile(os.path.join(out_dir, rname, "fed_state.pt"))  # cut off after a round: go on from it
        argv = FED_RUNS[name] + ["--model", args.model, "--data", args.data, "--seed", str(seed), "--out_dir", out_dir,
                                 "--run_name", rname, "--resume" if saved else "--overwrite"]
        argv += [] if any(f.startswith("--lr=") for f in extra) else ["--lr", f"{lr:g}"]  # else in extra already
        argv += ["--dp_epsilon", eps] if eps != "inf" else []
        run_script("fed.py", rname, argv + extra)
    s = json.load(open(os.path.join(out_dir, rname, "summary.json")))
    paper = s["per_client_per_round"]["paper"]
    sent = sum(len(r["clients"]) for r in s["log"] if r.get("clients"))  # client-rounds
    rec = dict(name=name, strategy=s["method"], rank=s["rank"], lr=lr, lr_from=lr_from, eps=eps, seed=seed,
               val_loss=s["final_val_loss"],
               bytes=s["total"]["up_bytes"] + s["total"]["down_bytes"],
               paper_bytes=4 * sent * (paper["up_params"] + paper["down_params"]),
               epsilon=s["dp"] and s["dp"]["epsilon"], dp=s["dp"], clients=s["clients"], rounds=s["rounds"],
               flags=extra, jobs=AT_ONCE[0], wall_s=s.get("wall_s"))
    write_record(rec, path)
    return rec


def write_record(rec, path):
    """A finished run's record, written whole (runs.save_json: a temporary file, then os.replace): concurrent runs
    (--jobs), a report read meanwhile and a crash see the whole record or none."""
    import runs
    os.makedirs(os.path.dirname(path), exist_ok=True)
    runs.save_json(rec, path)


STOP = threading.Event()  # set by a failed run under --jobs (or Ctrl-C): no run starts after it
AT_ONCE = [1]  # the most runs sharing the GPU now: --jobs, or fewer when fewer tasks run (records keep it)


def concurrently(jobs, tasks):
    """Run the thunks `tasks`, `jobs` at a time (each waits on its own process, so threads suffice). After a
    failure or Ctrl-C no further run starts (a task checks STOP before each run it starts: a sweep is several);
    the running ones finish (their records are kept), and the first failure is raised."""
    STOP.clear()
    AT_ONCE[0] = min(jobs, len(tasks)) or 1
    if jobs == 1:
        return [t() for t in tasks]
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
    failures = []

    def guarded(task):
        try:
            return task()
        except BaseException as e:
            if not STOP.is_set():
                failures.append(e)
            STOP.set()  # before this thread takes the next task
            raise
    with ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(guarded, t) for t in tasks]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)  # returns at the first failure, not when its turn comes
        except BaseException:  # Ctrl-C (the running runs' processes got it too): start nothing more
            STOP.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        if failures:
            pool.shutdown(cancel_futures=True)  # waits for the running ones
            raise failures[0]
        return [f.result() for f in futures]


def not_stopped(name):
    """Under --jobs, a run about to start after another failed (or Ctrl-C) is not started."""
    if STOP.is_set():
        raise UserError(f"{name} not started: another run failed")


def given_lr(extra):
    """The lr a command gives every fed run (--lr, passed on to fed.py), or None: then each strategy's is swept."""
    given = [f.split("=", 1)[1] for f in extra if f.startswith("--lr=")]
    if not given:
        return None
    try:
        lr = float(given[-1])
    except ValueError:
        lr = 0.0
    if not lr > 0:
        raise UserError(f"--lr must be a number > 0, got {given[-1]!r}")
    return lr


def factors_of(key, values):
    """An lr grid's factors (--fed_lr_factors, --fed_dp_lr_factors): numbers > 0, or one line naming the flag."""
    try:
        factors = [float(f) for f in values]
    except ValueError:
        factors = [0.0]
    if not factors or not all(f > 0 for f in factors):
        raise UserError(f"--{key} takes numbers > 0 (e.g. 0.25,1,4), got {','.join(values)}")
    return factors


def fed_lr_sweep(eps, centres, factors, swept_at, fed_names, args, extra):
    """Each strategy's fed lr sweep at epsilon `eps` (seed 0, at its run swept_at[strategy]; resumes from its
    records): every strategy's grid around centres[strategy] at once, then each one's steps past an edge. Returns
    the lr each run of fed_names takes: its strategy's choice."""
    concurrently(args.jobs, [functools.partial(fed_run, swept_at[st], lr, eps, 0, args, extra)
                             for st in centres for lr in lr_grid(centres[st], factors)])
    concurrently(args.jobs, [functools.partial(sweep, swept_at[st], centres[st], factors, args, extra,
                                               run=functools.partial(fed_run, swept_at[st], eps=eps, seed=0,
                                                                     args=args, extra=extra)) for st in centres])
    lrs = {n: fed_chosen_lr(swept_at[FED_RUNS[n][1]], args.results_dir, eps) for n in fed_names}
    if None in lrs.values():
        private = eps != "inf"
        raise UserError(f"every run of a{' private' * private} fed lr sweep diverged "
                        f"({', '.join(n for n in lrs if lrs[n] is None)}): pass smaller "
                        f"--{'fed_dp_lr_factors' if private else 'fed_lr_factors'}")
    return lrs


def fed_centre(strategy, results_dir):
    """The centre of a strategy's fed lr sweep: the lr the centralised sweep chose for its method (FED_LR: Fed-SB
    LoRA-SB's, the LoRA strategies LoRA's)."""
    lr = chosen_lr(FED_LR[strategy], results_dir)
    if lr is None:
        raise UserError(f"no finished sweep run of {FED_LR[strategy]} (whose lr centres {strategy}'s fed sweep) in "
                        f"{results_dir}/sweep: run --stage sweep --methods {FED_LR[strategy]} first")
    return lr


def fed_sweep_run(strategy, fed_names, results_dir):
    """The run a strategy's lr is swept at: the one its records already sweep (a later command with other --fed_runs
    keeps it), else the middle rank of its runs in --fed_runs (by default Fed-SB r64, the others r16)."""
    d = os.path.join(results_dir, "fed")
    for f in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        if f.endswith("_epsinf_s0.json") and FED_RUNS.get(f.split("_")[0], [None, None])[1] == strategy:
            if json.load(open(os.path.join(d, f))).get("lr_from") == FED_SWEPT:
                return f.split("_")[0]
    mine = sorted((n for n in fed_names if FED_RUNS[n][1] == strategy), key=lambda n: int(FED_RUNS[n][3]))
    return mine[len(mine) // 2]


def fed_chosen_lr(run, results_dir, eps="inf"):
    """The lr of the lowest held-out loss in a fed lr sweep (its run `run`, seed 0, at epsilon `eps`), or None."""
    d = os.path.join(results_dir, "fed")
    recs = [json.load(open(os.path.join(d, f))) for f in sorted(os.listdir(d)) if f.endswith(".json") and
            f.startswith(run + "_lr") and f.endswith(f"_eps{eps}_s0.json")] if os.path.isdir(d) else []
    recs = [r for r in recs if r.get("lr_from") == FED_SWEPT and r["val_loss"] is not None]
    return min(recs, key=lambda r: r["val_loss"])["lr"] if recs else None


def one_lr(d, lrs, what, sweep_end=None, private=None):
    """Before any run: the records in `d` of each run name in `lrs` are at the lr this command gives it, or its
    seeds would mix two lrs in one row; `sweep_end` ends the names of the sweep's own records (at any lr);
    `private` (fed records): only the private ones (True) or only those without privacy (False)."""
    for f in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        n, lr = f.split("_")[0], f.split("_lr")[-1].split("_")[0]  # <name>_lr<lr>_...json (no "_" in either)
        if private is not None and ("_epsinf_" not in f) != private:
            continue
        if f.endswith(".json") and n in lrs and lr != f"{lrs[n]:g}" and not (sweep_end and f.endswith(sweep_end)):
            raise UserError(f"{os.path.join(d, f)} is {n} at lr {lr}, this command runs it at {lrs[n]:g} ({what} "
                            f"changed): move the old records away, or pass another --results_dir")


def flagged(out_dir, stage, extra):
    """The folder of a stage's runs under the script's other flags: other flags, another folder, so a finished run
    is read back only under the flags it was made with, in any order (as same_flags reads them)."""
    return os.path.join(out_dir, stage + ("_" + hashlib.sha256(" ".join(sorted(extra)).encode()).hexdigest()[:8]
                                          if extra else ""))


def same_flags(rec, path, extra):
    """A committed record stands for its run only under the flags it was made with (the script's flags beyond the
    run's own: --epochs 3, --local_steps 20, ...): reused under others, it would mix two protocols in one table.
    Their order does not matter. Records that predate the field were made with none."""
    if sorted(rec.get("flags", [])) != sorted(extra):
        raise UserError(f"{path} was made with the flags {' '.join(rec.get('flags', [])) or '(none)'}, this command "
                        f"passes {' '.join(extra) or '(none)'}: pass the same flags, or another --results_dir")
    return rec


def welch_t(a, b):
    """(Welch's t that the mean of `a` is below that of `b`, the decisive |t|: Student's 97.5% point, n - 1 dof;
    with one value on a side nothing is decisive: its spread is unknown)."""
    if min(len(a), len(b)) < 2:
        return 0.0, float("inf")
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    se = (sa ** 2 / len(a) + sb ** 2 / len(b)) ** 0.5
    t = (mb - ma) / se if se > 0 else float("inf") * ((mb > ma) - (mb < ma))
    return t, {2: 12.7, 3: 4.3, 4: 3.2, 5: 2.8}.get(min(len(a), len(b)), 2.0)


def plane_points(recs):
    """Claim 5's records that are points of the plane (the seeds, not the lr sweep), and the runs left out: a run
    (name, lr, epsilon) with a diverged seed (fed.py's null held-out loss) counts for nothing, since its lucky seeds
    alone would favour it."""
    others = [r for r in recs if r.get("lr_from") != FED_SWEPT]
    seeds_of = {}
    for r in others:
        seeds_of.setdefault((r["name"], r.get("lr"), r["eps"]), []).append(r["val_loss"])
    bad = {k for k, v in seeds_of.items() if None in v}
    diverged = [f"{n} (lr {lr:g}, epsilon {eps}: {seeds_of[n, lr, eps].count(None)} of {len(seeds_of[n, lr, eps])} "
                f"seeds)" for n, lr, eps in sorted(bad, key=str)]
    return [r for r in others if (r["name"], r.get("lr"), r["eps"]) not in bad], diverged


def fed_report(recs):
    """Claim 5's lines: per privacy setting, every run's bytes (both conventions) and held-out loss, then whether
    Fed-SB dominates each other strategy: each of its points is beaten when the best Fed-SB point with no more bytes
    has a lower held-out loss by Welch's t over the seeds (decisive as in `verdict`), missed when that loss is
    decisively higher or no Fed-SB point is that cheap; the claim holds when every point is beaten, does not hold
    when one is missed, and is inconclusive otherwise."""
    if not recs:
        return ["", "### Claim 5: Fed-SB on the communication / held-out loss plane", "", "Not run yet: `python "
                "results.py --stage fed --model M --data train.jsonl --clients 10 --rounds 3 --local_steps 20`."]
    r = recs[0]
    lines = ["", f"Claim 5's protocol: `fed.py` with {r.get('clients')} clients (iid shards of the training file "
             f"minus the held-out split), {r.get('rounds')} rounds, every client each round, flags "
             f"`{' '.join(r.get('flags', [])) or '(none)'}`; held-out loss of the global model after the last round; "
             "bytes summed over the run, up and down, in fed.py's convention (with Fed-SB's one-time download of B "
             "and A) and in the Fed-SB paper's; "]
    swept_recs = sorted((r for r in recs if r.get("lr_from") == FED_SWEPT),
                        key=lambda r: (r["name"], float(r["eps"]), r["lr"]))
    lines[-1] += ("each strategy's lr is chosen by a sweep of its own at one rank (the sweep's table names it), "
                  "seed 0, without privacy, on the held-out loss: the lr its method's centralised sweep chose times "
                  "`--fed_lr_factors`, extended past an edge as the centralised sweep is; the seeds take the chosen "
                  "lr. The private runs take the lr of a second sweep of the same run, seed 0, at one epsilon "
                  "(`--fed_dp_sweep`), over that choice times `--fed_dp_lr_factors`. The sweeps and the verdicts read "
                  "the same held-out split (every strategy alike). " if swept_recs else
                  "each table names where its lrs come from. ") + (
        "That Fed-SB's aggregate equals the exact average of the clients' updates (and FedIT's does not) is "
        "checked by tests/test_fed.py::test_aggregation_exactness, not by these runs.")
    all_recs = recs
    missing = fed_missing([r for r in recs if r.get("lr_from") != FED_SWEPT])  # a diverged run did run
    recs, diverged = plane_points(recs)
    if swept_recs:
        best = {}
        for r in swept_recs:
            k = r["name"], r["eps"]
            if r["val_loss"] is not None and (k not in best or r["val_loss"] < best[k]["val_loss"]):
                best[k] = r
        lines += ["", "### Claim 5's lr sweeps (seed 0, held-out loss)", "", "| run | epsilon | lr | held-out loss |",
                  "|---|---|---|---|"]
        lines += [f"| {r['name']} | {'none' if r['eps'] == 'inf' else r['eps']} | {r['lr']:g} | "
                  + ("diverged" if r["val_loss"] is None else f"{r['val_loss']:.4f}")
                  + (" (chosen)" if best.get((r["name"], r["eps"])) is r else "") + " |" for r in swept_recs]
    if diverged:  # a non-finite held-out loss: no point of the plane (fed.py trains on; its summary says null)
        lines += ["", f"Diverged (a null held-out loss), left out with all their seeds from the tables and verdicts "
                      f"below: {', '.join(diverged)}."]
    if not recs:
        lines += ["", "The seeds at the chosen lrs: not run yet."]
    for eps, src in sorted({(r["eps"], r.get("lr_from", "")) for r in recs}, key=lambda k: (float(k[0]), k[1])):
        groups = {}  # by run and lr: seeds of one run at two lrs are two points, never one
        for r in recs:
            if (r["eps"], r.get("lr_from", "")) == (eps, src):
                groups.setdefault((r["name"], r.get("lr")), []).append(r)
        pts = {n: (g[0]["strategy"], g[0]["bytes"], g[0]["paper_bytes"], [r["val_loss"] for r in g])
               for n, g in groups.items()}
        title = "without privacy" if eps == "inf" else f"DP-SGD, epsilon {eps} per client"
        lines += ["", f"### Claim 5: Fed-SB on the communication / held-out loss plane, {title}, lr from "
                  f"{src or 'fed.py'}"] + dp_terms([r for g in groups.values() for r in g]) + [
                  "", "| run | lr | bytes (fed.py's) | bytes (Fed-SB paper's) | held-out loss | seeds |",
                  "|---|---|---|---|---|---|"]
        for (n, lr), (_, b, pb, ls) in sorted(pts.items(), key=lambda kv: kv[1][1]):
            m, sd = mean_std(ls)
            spread = f"+- {sd:.4f}" if len(ls) > 1 else "(one seed)"
            lines.append(f"| {n} | {'' if lr is None else format(lr, 'g')} | {b:,} | {pb:,} | {m:.4f} {spread} | "
                         f"{len(ls)} |")
        sb = [(b, pb, ls, n) for (n, _), (st, b, pb, ls) in pts.items() if st == "sb"]
        for other in sorted({st for st, *_ in pts.values()} - {"sb"}):
            theirs = sorted((b, pb, ls, n) for (n, _), (st, b, pb, ls) in pts.items() if st == other)
            for conv, i in (("fed.py's bytes", 0), ("the paper's bytes", 1)):
                beaten = missed = 0
                each = []  # per point: the Fed-SB point it is compared with, the two losses and t
                for t in theirs:
                    cheaper = [s for s in sb if s[i] <= t[i]]
                    if not cheaper:
                        missed += 1
                        each.append(f"{t[3]} {mean_std(t[2])[0]:.4f}: no Fed-SB point moves as few bytes")
                        continue
                    s = min(cheaper, key=lambda s: mean_std(s[2])[0])
                    tt, need = welch_t(s[2], t[2])
                    beaten, missed = beaten + (tt >= need), missed + (tt <= -need)
                    each.append(f"{t[3]} {mean_std(t[2])[0]:.4f} against {s[3]} {mean_std(s[2])[0]:.4f}, "
                                + (f"t = {tt:.2f}" if need < float("inf") else "a side with one seed: no t"))
                word = "holds" if beaten == len(theirs) else "does not hold" if missed else "inconclusive"
                lines.append(f"- Fed-SB dominates {other} ({conv}): **{word}** (of its {len(theirs)} points, "
                             f"{beaten} beaten and {missed} missed by the best Fed-SB point with no more bytes, "
                             f"Welch's t over the seeds, positive where Fed-SB is lower: {'; '.join(each)})")
    timed = [r for r in all_recs if r.get("wall_s") is not None]
    cost = ["", f"Cost: {len(timed)} of the {len(all_recs)} runs here keep their wall time (start-up included): "
                f"{sum(r['wall_s'] for r in timed):,.0f} s in all, up to {max(r.get('jobs', 1) for r in timed)} "
                f"sharing the GPU at once."] if timed else []
    return lines + missing + cost


def dp_terms(recs):
    """The guarantee the private records of one table state, from what each run spent (its summary's dp): the
    largest epsilon spent per client, the delta, the accountant, and every run whose noise was reproducible."""
    dps = [r.get("dp") for r in recs if r["eps"] != "inf"]
    if not dps:
        return []
    if None in dps:  # a record made before records kept the run's dp terms: its epsilon alone
        return ["", f"Epsilon spent per client, at most {max(r['epsilon'] for r in recs):.4f} (the records "
                    f"keep no delta or accountant)."]
    void = sorted({r["name"] for r, d in zip(recs, dps) if d.get("void")})
    inits = sorted({d["init"] for d in dps if d.get("init")})
    return ["", f"Epsilon spent per client, at most {max(d['epsilon'] for d in dps):.4f} (target "
                f"{max(d['target_epsilon'] for d in dps):g}) at delta <= {max(d['delta'] for d in dps):.2e} "
                f"({', '.join(sorted({d['accountant'] for d in dps}))} accountant; clip "
                f"{', '.join(sorted({format(d['clip'], 'g') for d in dps}))}); each run's own guarantee: its lr "
                f"was chosen from sweeps on the same data, outside every run's accounting."
                + (f" LoRA-SB's init: {'; '.join(inits)}." if inits else "")
                + (f" **No guarantee** (--dp_seed made the noise reproducible): {', '.join(void)}." if void else "")]


def fed_missing(recs):
    """What the default --stage fed would still run: per privacy setting, each run of FED_RUNS with fewer seeds
    than the default --seeds (the report never lets a gap pass for a finished claim)."""
    want, have = {int(sd) for sd in ResultsConfig.seeds}, {}
    for r in recs:
        if r["seed"] in want:  # other seeds stand in for none of the default ones
            have.setdefault(r["eps"], {}).setdefault(r["name"], set()).add(r["seed"])
    gaps = []
    for eps in ResultsConfig.dp_epsilons:
        count = {n: len(have.get(eps, {}).get(n, ())) for n in FED_RUNS}
        short = [f"{n} ({c} of {len(want)})" for n, c in count.items() if c < len(want)]
        title = "without privacy" if eps == "inf" else f"at epsilon {eps}"
        gaps += [f"{title}: " + ("none yet" if not any(count.values()) else ", ".join(short))] if short else []
    return ["", "Not run yet, seeds per run (`--stage fed` runs them): " + "; ".join(gaps) + "."] if gaps else []


def plane_rows(recs):
    """The rows of claim 5's figure: each (epsilon, lr source) of the records, no privacy first, then by epsilon."""
    return sorted({(r["eps"], r.get("lr_from", "")) for r in recs}, key=lambda k: (k[0] != "inf", float(k[0]), k[1]))


def fed_figure(recs, results_dir):
    """Claim 5's figure, fed_plane.png: held-out loss against the bytes a run moved, one row per privacy setting
    and lr source, the two byte conventions side by side, each strategy a line through its ranks."""
    recs = plane_points(recs)[0]
    groups = plane_rows(recs)
    try:
        if not groups:
            raise ImportError
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    # one byte axis per convention for every row (so a privacy setting's points sit where they would without it),
    # and one colour per strategy throughout
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 4 * len(groups)), squeeze=False, sharex="col",
                             layout="constrained")
    colour = {"sb": "C3", "fedit": "C1", "ffa": "C2", "fedex": "C0"}
    for row, (eps, src) in zip(axes, groups):
        runs_of = {}
        for r in recs:
            if (r["eps"], r.get("lr_from", "")) == (eps, src):
                runs_of.setdefault((r["strategy"], r["name"], r.get("lr")), []).append(r)
        for ax, key, conv in ((row[0], "bytes", "fed.py's"), (row[1], "paper_bytes", "the Fed-SB paper's")):
            for strategy in sorted({st for st, *_ in runs_of}):
                pts = sorted((g[0][key], *mean_std([r["val_loss"] for r in g]))
                             for (st, *_), g in runs_of.items() if st == strategy)
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt="o-",
                            capsize=3, label=strategy, lw=2 if strategy == "sb" else 1, color=colour.get(strategy))
            title = "no privacy" if eps == "inf" else f"epsilon {eps}"
            ax.set(xscale="log", xlabel=f"bytes moved ({conv} convention)", ylabel="held-out loss (mean +- std)")
            ax.set_title(f"{title}\nlr from {src or 'fed.py'}", fontsize=9)
            ax.legend(fontsize=8)
            ax.label_outer()  # the shared byte axis is labelled on the last row only
    fig.savefig(os.path.join(results_dir, "fed_plane.png"), dpi=100, bbox_inches="tight")
    return ["", "![claim 5: held-out loss against bytes moved](fed_plane.png)"]


def swept(name, results_dir):
    """The sweep records of run `name` (diverged ones included)."""
    d = os.path.join(results_dir, "sweep")
    recs = [json.load(open(os.path.join(d, f))) for f in sorted(os.listdir(d))
            if f.startswith(name + "_lr") and f.endswith(".json")] \
        if os.path.isdir(d) else []
    return [r for r in recs if r["name"] == name]


def chosen_lr(name, results_dir):
    """The swept lr with the lowest held-out loss (seed 0), or None before the sweep has run."""
    recs = [r for r in swept(name, results_dir) if r["val_loss"] is not None]
    return min(recs, key=lambda r: r["val_loss"])["lr"] if recs else None


def mean_std(xs):
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


def verdict(a, b, claim):
    """Is the metric lower for the seeds `a` than for `b`? Welch's t of the difference of the means, decisive at the
    two-sided 95% point of Student's t with n - 1 degrees of freedom (n seeds per side; 4.30 for 3), else
    inconclusive."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    t, need = welch_t(a, b)
    word = "holds" if t >= need else "does not hold" if t <= -need else "inconclusive"
    return f"{claim}: **{word}** ({ma:.4f} +- {sa:.4f} vs {mb:.4f} +- {sb:.4f}, t = {t:.2f}, decisive at |t| >= {need})"


def merged_report(path):
    """Claim 6's lines from --merged_check's record (one seed per method, the README's precision table): the held-out
    loss of the model as trained against the same adapter merged into a bf16 base. The fp32 merge equals the trained
    model exactly (tests/test_train.py checks the merged export's logits); what a bf16 merge loses is measured here."""
    if not path or not os.path.isfile(path):
        return []
    rs = json.load(open(path)).get("runs", {})
    lines = ["", "### Claim 6: the merged model against the model as trained (one seed each, default lrs)", "",
             f"From `{path}` (`results.py --merged_check 1`). Merged in fp32 the model is the trained one (the "
             "merged export's logits equal the trained model's within 1e-4: tests/test_train.py); merged into a bf16 "
             "base, each weight is rounded once more:", "",
             "| run | held-out loss as trained | merged, bf16 | difference | GSM8K as trained | merged, bf16 |",
             "|---|---|---|---|---|---|"]
    for n, r in rs.items():
        lines.append(f"| {n} | {r['val_loss_trained']:.4f} | {r['val_loss_merged_bf16']:.4f} | "
                     f"{r['val_loss_merged_bf16'] - r['val_loss_trained']:+.4f} | {100 * r['acc_trained']:.2f}% | "
                     f"{100 * r['acc_merged_bf16']:.2f}% |")
    worst = max(rs.items(), key=lambda kv: abs(kv[1]["val_loss_merged_bf16"] - kv[1]["val_loss_trained"]))
    lines.append(f"\nThe largest change of held-out loss from the bf16 merge: {worst[0]}, "
                 f"{worst[1]['val_loss_merged_bf16'] - worst[1]['val_loss_trained']:+.4f}.")
    return lines


def report(results_dir, path, merged_json=""):
    """RESULTS.md from the committed records alone: the protocol, the sweep, mean +- std per method, verdicts."""
    def load(stage):
        d = os.path.join(results_dir, stage)
        return [json.load(open(os.path.join(d, f))) for f in sorted(os.listdir(d)) if f.endswith(".json")] \
            if os.path.isdir(d) else []
    sweep, seeds, fed_recs = load("sweep"), load("seeds"), load("fed")
    if not sweep and not seeds and not fed_recs:
        raise UserError(f"no records in {results_dir}/sweep, /seeds or /fed: run --stage sweep, then --stage seeds "
                        f"(or --stage fed)")
    regime = os.path.basename(os.path.normpath(results_dir)) == "dylora"  # claim 4's longer regime: its runs only
    epochs = sorted({r.get("epochs", 1.0) for r in sweep + seeds}) or [1.0]
    span = "one epoch" if epochs == [1.0] else " or ".join(f"{e:g}" for e in epochs) + " epochs"
    lines = ["# Results", "", "Generated by `python results.py --stage report` from the records in "
             f"`{results_dir}/` (one JSON per finished run); nothing here is typed by hand.", "",
             f"Protocol: each method at its own defaults (train.py), {span} of the training file minus the "
             "256-example held-out split, batch 16, max_len 512, cosine schedule with 3% warm-up. Learning rate: a "
             "sweep over each "
             "method's default lr times the factors of `--lr_factors`, seed 0, scored on the held-out loss only (never "
             "the test set); the lowest wins. Then `--seeds` at that lr (1, 2 and 3: fresh seeds, not the sweep's "
             "seed 0 that chose it; a rank or block-size variant not swept itself runs at its method's chosen "
             "lr), scored on the held-out loss and on GSM8K test (eval.py's protocol). Sizes are "
             "each method's default: LoRA r16, LoRA-XS and LoRA-SB r64 (R is 64 x 64), LoRA-GA r8, Bone and DyLoRA "
             "as their files set them. A verdict compares held-out losses by Welch's t; it is decisive at the two-sided "
             "95% point of Student's t for the seeds' degrees of freedom (4.30 for 3 seeds per side), else "
             "inconclusive.", "",
             "## Sweep (seed 0, held-out loss)", "", "| run | lr | held-out loss |", "|---|---|---|"]
    best = {}
    for r in sweep:
        if r["val_loss"] is not None and (r["name"] not in best or r["val_loss"] < best[r["name"]]["val_loss"]):
            best[r["name"]] = r
    for r in sorted(sweep, key=lambda r: (r["name"], r["lr"])):
        lrs = sorted(q["lr"] for q in sweep if q["name"] == r["name"])
        mark = "" if best.get(r["name"]) is not r else " (chosen" + (
            ", at the grid's edge: the best lr may lie beyond it)" if r["lr"] in (lrs[0], lrs[-1]) else ")")
        loss = "diverged (stopped by train.py)" if r["val_loss"] is None else f"{r['val_loss']:.4f}"
        lines.append(f"| {r['name']} | {r['lr']:g} | {loss}{mark} |")
    by = {}
    for r in seeds:
        by.setdefault(r["name"], []).append(r)
    lines += ["", "## At the chosen lr, mean +- std over seeds", "",
              "| run | lr | seeds | trainable | held-out loss | GSM8K | train s |", "|---|---|---|---|---|---|---|"]
    for name, rs in sorted(by.items()):
        (vl, vs), acc = mean_std([r["val_loss"] for r in rs]), [r["acc"] for r in rs if r["acc"] is not None]
        am, asd = mean_std(acc) if acc else (float("nan"), 0.0)
        lines.append(f"| {name} | {rs[0]['lr']:g} | {len(rs)} | {rs[0]['trainable']:,} | {vl:.4f} +- {vs:.4f} | "
                     f"{100 * am:.2f} +- {100 * asd:.2f}% | {mean_std([r['train_s'] for r in rs])[0]:.1f} |")
    loss = {n: [r["val_loss"] for r in rs] for n, rs in by.items()}
    claims = [("sb", "xs", "LoRA-SB has a lower held-out loss than LoRA-XS at equal rank (64, the default)"),
              ("sb", "lora", "LoRA-SB has a lower held-out loss than LoRA r16 (with fewer trainable parameters)"),
              ("bone", "lora", "Bone fits better than LoRA (held-out loss)"),
              ("dylora", "lora", "DyLoRA at its full rank is as good as LoRA at that rank (lower loss)")]
    for r in sorted({int(n.split("-r")[1]) for n in by if n.startswith(("sb-r", "xs-r"))}):  # claim 1 at other ranks
        claims.append((f"sb-r{r}", f"xs-r{r}", f"LoRA-SB has a lower held-out loss than LoRA-XS at rank {r} (both at "
                                               "their default rank's lr)"))
    lines += ["", "## Verdicts (held-out loss; lower is better)", ""]
    for a, b, claim in claims:
        if a in loss and b in loss and len(loss[a]) > 1 and len(loss[b]) > 1:
            lines.append("- " + verdict(loss[a], loss[b], claim))
        elif "-r" not in a and (not regime or a in {r["name"] for r in sweep + seeds}):
            lines.append(f"- {claim}: not run yet")  # (a rank variant with one side missing is simply not listed)
    fit = {n: [sum(v for _, v in r["train_curve"][-5:]) / len(r["train_curve"][-5:]) for r in rs]
           for n, rs in by.items() if all(r.get("train_curve") for r in rs)}  # each seed's last 5 logged losses
    for bone in ("bone", "bone-shared"):  # claim 3's first half: the pace (held-out loss a quarter into the epoch)
        if bone in by and "lora" in by and len(by[bone]) > 1 and len(by["lora"]) > 1:
            at = next(s for s, _ in by["lora"][0]["curve"] if s >= by["lora"][0]["steps"] // 4)  # a logged step
            early = {n: [dict(r["curve"]).get(at) for r in by[n]] for n in (bone, "lora")}
            if None not in early[bone] + early["lora"]:
                lines.append("- " + verdict(early[bone], early["lora"], f"{bone} converges faster than LoRA "
                                            f"(held-out loss at step {at} of {by['lora'][0]['steps']})"))
    for bone in ("bone", "bone-shared"):  # claim 3's other half: the training fit
        if bone in fit and "lora" in fit and len(fit[bone]) > 1 and len(fit["lora"]) > 1:
            lines.append("- " + verdict(fit[bone], fit["lora"], f"{bone} fits the training data better than LoRA "
                                                                "(mean of the last 5 logged training losses)"))
    if all(n in loss and len(loss[n]) > 1 for n in ("sb", "full", "lora")):  # claim 1's third part: near full?
        (ms, _), (mf, _), (ml, _) = mean_std(loss["sb"]), mean_std(loss["full"]), mean_std(loss["lora"])
        gap = lambda n: [abs(v - mf) for v in loss[n]]  # each seed's distance from full's mean
        word = verdict(gap("sb"), gap("lora"), "").split("**")[1]  # "close": at least as close as LoRA r16 is
        lines.append(f"- LoRA-SB gets as close to full fine-tuning as LoRA r16 does: **{word}**: its held-out loss is "
                     f"{ms - mf:+.4f} from full's ({ms:.4f} vs {mf:.4f}), LoRA r16's {ml - mf:+.4f}; with "
                     f"{by['full'][0]['trainable'] / by['sb'][0]['trainable']:.0f}x fewer trainable parameters than "
                     f"full and {by['lora'][0]['trainable'] / by['sb'][0]['trainable']:.1f}x fewer than LoRA r16")
    for ref in ("lora-r8", "lora"):  # claim 2: the steps LoRA-GA needs to reach LoRA's final held-out loss
        if "ga" not in by or ref not in by:  # (the paper compares at equal rank: LoRA r8 where it has run)
            continue
        target = mean_std(loss[ref])[0]
        reach = [next((s for s, v in r["curve"] if v <= target and s > 0), None) for r in by["ga"]]
        lora_steps = by[ref][0]["steps"]
        got = [s for s in reach if s is not None]
        pace = lora_steps / mean_std(got)[0] if len(got) == len(reach) else None
        word = ("holds" if 2 <= pace else "does not hold") if pace else "does not hold" if not got else "inconclusive"
        lines.append(f"- LoRA-GA (r{by['ga'][0]['rank']}) converges 2-4x faster than LoRA (r{by[ref][0]['rank']}): "
                     f"**{word}**: the steps it needs to reach LoRA's final held-out loss ({target:.4f} after "
                     f"{lora_steps} steps), per seed: {reach}" + (f"; {pace:.2f}x LoRA's pace" if pace else "") +
                     " (curves are evaluated every 25 steps, so this resolves 25 steps)")
    if not regime:  # claims 5 and 6 have no runs in claim 4's regime
        lines += fed_report(fed_recs) + fed_figure(fed_recs, results_dir) + merged_report(merged_json)
    for dy in ("dylora", "dylora-nf"):  # claim 4: one run used at every rank, against LoRA trained at that rank
        runs_by_rank = [r.get("val_loss_by_rank") for r in by.get(dy, []) if r.get("val_loss_by_rank")]
        if not runs_by_rank:
            continue
        mode = "frozen: only the sampled component trains" if dy == "dylora" else "non-frozen"
        epochs = by[dy][0]["epochs"]
        lines += ["", f"### Claim 4: one {dy} run ({mode}, {epochs:g} epoch{'s' * (epochs != 1)}) at each rank, "
                  "against LoRA trained at that rank", "", "Verdict: is the DyLoRA run, cut to that rank, lower in "
                  "held-out loss than LoRA trained at it? Welch's t as above, positive where DyLoRA is lower: holds "
                  "when decisively so, does not hold when decisively higher, else inconclusive.", "",
                  "| rank | DyLoRA held-out loss | LoRA at that rank | DyLoRA - LoRA | verdict |",
                  "|---|---|---|---|---|"]
        lora_s, shared = [], max(r.get("jobs", 1) for r in by[dy])
        for b in sorted({int(k) for d in runs_by_rank for k in d}):
            dyl = [d.get(str(b), d.get(b)) for d in runs_by_rank]
            name = "lora" if b == 16 else f"lora-r{b}"
            m, sd = mean_std(dyl)
            if name in loss and len(loss[name]) > 1 and len(dyl) > 1:
                lm, lsd = mean_std(loss[name])
                lora_s.append((mean_std([r["train_s"] for r in by[name]])[0], by[name][0]["steps"]))
                shared = max([shared] + [r.get("jobs", 1) for r in by[name]])
                t, need = welch_t(dyl, loss[name])
                word = "holds" if t >= need else "does not hold" if t <= -need else "inconclusive"
                far = f" (seeds: {', '.join(f'{v:.3f}' for v in dyl)})" if sd > 0.1 * m else ""  # one far off
                lines.append(f"| {b} | {m:.4f} +- {sd:.4f}{far} | {lm:.4f} +- {lsd:.4f} ({name}) | {m - lm:+.4f} "
                             f"({100 * (m - lm) / lm:+.1f}%) | **{word}** (t = {t:.2f}) |")
            else:
                lines.append(f"| {b} | {m:.4f} +- {sd:.4f} | not run | | |")
        if lora_s:
            lines.append(f"\nTraining cost: one {dy} run {mean_std([r['train_s'] for r in by[dy]])[0]:.1f} s, "
                         f"{by[dy][0]['steps']:,} steps; the {len(lora_s)} LoRA runs it replaces "
                         f"{sum(t for t, _ in lora_s):.1f} s together, {sum(n for _, n in lora_s):,} steps" + (
                             f" (runs made up to {shared} at a time on one GPU, `--jobs`: these times include "
                             f"that sharing and compare only roughly)." if shared > 1 else "."))
    sub = os.path.join(results_dir, "dylora")  # claim 4 in the paper's longer regime: its own records and report
    if not regime:
        lines += ["", "### Claim 4 in the paper's regime (3 epochs, frozen and non-frozen)", "",
                  "In [dylora/RESULTS.md](dylora/RESULTS.md) (`python results.py --stage report --results_dir "
                  f"{sub}`)." if os.path.isfile(os.path.join(sub, "RESULTS.md")) else
                  "Not run yet: `python results.py --stage sweep|seeds --methods ... --epochs 3 --results_dir "
                  f"{sub}` (README, Results)."]
    try:  # the figures of claims 1-3 (not in claim 4's regime, which has its runs only) and of claim 4
        if not by:
            raise ImportError
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        figures = [] if regime else [claim1_figure(by, loss, results_dir, plt), claim23_figure(by, results_dir, plt)]
        figures += claim4_figure(by, loss, results_dir, plt)
        if not figures:
            raise ImportError
        lines += ["", "\n\n".join(figures)]
    except ImportError:
        lines += ["", "(no figure: no seeds yet, or matplotlib is not installed)"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)


def claim1_figure(by, loss, results_dir, plt):
    """Held-out loss against trainable parameters, each method's sizes as one line (mean +- std over seeds)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    families = {}  # a method's sizes as one line: "lora-r4" and "lora" are both LoRA, "bone-b32" is Bone
    for name in by:
        families.setdefault(re.sub(r"-[rb]\d+$", "", name), []).append(name)
    for fam, names in sorted(families.items()):
        pts = sorted((by[n][0]["trainable"], *mean_std(loss[n])) for n in names)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt="o-", capsize=3, label=fam)
    ax.set(xscale="log", xlabel="trainable parameters", ylabel="held-out loss (mean +- std over seeds)")
    ax.legend(fontsize=8)
    fig.savefig(os.path.join(results_dir, "loss_vs_params.png"), dpi=110, bbox_inches="tight")
    return "![held-out loss against trainable parameters](loss_vs_params.png)"


def claim23_figure(by, results_dir, plt):
    """Claims 2 and 3: how fast each method gets there (held-out loss against step, mean over seeds)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rs in sorted((n, rs) for n, rs in by.items() if n in MAIN):  # the sizes' variants: figure 1
        steps = [st for st, _ in rs[0]["curve"]]
        curves = [[v for _, v in r["curve"]] for r in rs if [st for st, _ in r["curve"]] == steps]
        ax.plot(steps, [sum(c[i] for c in curves) / len(curves) for i in range(len(steps))], label=name,
                lw=2 if name in ("lora", "ga", "bone", "bone-shared") else 1)
    ax.set(xlabel="optimizer step", ylabel="held-out loss (mean over seeds)")
    ax.legend(fontsize=8)
    fig.savefig(os.path.join(results_dir, "loss_vs_steps.png"), dpi=110, bbox_inches="tight")
    return "![held-out loss against step (claims 2 and 3)](loss_vs_steps.png)"


def claim4_figure(by, loss, results_dir, plt):
    """Claim 4: each DyLoRA mode's runs cut to every rank against LoRA trained at that rank (mean +- std over seeds);
    [] when no record holds the losses by rank."""
    dys = {dy: [r["val_loss_by_rank"] for r in by.get(dy, []) if r.get("val_loss_by_rank")] for dy in ("dylora",
                                                                                                       "dylora-nf")}
    if not any(dys.values()):
        return []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ranks = sorted({int(k) for runs_by_rank in dys.values() for d in runs_by_rank for k in d})
    lora = [(b, *mean_std(loss[n])) for b in ranks for n in ["lora" if b == 16 else f"lora-r{b}"]
            if len(loss.get(n, [])) > 1]  # as in the table: one seed decides nothing
    ax.errorbar([p[0] for p in lora], [p[1] for p in lora], yerr=[p[2] for p in lora], fmt="o-", capsize=3,
                label="LoRA trained at each rank")
    top = 1.25 * max(p[1] for p in lora) if lora else None  # a mean above it (a seed far off) is written in, not drawn
    for dy, runs_by_rank in dys.items():
        at = [[d.get(str(b), d.get(b)) for d in runs_by_rank] for b in ranks]  # (keys: str in JSON, int in memory)
        pts = [(b, *mean_std(v)) for b, v in zip(ranks, at) if v and None not in v]
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt="s--", capsize=3,
                        label=f"one {dy} run, cut to each rank")
            for b, m, _ in pts:
                if top and m > top:
                    ax.annotate(f"{dy} r{b}: {m:.2f}", (b, top), fontsize=8, xytext=(6, -12),
                                textcoords="offset points", arrowprops=dict(arrowstyle="<-"))
    ax.set_ylim(top=top)
    ax.set(xscale="log", xlabel="rank", ylabel="held-out loss (mean +- std over seeds)")
    ax.set_xticks(ranks, [str(b) for b in ranks])
    ax.legend(fontsize=8)
    fig.savefig(os.path.join(results_dir, "loss_vs_rank.png"), dpi=110, bbox_inches="tight")
    return ["![held-out loss against rank (claim 4)](loss_vs_rank.png)"]


def merged_check(name, args):
    """The model as trained (adapters unmerged, bf16 autocast over the bf16 base: what train.py now scores) against
    the same adapter merged into the base and rounded to bf16 (what train.py scored before, and what a bf16 merged
    export gives): held-out loss on train.py's held-out split, and GSM8K accuracy. Written to <run>/merged.json."""
    import torch
    import data
    import runs
    import step
    from model import Tokenizer
    out = os.path.join(args.out_dir, name)
    path = os.path.join(out, "merged.json")
    if os.path.isfile(path):
        return json.load(open(path))
    cfg = cli.from_dict(data.DataConfig, json.load(open(os.path.join(out, "config.json")))["train"])
    tok = Tokenizer.from_pretrained(args.model)
    _, val_ex, _ = data.splits(cfg, args.data)  # the run's own held-out examples
    val, _ = data.tokenize(val_ex, tok, cfg.template, cfg.max_len)
    batches = data.eval_batches(val, 16, cfg.max_len, tok.pad_id)
    model = runs.load_trained(out, args.model, "cuda", torch.bfloat16)
    trained = step.evaluate(model, batches)
    runs.load_adapter(out)[0].merge(model)
    merged = step.evaluate(model.to(torch.bfloat16), batches)
    acc, = ev.main(["--model", args.model, "--adapter", out, "--data", args.test_data, "--merged_dtype",
                    "bfloat16", "--out", os.path.join(out, "gsm8k_merged_bf16.jsonl")])
    res = dict(val_loss_trained=trained, val_loss_merged_bf16=merged, acc_merged_bf16=acc["accuracy"],
               invalid_merged_bf16=acc["invalid_rate"])
    json.dump(res, open(path, "w"))
    return res


def table(rows):
    lines = ["| run | lr | rank | trainable | init s | train s | tok/s | peak GiB | held-out loss | GSM8K | invalid |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        init = f"{r['init_s']:.1f}" if r["name"] in ("sb", "ga", "xs") else "-"
        lines.append(f"| {r['name']} | {r['lr']:g} | {r['rank'] or '-'} | {r['trainable']:,} | {init} | "
                     f"{r['train_s']:.1f} | {r['tok_s']:,.0f} | {r['peak_gib'] or float('nan'):.2f} | "
                     f"{r['val_loss']:.4f} | {100 * r['acc']:.2f}% | {100 * r['invalid']:.1f}% |")
        for rank, (acc, inv) in sorted((r.get("by_rank") or {}).items(), key=lambda kv: int(kv[0])):
            lines.append(f"| dylora @ rank {rank} | | {rank} | | | | | | | {100 * acc:.2f}% | {100 * inv:.1f}% |")
    return "\n".join(lines)


def plot(rows, out_dir, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        log = [json.loads(l) for l in open(os.path.join(out_dir, r["name"], "log.jsonl"))]
        pts = [(l["step"], l["val_loss"]) for l in log if "val_loss" in l and not l.get("base_model")]
        ax.plot(*zip(*pts), marker=".", label=r["name"])
    base = [l["val_loss"] for l in log if l.get("base_model")]
    if base:
        ax.axhline(base[0], color="gray", ls=":", label="base model")
    ax.set(xlabel="optimizer step (batch 16)", ylabel="held-out loss (256 GSM8K train examples)", ylim=(0.8, 1.6),
           title="SmolLM2-135M-Instruct on GSM8K, one epoch")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")


def resolve(args):
    """The model folder and data files, fetched once here (after every check of the command), not by N concurrent
    runs (--jobs) racing on one download."""
    import fetch
    args.model = fetch.resolve_model(args.model)
    args.data = fetch.resolve_data(args.data, "train")
    args.test_data = args.test_data and fetch.resolve_data(args.test_data, "test")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if cli.wants_help(argv):
        return cli.print_help(__doc__, [("options (others go on to train.py)", ResultsConfig)])
    extra = []
    args, = cli.parse(argv, ResultsConfig(), rest=extra)
    if args.stage not in ("table", "sweep", "seeds", "fed", "report"):
        raise UserError(f"--stage must be table, sweep, seeds, fed or report, got {args.stage!r}")
    if args.jobs < 1:
        raise UserError(f"--jobs must be >= 1 (runs at once), got {args.jobs}")
    if args.report and args.stage not in ("table", "report"):
        raise UserError(f"--report is --stage report: leave out --stage {args.stage} (or --report)")
    if args.stage == "report" or args.report:  # from the committed records alone: no model, no data, no GPU
        return print(report(args.results_dir, os.path.join(args.results_dir, "RESULTS.md"), args.merged_json))
    for k in ("model", "data") + (("test_data",) if args.stage != "fed" else ()):
        if not getattr(args, k):
            raise UserError(f"--{k} is required (results.py --model PATH --data train.jsonl --test_data test.jsonl)")
    names = args.methods.split(",")
    for n in names:
        if n not in RUNS:
            raise UserError(f"unknown run {n!r}: choose from {', '.join(RUNS)}")
    try:
        factors, seeds = [float(f) for f in args.lr_factors], [int(s) for s in args.seeds]
    except ValueError:
        raise UserError("--lr_factors takes numbers (e.g. 0.5,1,2) and --seeds whole numbers (e.g. 0,1,2)") from None
    owned = [f for f in extra if f.split("=")[0] in ("--lr", "--seed")]
    if args.stage in ("sweep", "seeds") and owned:  # each run's lr and seed are the stage's, filed in its name
        raise UserError(f"{owned[0].split('=')[0]}: --stage {args.stage} sets each run's lr and seed itself (the "
                        f"sweep's grid, --seeds); leave it out")
    wanted = {"fed": args.fed_runs.split(","), "sweep": names, "seeds": names}
    if args.stage == "fed":  # the runs and their lrs first: an unknown run, a bad --lr or a missing sweep
        fed_names = args.fed_runs.split(",")
        bad = [n for n in fed_names if n not in FED_RUNS] + [e for e in args.dp_epsilons if not (
            e == "inf" or e.replace(".", "", 1).isdigit() and float(e) > 0)]
        if bad:
            raise UserError(f"--fed_runs takes {', '.join(FED_RUNS)} and --dp_epsilons inf or numbers > 0; got "
                            f"{bad[0]!r}")
        import fed  # each run's fed.py options, parsed here: a flag one strategy lacks stops it before any run
        for n in fed_names:
            try:
                cli.parse_run(FED_RUNS[n] + extra, fed.FedConfig, fed.FED_METHODS)
            except UserError as e:
                raise UserError(f"{n} (fed.py {' '.join(FED_RUNS[n])}): {e}") from None
        given = given_lr(extra)
        if 0 in seeds and not given:
            raise UserError("--stage fed runs seed 0 as each strategy's lr sweep: pass other --seeds (e.g. 1,2,3)")
        fed_factors, dp_factors = (factors_of(key, getattr(args, key)) for key in ("fed_lr_factors",
                                                                                   "fed_dp_lr_factors"))
        dp_sweep = args.fed_dp_sweep if any(e != "inf" for e in args.dp_epsilons) and not given else None
        if dp_sweep is not None and not (dp_sweep.replace(".", "", 1).isdigit() and float(dp_sweep) > 0):
            raise UserError(f"--fed_dp_sweep takes an epsilon > 0 (e.g. 3), got {dp_sweep!r}")
        strategies = sorted({FED_RUNS[n][1] for n in fed_names})
        centres = {} if given else {st: fed_centre(st, args.results_dir) for st in strategies}
        swept_at = {st: fed_sweep_run(st, fed_names, args.results_dir) for st in centres}
        wanted["fed"] += list(swept_at.values())
    # every committed record this stage would reuse must have been made with this command's flags: checked first,
    # so a mismatch stops the command before any run, not after some
    # (the seeds stage reads the sweep's records of its runs and of their base methods, whose lr a variant takes)
    if args.stage == "seeds":
        wanted["sweep"] = names + [RUNS[n][1] for n in names]
    for stage in {"sweep": ["sweep"], "seeds": ["sweep", "seeds"], "fed": ["fed"]}.get(args.stage, []):
        d = os.path.join(args.results_dir, stage)
        for f in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            if f.endswith(".json") and f.split("_")[0] in wanted[stage]:  # run names hold no "_"
                same_flags(json.load(open(os.path.join(d, f))), os.path.join(d, f), extra)
    os.makedirs(args.out_dir, exist_ok=True)
    if args.stage == "fed":  # claim 5: other keys go on to fed.py (e.g. --clients 10 --rounds 3)
        resolve(args)
        # each strategy's lr: its own sweep first (seed 0, no privacy, at its middle rank), around its method's
        # centralised choice
        lrs = {n: given for n in fed_names} if given else fed_lr_sweep("inf", centres, fed_factors, swept_at,
                                                                        fed_names, args, extra)
        d = os.path.join(args.results_dir, "fed")
        one_lr(d, lrs, "the sweep's choice or --lr", "_epsinf_s0.json", private=False)  # before any private sweep
        dp_lrs, dp_source = lrs, "--lr" if given else "each strategy's fed sweep"
        if dp_sweep is not None:  # the private runs' lr: a second sweep, at epsilon dp_sweep, around that choice
            chosen = {st: fed_chosen_lr(swept_at[st], args.results_dir) for st in centres}
            dp_lrs = fed_lr_sweep(dp_sweep, chosen, dp_factors, swept_at, fed_names, args, extra)
            dp_source = f"each strategy's private fed sweep (epsilon {dp_sweep})"
        if any(e != "inf" for e in args.dp_epsilons):  # (a command without privacy leaves the private ones be)
            one_lr(d, dp_lrs, "the private sweep's choice or --lr", f"_eps{args.fed_dp_sweep}_s0.json", private=True)
        source = "--lr" if given else "each strategy's fed sweep"
        # epsilon by epsilon, in --dp_epsilons' order: a command cut short leaves whole tables behind, not every
        # table short of its last runs
        concurrently(args.jobs, [functools.partial(fed_run, n, lrs[n] if eps == "inf" else dp_lrs[n], eps, sd, args,
                                                   extra, lr_from=source if eps == "inf" else dp_source)
                                 for eps in args.dp_epsilons for n in fed_names for sd in seeds])
        return print(report(args.results_dir, os.path.join(args.results_dir, "RESULTS.md"), args.merged_json))
    if args.stage in ("sweep", "seeds"):
        import runs
        tasks = []  # each method's sweep is one task (its grid grows on its own results); each seeds run is one
        for n in names:
            if args.stage == "sweep":
                tasks.append(functools.partial(sweep, n, runs.METHODS[RUNS[n][1]].DEFAULT_LR, factors, args, extra))
                continue
            # a variant (another rank or block size, RUNS beyond MAIN) never swept itself takes its method's lr
            source = n if n in MAIN or swept(n, args.results_dir) else RUNS[n][1]
            lr = chosen_lr(source, args.results_dir)
            if lr is None:
                raise UserError(f"no finished sweep run of {source} (for {n}) in {args.results_dir}/sweep: run "
                                f"--stage sweep first")
            one_lr(os.path.join(args.results_dir, "seeds"), {n: lr}, "the sweep's choice")
            tasks += [functools.partial(evidence_run, "seeds", n, lr, s, args, extra) for s in seeds]
        resolve(args)
        concurrently(args.jobs, tasks)
        return print(report(args.results_dir, os.path.join(args.results_dir, "RESULTS.md"), args.merged_json))
    resolve(args)
    rows = [run(n, args, extra) for n in names]
    text = table(rows)
    if args.merged_check:  # scored as trained vs merged into a bf16 base (the README's precision table)
        lines = ["| run | held-out loss as trained | merged, bf16 | GSM8K as trained | merged, bf16 |",
                 "|---|---|---|---|---|"]
        for r in rows:
            m = merged_check(r["name"], args)
            lines.append(f"| {r['name']} | {m['val_loss_trained']:.4f} | {m['val_loss_merged_bf16']:.4f} | "
                         f"{100 * r['acc']:.2f}% | {100 * m['acc_merged_bf16']:.2f}% |")
        text += "\n\n" + "\n".join(lines)
    print(text)
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write(text + "\n")
    json.dump(rows, open(os.path.join(args.out_dir, "results.json"), "w"), indent=1)
    try:
        plot(rows, args.out_dir, args.figure or os.path.join(args.out_dir, "loss.png"))
    except ImportError:
        print("matplotlib is not installed: no figure (pip install matplotlib)")
    return rows


if __name__ == "__main__":
    cli.run(main, resume="the same command goes on where it stopped")
