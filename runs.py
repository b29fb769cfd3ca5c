"""
Run folders: the methods by name, and everything a run writes or reads back. A train.py run folder
(out/<run_name>) holds:

    config.json          the resolved TrainConfig and method Config
    log.jsonl            one JSON line per log/eval step (step 0: the base model's held-out loss, init time)
    adapter.safetensors  the method's adapter_state_dict(), with adapter.json (method, config, base model, template)
    ckpt.pt              resume state: adapter, optimizer, RNG, step, config (torch.load with weights_only=True)
    summary.json         the run's outcome; gsm8k.jsonl (+ .summary.json) the score; peft/ or merged/ the exports

Every file is written atomically (a temporary file, then os.replace): a reader or a crash sees the old file or the
new one, never half of one.
"""
import contextlib
import glob
import json
import math
import os
import signal
import sys
import threading

from dataclasses import asdict

import torch

import bone
import dylora
import full
import nf4
import lora
import lora_ga
import lora_sb
import lora_xs
from cli import UserError, from_dict

# --method NAME -> the method's file; adding a method is one file and one line here
METHODS = {"full": full, "lora": lora, "xs": lora_xs, "sb": lora_sb, "ga": lora_ga, "bone": bone, "dylora": dylora}


def atomic_save(obj, path, save_fn):
    tmp = path + ".tmp"
    save_fn(obj, tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # an ordinary file's mode (safetensors writes 0600)
    os.replace(tmp, path)  # a reader sees the old file or the new one, never half of one


def finite(obj):
    """obj with every NaN or inf float replaced by None: strict JSON has neither."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def save_json(obj, path):
    atomic_save(finite(obj), path, lambda o, p: open(p, "w").write(json.dumps(o, indent=2, allow_nan=False) + "\n"))


def save_adapter(sd, tcfg, mcfg, run_dir, step, base):
    """adapter.safetensors + adapter.json; `base` is model.fingerprint of the base the adapter was trained on."""
    from safetensors.torch import save_file
    sd = {k: v.detach().contiguous() for k, v in sd.items()}
    meta = dict(method=tcfg.method, config=asdict(mcfg), base_model=tcfg.model, base_fingerprint=base,
                base_bits=getattr(tcfg, "base_bits", 16), template=tcfg.template, step=step)
    atomic_save(sd, os.path.join(run_dir, "adapter.safetensors"),
                lambda o, p: save_file(o, p, metadata={"nanopeft": json.dumps(meta)}))
    save_json(meta, os.path.join(run_dir, "adapter.json"))


def load_adapter(run_dir):
    """(method module, its Config, state dict, metadata) of a train.py run folder."""
    from safetensors.torch import load_file
    path = os.path.join(run_dir, "adapter.json")
    if not os.path.isfile(path):
        raise UserError(f"no adapter.json in {run_dir}: pass a train.py run folder (out/<run_name>)")
    try:
        meta = json.load(open(path))
        method = METHODS[meta["method"]]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} is damaged or not a nanoPEFT adapter (method: {', '.join(METHODS)})") from None
    weights = os.path.join(run_dir, "adapter.safetensors")
    if not os.path.isfile(weights):
        raise UserError(f"{run_dir} has adapter.json but no adapter.safetensors: the run saved no adapter")
    try:
        sd = load_file(weights)
    except Exception as e:  # safetensors' own error types for a truncated or foreign file
        raise UserError(f"cannot read {weights} ({type(e).__name__}): it is truncated or damaged") from None
    return method, from_dict(method.Config, meta["config"]), sd, meta


def load_trained(run_dir, model_path, device, dtype):
    """The base model with a run's saved adapter applied (unmerged): the model as trained."""
    from model import Llama
    method, mcfg, sd, meta = load_adapter(run_dir)
    model = Llama.from_pretrained(model_path, device=device, dtype=dtype, base_bits=meta.get("base_bits", 16))
    method.apply(model, mcfg, init=False)
    method.load_adapter_state_dict(model, sd)
    return model


EXPORT_LOSS = 0.01  # auto: the checkpoint's dtype only if its rounding changes the weights by < 1% of the update


def save_hf(model, src, out, dtype="auto", base_bits=16):
    """A Hugging Face model folder from a merged model (fp32 weights): its weights, the source's config and tokenizer.
    The weights are written in `dtype`; "auto" takes the source checkpoint's dtype unless rounding to it would
    change the weights by more than EXPORT_LOSS of the update's norm, ||round(W) - W|| / ||W - W0|| with W0 the
    source checkpoint's weights (a bf16 checkpoint after a short or low-lr run: most changed weights round back to
    W0), and then float32. base_bits=4: the model was trained on an NF4 base, which is what W0 is then (the
    layers it did not adapt are written dequantized). Returns (the dtype written, what it loses of the update)."""
    import shutil
    from safetensors import safe_open
    from safetensors.torch import save_file
    src_cfg = json.load(open(os.path.join(src, "config.json")))
    src_dtype = getattr(torch, src_cfg.get("dtype") or src_cfg.get("torch_dtype") or "bfloat16")
    sd = {k: (v.dequantize() if isinstance(v, nf4.NF4Tensor) else v).detach().contiguous()
          for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight")
    W0 = {}
    for f in sorted(glob.glob(os.path.join(src, "*.safetensors"))):
        with safe_open(f, framework="pt") as fh:
            W0.update({k: fh.get_tensor(k) for k in fh.keys() if k in sd})
    if base_bits == 4:  # the base as trained: each weight through NF4 and back
        W0 = {k: nf4.dequantize(*nf4.quantize(v), v.shape, torch.float32) if nf4.is_quantized(k) else v
              for k, v in W0.items()}

    def lost(dt):  # ||round(W) - W|| / ||W - W0|| over every tensor
        err = sum(float((v.to(dt).double() - v.double()).pow(2).sum()) for v in sd.values())
        upd = sum(float((v.double() - W0[k].double()).pow(2).sum()) for k, v in sd.items() if k in W0)
        return math.sqrt(err / upd) if upd > 0 else 0.0
    if dtype == "auto":
        dt = src_dtype if lost(src_dtype) <= EXPORT_LOSS else torch.float32
        if dt != src_dtype:
            print(f"merged export in float32: rounding to the checkpoint's {str(src_dtype)[6:]} would change the "
                  f"weights by {lost(src_dtype):.1%} of the update "
                  f"(--export_dtype {str(src_dtype)[6:]} writes it anyway)")
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


def save_peft(model, method, out, base_model):
    """A standard PEFT LoRA adapter: every layer of a method with a low-rank form gives its lora_pair() (A, B), the
    scale folded into B, so that W = W0 + B A (method files: Linear.lora_pair)."""
    from safetensors.torch import save_file
    if method.Linear is None:
        raise UserError("this method has no PEFT LoRA form: use --export merged")
    pairs = {n: m.lora_pair() for n, m in model.named_modules() if isinstance(m, method.Linear)}
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


STOP = []  # the name of a stop signal received inside stop_signals(), once one has been


@contextlib.contextmanager
def stop_signals():
    """Around a training loop: SIGTERM (a cluster's preemption, `timeout` at a time limit) or Ctrl-C is noted in STOP
    instead of killing the process, so that the loop can save a checkpoint after the current step and stop: no
    work is lost. A second signal acts as usual (ends the process). The previous handlers are back afterwards. Only the
    main thread of a single process takes part: under torchrun, its own handling stays (it forwards the signal to
    every worker and kills them 30 s later)."""
    def note(sig, frame):
        STOP.append(signal.Signals(sig).name)
        for s in old:  # the next one acts as usual
            signal.signal(s, old[s])
        if sig == signal.SIGINT:
            print("\nCtrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again quits now)",
                  file=sys.stderr)
    STOP.clear()
    old = {}
    if threading.current_thread() is threading.main_thread() and "LOCAL_RANK" not in os.environ:
        old = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        for sig in old:
            signal.signal(sig, note)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def save_checkpoint(run_dir, step, adapter, optimizer, config, **progress):
    """ckpt.pt: what --resume needs to continue exactly (whole tensors, whatever the number of processes), and
    `progress` (plain numbers: the init time, training time, tokens and peak memory so far, which a resumed run's
    summary goes on from)."""
    state = dict(step=step, adapter=adapter, optimizer=optimizer, rng_cpu=torch.get_rng_state(),
                 config=json.dumps(config), **progress)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["rng_cuda"] = torch.cuda.get_rng_state()
    atomic_save(state, os.path.join(run_dir, "ckpt.pt"), torch.save)


def load_checkpoint(run_dir, name="ckpt.pt"):
    """A run's resume state (tensors and plain data only: weights_only, so no pickled code can run)."""
    path = os.path.join(run_dir, name)
    if not os.path.isfile(path):
        raise UserError(f"--resume: no checkpoint at {path} (start the run without --resume)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, empty, or not a checkpoint; never suggest weights_only=False
        raise UserError(f"--resume: {path} cannot be read ({type(e).__name__}): it is damaged or not a checkpoint; "
                        f"--overwrite starts the run again") from None
    if not isinstance(state, dict) or "config" not in state:
        raise UserError(f"--resume: {path} is not a checkpoint of this project; --overwrite starts the run again")
    return state


RUN_FILES = ("config.json", "log.jsonl", "ckpt.pt", "adapter.safetensors", "fed_state.pt", "summary.json")


def prepare_run_dir(run_dir, resume, overwrite):
    """Check the run folder before any work: a new run needs a folder without a run in it (or --overwrite, which
    removes the old run's files when the new run writes its first); --resume needs one. The folder's parent must be
    writable. Nothing is created here."""
    if resume and overwrite:
        raise UserError("--resume continues a run and --overwrite replaces it: choose one")
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise UserError(f"{run_dir} exists and is not a folder: choose another --out_dir or --run_name")
    old = [f for f in RUN_FILES if os.path.exists(os.path.join(run_dir, f))]
    if old and not (resume or overwrite):
        raise UserError(f"{run_dir} already holds a run ({', '.join(old)}): --resume continues it, --overwrite "
                        f"replaces it, or choose another --run_name")
    parent = run_dir
    while not os.path.isdir(parent):
        if os.path.exists(parent):
            raise UserError(f"{parent} is a file, not a folder: choose another --out_dir")
        parent = os.path.dirname(parent) or "."
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write in {parent}: choose another --out_dir")


def start_run_dir(run_dir, overwrite):
    """Make the run folder when the run writes its first file; --overwrite removes the old run's files then."""
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {run_dir} ({e.strerror}): choose another --out_dir") from None
    if overwrite:
        for f in os.listdir(run_dir):
            p = os.path.join(run_dir, f)
            if os.path.isfile(p) and (f in RUN_FILES or f.startswith(("adapter.", "gsm8k"))):
                os.remove(p)
            elif os.path.isdir(p) and f in ("peft", "merged"):
                import shutil
                shutil.rmtree(p)


def check_method(method, mcfg, model_path, export=""):
    """Build the method's layers on a weightless (meta-device) copy of the model, before any weight is loaded or
    gradient computed: a target that names no layer, a rank or block size the layers cannot take, or an export the
    method has no form for, each stops here with the method's own error line."""
    from model import Llama, ModelConfig
    path = os.path.join(model_path, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"no config.json in {model_path}: point --model at a Hugging Face checkpoint folder")
    try:
        hf_config = json.load(open(path))
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e}): the model folder is damaged") from None
    with torch.device("meta"):
        model = Llama(ModelConfig.from_hf(hf_config))
    method.apply(model, mcfg, init=False)  # model.swap_linears refuses --targets that name no layer
    if export == "peft":
        if method.Linear is None:
            raise UserError("this method has no PEFT LoRA form: use --export merged")
        next(m for m in model.modules() if isinstance(m, method.Linear)).lora_pair()  # raises where there is none


def restore_rng(ckpt):
    torch.set_rng_state(ckpt["rng_cpu"])
    if "rng_cuda" in ckpt and torch.cuda.is_available():
        torch.cuda.set_rng_state(ckpt["rng_cuda"])


def strict_json(entry):
    return json.dumps(finite(entry), allow_nan=False)  # NaN and inf are not JSON: written as null


def write_log(lines, path):
    atomic_save(lines, path, lambda o, p: open(p, "w").write("".join(strict_json(l) + "\n" for l in o)))


def read_log(path, upto):
    """The log lines of steps <= upto (a resumed run forgets what was logged after its checkpoint). A last line cut
    short (the machine lost mid-write; appends are not atomic) was logged after the checkpoint: dropped too."""
    if not os.path.isfile(path):
        return []
    lines = open(path).read().splitlines()
    try:
        json.loads(lines[-1] if lines else "{}")
    except json.JSONDecodeError:
        lines.pop()
    return [l for l in map(json.loads, lines) if l.get("step", 0) <= upto]


def append_log(entry, path):
    with open(path, "a") as f:
        f.write(strict_json(entry) + "\n")
