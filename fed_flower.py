"""
fed.py's four strategies (Fed-SB, FedIT, FFA-LoRA, FedEx-LoRA) on real machines, as a Flower app (flwr 1.42).

The ServerApp runs fed.main itself, rounds, client sampling, aggregation, DP accounting, logs and files included;
only the clients' training is sent out: each sampled client's machine gets the global adapter (plus, once, what
fed.py counts as setup: LoRA-SB's B and A; FedEx-LoRA's residuals every round) and runs fed.client_round, the
same local training as the in-process simulator, on its own shard. A client that fails, is killed or times out
leaves the round to the survivors, re-weighted, as a dropped client does in fed.py. Every client machine needs the
base model and the same training file (the server tells it which shard is its own); the server needs them too (the
central LoRA-SB init, the held-out loss).

On real machines (one SuperLink, one SuperNode per client; paths may differ per machine):

    flower-superlink --insecure --host 0.0.0.0                                       # the server's machine (port 8000)
    flower-supernode --insecure --superlink SERVER:8000 [--node-config "model=PATH data=PATH"]
    flwr run . my-federation --stream --run-config 'args="--method sb --clients N --rounds 3 --model PATH --data PATH"'

Client k of fed.py is the k-th SuperNode to connect (in node-id order) for the whole run. (`my-federation` is a
SuperLink connection in $FLWR_HOME/config.toml: `[superlink.my-federation]`, `address =
"SERVER:8000"`, `insecure = true`.) On this machine, the SuperLink and N SuperNodes as local processes, torn down
at the end:

    python fed_flower.py --nodes N [fed.py's options: --method sb --clients N --model PATH --data PATH ...]

Communication: per round the server prints the bytes of tensors it sent and received next to fed.py's accounting
of them (they are equal by construction and checked), and the bytes of the records as Flower counts them
(`count_bytes()`: the tensors serialized with their headers and names); summary.json gets both ("flower").
"""
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

import cli
import fed
import runs
from cli import UserError

server_app = ServerApp()
client_app = ClientApp()
FLOWERTUNE_BUDGET_MB = 200_000  # the FlowerTune LLM leaderboard's communication budget: every record, both ways
POLL_S = 0.2  # how often the server looks for replies (Flower's send_and_receive waits 3 s between looks)


# -----------------------------------------------------------------------------
# the server: fed.main, with each round's clients on their machines

def tensor_bytes(state):
    return sum(t.numel() * t.element_size() for t in state.values())


def record_bytes(content):
    return sum(r.count_bytes() for r in content.values())


def exchange(grid, messages, timeout):
    """Send the messages, wait for their replies (or errors) up to `timeout` s: {message index: reply}; a message
    whose node went away or did not answer in time has none."""
    ids = list(grid.push_messages(messages))  # in the order of `messages`
    index = {mid: i for i, mid in enumerate(ids)}
    replies, end = {}, time.time() + timeout
    while len(replies) < len(ids) and time.time() < end:
        for r in grid.pull_messages([m for m in ids if index[m] not in replies]):
            replies[index[r.metadata.reply_to_message_id]] = r  # SuperLink-made errors come from node 1: match by id
        time.sleep(POLL_S)
    return replies


def discover(grid, n, timeout):
    """{client: node id} for the n clients: the first n SuperNodes to connect, in node-id order, each training the
    same client (shard) in every round. Every machine holds the same training file, so any node can train any
    shard; a SuperNode that goes away is not replaced."""
    end = time.time() + timeout
    while len(grid.get_node_ids()) < n and time.time() < end:
        time.sleep(POLL_S)
    nodes = sorted(grid.get_node_ids())
    if len(nodes) < n:
        raise UserError(f"--clients {n}, but {len(nodes)} SuperNodes connected within {timeout:g} s: start one "
                        f"SuperNode per client, pointed at this SuperLink, or raise node-wait-s")
    return dict(enumerate(nodes[:n]))


