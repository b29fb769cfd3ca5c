"""
Fine-tune a Llama-family model on GSM8K or MetaMathQA with any method in this repo, then score it on GSM8K.

    python train.py --method sb --model PATH --data train.jsonl [--key=value ...]     (--help lists every key)

One loop for every method: the method file swaps the layers (apply), says what trains (requires_grad) and how to
save, load and merge itself; this script never branches on the method. Precision (step.py): on CUDA the frozen
base stays bf16, trainable tensors are fp32, compute runs under bf16 autocast; on CPU everything is fp32.
Outputs in <out_dir>/<run_name>/ (runs.py): config.json, log.jsonl, adapter.safetensors + adapter.json, ckpt.pt
(resume), summary.json, gsm8k.jsonl. SIGTERM (a preemption, a time limit) or Ctrl-C during training saves a
checkpoint after the step and stops; --resume goes on from it exactly.

Several GPUs: torchrun --nproc_per_node N train.py ... (DDP; --fsdp shards with FSDP2). Every process trains on
its share of each step's batch_size examples; the math is one process's, up to the order of float sums.
No other file imports this one: it is the script to read, and to fork.
"""
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

import cli
import data
import eval as ev
import fetch
import runs
import step
from cli import UserError
from data import DataConfig
from model import Llama, Tokenizer, fingerprint
from runs import METHODS
from step import OptimConfig


@dataclass
class TrainConfig(DataConfig, OptimConfig):
    method: str = "sb"  # full | lora | xs | sb | ga | bone | dylora (each one's options: --help)
    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"  # a Hugging Face folder or hub id (fetch.py resolves it)
    test_data: str = "auto"  # GSM8K test file scored after training; auto: GSM8K test if --data is gsm8k; "": none
    eval_limit: int = -1  # test problems to score; 0: all; -1 (auto): all on CUDA, 16 on CPU
    epochs: float = 1.0  # passes over the training examples (fractions allowed), unless --max_steps is set
    max_steps: int = -1  # > 0: this many optimizer steps instead of --epochs; 0: --epochs; -1: 0 on CUDA, 8 on CPU
    seed: int = 0  # data order, dropout and the method's own draws (a method's --seed too)
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    dtype: str = "bfloat16"  # of the frozen base on CUDA: bfloat16 | float16 | float32 (CPU always runs fp32)
    base_bits: int = 16  # 4: the blocks' linear weights stored in NF4 (QLoRA's 4-bit format, nf4.py), dequantized
    # on the fly; 16: in --dtype
    compile: bool = False  # torch.compile each transformer block
    cuda_graph: bool = True  # on CUDA: capture each training step as one CUDA graph (fixed-shape batches)
    grad_checkpoint: bool = False  # recompute activations in backward (less memory, ~30% slower)
    fsdp: bool = False  # under torchrun: shard weights, gradients and optimizer state with FSDP2 instead of DDP
    log_every: int = 10  # optimizer steps between log lines (loss, lr, grad norm, tok/s)
    eval_every: int = 100  # optimizer steps between held-out losses
    save_every: int = 200  # optimizer steps between checkpoints (and at the end)
    out_dir: str = "out"  # runs go to <out_dir>/<run_name>
    run_name: str = ""  # default: the method name
    resume: bool = False  # continue <out_dir>/<run_name> from its last checkpoint
    overwrite: bool = False  # replace the run already in <out_dir>/<run_name> (else an existing run is refused)
    export: str = ""  # after training: peft (a standard PEFT LoRA adapter) | merged (an HF model folder) | "": none
    export_dtype: str = "auto"  # of --export merged: auto (the checkpoint's, unless rounding to it loses > 1% of the
    # update: then float32) | float32 | bfloat16 | float16


