"""Measure what an MLflow outage costs training (figures for docs/benchmarks.md).

    python jobs/speed_outage.py --epochs 7 --outages 2 --json outage.json

In one run: start a real `mlflow server` on 127.0.0.1 (a free port; SQLite store and artifacts in
a temporary folder) and run `jobs/train.py` against it on the built-in demo videos with a step
line per step. After --warmup steps and --up-for steps with the server up, SIGKILL the server,
restart it on the same port with the same store after --down-for more step lines, and once it
answers /health again give it --up-for steps before the next of the --outages kills; the run then
completes. Up and down windows alternate through the run, so a drift of the step time over the
run (it shortens on the demo as the run goes on, server up or not) falls on both alike.

Printed (and written with --json), per window and pooled:
- the median step time, from the clips/s of each step line (the loop's own timing of the step:
  forward, backward, optimizer, data wait), and the median wall time between consecutive step
  lines as this script reads them (what the outage would add around the step: logging calls,
  GIL contention with the tracker's thread); intervals spanning an epoch end (validation) are
  left out of the wall figures. A down window runs from the kill until the restarted server
  answers /health, so it includes the server's start-up time.
- down/up: each outage against the mean of the up windows on either side of it (bracketed: a
  linear drift cancels), and every down step against every up step (pooled medians: simpler,
  but under drift it leans on how many steps each window got). Target: the outage costs at most
  5% of the steps/s, i.e. the bracketed ratios at most 1.05; the wall ratios are the steps/s.
- the job's exit code, how many "MLflow ... failed" warnings and "MLflow is back" lines it
  printed (target: one of each per outage), urllib3 "Retrying" lines, and what the restarted
  server holds: every step's train/loss (none lost) and the run's status (FINISHED).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r"step (\d+)/(\d+)\s+epoch ([\d.]+)\s+loss \S+\s+lr \S+\s+([\d.]+) clips/s")
EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+)\s+val top1")
RUN_LINE = re.compile(r"MLflow run:\s+([0-9a-f]{32})")
FAILED = re.compile(r"MLflow \S+ failed")
URLLIB3_RETRY = "Retrying (Retry("  # urllib3's own warning on each HTTP retry
BACK = "MLflow is back"
# 480 demo training videos at batch 16, passed to the job so that the figures stay comparable
# whatever the demo recipe's own batch is
BATCH = 16
DEMO_STEPS_PER_EPOCH = 480 // BATCH


@dataclass
class Step:
    step: int
    clips_per_s: float
    window: int  # 0, 2, 4, ...: server up; 1, 3, ...: outage (window + 1) // 2; -1: warm-up
    seen_at: float  # time.monotonic() when this script read the line
    after_epoch_end: bool  # the interval since the previous step line includes validation

    @property
    def down(self) -> bool:
        return self.window % 2 == 1


@dataclass
class Outage:
    killed_after_step: int
    restart_begun_after_step: int | None = None
    back_after_step: int | None = None
    down_s: float | None = None


@dataclass
class Result:
    load_average_at_start: list[float]
    command: list[str]
    exit_code: int | None = None
    steps_total: int | None = None
    outages: list[Outage] = field(default_factory=list)
    failed_warnings: int = 0
    failed_warning_lines: list[str] = field(default_factory=list)
    back_messages: int = 0
    urllib3_retry_lines: int = 0  # other warning lines an outage printed (one per HTTP retry)
    not_sent_lines: list[str] = field(default_factory=list)  # "MLflow: N calls not sent"
    windows: list[dict] = field(default_factory=list)  # per window: up/down, steps, medians
    pooled: dict = field(default_factory=dict)  # "up"/"down" -> steps, step_time_s, wall_s
    ratio_down_up_step_time: float | None = None  # pooled (drift: window sizes weigh in)
    ratio_down_up_wall: float | None = None
    bracketed_step_time: list[float | None] = field(default_factory=list)  # target <= 1.05
    bracketed_wall: list[float | None] = field(default_factory=list)
    mlflow_run_id: str | None = None
    mlflow_status: str | None = None
    loss_steps_logged: int | None = None
    loss_steps_missing: list[int] = field(default_factory=list)
    job_seconds: float | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--epochs", type=int, default=7, help=f"training epochs ({DEMO_STEPS_PER_EPOCH} steps each)"
    )
    parser.add_argument("--outages", type=int, default=2, help="how many times to kill the server")
    parser.add_argument(
        "--up-for",
        type=int,
        default=30,
        help="step lines with the server up before each kill (after the warm-up, after a restart)",
    )
    parser.add_argument(
        "--down-for", type=int, default=20, help="restart the server after this many step lines"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=20,
        help="leave the first N steps out of the figures (the data pipeline starting up)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    return args


def check_args(args: argparse.Namespace) -> str | None:
    """The one-line complaint about the flags, before anything starts; None when they're fine."""
    if args.warmup < 0:
        return f"--warmup {args.warmup}: must be at least 0"
    for flag in ("epochs", "outages", "up_for", "down_for"):
        if getattr(args, flag) < 1:
            return f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1"
    steps = DEMO_STEPS_PER_EPOCH * args.epochs
    # the restarted server's start-up adds steps to each outage: keep the last up window whole
    planned = args.warmup + args.up_for + args.outages * (2 * args.down_for + args.up_for)
    if planned > steps:
        return (
            f"--warmup {args.warmup} + --up-for {args.up_for} + --outages {args.outages} x "
            f"(2 x --down-for {args.down_for} + --up-for {args.up_for}) = {planned} steps: more "
            f"than the run's {steps} (--epochs {args.epochs}: {DEMO_STEPS_PER_EPOCH} steps an "
            "epoch); raise --epochs"
        )
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir: Path, port: int, log_name: str) -> subprocess.Popen:
    """`mlflow server` in its own process group (its workers die with it on SIGKILL)."""
    mlflow_bin = os.path.join(os.path.dirname(sys.executable), "mlflow")
    with open(workdir / log_name, "wb") as out:
        return subprocess.Popen(
            [
                mlflow_bin,
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{workdir}/mlflow.db",
                "--artifacts-destination",
                str(workdir / "artifacts"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def wait_healthy(port: int, proc: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}")
        if healthy(port):
            return
        time.sleep(0.5)
    raise RuntimeError(f"mlflow server did not answer /health within {timeout_s:.0f} s")


def kill_server(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):  # it may have died already
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def medians(steps: list[Step], keep, batch: int) -> dict:
    """Median step time (from clips/s) and wall time between lines, of the steps `keep` picks."""
    walls = [
        cur.seen_at - prev.seen_at
        for prev, cur in itertools.pairwise(steps)
        if keep(cur) and prev.window == cur.window and not cur.after_epoch_end
    ]
    mine = [s for s in steps if keep(s)]
    return {
        "steps": len(mine),
        "step_time_s": median_or_none([batch / s.clips_per_s for s in mine if s.clips_per_s]),
        "wall_s": median_or_none(walls),
    }


def ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num and den else None


def bracketed(per: dict[int, dict], key: str) -> list[float | None]:
    """Each outage's median against the mean of the up windows' medians on either side of it."""
    out = []
    for w in sorted(per):
        if w % 2 == 1:
            around = [per[v][key] for v in (w - 1, w + 1) if v in per and per[v][key]]
            out.append(ratio(per[w][key], statistics.mean(around) if around else None))
    return out


def summarize(steps: list[Step], result: Result, batch: int) -> None:
    """Per window, pooled over up and down, and each outage against the up windows around it."""
    windows = sorted({s.window for s in steps if s.window >= 0})
    per = {w: medians(steps, lambda s, w=w: s.window == w, batch) for w in windows}
    result.windows = [{"window": w, "down": w % 2 == 1, **per[w]} for w in windows]
    up = medians(steps, lambda s: s.window >= 0 and not s.down, batch)
    down = medians(steps, lambda s: s.down, batch)
    result.pooled = {"up": up, "down": down}
    result.ratio_down_up_step_time = ratio(down["step_time_s"], up["step_time_s"])
    result.ratio_down_up_wall = ratio(down["wall_s"], up["wall_s"])
    result.bracketed_step_time = bracketed(per, "step_time_s")
    result.bracketed_wall = bracketed(per, "wall_s")


def run(args: argparse.Namespace, workdir: Path) -> Result:
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    name = f"speed-outage-{int(time.time())}"
    command = [
        sys.executable,
        str(REPO / "jobs" / "train.py"),
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(BATCH),
        "--set",
        "optim.lr_reference_batch=16",  # the lr of the runs recorded in docs/benchmarks.md
        "--set",
        "run.log_every_steps=1",
        "--storage",
        str(workdir / "runs"),
        "--name",
        name,
    ]
    result = Result(load_average_at_start=[round(x, 2) for x in os.getloadavg()], command=command)
    print(f"load average at start: {result.load_average_at_start}", flush=True)
    print(f"mlflow server: {uri}  (store and artifacts in {workdir})", flush=True)

    server = start_server(workdir, port, "server-1.log")
    try:
        wait_healthy(port, server)
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
        env.pop("RAY_ADDRESS", None)  # a local Ray instance of its own
        t0 = time.monotonic()
        job = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        try:
            server, steps = follow(job, args, result, workdir, port, server)
        except BaseException:
            job.terminate()  # SIGTERM: the job shuts its local Ray instance down
            job.wait()
            raise
        result.exit_code = job.wait()
        result.job_seconds = round(time.monotonic() - t0, 1)
        if server is None:  # the run ended before the restart point: bring it back to read it
            server = start_server(workdir, port, "server-2.log")
            wait_healthy(port, server)
        summarize(steps, result, batch=BATCH)
        check_mlflow(uri, result)
    finally:
        if server is not None:
            kill_server(server)
    return result


def follow(job, args, result: Result, workdir: Path, port: int, server):
    """Read the job's lines as they come; kill and restart the server at the step counts.

    Windows: -1 the warm-up, then 0 (up), 1 (down), 2 (up), ...: a down window ends when the
    restarted server answers /health, an up window after --up-for steps (the last one with the
    run). The window of a step is the one in force when its line is read."""
    steps: list[Step] = []
    window, in_window = (-1 if args.warmup else 0), 0  # the current window, its steps so far
    epoch_ended = False
    back = threading.Event()
    killed_at = 0.0
    waiter = None

    def wait_back(proc: subprocess.Popen) -> None:
        wait_healthy(port, proc)
        back.set()

    for line in job.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        if FAILED.search(line):
            result.failed_warnings += 1
            result.failed_warning_lines.append(line.strip())
        if URLLIB3_RETRY in line:
            result.urllib3_retry_lines += 1
        if "calls not sent" in line:
            result.not_sent_lines.append(line.strip())
        if BACK in line:
            result.back_messages += 1
        if m := RUN_LINE.search(line):
            result.mlflow_run_id = m.group(1)
        if EPOCH_LINE.search(line):
            epoch_ended = True
        m = STEP_LINE.search(line)
        if not m:
            continue
        step = int(m.group(1))
        result.steps_total = int(m.group(2))
        if window % 2 == 1 and back.is_set():  # the outage ended before this step's line
            outage = result.outages[-1]
            outage.back_after_step = steps[-1].step
            outage.down_s = round(time.monotonic() - killed_at, 1)
            print(f"[speed_outage] server answers again (down {outage.down_s} s)", flush=True)
            window, in_window = window + 1, 0
            back.clear()
        steps.append(Step(step, float(m.group(4)), window, time.monotonic(), epoch_ended))
        epoch_ended = False
        in_window += 1
        if window == -1 and in_window == args.warmup:
            window, in_window = 0, 0
        elif window % 2 == 0 and in_window == args.up_for and len(result.outages) < args.outages:
            kill_server(server)
            killed_at = time.monotonic()
            result.outages.append(Outage(killed_after_step=step))
            window, in_window = window + 1, 0
            print(f"[speed_outage] SIGKILLed the mlflow server after step {step}", flush=True)
        elif window % 2 == 1 and in_window == args.down_for:
            server = start_server(workdir, port, f"server-{window // 2 + 2}.log")
            result.outages[-1].restart_begun_after_step = step
            waiter = threading.Thread(target=wait_back, args=(server,), daemon=True)
            waiter.start()
            print(f"[speed_outage] restarting the mlflow server after step {step}", flush=True)
    if waiter is not None:
        waiter.join()
    if result.outages and result.outages[-1].restart_begun_after_step is None:
        server = None  # killed and never restarted: run() restarts it to read the run
    return server, steps


def check_mlflow(uri: str, result: Result) -> None:
    if result.mlflow_run_id is None:
        return
    sys.path.insert(0, str(REPO / "platform"))
    from morphmlp import tracking

    mlflow_client = tracking.client(uri)
    result.mlflow_status = mlflow_client.get_run(result.mlflow_run_id).info.status
    logged = {m.step for m in mlflow_client.get_metric_history(result.mlflow_run_id, "train/loss")}
    result.loss_steps_logged = len(logged)
    expected = range(1, (result.steps_total or 0) + 1)
    result.loss_steps_missing = [s for s in expected if s not in logged]


def report(result: Result) -> None:
    print("\n== What an MLflow outage costs training ==")
    print(f"load average at start:   {result.load_average_at_start}")
    print(f"{result.steps_total} steps in {result.job_seconds} s")
    for i, o in enumerate(result.outages, 1):
        print(
            f"outage {i}: killed after step {o.killed_after_step}, restart begun after step "
            f"{o.restart_begun_after_step}, answering again after step {o.back_after_step} "
            f"(down {o.down_s} s)"
        )

    def num(x: float | None) -> str:
        return f"{x:.3f}" if x else "-"

    def pct(r: float | None) -> str:
        return f"{r:.3f} ({100 * (r - 1):+.1f}%)" if r else "-"

    print(f"{'window':<10} {'steps':>5} {'step time (s)':>14} {'wall between lines (s)':>23}")
    rows = [(f"{'down' if w['down'] else 'up'} {w['window']}", w) for w in result.windows]
    rows += [(f"all {kind}", result.pooled[kind]) for kind in ("up", "down")]
    for label, m in rows:
        print(f"{label:<10} {m['steps']:>5} {num(m['step_time_s']):>14} {num(m['wall_s']):>23}")
    print(f"down/up step time:       {pct(result.ratio_down_up_step_time)}  (pooled)")
    print(f"down/up wall:            {pct(result.ratio_down_up_wall)}")
    for i, (st, wall) in enumerate(
        zip(result.bracketed_step_time, result.bracketed_wall, strict=True), 1
    ):
        print(f"outage {i} / up around it: step time {pct(st)}, wall {pct(wall)}  (target <= 1.05)")
    print(f"job exit code:           {result.exit_code}")
    n = len(result.outages)
    print(f"'MLflow ... failed':     {result.failed_warnings} warning(s) (target: {n})")
    print(f"'MLflow is back':        {result.back_messages} (target: {n})")
    print(f"urllib3 'Retrying' lines: {result.urllib3_retry_lines}")
    for line in result.not_sent_lines:
        print(f"not sent at the end:     {line}")
    print(f"MLflow run:              {result.mlflow_run_id}  status {result.mlflow_status}")
    print(
        f"train/loss steps logged: {result.loss_steps_logged} of {result.steps_total}"
        f"  (missing: {result.loss_steps_missing or 'none'})"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if problem := check_args(args):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="morphmlp-speed-outage-"))
    try:
        result = run(args, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(result), f, indent=2)
    n = len(result.outages)
    ok = (
        result.exit_code == 0
        and n == args.outages
        and result.failed_warnings == n
        and result.back_messages == n
        and result.mlflow_status == "FINISHED"
        and not result.loss_steps_missing
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