def flower_clients(grid, argv, node_of, timeout, stats):
    """fed.main's `clients`: one TRAIN message per sampled client, its trained state (or None) back."""
    set_up = set()  # clients that hold LoRA-SB's B and A already (sent once, as fed.py counts them)
    strategy = fed.STRATEGIES[cli.parse_run(argv, fed.FedConfig, fed.FED_METHODS)[0].method]

    def run(rnd, picked, fails, global_state, model, dp):
        adapter = strategy.method.adapter_state_dict(model)
        setup = {k: v.cpu() for k, v in adapter.items() if k not in global_state}  # the shared frozen init
        residual = {k: v.cpu() for k, v in fed.fedex_residuals(model).items()}
        messages, sent = [], dict(tensors=0, records=0, setup_tensors=0, setup_records=0)
        alive = set(grid.get_node_ids())  # a node that went away (killed, disconnected) is no longer listed
        reachable = [k for k in picked if node_of[k] in alive]
        for k in reachable:
            content = RecordDict({"global": ArrayRecord(global_state), "config": ConfigRecord(dict(
                round=rnd, client=k, fail_at=fails.get(k, -1), sigma=dp["sigma"] if dp else 0.0,
                q=dp["q"][k] if dp else 0.0, args=shlex.join(argv)))})
            if strategy.residual:
                content["residual"] = ArrayRecord(residual)
            sent["tensors"] += tensor_bytes(global_state) + tensor_bytes(residual if strategy.residual else {})
            sent["records"] += record_bytes(content)
            if setup and k not in set_up:
                content["setup"] = ArrayRecord(setup)
                sent["setup_tensors"] += tensor_bytes(setup)
                sent["setup_records"] += content["setup"].count_bytes()
            messages.append(Message(content, dst_node_id=node_of[k], message_type=MessageType.TRAIN,
                                    group_id=str(rnd + 1)))
        print(f"round {rnd + 1}: sent to clients {reachable}", flush=True)
        replies = exchange(grid, messages, timeout)
        replies = {k: replies.get(i) for i, k in enumerate(reachable)}
        done, got = [], dict(tensors=0, records=0)
        for k in picked:
            r = replies.get(k)
            if r is None or r.has_error() or "state" not in r.content:
                why = ("its node is gone" if k not in reachable else "no reply" if r is None else
                       f"error {r.error.code}: {r.error.reason[:120]}" if r.has_error() else "dropped out")
                print(f"round {rnd + 1}: client {k} {why}")
                done.append((k, None))
                continue
            set_up.add(k)
            state = r.content["state"].to_torch_state_dict()
            got["tensors"] += tensor_bytes(state)
            got["records"] += r.content["state"].count_bytes()
            done.append((k, state))
        stats.append(dict(round=rnd + 1, survivors=[k for k, st in done if st is not None],
                          down_tensor_bytes=sent["tensors"], down_record_bytes=sent["records"],
                          setup_tensor_bytes=sent["setup_tensors"], setup_record_bytes=sent["setup_records"],
                          up_tensor_bytes=got["tensors"], up_record_bytes=got["records"]))
        s = stats[-1]
        print(f"round {rnd + 1} over Flower: {s['down_tensor_bytes'] + s['setup_tensor_bytes']:,} bytes of tensors down"
              f" ({s['down_record_bytes'] + s['setup_record_bytes']:,} as Flower counts the records), "
              f"{s['up_tensor_bytes']:,} up ({s['up_record_bytes']:,})")
        return done
    return run


@server_app.main()
def server(grid: Grid, context: Context) -> None:
    try:
        serve(grid, context)
    except UserError as e:  # one line in the run's log, as fed.py would print it, not a traceback
        print(f"error: {e}", flush=True)