def check(tcfg, mcfg, method, argv):
    """One clear line for a setting that cannot work, before anything is loaded (the method's own layers are
    checked later on a weightless copy of the model: runs.check_method)."""
    data.check(tcfg)
    step.check(tcfg, lr_given="lr" in dict(cli.pairs(argv)))
    if method.GRADIENT_INIT and mcfg.init_samples < 1:
        raise UserError(f"--init_samples must be >= 1 (the examples whose gradient initialises {tcfg.method})")
    if tcfg.epochs <= 0 or tcfg.max_steps < -1 or tcfg.eval_limit < -1:
        raise UserError(f"--epochs must be > 0, --max_steps >= 0 (-1: auto) and --eval_limit >= 0 (-1: auto), got "
                        f"{tcfg.epochs}, {tcfg.max_steps}, {tcfg.eval_limit}")
    if min(tcfg.log_every, tcfg.eval_every, tcfg.save_every) < 1:
        raise UserError(f"--log_every, --eval_every and --save_every must be >= 1, got {tcfg.log_every}, "
                        f"{tcfg.eval_every}, {tcfg.save_every}")
    if tcfg.dtype not in ("bfloat16", "float16", "float32"):
        raise UserError(f"--dtype must be bfloat16, float16 or float32, got {tcfg.dtype!r}")
    if tcfg.base_bits not in (4, 16):
        raise UserError(f"--base_bits must be 4 (NF4) or 16 (the base in --dtype), got {tcfg.base_bits}")
    if tcfg.base_bits == 4 and method.Linear is None:
        raise UserError(f"--method {tcfg.method} trains the base weights themselves: they cannot be 4-bit; use "
                        "--base_bits 16, or an adapter method")
    if tcfg.export not in ("", "peft", "merged"):
        raise UserError(f"--export must be peft or merged, got {tcfg.export!r}")
    if tcfg.export_dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UserError(f"--export_dtype must be auto, float32, bfloat16 or float16, got {tcfg.export_dtype!r}")
    if tcfg.batch_size % int(os.environ.get("WORLD_SIZE", 1)):
        raise UserError(f"--batch_size={tcfg.batch_size} must be divisible by the number of processes "
                        f"({os.environ['WORLD_SIZE']})")


def bounded_on_cpu(tcfg, device):
    """The -1 (auto) settings: the real experiment on CUDA, a run of a few minutes on a CPU, which says so."""
    cpu = device.type == "cpu"
    if cpu and -1 in (tcfg.max_steps, tcfg.val_size, tcfg.eval_limit):
        print("CPU: a bounded run (8 steps, 3 of them warm-up, 32 held-out examples, 16 test problems, where not "
              "set); --max_steps=0 --val_size=256 --eval_limit=0 give the full one")
    if cpu and tcfg.max_steps < 0 and tcfg.warmup_steps < 0:
        tcfg.warmup_steps = 3  # 3% of 8 steps would be 1: the first step at the peak lr (LoRA-SB's lr_1 too)
    tcfg.max_steps = (8 if cpu else 0) if tcfg.max_steps < 0 else tcfg.max_steps
    tcfg.val_size = (32 if cpu else 256) if tcfg.val_size < 0 else tcfg.val_size
    tcfg.eval_limit = (16 if cpu else 0) if tcfg.eval_limit < 0 else tcfg.eval_limit


def resolve(tcfg):
    """(model folder, training file, test file or "") for the run, fetched into the cache where needed; the test
    file is looked for now, not after training."""
    test = ("gsm8k" if tcfg.data == "gsm8k" else "") if tcfg.test_data == "auto" else tcfg.test_data
    test_path = fetch.resolve_data(test, "test") if test else ""
    if test_path and not os.path.isfile(test_path):
        raise UserError(f"--test_data {test_path}: file not found (\"\" trains without the final score)")
    return fetch.resolve_model(tcfg.model), fetch.resolve_data(tcfg.data, "train"), test_path


def check_finite(loss, grad_norm, done, last_saved, run_dir, what="loss"):
    """Stop a run that has broken (a NaN or inf loss or gradient) or died (a zero gradient: nothing more can be
    learnt, as when a huge lr saturates every softmax), pointing at the last checkpoint, which holds good weights."""
    dead = grad_norm == 0 and loss > 0
    if not (math.isfinite(loss) and math.isfinite(grad_norm)) or dead:
        why = f"the gradient is zero with the {what} at {loss:.4f}" if dead else f"{what} is {loss}"
        raise UserError(f"{why} at step {done}: training stopped; " + (
            f"the last good checkpoint (step {last_saved}) is in {run_dir}" if last_saved else
            "no checkpoint had been saved") + "; lower --lr or check the data")


