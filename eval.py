"""
GSM8K exact-match evaluation, comparable with the MetaMath-family papers (LoRA-XS, LoRA-SB, Fed-SB) and with
lm-eval-harness's extractors.

    python eval.py --model PATH [--adapter RUN_DIR] [--data test.jsonl] [--limit N] [--batch_size B]
                   [--max_new_tokens 256] [--out FILE.jsonl] [--ranks 1,2,4,8,16]

Protocol (../shared/methods.md): the training prompt template plus the papers' " Let's think step by step.",
greedy decoding, stop at EOS or at "Instruction"/"Response" (the papers' stop strings), 256 new tokens.
Scores:
- accuracy (primary): the first number after the LAST "The answer is" (any case); if there is none, the number
  after "####", else the last number in the completion. Numbers are parsed robustly (1,450,000; $; Unicode
  minus; a trailing '.'; .5; 18.00 == 18; "1,2,3" is a list) and compared numerically (extract() says where this
  departs from MetaMath's and lm-eval-harness's extraction). No number at all is wrong (never read as 0) and
  counts as invalid.
- strict / flexible: lm-eval-harness gsm8k's filters (first "#### N"; last number-like string) and its string
  comparison after removing ',', '$' and a trailing '.'.
An adapter from train.py is applied through its method's interface and scored as trained: unmerged, under the
training's precision policy (`--merged_dtype bfloat16` scores it merged and rounded to bf16 instead).
"""
import json
import os
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm import tqdm

import cli
import fetch
import runs
from cli import UserError
from data import TEMPLATE
from model import Llama, Tokenizer, fingerprint, generate

SUFFIX = " Let's think step by step."  # appended to the prompt at evaluation by MetaMath, LoRA-XS, LoRA-SB, Fed-SB
STOP = ("Instruction", "Response")  # their vLLM stop strings (which also cover "Instruction:" / "Response:")
# a number: thousands groups only of exactly three digits ("1,450,000"; "1,2,3" is a list: its first number is 1),
# an optional decimal part, a leading decimal point (".5"), an optional sign and "$"
NUMBER = re.compile(r"-?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|-?\$?\.\d+")
TRIGGER = re.compile(r"the answer is", re.IGNORECASE)


def parse_number(s):
    s = s.replace("$", "").replace(",", "").rstrip(".")
    try:
        return float(s)
    except ValueError:
        return None


def extract(text):
    """The predicted number of a completion, or None. Where this departs from the references (MetaMath's
    eval_gsm8k.py, lm-eval-harness gsm8k): the trigger is case-insensitive and its colon optional (MetaMath needs
    "The answer is: " exactly and counts "the answer is: 7" as no answer); "1,450,000" is 1450000 (MetaMath's regex
    reads 1450; lm-eval agrees with us); "1,2,3" is the list 1, 2, 3, so 1 (MetaMath reads 12, lm-eval 123); ".5" is
    0.5 (MetaMath rounds it to 0, lm-eval compares the string ".5")."""
    text = text.replace("\u2212", "-")  # Unicode minus
    hits = list(TRIGGER.finditer(text))
    if hits:
        m = NUMBER.search(text[hits[-1].end():])
        if m:
            return parse_number(m.group())
    m = re.search(r"####\s*(" + NUMBER.pattern + ")", text)
    if m:
        return parse_number(m.group(1))
    nums = NUMBER.findall(text)
    return parse_number(nums[-1]) if nums else None