def serve(grid, context):
    argv = shlex.split(str(context.run_config["args"]))
    cfg, _ = cli.parse_run(argv, fed.FedConfig, fed.FED_METHODS)
    node_of = discover(grid, cfg.clients, float(context.run_config["node-wait-s"]))
    print(f"Flower: clients 0..{cfg.clients - 1} on nodes {list(node_of.values())}", flush=True)
    stats = []
    summary = fed.main(argv, clients=flower_clients(grid, argv, node_of, float(context.run_config["round-timeout-s"]),
                                                      stats))
    ours = dict(down=sum(s["down_tensor_bytes"] + s["setup_tensor_bytes"] for s in stats),
                up=sum(s["up_tensor_bytes"] for s in stats))
    counted = dict(down=sum(s["down_record_bytes"] + s["setup_record_bytes"] for s in stats),
                   up=sum(s["up_record_bytes"] for s in stats))
    summary["flower"] = dict(rounds=stats, tensor_bytes=ours, record_bytes=counted)
    accounted = summary["total"]
    total_mb = (counted["down"] + counted["up"]) / 1e6
    summary["flower"]["flowertune_budget_share"] = total_mb / FLOWERTUNE_BUDGET_MB
    print(f"Flower sent {ours['down']:,} bytes of tensors down and {ours['up']:,} up (fed.py's accounting: "
          f"{accounted['down_bytes']:,} and {accounted['up_bytes']:,}); as Flower counts its records: "
          f"{counted['down']:,} and {counted['up']:,}, {counted['down'] + counted['up']:,} in all")
    print(f"communication budget (FlowerTune LLM: {FLOWERTUNE_BUDGET_MB:,} MB over a run, both ways): "
          f"{total_mb:,.3f} MB used, {100 * total_mb / FLOWERTUNE_BUDGET_MB:.4f}%")
    run_dir = os.path.join(cfg.out_dir, cfg.run_name or cfg.method)
    runs.save_json(summary, os.path.join(run_dir, "summary.json"))


# -----------------------------------------------------------------------------
# a client: fed.client_round on this machine's copy of the model and data

@client_app.train()
def train(msg: Message, context: Context) -> Message:
    c = msg.content["config"]
    argv = shlex.split(str(c["args"]))
    for key in ("model", "data"):  # this machine's paths, where its SuperNode's --node-config gives them
        if key in context.node_config:
            argv += [f"--{key}", str(context.node_config[key])]
    k, rnd, fail_at = int(c["client"]), int(c["round"]), int(c["fail_at"])
    if "setup" in msg.content:  # LoRA-SB's B and A: sent once, kept in this node's state for the later rounds
        context.state["setup"] = msg.content["setup"]
    setup = context.state["setup"].to_torch_state_dict() if "setup" in context.state else None
    residual = msg.content["residual"].to_torch_state_dict() if "residual" in msg.content else None
    state = fed.client_round(argv, k, rnd, msg.content["global"].to_torch_state_dict(), setup, residual,
                             (float(c["sigma"]), float(c["q"])) if float(c["sigma"]) > 0 else None,
                             fail_at if fail_at >= 0 else None)
    content = RecordDict({"state": ArrayRecord(state)} if state is not None else
                         {"dropped": MetricRecord({"dropped": 1})})
    return Message(content, reply_to=msg)


# -----------------------------------------------------------------------------
# everything on this machine: a SuperLink and N SuperNodes as local processes, one `flwr run`, then teardown

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(pid):
    """pid and its descendants (Flower starts some in sessions of their own: a process group misses them)."""
    children = {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def stop(procs, grace=5.0):
    """SIGTERM every process tree (SuperNodes first, so each says goodbye), SIGKILL what is left after `grace` s."""
    pids = [p for proc in procs for p in process_tree(proc.pid)]
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.time() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, end - time.time()))
        except subprocess.TimeoutExpired:
            pass
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for proc in procs:
        proc.wait()