def main(argv=None):
    # set-up: the config (a resumed run's own, then this command line), processes, device, files
    argv = sys.argv[1:] if argv is None else argv
    if cli.wants_help(argv):
        return cli.print_help(__doc__, [("run", TrainConfig), ("data", DataConfig), ("optimizer", OptimConfig)] +
                              [(f"--method {k}", m.Config) for k, m in METHODS.items()])
    tcfg, mcfg = cli.parse_run(argv, TrainConfig, METHODS)
    run_dir = os.path.join(tcfg.out_dir, tcfg.run_name or tcfg.method)
    runs.prepare_run_dir(run_dir, tcfg.resume, tcfg.overwrite)  # an existing run is touched only when asked
    ckpt = runs.load_checkpoint(run_dir) if tcfg.resume else None
    if ckpt is not None:
        tcfg, mcfg = cli.parse_run(argv, TrainConfig, METHODS, json.loads(ckpt["config"]))
    method = METHODS[tcfg.method]
    check(tcfg, mcfg, method, argv)
    tcfg.lr = tcfg.lr or method.DEFAULT_LR
    distributed, rank, world, device = step.init_distributed(cli.device(tcfg.device))
    dtype = getattr(torch, tcfg.dtype) if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # this run's peak, even when called in-process after another
    bounded_on_cpu(tcfg, device)
    with step.rank0_first(distributed, rank):  # downloads and conversions into the cache, once
        model_path, data_path, test_path = resolve(tcfg)
    runs.check_method(method, mcfg, model_path, tcfg.export)  # its layers, on a weightless copy of the model
    torch.manual_seed(tcfg.seed + rank)  # each rank its own dropout masks (nanoGPT's seed_offset); inits seed apart

    # data: examples -> (ids, n_prompt) -> packed held-out batches; training batches are packed per step
    tok = Tokenizer.from_pretrained(model_path)
    train_ex, val_ex, _ = data.splits(tcfg, data_path)
    train, cut = data.tokenize(train_ex, tok, tcfg.template, tcfg.max_len)  # [(ids, n_prompt)]
    val, _ = data.tokenize(val_ex, tok, tcfg.template, tcfg.max_len)
    micro = tcfg.micro_batch_size or tcfg.batch_size
    val_batches = data.eval_batches(val, micro, tcfg.max_len, tok.pad_id)  # [(x, y, pos)], each (R, T)
    total = tcfg.max_steps or math.ceil(tcfg.epochs * len(train) / tcfg.batch_size)
    print(f"{len(train)} training examples ({cut} truncated to {tcfg.max_len} tokens), {len(val)} held out, "
          f"{total} steps of {tcfg.batch_size}" + (f" over {world} processes" if distributed else ""))

    # the model: every process holds it whole until it is wrapped, and evaluates the whole held-out set
    model = Llama.from_pretrained(model_path, device=device, dtype=dtype, base_bits=tcfg.base_bits)
    base = fingerprint(model)  # recorded with the adapter: eval.py refuses it on another base model
    log_path = os.path.join(run_dir, "log.jsonl")
    log = [] if ckpt else [dict(step=0, val_loss=step.evaluate(model, val_batches), base_model=True)]

    # the method: its initialisation (from gradients of the first examples where it needs them), timed
    t0 = time.time()
    if ckpt is None:
        step.init_method(model, method, mcfg, train, tcfg, tok.pad_id, step.get_lr(0, tcfg, total), rank, world)
    else:  # the layers only: the checkpoint fills them
        method.apply(model, mcfg, init=False)
    init_diff = None  # every rank built the init from the same summed gradient: check that they agree
    if distributed and method.GRADIENT_INIT and ckpt is None:
        init_diff = step.rank_disagreement(method.adapter_state_dict(model).values())
    if device.type == "cuda":
        torch.cuda.synchronize()
    init_s = time.time() - t0
    config = dict(train=asdict(tcfg), method_config=asdict(mcfg))  # resolved (LoRA-SB's lr_1 included)
    if rank == 0:  # the run's first file: the folder is made (and --overwrite clears the old run) only now
        runs.start_run_dir(run_dir, tcfg.overwrite)
        runs.save_json(config, os.path.join(run_dir, "config.json"))
        print(f"settings in {run_dir}/config.json")
    if ckpt is not None:  # whole tensors, loaded before any sharding
        method.load_adapter_state_dict(model, ckpt["adapter"])
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # the optimizer and the step; under torchrun the step calls a DDP/FSDP2 wrapper, files use `model` itself.
    # No CUDA graph under torchrun: DDP and FSDP2 launch collectives from backward hooks, which a replay skips
    step_model = step.wrap(model, device, tcfg.fsdp) if distributed else model
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP2: this rank's shards (DTensors)
    graphed = tcfg.cuda_graph and device.type == "cuda" and method.CUDA_GRAPH and not distributed
    if tcfg.cuda_graph and device.type == "cuda" and not graphed:
        print(f"{tcfg.method}: no CUDA graph " + ("under torchrun" if distributed else
                                                  "(its CUDA_GRAPH flag is off)"))
    opt = step.make_optimizer(params, tcfg, device, graphed)
    start = 0
    if ckpt is not None:  # adapter (above), optimizer, RNG, step; the data order is a function of the step
        step.load_optimizer(opt, ckpt["optimizer"], params, graphed, device)
        if rank == 0:  # the saved stream is rank 0's; other ranks keep their own (dropout masks only)
            runs.restore_rng(ckpt)
        start = ckpt["step"]
        log = runs.read_log(log_path, start)  # forget what was logged after the checkpoint
        print(f"resumed {run_dir} at step {start}")
    else:
        log.append(dict(step=0, init_s=round(init_s, 3), trainable_params=n_train))
        if distributed:
            log[-1].update(processes=world, init_rank_diff=init_diff)
        log.append(dict(step=0, val_loss=step.evaluate(model, val_batches)))
        print(f"held-out loss {log[0]['val_loss']:.4f} (base model), {log[-1]['val_loss']:.4f} after the init")
    if rank == 0:
        runs.write_log(log, log_path)
    print(f"{tcfg.method}: {n_train:,} trainable parameters, init {init_s:.2f}s")

    # a resumed run's init time, training time, tokens and peak memory go on from its checkpoint's, so its summary
    # is of the whole run (its init ran once, in the first process)
    saved = ckpt if ckpt is not None else {}
    init_s = saved.get("init_s", init_s)
    prior_s, prior_tok = saved.get("train_s", 0.0), saved.get("tokens", 0)

    def trained_s():  # the loop's time so far, over every process of the run
        return prior_s + time.time() - t_train - t_aside

    def peak_gib():  # training's peak so far, over every process of the run
        if device.type != "cuda":
            return None
        return max(saved.get("peak_gib") or 0.0, torch.cuda.max_memory_allocated() / 2**30)

    def checkpoint(done):  # every rank gathers (FSDP2 shards -> whole tensors); rank 0 writes
        adapter, optimizer = step.whole(method.adapter_state_dict(model)), step.whole(opt.state_dict())
        if rank == 0:
            runs.save_adapter(adapter, tcfg, mcfg, run_dir, done, base)
            runs.save_checkpoint(run_dir, done, adapter, optimizer, config, init_s=init_s, peak_gib=peak_gib(),
                                 train_s=trained_s(), tokens=prior_tok + tok_all)

    # the loop: nothing in it waits for the GPU except on log, eval and save steps
    model.grad_checkpoint = tcfg.grad_checkpoint
    if tcfg.compile:
        model.compile()
    model.train()
    train_step = step.make_step(step_model, opt, params, tcfg.grad_clip, graphed, world)
    bar = tqdm(range(start, total), initial=start, total=total, desc=tcfg.method, dynamic_ncols=True, disable=rank > 0)
    loss_sum = torch.zeros((), device=device)  # summed on the device between log steps
    t_log, tok_log, slots, last_log, last_saved = time.time(), 0, 0, start, start
    t_train, t_aside, tok_all = time.time(), 0.0, 0  # the loop's time, evaluations and checkpoints excluded
    vl = next((l["val_loss"] for l in reversed(log) if l.get("val_loss") is not None), float("nan"))  # the latest
    with runs.stop_signals():  # one process: SIGTERM or Ctrl-C saves a checkpoint after the step, then stops
        for it in bar:
            lr = step.get_lr(it, tcfg, total)
            step.set_lr(opt, lr)
            method.on_step(model, mcfg, it)
            idxs = data.example_order(len(train), tcfg.seed, it * tcfg.batch_size, tcfg.batch_size)
            batches, n_tgt, n_real = data.micro_batches(train, idxs, micro, tcfg.max_len, tok.pad_id, graphed, rank,
                                                        world)
            loss, grad_norm = train_step(batches, n_tgt)  # device scalars
            loss_sum += loss
            tok_log, tok_all = tok_log + n_real, tok_all + n_real  # real (non-pad) tokens of every rank
            slots += sum(x.numel() for x, _, _ in batches)  # this rank's padded slots
            done, stop = it + 1, bool(runs.STOP)  # SIGTERM or Ctrl-C came (runs.stop_signals): save, then stop
            if done % tcfg.log_every == 0 or done == total:
                # the step loss (each rank's carries world x its share, see make_step) and every rank's slots
                loss_val, all_slots = step.sum_over_ranks([loss_sum.item(), slots], device)
                loss_val /= world * (done - last_log)
                check_finite(loss_val, grad_norm.item(), done, last_saved, run_dir)
                dt = time.time() - t_log
                entry = dict(step=done, loss=round(loss_val, 5), lr=lr, grad_norm=round(grad_norm.item(), 5),
                             tok_s=round(tok_log / dt), pad_frac=round(1 - tok_log / all_slots, 4),
                             peak_mem_gb=round(torch.cuda.max_memory_allocated() / 2**30, 3) if device.type == "cuda"
                             else None)
                if rank == 0:
                    runs.append_log(entry, log_path)
                bar.set_postfix(loss=f"{loss_val:.4f}", tok_s=entry["tok_s"])
                loss_sum.zero_()
                t_log, tok_log, slots, last_log = time.time(), 0, 0, done
            if done % tcfg.eval_every == 0 or done == total:
                t = time.time()
                vl = step.evaluate(model, val_batches)
                t_aside += time.time() - t
                if rank == 0:
                    runs.append_log(dict(step=done, val_loss=round(vl, 5)), log_path)
                bar.write(f"step {done}: held-out loss {vl:.4f}")
            if done % tcfg.save_every == 0 or done == total or stop:
                # never save broken weights: the step's loss was of the weights before it, so check the ones saved
                held = vl if done % tcfg.eval_every == 0 or done == total else step.evaluate(
                    model, val_batches[:1] or batches[:1])
                check_finite(held, 1.0, done, last_saved, run_dir, "held-out loss of the weights to be saved")
                t = time.time()
                checkpoint(done)
                t_aside += time.time() - t
                last_saved = done
            if stop and done < total:
                raise UserError(f"stopped by {runs.STOP[0]} at step {done} of {total}: the checkpoint is in {run_dir}; "
                                f"continue with --resume")
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = trained_s()  # the whole run's, resumed parts included
    peak = peak_gib()  # training's peak (before scoring)
    if start >= total and ckpt is not None:
        print(f"{run_dir} had already finished ({total} steps)")

    # the end: rank 0 alone scores and exports the model as trained (adapters unmerged, the training's precision)
    if distributed:
        train_step = step_model = opt = params = grad_norm = None  # free what uses the process group first
        if not step.finish_distributed():
            return None
        if tcfg.fsdp and (tcfg.export or test_path):  # rank 0 held shards: rebuild the model from its adapter
            model = None  # the shards go first
            model = runs.load_trained(run_dir, model_path, device, dtype)
    summary = ev.score(model, tok, test_path, tcfg.eval_limit, tcfg.template, os.path.join(run_dir, "gsm8k.jsonl"),
                       method=tcfg.method) if test_path else None
    if tcfg.export == "peft":
        runs.save_peft(model, method, os.path.join(run_dir, "peft"), tcfg.model)
        print(f"PEFT adapter written to {run_dir}/peft")
    if tcfg.export == "merged":
        method.merge(model)  # fp32 merged weights; save_hf picks the dtype that keeps the update
        runs.save_hf(model, model_path, os.path.join(run_dir, "merged"), tcfg.export_dtype, tcfg.base_bits)
        print(f"merged model written to {run_dir}/merged")
    out = dict(run_dir=run_dir, steps=total, steps_this_run=total - start, trainable_params=n_train, init_s=init_s,
               train_s=train_s, tok_s=(prior_tok + tok_all) / max(train_s, 1e-9), peak_gib=peak, val_loss=vl,
               gsm8k=summary)
    runs.save_json(out, os.path.join(run_dir, "summary.json"))
    if fetch.is_synthetic(data_path):
        print("trained on SYNTHETIC arithmetic problems, NOT GSM8K (GSM8K could not be fetched: pass --data)")
    return out


if __name__ == "__main__":
    cli.run(main, "--micro_batch_size", "--resume goes on from the run's last checkpoint")
