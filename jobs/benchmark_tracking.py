"""Benchmark what an MLflow outage costs training (figures for docs/benchmarks.md).

    python jobs/benchmark_tracking.py --epochs 4 --kill-after 15 --down-for 15 --json tracking.json

In one run: start a real `mlflow server` on 127.0.0.1 (a free port; SQLite store and artifacts in
a temporary folder), run `jobs/train.py` against it on the built-in demo videos with a step line
per step, SIGKILL the server after --kill-after step lines, restart it on the same port with the
same store after --down-for more, and let the run complete. Printed (and written with --json):

- the median step time before / during / after the outage, from the clips/s of each step line
  (the loop's own timing of the step: forward, backward, optimizer, data wait) and from the
  wall time between consecutive step lines as this script reads them (what the outage would add
  around the step: logging calls, GIL contention with the tracker's thread). Intervals spanning
  an epoch end (validation) are left out of the wall figures, and the first --warmup steps (the
  data pipeline starting) out of every figure. "During" runs from the kill until the restarted
  server answers /health, so it includes the server's start-up time.
- the ratios during/before (target: within 5%), after/before (both with the server up: how
  much the step time moves without an outage on this machine) and during/after; the job's exit
  code, how many "MLflow ... failed" warnings it printed (target: exactly one) and urllib3
  "Retrying" lines, whether it printed "MLflow is back", and what the restarted server holds:
  every step's train/loss (none lost) and the run's status (FINISHED).

The two cores of the machine this was written on are shared with other work: step times vary by
more than the effect being measured, so the load average is printed with the figures.
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
PHASES = ("before", "during", "after")
# 480 demo training videos at batch 16, passed to the job so that the figures stay comparable
# whatever the demo recipe's own batch is
BATCH = 16
DEMO_STEPS_PER_EPOCH = 480 // BATCH


@dataclass
class Step:
    step: int
    clips_per_s: float
    phase: str
    seen_at: float  # time.monotonic() when this script read the line
    after_epoch_end: bool  # the interval since the previous step line includes validation


@dataclass
class Result:
    load_average_at_start: list[float]
    command: list[str]
    exit_code: int | None = None
    steps_total: int | None = None
    killed_after_step: int | None = None
    restart_begun_after_step: int | None = None
    back_after_step: int | None = None
    outage_s: float | None = None
    failed_warnings: int = 0
    failed_warning_lines: list[str] = field(default_factory=list)
    urllib3_retry_lines: int = 0  # other warning lines the outage printed (one per HTTP retry)
    not_sent_lines: list[str] = field(default_factory=list)  # "MLflow: N calls not sent"
    back_message: bool = False
    medians: dict = field(default_factory=dict)  # phase -> {steps, step_time_s, wall_s}
    ratio_during_before_step_time: float | None = None
    ratio_during_before_wall: float | None = None
    ratio_after_before_step_time: float | None = None  # the noise: both with the server up
    ratio_after_before_wall: float | None = None
    ratio_during_after_step_time: float | None = None  # against the server-up steps that follow
    ratio_during_after_wall: float | None = None
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
        "--epochs", type=int, default=4, help=f"training epochs ({DEMO_STEPS_PER_EPOCH} steps each)"
    )
    parser.add_argument(
        "--kill-after", type=int, default=15, help="SIGKILL the server after this many step lines"
    )
    parser.add_argument(
        "--down-for", type=int, default=15, help="restart it after this many more step lines"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=5,
        help="leave the first N steps out of the figures (the data pipeline starting up)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    return args


def check_args(args: argparse.Namespace) -> str | None:
    """The one-line complaint about the flags, before anything starts; None when they're fine."""
    if args.warmup < 0 or args.warmup >= args.kill_after:
        return (
            f"--warmup {args.warmup}: must be at least 0 and under --kill-after {args.kill_after}"
        )
    for flag in ("epochs", "kill_after", "down_for"):
        if getattr(args, flag) < 1:
            return f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1"
    steps = DEMO_STEPS_PER_EPOCH * args.epochs
    if args.kill_after + args.down_for >= steps:
        return (
            f"--kill-after {args.kill_after} + --down-for {args.down_for} must be under the "
            f"run's {steps} steps (--epochs {args.epochs}: {DEMO_STEPS_PER_EPOCH} steps an epoch)"
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


def summarize(steps: list[Step], batch: int) -> dict:
    """Per phase: median step time from clips/s, and median wall time between step lines."""
    out = {}
    for phase in PHASES:
        mine = [s for s in steps if s.phase == phase]
        walls = [
            cur.seen_at - prev.seen_at
            for prev, cur in itertools.pairwise(steps)
            if cur.phase == phase and prev.phase == phase and not cur.after_epoch_end
        ]
        out[phase] = {
            "steps": len(mine),
            "step_time_s": median_or_none([batch / s.clips_per_s for s in mine if s.clips_per_s]),
            "wall_s": median_or_none(walls),
        }
    return out


def ratio(medians: dict, phase: str, key: str, base: str = "before") -> float | None:
    reference, other = medians[base][key], medians[phase][key]
    return other / reference if reference and other else None


def run(args: argparse.Namespace, workdir: Path) -> Result:
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    name = f"bench-tracking-{int(time.time())}"
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
        result.medians = summarize(steps[args.warmup :], batch=BATCH)
        result.ratio_during_before_step_time = ratio(result.medians, "during", "step_time_s")
        result.ratio_during_before_wall = ratio(result.medians, "during", "wall_s")
        result.ratio_after_before_step_time = ratio(result.medians, "after", "step_time_s")
        result.ratio_after_before_wall = ratio(result.medians, "after", "wall_s")
        result.ratio_during_after_step_time = ratio(
            result.medians, "during", "step_time_s", "after"
        )
        result.ratio_during_after_wall = ratio(result.medians, "during", "wall_s", "after")
        check_mlflow(uri, result)
    finally:
        if server is not None:
            kill_server(server)
    return result


def follow(job, args, result: Result, workdir: Path, port: int, server):
    """Read the job's lines as they come; kill and restart the server at the step counts."""
    steps: list[Step] = []
    phase = "before"
    epoch_ended = False
    back: dict = {}

    def wait_back(proc: subprocess.Popen) -> None:
        wait_healthy(port, proc)
        back["at"] = time.monotonic()

    waiter = None
    killed_at = None
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
            result.back_message = True
        if m := RUN_LINE.search(line):
            result.mlflow_run_id = m.group(1)
        if EPOCH_LINE.search(line):
            epoch_ended = True
        m = STEP_LINE.search(line)
        if not m:
            continue
        now = time.monotonic()
        if phase == "during" and "at" in back:
            phase = "after"
            result.back_after_step = steps[-1].step if steps else None
            result.outage_s = round(back["at"] - killed_at, 1)
            print(f"[benchmark] server answers again (down {result.outage_s} s)", flush=True)
        step = int(m.group(1))
        result.steps_total = int(m.group(2))
        steps.append(Step(step, float(m.group(4)), phase, now, epoch_ended))
        epoch_ended = False
        seen = len(steps)
        if seen == args.kill_after:
            kill_server(server)
            killed_at = time.monotonic()
            result.killed_after_step = step
            phase = "during"
            print(f"[benchmark] SIGKILLed the mlflow server after step {step}", flush=True)
        elif seen == args.kill_after + args.down_for:
            server = start_server(workdir, port, "server-2.log")
            result.restart_begun_after_step = step
            waiter = threading.Thread(target=wait_back, args=(server,), daemon=True)
            waiter.start()
            print(f"[benchmark] restarting the mlflow server after step {step}", flush=True)
    if waiter is not None:
        waiter.join()
        if result.outage_s is None and "at" in back:
            result.outage_s = round(back["at"] - killed_at, 1)
    if killed_at is not None and result.restart_begun_after_step is None:
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
    print(
        f"server killed after step {result.killed_after_step}, restart begun after step "
        f"{result.restart_begun_after_step}, answering again after step {result.back_after_step} "
        f"(down {result.outage_s} s); {result.steps_total} steps in {result.job_seconds} s"
    )
    print(f"{'phase':<8} {'steps':>5} {'step time (s)':>14} {'wall between lines (s)':>23}")
    for phase in PHASES:
        m = result.medians.get(phase, {})
        step_time = f"{m['step_time_s']:.3f}" if m.get("step_time_s") else "-"
        wall = f"{m['wall_s']:.3f}" if m.get("wall_s") else "-"
        print(f"{phase:<8} {m.get('steps', 0):>5} {step_time:>14} {wall:>23}")

    def pct(r: float | None) -> str:
        return f"{r:.3f} ({100 * (r - 1):+.1f}%)" if r else "-"

    print(f"during/before step time: {pct(result.ratio_during_before_step_time)}  (target ±5%)")
    print(f"during/before wall:      {pct(result.ratio_during_before_wall)}")
    print(f"after/before step time:  {pct(result.ratio_after_before_step_time)}  (the noise)")
    print(f"after/before wall:       {pct(result.ratio_after_before_wall)}")
    print(f"during/after step time:  {pct(result.ratio_during_after_step_time)}")
    print(f"during/after wall:       {pct(result.ratio_during_after_wall)}")
    print(f"job exit code:           {result.exit_code}")
    print(f"'MLflow ... failed':     {result.failed_warnings} warning(s) (target: 1)")
    print(f"urllib3 'Retrying' lines: {result.urllib3_retry_lines}")
    print(f"'MLflow is back':        {'yes' if result.back_message else 'NO'}")
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
    workdir = Path(tempfile.mkdtemp(prefix="morphmlp-bench-tracking-"))
    try:
        result = run(args, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(result), f, indent=2)
    ok = (
        result.exit_code == 0
        and result.failed_warnings == 1
        and result.back_message
        and result.mlflow_status == "FINISHED"
        and not result.loss_steps_missing
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
