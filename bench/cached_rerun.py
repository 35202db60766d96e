#!/usr/bin/env python3
"""Fully cached rerun: `pipeline run` vs `dvc repro` on equivalent pipelines, in one run.

Pipeline: a 10,000-sample golden set, then 3 candidates x 5 stages each (prompt, render with one
memoized item per sample, three `command` stages), 16 stages in all. DVC gets the same DAG of 16
stages over the same data file, each a no-op command with its own output. Both are run once to fill
their caches, then timed on reruns where nothing changed. Prints medians and the ratio.

    python3 bench/cached_rerun.py [--runs 15] [--samples 10000] [--profile dev|release]

Needs DVC (installed into ~/.cache/pipeline-bench-venv when missing). `--profile dev` times the
binary README's commands build (`cargo build`); `release` (the default) builds one with
`cargo build --release` first.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CANDIDATES = ["small", "medium", "large"]
NOOP = "import json,sys; json.load(sys.stdin); print('{}')"


def sh(cmd, cwd, **kw):
    return subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def dvc_bin():
    venv = Path.home() / ".cache/pipeline-bench-venv"
    dvc = venv / "bin/dvc"
    if not dvc.exists():
        print("installing DVC into", venv, file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin/pip"), "install", "-q", "dvc"], check=True)
    return str(dvc)


def write_data(path, n):
    intents = ["billing", "refund", "technical", "account", "shipping", "cancel"]
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"s{i:05d}", "text": f"ticket number {i} about {intents[i % 6]}", "intent": intents[i % 6]}) + "\n")


def ours(dir, binary):
    (dir / "prompts").mkdir()
    lines = ['seed = 1', '[stages.data]', 'kind = "dataset"', 'path = "data.jsonl"', 'label = "intent"']
    for c in CANDIDATES:
        (dir / "prompts" / f"{c}.j2").write_text(f"[{c}] Classify: {{{{ text }}}}\n")
        lines += [
            f'[stages.{c}_prompt]', 'kind = "prompt"', f'template = "prompts/{c}.j2"',
            f'[stages.{c}_render]', 'kind = "render"', f'needs = ["data", "{c}_prompt"]',
        ]
        prev = f"{c}_render"
        for step in ["score", "aggregate", "report"]:
            lines += [f'[stages.{c}_{step}]', 'kind = "command"', f'needs = ["{prev}"]', f'run = ["python3", "-c", {json.dumps(NOOP)}]']
            prev = f"{c}_{step}"
    (dir / "bench.toml").write_text("\n".join(lines) + "\n")
    return [str(binary), "run", "bench.toml"]


def dvc(dir, dvc):
    sh([dvc, "init", "--no-scm", "-q"], dir)
    stages = {"data": {"cmd": "python3 -c \"open('data.out','w').write('x')\"", "deps": ["data.jsonl"], "outs": ["data.out"]}}
    for c in CANDIDATES:
        (dir / f"{c}.j2").write_text(f"[{c}] Classify: {{{{ text }}}}\n")
        prev = "data.out"
        for step in ["prompt", "render", "score", "aggregate", "report"]:
            out = f"{c}_{step}.out"
            deps = [prev] + ([f"{c}.j2"] if step == "prompt" else [])
            stages[f"{c}_{step}"] = {"cmd": f"python3 -c \"open('{out}','w').write('x')\"", "deps": deps, "outs": [out]}
            prev = out
    import_yaml = json.dumps({"stages": stages}, indent=1)  # JSON is valid YAML
    (dir / "dvc.yaml").write_text(import_yaml)
    return [dvc, "repro", "-q"]


def timed(cmd, cwd, runs):
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sh(cmd, cwd)
        times.append(time.perf_counter() - t)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--samples", type=int, default=10000)
    ap.add_argument("--profile", choices=["dev", "release"], default="release")
    args = ap.parse_args()
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    sh(["cargo", "build", "--locked", "-q"] + (["--release"] if args.profile == "release" else []), ROOT)
    binary = target / ("release" if args.profile == "release" else "debug") / "pipeline"
    dvc_exe = dvc_bin()
    version = sh([dvc_exe, "--version"], ROOT).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp) / "ours", Path(tmp) / "dvc"
        a.mkdir(), b.mkdir()
        write_data(a / "data.jsonl", args.samples)
        shutil.copy(a / "data.jsonl", b / "data.jsonl")
        ours_cmd, dvc_cmd = ours(a, binary), dvc(b, dvc_exe)
        t = time.perf_counter(); sh(ours_cmd, a); first = time.perf_counter() - t
        sh(dvc_cmd, b)
        # Nothing may execute on a cached rerun.
        out = json.loads(sh(ours_cmd + ["--json"], a).stdout)
        ran = [s["id"] for it in out["iterations"] for s in it["stages"] if s["status"] != "fresh"]
        assert not ran, f"cached rerun executed {ran}"
        ours_t = timed(ours_cmd, a, args.runs)
        dvc_t = timed(dvc_cmd, b, args.runs)
    med_o, med_d = statistics.median(ours_t), statistics.median(dvc_t)
    print(f"fully cached rerun, {args.samples} samples x {len(CANDIDATES)} candidates x 5 stages (+ dataset), median of {args.runs}, {args.profile} build")
    print(f"  pipeline (first run, not a rerun: {first:.1f} s)")
    print(f"  pipeline run   {med_o * 1000:8.1f} ms   (min {min(ours_t) * 1000:.1f}, max {max(ours_t) * 1000:.1f})")
    print(f"  dvc repro      {med_d * 1000:8.1f} ms   (min {min(dvc_t) * 1000:.1f}, max {max(dvc_t) * 1000:.1f})   {version}")
    print(f"  ratio          {med_d / med_o:8.1f}x faster than dvc repro")


if __name__ == "__main__":
    main()