def lm_eval_scores(text, gold_text):
    """lm-eval-harness gsm8k: strict = first '#### N', flexible = last number-like string; exact string match."""
    norm = lambda s: re.sub(r"\.$", "", s.replace(",", "").replace("$", "")).strip().lower()
    strict = re.search(r"#### (\-?[0-9\.\,]+)", text)
    flex = [a or b for a, b in re.findall(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", text)]
    return (strict is not None and norm(strict.group(1)) == norm(gold_text),
            bool(flex) and norm(flex[-1]) == norm(gold_text))


def load_gsm8k(path, limit=0):
    if not os.path.isfile(path):
        raise UserError(f"GSM8K file not found: {path}")
    rows = []
    for n, line in enumerate(open(path), 1):
        if line.strip():
            try:
                r = json.loads(line)
                rows.append((r["question"], r["answer"].rsplit("####", 1)[1].strip()))
            except (json.JSONDecodeError, KeyError, IndexError, AttributeError):
                raise UserError(f"{path}:{n}: expected GSM8K 'question' and 'answer' with '#### N'") from None
    if not rows:
        raise UserError(f"{path}: no examples")
    return rows[:limit] if limit else rows


def auto_batch(model, ids, max_new_tokens):
    """Prompts decoded together when --batch_size is 0: on a GPU as many as their KV cache, logits and prefill
    activations fit in 40% of the free memory (all of GSM8K test at once for SmolLM2 on an H200: fewer, fuller
    decode steps); 256 on a CPU."""
    dev = model.lm_head.weight.device
    if dev.type != "cuda":
        return 256
    c, T = model.cfg, max(map(len, ids)) + max_new_tokens
    per_row = (2 * c.n_layers * c.n_kv_heads * c.head_dim * T * 2  # k and v, bf16
               + 3 * c.vocab_size * 4  # the last position's fp32 logits and what sampling makes of them
               + max(map(len, ids)) * (3 * c.hidden_dim + 6 * c.dim) * 2)  # one block's prefill activations
    return max(1, min(len(ids), int(0.4 * torch.cuda.mem_get_info(dev)[0]) // per_row))


def run_eval(model, tok, rows, template, suffix, batch_size, max_new_tokens, desc="gsm8k"):
    """Greedy completions for every row (longest prompts first, batched), scored. Returns records, summary."""
    prompts = [template.format(question=q) + suffix for q, _ in rows]
    ids = [tok.encode(p, bos=tok.add_bos) for p in prompts]
    auto, batch_size = not batch_size, batch_size or auto_batch(model, ids, max_new_tokens)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths share a batch: little padding
    new = [None] * len(ids)
    t0 = time.time()
    dev = model.lm_head.weight.device
    # the training's precision policy on CUDA (bf16 autocast over a bf16 base and fp32 adapters), so the model scored
    # is the model trained; no cast cache: a decode step captured as a CUDA graph re-casts inside the graph
    policy = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if dev.type == "cuda" else nullcontext()
    with tqdm(total=len(ids), desc=desc, dynamic_ncols=True) as bar, policy:
        j = 0
        while j < len(order):
            chunk = order[j:j + batch_size]
            try:
                outs = generate(model, [ids[i] for i in chunk], max_new_tokens, eos_id=tok.stop_ids, stop=STOP,
                                tokenizer=tok, pad_id=tok.pad_id)
            except torch.OutOfMemoryError:
                if not auto:
                    raise UserError(f"out of GPU memory decoding {len(chunk)} prompts at once: pass a smaller "
                                    f"--batch_size (0: as many as fit)") from None
                if len(chunk) == 1:
                    raise
                outs = None
            if outs is None:  # (outside the except: its traceback no longer holds the failed batch's tensors)
                # the auto size was measured on free memory that others on the GPU (--jobs) have since taken: the
                # same prompts again, half as many at a time
                batch_size = (len(chunk) + 1) // 2
                torch.cuda.empty_cache()
                continue
            for i, o in zip(chunk, outs):
                new[i] = o
            bar.update(len(chunk))
            j += len(chunk)
    if model.lm_head.weight.device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.time() - t0
    records, n_ok, n_strict, n_flex, n_invalid = [], 0, 0, 0, 0
    for i, ((q, gold_text), prompt) in enumerate(zip(rows, prompts)):
        completion = tok.decode(new[i])
        for s in STOP:  # the text up to the first stop string, as the papers' vLLM returns it
            completion = completion.split(s)[0]
        pred, gold = extract(completion), parse_number(gold_text)
        correct = pred is not None and abs(pred - gold) < 1e-6
        strict, flex = lm_eval_scores(completion, gold_text)
        n_ok, n_strict, n_flex, n_invalid = n_ok + correct, n_strict + strict, n_flex + flex, n_invalid + (pred is None)
        records.append(dict(idx=i, question=q, prompt=prompt, completion=completion, pred=pred, gold=gold,
                            correct=correct, strict=strict, flexible=flex, n_new_tokens=len(new[i])))
    n, n_tok = len(rows), sum(len(o) for o in new)
    summary = dict(accuracy=n_ok / n, strict=n_strict / n, flexible=n_flex / n, invalid_rate=n_invalid / n, n=n,
                   generated_tokens=n_tok, tok_s=round(n_tok / wall), wall_s=round(wall, 2), batch_size=batch_size)
    return records, summary


def save_results(records, summary, path):
    """Per-example JSONL at `path`, the summary next to it (.summary.json); both written atomically."""
    runs.atomic_save(records, path, lambda o, p: open(p, "w").write("".join(json.dumps(r) + "\n" for r in o)))
    runs.save_json(summary, path.replace(".jsonl", ".summary.json"))


def score(model, tok, path, limit=0, template=TEMPLATE, out="", batch_size=0, max_new_tokens=256, **meta):
    """The GSM8K score of a model as it is (train.py and fed.py call this on the model as trained: adapters
    unmerged, the training's precision policy) on the first `limit` problems (0: all) of `path`; the records and
    the summary (with `meta`) are written to `out` when given."""
    records, summary = run_eval(model.eval(), tok, load_gsm8k(path, limit), template, SUFFIX, batch_size,
                                max_new_tokens)
    summary["synthetic"] = fetch.is_synthetic(path)  # GSM8K could not be fetched: not a GSM8K score
    if out:
        save_results(records, dict(summary, data=path, **meta), out)
    print(("accuracy on SYNTHETIC arithmetic problems, NOT GSM8K (GSM8K could not be fetched: pass --test_data)"
           if summary["synthetic"] else "GSM8K accuracy") + f" {summary['accuracy']:.4f} on {summary['n']} problems "
          f"of {path} (invalid {summary['invalid_rate']:.4f})" + (f"; details in {out}" if out else ""))
    return summary


@dataclass
class EvalConfig:
    model: str = fetch.DEFAULT_MODEL  # a Hugging Face folder or hub id
    adapter: str = ""  # a train.py run folder (out/<run_name>); empty: the base model
    data: str = "gsm8k"  # a GSM8K test.jsonl; gsm8k: GSM8K test (fetched)
    limit: int = 0  # the first N problems only; 0: all
    batch_size: int = 0  # prompts decoded together; 0: as many as fit in 40% of the free GPU memory (256 on a CPU),
    # halved while a batch runs out of memory (others sharing the GPU may take it meanwhile)
    max_new_tokens: int = 256  # generated tokens per problem at most
    suffix: str = SUFFIX  # appended to the prompt ('' for the training prompt as is)
    ranks: str = ""  # DyLoRA-like methods (NESTED_RANKS): score one adapter at each rank, e.g. 1,2,4,8,16
    out: str = ""  # per-example JSONL (the summary goes to <out>.summary.json); default: <adapter>/gsm8k.jsonl
    merged_dtype: str = ""  # score the adapter merged and cast to this dtype (bfloat16: a bf16 merged export)
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if cli.wants_help(argv):
        return cli.print_help(__doc__, [("options", EvalConfig)])
    args, = cli.parse(argv, EvalConfig())
    if args.limit < 0:
        raise UserError(f"--limit must be >= 0 (0: all problems), got {args.limit}")
    if args.merged_dtype not in ("", "float32", "bfloat16", "float16"):
        raise UserError(f"--merged_dtype must be float32, bfloat16 or float16, got {args.merged_dtype!r}")
    device = cli.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.batch_size < 0 or args.max_new_tokens < 1:
        raise UserError(f"--batch_size must be >= 0 (0: auto) and --max_new_tokens >= 1, got {args.batch_size}, "
                        f"{args.max_new_tokens}")
    rows_path = fetch.resolve_data(args.data, "test")
    rows = load_gsm8k(rows_path, args.limit)
    adapter = runs.load_adapter(args.adapter) if args.adapter else None
    try:
        ranks = [int(r) for r in args.ranks.split(",") if r] or [None]
    except ValueError:
        raise UserError(f"--ranks takes whole numbers, e.g. 1,2,4,8,16; got {args.ranks!r}") from None
    if ranks[0] is not None and (adapter is None or not adapter[0].NESTED_RANKS):
        raise UserError("--ranks needs an adapter of a method trained at several ranks (DyLoRA)")
    model_path = fetch.resolve_model(args.model)
    tok = Tokenizer.from_pretrained(model_path)
    model = Llama.from_pretrained(model_path, device=device, dtype=dtype,  # the base the adapter was trained on
                                  base_bits=adapter[3].get("base_bits", 16) if adapter else 16)
    trained_on = adapter[3].get("base_fingerprint") if adapter else None
    if trained_on and trained_on != fingerprint(model):  # same shapes, other weights: strict loading cannot tell
        raise UserError(f"{args.adapter} was trained on {adapter[3]['base_model']}, whose weights differ from "
                        f"{args.model}'s: pass --model {adapter[3]['base_model']}")
    template = adapter[3].get("template", TEMPLATE) if adapter else TEMPLATE
    base_layers = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    out = args.out or (os.path.join(args.adapter, "gsm8k.jsonl") if args.adapter else
                       os.path.join("out", f"gsm8k_{os.path.basename(os.path.normpath(args.model))}.jsonl"))
    try:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror}): choose another --out") from None
    summaries = []
    for rank in ranks:
        if adapter is not None:
            method, cfg, sd, meta = adapter
            if rank is not None:
                cfg.eval_rank = rank
            method.apply(model, cfg, init=False)
            method.load_adapter_state_dict(model, sd)
            if args.merged_dtype:  # for comparison: the merged model rounded to one dtype
                method.merge(model)
                model.to(getattr(torch, args.merged_dtype))
        records, summary = run_eval(model, tok, rows, template, args.suffix, args.batch_size, args.max_new_tokens,
                                    desc=f"gsm8k r={rank}" if rank else "gsm8k")
        summary.update(model=args.model, adapter=args.adapter, method=adapter[3]["method"] if adapter else "base",
                       rank=rank, merged_dtype=args.merged_dtype or None, data=args.data, template=template,
                       suffix=args.suffix, stop=list(STOP),
                       decoding=dict(greedy=True, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size),
                       protocol="first number after the last 'The answer is', else '#### N', else the last number; "
                                "numeric comparison; strict/flexible as lm-eval-harness gsm8k")
        save_results(records, summary, out if rank is None else out.replace(".jsonl", f"_r{rank}.jsonl"))
        summaries.append(summary)
        print(f"{'rank ' + str(rank) + ': ' if rank else ''}"
              f"{'SYNTHETIC problems, NOT GSM8K: ' if fetch.is_synthetic(rows_path) else ''}"
              f"accuracy {summary['accuracy']:.4f} "
              f"(strict {summary['strict']:.4f}, flexible {summary['flexible']:.4f}, invalid "
              f"{summary['invalid_rate']:.4f}) on {summary['n']} problems; {summary['tok_s']} tok/s, "
              f"{summary['wall_s']} s")
        for n, m in base_layers.items():  # restore the base layers for the next rank
            parent, _, child = n.rpartition(".")
            setattr(model.get_submodule(parent), child, m)
    return summaries


if __name__ == "__main__":
    cli.run(main, "--batch_size (0: as many as fit)")