class Local:
    """A SuperLink and SuperNodes on 127.0.0.1 (free ports, one temporary FLWR_HOME per process)."""

    def __init__(self, nodes, root, node_config=""):
        self.root, self.procs, self.port = root, [], free_port()
        # the server and N clients share this machine's cores: each process its share of threads (unless set)
        self.threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // (nodes + 1)))
        self.bin = os.path.dirname(sys.executable)  # flower-superlink etc. beside this python
        self.link = self.spawn("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port",
                                             str(self.port), "--disable-runtime-dependency-installation"])
        end = time.time() + 60
        while True:  # the SuperLink first: a SuperNode started before it backs off for up to ~14 s
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1).status == 200:
                    break
            except OSError:
                pass
            if self.link.poll() is not None or time.time() > end:
                raise UserError(f"the Flower SuperLink did not start: see {root}/superlink.log")
            time.sleep(0.1)
        self.nodes = [self.spawn(f"supernode{k}", ["flower-supernode", "--insecure", "--superlink",
                                                   f"127.0.0.1:{self.port}", "--port", str(free_port()),
                                                   *(["--node-config", node_config] if node_config else [])])
                      for k in range(nodes)]
        cli_home = os.path.join(root, "home_cli")
        os.makedirs(cli_home, exist_ok=True)
        with open(os.path.join(cli_home, "config.toml"), "w") as f:  # our own: else flwr starts a SuperLink of its own
            f.write(f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{self.port}"\n'
                    f'insecure = true\n')

    def env(self, home):
        env = dict(os.environ, FLWR_HOME=os.path.join(self.root, "home_" + home), FLWR_DISABLE_UPDATE_CHECK="1",
                   FLWR_TELEMETRY_ENABLED="0", FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.1", PYTHONUNBUFFERED="1",
                   OMP_NUM_THREADS=self.threads)
        env["PATH"] = self.bin + os.pathsep + env.get("PATH", "")  # the SuperLink/SuperNode start flower-superexec
        return env

    def spawn(self, name, cmd):
        log = open(os.path.join(self.root, name + ".log"), "wb")
        proc = subprocess.Popen([os.path.join(self.bin, cmd[0])] + cmd[1:], env=self.env(name), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def run(self, argv, timeout, node_wait=60.0, on_line=None):
        """`flwr run` of this folder's app with fed.py's command line `argv`: its output (the server's log, streamed),
        each line also given to on_line as it comes."""
        config = (f"args={json.dumps(shlex.join(argv))} node-wait-s={node_wait} "
                  f"round-timeout-s={float(timeout)}")
        cmd = [os.path.join(self.bin, "flwr"), "run", os.path.dirname(os.path.abspath(__file__)), "local", "--stream",
               "--run-config", config]
        proc = subprocess.Popen(cmd, env=self.env("cli"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        lines = []

        def read():
            for line in proc.stdout:
                lines.append(line)
                if on_line:
                    on_line(line)
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop([proc])
            raise UserError(f"the Flower run did not finish in {timeout} s (logs in {self.root})") from None
        reader.join(10)
        return "".join(lines)

    def close(self):
        stop(self.nodes + [p for p in self.procs if p not in self.nodes])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if cli.wants_help(argv):
        print(__doc__)
        return None
    nodes, timeout, rest = 0, 3600, []
    pairs = iter(argv)
    for a in pairs:  # --nodes and --timeout are this launcher's; the rest is fed.py's command line
        key, eq, val = a.partition("=")
        if key in ("--nodes", "--timeout"):
            val = val if eq else next(pairs, "")
            if not val.isdigit():
                raise UserError(f"{key} takes a whole number, got {val!r}")
            nodes, timeout = (int(val), timeout) if key == "--nodes" else (nodes, int(val))
        else:
            rest.append(a)
    cfg, _ = cli.parse_run(rest, fed.FedConfig, fed.FED_METHODS)  # fed.py's own errors, before any process starts
    fed.check_options(cfg)
    if nodes != cfg.clients:
        raise UserError(f"--nodes {nodes}: start one SuperNode per client (--clients {cfg.clients})")
    root = tempfile.mkdtemp(prefix="nanopeft_flower_")
    local = Local(nodes, root)
    try:
        out = local.run(rest, timeout)
    finally:
        local.close()
    print(out)
    summary = os.path.join(cfg.out_dir, cfg.run_name or cfg.method, "summary.json")
    if "flower" not in (json.load(open(summary)) if os.path.isfile(summary) else {}):
        raise UserError(f"the Flower run failed (its output is above; process logs in {root})")
    return json.load(open(summary))


if __name__ == "__main__":
    cli.run(main, "--micro_batch_size", "--resume goes on after the run's last finished round")
