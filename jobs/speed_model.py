"""MorphMLP speed and memory: forward and forward+backward clips/s and peak memory per variant.

    python jobs/speed_model.py                         # CPU: xs (batch 8), s and b (batch 1)
    python jobs/speed_model.py --variants xs --batch-size 8 --threads 2
    python jobs/speed_model.py --device cuda           # bf16 autocast, eager and compiled

CPU runs are fp32 eager. Throughput is batch size / fastest of the timed steps. On CUDA each
variant runs with bf16 autocast, eager and under torch.compile, and the table adds the training
step's MFU: achieved FLOP/s / peak bf16 FLOP/s, where a step's FLOPs are 3 x the forward FLOPs
counted by torch's FlopCounterMode (backward costs about twice the forward) and the peak comes
from --peak-tflops or the table below.

Each measurement runs in a fresh child process, so peak memory is that measurement's own: on
CUDA torch's max_memory_allocated, on CPU (Linux) the peak resident size during the steps minus
the resident size of the built model and its input. Needs only torch (no Ray): the package is
imported inside the functions, from platform/ when it is not installed. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, matched against the device name.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
}
DEFAULT_BATCH = {"morphmlp_xs": 8}  # others: 1 on CPU, 8 on CUDA


def _import_package() -> None:
    try:
        import morphmlp  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "platform"))


def measure(case: dict) -> dict:
    """One (variant, mode) measurement in this process; `case` comes from the parent."""
    _import_package()
    import torch

    from morphmlp.models import create_model
    from morphmlp.models.flops import input_shape

    cuda = case["device"] == "cuda"
    if case["threads"]:
        torch.set_num_threads(case["threads"])
    torch.backends.cudnn.benchmark = True
    model = create_model(case["variant"], num_frames=case["frames"], drop_path_rate=0.0)
    model = model.to(case["device"])
    batch = case["batch_size"]
    x = torch.randn(batch, *input_shape(model.cfg), device=case["device"])
    labels = torch.randint(0, model.cfg.num_classes, (batch,), device=case["device"])
    train = case["mode"] == "train"
    model.train(train)
    run = torch.compile(model) if case["compile"] else model

    def step():
        with torch.autocast(case["device"], dtype=torch.bfloat16, enabled=case["bf16"]):
            if not train:
                with torch.inference_mode():
                    return run(x)
            loss = torch.nn.functional.cross_entropy(run(x), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss

    def sync():
        if cuda:
            torch.cuda.synchronize()

    baseline_kib = _reset_peak_rss_kib()
    for _ in range(case["warmup"]):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(case["iters"]):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    if cuda:
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = (_status_kib("VmHWM") - baseline_kib) / 1024
    # The fastest step, as timeit advises: slower ones measure other processes' interference.
    return {"clips_per_s": batch / min(times), "peak_mib": peak_mib}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss_kib() -> int:
    """Reset the kernel's peak-resident mark (Linux) and return the current resident size."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def _child(case: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(case)], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(f"measuring {case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_tflops(device_name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, value in PEAK_BF16_TFLOPS.items():  # most specific names first
        if key in device_name:
            return value
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="+", default=["xs", "s", "b"], metavar="NAME")
    parser.add_argument("--frames", type=int, help="default: each variant's own")
    parser.add_argument("--batch-size", type=int, help="default: 8 for xs; 1 (CPU) / 8 (CUDA)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--iters", type=int, help="timed steps (default 5 CPU, 20 CUDA)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 2 CPU, 5 CUDA)")
    parser.add_argument("--no-compile", action="store_true", help="CUDA: eager only")
    parser.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s for MFU")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.iters is not None and args.iters < 1:
        parser.error(f"--iters {args.iters}: at least 1 timed step")
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"--warmup {args.warmup}: must be >= 0")
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return 0

    _import_package()
    import torch

    from morphmlp.models import variant_config, variant_name
    from morphmlp.models.flops import forward_flops

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    device_name = torch.cuda.get_device_name() if cuda else f"CPU, {args.threads or 'all'} threads"
    peak = peak_tflops(device_name, args.peak_tflops) if cuda else None
    settings = [("fp32", False, False)]
    if cuda:
        settings = [("bf16 eager", True, False)]
        if not args.no_compile:
            settings.append(("bf16 compiled", True, True))

    header = ["variant", "input", "batch", "precision", "fwd clips/s", "fwd peak MiB"]
    header += ["fwd+bwd clips/s", "fwd+bwd peak MiB", "GMACs/clip"]
    if cuda:
        header.append("MFU (fwd+bwd)")
    print(f"device: {device_name}" + (f"; peak bf16 {peak} TFLOP/s" if peak else ""))
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for name in map(variant_name, args.variants):
        cfg = variant_config(name, **({"num_frames": args.frames} if args.frames else {}))
        batch = args.batch_size or DEFAULT_BATCH.get(name, 8 if cuda else 1)
        flops_per_clip = forward_flops(cfg)
        for label, bf16, compiled in settings:
            result = {}
            for mode in ("forward", "train"):
                case = {
                    "variant": name,
                    "frames": cfg.num_frames,
                    "batch_size": batch,
                    "device": args.device,
                    "threads": args.threads,
                    "mode": mode,
                    "bf16": bf16,
                    "compile": compiled,
                    "iters": args.iters if args.iters is not None else (20 if cuda else 5),
                    "warmup": args.warmup if args.warmup is not None else (5 if cuda else 2),
                }
                result[mode] = _child(case)
            row = [
                name,
                f"{cfg.num_frames}×{cfg.img_size}²",
                batch,
                label,
                f"{result['forward']['clips_per_s']:.2f}",
                f"{result['forward']['peak_mib']:.0f}",
                f"{result['train']['clips_per_s']:.2f}",
                f"{result['train']['peak_mib']:.0f}",
                f"{flops_per_clip / 2e9:.2f}",
            ]
            if cuda:
                achieved = 3 * flops_per_clip * result["train"]["clips_per_s"]
                row.append(f"{100 * achieved / (peak * 1e12):.1f}%" if peak else "n/a")
            print("| " + " | ".join(map(str, row)) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
