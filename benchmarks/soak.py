"""Soak: a long CPU run with logging and checkpointing must keep resident memory flat.

    python benchmarks/soak.py                      # 20,000 steps of the digits job, 1 process
    python benchmarks/soak.py --steps 50000 --out soak.json

Runs `dist-train train` in a subprocess and samples its resident set size (VmRSS) twice a
second. Growth is measured from the end of warm-up (the first 20% of the run, when allocator
pools, data and the first checkpoint settle) to the end; the target is under 2%.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            f"run.output_dir={tmp}",
            f"train.max_steps={args.steps}",
            "train.max_epochs=null",
            "train.log_every=50",
            "train.eval_every=1000",
            "checkpoint.every_steps=250",
            "checkpoint.keep_last=2",
            "logging.wandb.mode=offline",
            "train.progress_bar=false",
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_SILENT": "true"}
        command = [sys.executable, "-m", "dist_train.cli", "train", "configs/digits.yaml", *overrides]
        start = time.monotonic()
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        samples: list[tuple[float, float]] = []
        while proc.poll() is None:
            rss = rss_mib(proc.pid)
            if rss is not None:
                samples.append((time.monotonic() - start, rss))
            time.sleep(0.5)
        if proc.returncode != 0:
            print(proc.stderr.read().decode()[-3000:], file=sys.stderr)
            return proc.returncode
        metrics = [json.loads(line) for line in (Path(tmp) / "digits" / "metrics.jsonl").read_text().splitlines()]

    duration = samples[-1][0]
    after_warmup = [rss for t, rss in samples if t >= 0.2 * duration]
    settled, final, peak = after_warmup[0], sum(after_warmup[-5:]) / len(after_warmup[-5:]), max(after_warmup)
    result = {
        "steps": args.steps,
        "seconds": round(duration, 1),
        "rss_after_warmup_mib": round(settled, 1),
        "rss_final_mib": round(final, 1),
        "rss_peak_mib": round(peak, 1),
        "growth_percent": round(100 * (final - settled) / settled, 2),
        "checkpoints_written": args.steps // 250,
        "logged_steps": sum("loss" in m for m in metrics),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "rss_timeline_mib": [round(rss) for _, rss in samples[:: max(1, len(samples) // 20)]],
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
