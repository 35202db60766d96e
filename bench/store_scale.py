#!/usr/bin/env python3
"""How the store's costs grow with the number of samples: `dataset -> prompt -> render` over N
samples (no model), from an empty store, then a rerun with nothing changed, then a rerun after
one sample is appended. Per N: wall time, peak RSS of the `pipeline` process, the store's size
and file count (and its size over the input's), the first run's input MB/s. Prints a table and
how each cost grows from one N to the next (x per 10x samples).

    python3 bench/store_scale.py [--samples 10000,100000] [--profile dev|release]

`--profile dev` (the default) times the binary README's commands build; `release` builds one
with `cargo build --release` first. Export CARGO_TARGET_DIR as the tests do.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LABELS = ["alpha", "beta", "gamma", "delta"]


def binary(profile):
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    if profile == "release":
        subprocess.run(["cargo", "build", "--release", "--locked", "-p", "pipeline"], cwd=ROOT, check=True)
        return target / "release/pipeline"
    subprocess.run(["cargo", "build", "--locked", "-p", "pipeline"], cwd=ROOT, check=True)
    return target / "debug/pipeline"


def sample(i):
    return json.dumps({"id": f"s{i:07d}", "text": f"sample {i}: the quick brown fox jumps over the lazy dog {i * 7919 % 10007}", "label": LABELS[i % 4]}) + "\n"


def timed(cmd, cwd):
    """Wall seconds and peak RSS (MB) of one run of `cmd`."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    if status != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed: {proc.stderr.read()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def store_size(path):
    files, size = 0, 0
    for root, _, names in os.walk(path):
        for n in names:
            files += 1
            size += os.path.getsize(os.path.join(root, n))
    return files, size


def measure(pipeline, n):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        with open(d / "data.jsonl", "w") as f:
            for i in range(n):
                f.write(sample(i))
        input_mb = (d / "data.jsonl").stat().st_size / 1e6
        (d / "sample.j2").write_text("Label this sample as alpha, beta, gamma or delta.\n\n{{ text }}\n")
        (d / "scale.toml").write_text(
            'seed = 1\n[stages.samples]\nkind = "dataset"\npath = "data.jsonl"\nlabel = "label"\n'
            '[stages.prompt]\nkind = "prompt"\ntemplate = "sample.j2"\n'
            '[stages.rendered]\nkind = "render"\nneeds = ["samples", "prompt"]\n'
        )
        run = [str(pipeline), "run", "scale.toml"]
        first, first_rss = timed(run, d)
        files, size = store_size(d / ".pipeline")
        noop, noop_rss = timed(run, d)
        with open(d / "data.jsonl", "a") as f:
            f.write(sample(n))
        appended, appended_rss = timed(run, d)
        return {
            "n": n, "input_mb": input_mb, "first_s": first, "first_rss": first_rss, "noop_s": noop, "noop_rss": noop_rss,
            "appended_s": appended, "appended_rss": appended_rss, "store_files": files, "store_mb": size / 1e6,
        }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", default="10000,100000")
    ap.add_argument("--profile", choices=["dev", "release"], default="dev")
    args = ap.parse_args()
    pipeline = binary(args.profile)
    rows = []
    for n in [int(x) for x in args.samples.split(",")]:
        r = measure(pipeline, n)
        rows.append(r)
        print(
            f"{r['n']:>9} samples ({r['input_mb']:.1f} MB): first run {r['first_s']:.2f} s ({r['input_mb'] / r['first_s']:.1f} MB/s, peak {r['first_rss']:.0f} MB) · "
            f"nothing changed {r['noop_s'] * 1000:.0f} ms (peak {r['noop_rss']:.0f} MB) · one appended {r['appended_s']:.2f} s (peak {r['appended_rss']:.0f} MB) · "
            f"store {r['store_mb']:.1f} MB ({r['store_mb'] / r['input_mb']:.2f}x the input) in {r['store_files']} files",
            flush=True,
        )
    for a, b in zip(rows, rows[1:]):
        grow = lambda k: b[k] / a[k] if a[k] else float("nan")
        print(
            f"{a['n']} -> {b['n']} samples ({b['n'] / a['n']:.0f}x): first run {grow('first_s'):.1f}x, peak RSS {grow('first_rss'):.1f}x, "
            f"nothing changed {grow('noop_s'):.1f}x, one appended {grow('appended_s'):.1f}x, store {grow('store_mb'):.1f}x, files {grow('store_files'):.1f}x"
        )


if __name__ == "__main__":
    main()
