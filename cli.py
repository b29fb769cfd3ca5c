"""
The command line of every entry point (train.py, fed.py, eval.py, bench.py, results.py): one `--key=value` parser
over config dataclasses, with a help line per option, and UserError, the one-line error they all print.

An option is a dataclass field; its help text is the comment on the field's line (and on comment lines right after
it), read from the source, so the config class is the single place an option is declared and described:

    max_len: int = 512  # tokens per example (prompt + answer + EOS); longer answers are truncated

Values are type-checked (int, float, bool, str, tuple as a,b,c); an unknown key is refused with the valid ones.
"""
import dataclasses
import inspect
import re
import sys

import torch


class UserError(Exception):
    """Bad input (a missing file, an unsupported config, a meaningless value): printed as one line, no traceback."""


# a failure of the device itself, not of the program or its input: the first line of the error says the GPU is
# taken, lost or refused (MPS refuses new clients after its clients were killed: "busy or unavailable"). A
# device-side assert or an illegal memory access is not here: it is a bug (or a token id beyond the vocabulary) and
# keeps its traceback.
DEVICE_STATES = ("busy or unavailable", "no CUDA-capable device", "initialization error", "uncorrectable ECC error",
                 "driver version is insufficient")


def device_error(e, smaller="", resume=""):
    """The one line for a failure of the GPU itself (out of memory, or a DEVICE_STATES message), or None for any
    other error. `smaller`: the entry point's option that needs less memory; `resume`: how its work goes on."""
    text = (str(e).splitlines() or [""])[0][:160]
    then = f"; {resume}" if resume else ""
    if isinstance(e, torch.OutOfMemoryError):
        return (f"out of GPU memory ({text}): {f'pass a smaller {smaller}, or ' if smaller else ''}share the GPU "
                f"with fewer runs{then}")
    if isinstance(e, RuntimeError) and any(m in text for m in DEVICE_STATES):
        return (f"the GPU is unusable ({type(e).__name__}: {text}): check it with nvidia-smi (another process "
                f"holding it; a stuck MPS daemon: `echo quit | nvidia-cuda-mps-control`){then}")
    return None


def run(main, smaller="", resume=""):
    """Call main() as a script does: a UserError, or a failure of the GPU itself (device_error: out of memory, a
    busy or lost device), becomes one `error: ...` line on stderr and exit status 1; anything else is a bug and
    keeps its traceback. `smaller` and `resume` name the entry point's own remedies (device_error)."""
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
    except RuntimeError as e:  # (torch's OutOfMemoryError and AcceleratorError are RuntimeErrors)
        line = device_error(e, smaller, resume)
        if line is None:
            raise
        sys.exit(f"error: {line}")
    except BrokenPipeError:  # `--help | head`: the reader left
        sys.stderr.close()


# -----------------------------------------------------------------------------
# options and their help

def help_lines(cls):
    """{field name: help text} from the comments beside the fields of `cls` and its dataclass bases."""
    out = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        name = None
        for line in inspect.getsource(klass).splitlines():
            m = re.match(r"\s+(\w+)\s*:[^#]*=[^#]*?(?:#\s*(.*))?$", line)
            if m:
                name = m.group(1)
                out[name] = m.group(2) or ""
            elif name and re.match(r"\s+#", line):  # a comment line continues the field's help
                out[name] += " " + line.strip()[1:].strip()
            else:
                name = None
    return out


def print_help(doc, sections):
    """The entry point's docstring, then for each (title, config class) the options that class itself declares
    (list a config's dataclass bases as sections of their own), one `--name=default  help` line each."""
    print(doc.strip() + "\n")
    for title, cls in sections:
        helps, own = help_lines(cls), vars(cls).get("__annotations__", {})
        print(title + ":")
        for f in dataclasses.fields(cls):
            if f.name not in own:
                continue
            default = fmt(f.default if f.default is not dataclasses.MISSING else f.default_factory())
            if "\n" in default or len(default) > 30:
                default = repr(default)[:27] + "..."
            print(f"  {'--' + f.name + '=' + default:<34} {helps.get(f.name, '')}")
        print()


def fmt(v):
    return ",".join(v) if isinstance(v, tuple) else str(v)


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


def pairs(argv):
    """[(key, text)] from --key=value, --key value, or a bare --flag (true)."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if not a.startswith("--") or a == "--":
            raise UserError(f"unexpected argument {a!r}: options are --key=value (--help lists them)")
        key, eq, val = a[2:].partition("=")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and not nxt.startswith("--"):
                val, i = nxt, i + 1
            else:
                val = "true"
        out.append((key.replace("-", "_"), val))
        i += 1
    return out


def from_dict(cls, d):
    """A config dataclass from its saved JSON (lists back to tuples; keys it no longer has are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


def parse(argv, *configs, rest=None):
    """Set the fields of the config instances from argv, in place; a key in several (seed) sets each. Unknown keys
    are refused, or, when `rest` is a list, appended to it as they came (results.py hands them to train.py)."""
    fields = [{f.name: f for f in dataclasses.fields(c)} for c in configs]
    for key, val in pairs(argv):
        hits = [(c, fs[key]) for c, fs in zip(configs, fields) if key in fs]
        if not hits and rest is not None:
            rest.append(f"--{key}={val}")
        elif not hits:
            valid = sorted(set().union(*fields))
            raise UserError(f"unknown option --{key}; valid: {', '.join(valid)} (--help describes them)")
        for c, f in hits:
            setattr(c, f.name, parse_value(f, val))
    return configs


def parse_run(argv, cls, methods, saved=None):
    """A run's config (`cls`: TrainConfig or FedConfig) and its method's Config: defaults, or a saved run's
    settings (saved = {"train": ..., "method_config": ...}), then the command line."""
    method = dict(pairs(argv)).get("method", saved["train"]["method"] if saved else cls.method)
    if method not in methods:
        raise UserError(f"unknown method {method!r}: choose one of {', '.join(methods)}")
    if saved and method != saved["train"]["method"]:
        raise UserError(f"--method {method}: this run was trained with {saved['train']['method']}, and a resumed run "
                        f"keeps its method (--overwrite starts a new run instead)")
    if saved:  # the run's settings, less what the command that saved them asked of the folder (this one says)
        kept = {k: v for k, v in saved["train"].items() if k not in ("resume", "overwrite")}
        cfg, mcfg = from_dict(cls, kept), from_dict(methods[method].Config, saved["method_config"])
    else:
        cfg, mcfg = cls(), methods[method].Config()
    return parse(argv, cfg, mcfg)


def wants_help(argv):
    return "--help" in argv or "-h" in argv


def device(name):
    """torch.device from --device: auto (cuda if available, else cpu), cpu, cuda or cuda:N."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible here (use --device cpu)")
    if dev.type == "cuda":
        # SDPA's cuDNN backend (preferred by torch 2.11 on Hopper) spends ~4.5 ms of CPU per call building its
        # plan, more than the whole GPU work of a layer here; flash (causal) and memory-efficient (masked) do not
        torch.backends.cuda.enable_cudnn_sdp(False)
    return dev
