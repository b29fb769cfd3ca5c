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
import json
import os
import subprocess
import sys
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
DYLORA_RANKS = "1,2,4,8,16"  # the ranks a run of a method with NESTED_RANKS is scored at


@dataclass
class ResultsConfig:
    model: str = ""  # the base model: a Hugging Face folder (required)
    data: str = ""  # GSM8K train.jsonl (required)
    test_data: str = ""  # GSM8K test.jsonl (required)
    out_dir: str = "out/results"  # one run folder per method, plus results.md, results.json and loss.png
    methods: str = ",".join(RUNS)  # the runs to do or read, comma-separated
    figure: str = ""  # where the held-out loss figure goes; empty: <out_dir>/loss.png
    merged_check: bool = False  # CUDA: also score each run's adapter merged into a bf16 base (the precision table)
    # any other --key=value is passed on to every train.py run


def run(name, args, extra):
    """One train.py run in its own process (its peak memory and CUDA state are its own), or its saved result."""
    import runs
    out = os.path.join(args.out_dir, name)
    done = os.path.join(out, "result.json")
    if os.path.isfile(done):
        return json.load(open(done))
    argv = RUNS[name] + ["--model", args.model, "--data", args.data, "--test_data", args.test_data,
                         "--out_dir", args.out_dir, "--run_name", name, "--eval_every", "50", "--log_every", "10",
                         "--save_every", "100000"] + extra
    if os.path.isfile(os.path.join(out, "ckpt.pt")):  # a run cut off in an earlier session: continue it
        argv.append("--resume")
    elif os.path.isdir(out) and os.listdir(out):  # a run that never saved a checkpoint: start it again
        argv.append("--overwrite")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
    rc = subprocess.run([sys.executable, script] + argv).returncode
    if rc:
        raise UserError(f"the {name} run failed (exit {rc}); its output is above")
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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if cli.wants_help(argv):
        return cli.print_help(__doc__, [("options (others go on to train.py)", ResultsConfig)])
    extra = []
    args, = cli.parse(argv, ResultsConfig(), rest=extra)
    for k in ("model", "data", "test_data"):
        if not getattr(args, k):
            raise UserError(f"--{k} is required (results.py --model PATH --data train.jsonl --test_data test.jsonl)")
    names = args.methods.split(",")
    for n in names:
        if n not in RUNS:
            raise UserError(f"unknown run {n!r}: choose from {', '.join(RUNS)}")
    os.makedirs(args.out_dir, exist_ok=True)
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
    cli.run(main)
