#!/usr/bin/env python3
"""How the store's costs grow with the number of samples, ours beside DVC's on the same work.

Ours: `dataset -> prompt -> render -> command` over N generated samples, no model: the golden set
checked and split, each sample rendered (one memoized item each), then a user command that reads
the whole rendered set from its stdin and prints a digest of it (a fast program standing in for
one that scores or exports it). DVC: the same work as a `dvc.yaml` of two stages — a Python
script rendering every line with the same template, then the same command over its output.

Per N, for each tool: a first run into an empty cache, a rerun with nothing changed, a rerun after
one sample is appended; wall time, peak RSS (the tool's process tree, as `wait4` reports it), the
store's size (ours: `.pipeline/`; DVC: `.dvc/` with the outputs in the workspace) and file count.
Prints a table per N and how each cost grows from one N to the next (x per 10x samples).

    python3 bench/store_scale.py [--samples 10000,100000,1000000] [--profile dev|release] [--no-dvc]
                                 [--check] [--binary PATH]

`--profile dev` (the default) times the binary README's commands build. `--check` (what CI runs)
fails when our peak RSS passes 256 MB, the store passes twice the input's size or holds more than
a few files per stage.
DVC is installed into ~/.cache/pipeline-bench-venv when missing. Export CARGO_TARGET_DIR as the
tests do.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cached_rerun import dvc_bin  # the same DVC, installed once for both benchmarks

ROOT = Path(__file__).resolve().parent.parent
LABELS = ["alpha", "beta", "gamma", "delta"]
TEMPLATE = "Label this sample as alpha, beta, gamma or delta.\n\n{{ text }}\n"
# Reads its whole input as it comes (never holding it) and prints what it read, as JSON.
DIGEST = """import hashlib, json, sys
h, n = hashlib.sha256(), 0
for chunk in iter(lambda: sys.stdin.buffer.read(1 << 20), b""):
    h.update(chunk)
    n += len(chunk)
print(json.dumps({"bytes": n, "sha256": h.hexdigest()}))
"""
# DVC's render stage: the same template, each line of the data rendered as the `render` stage does.
RENDER = """import json, sys
template = open("sample.j2").read()
with open("data.jsonl") as f, open("rendered.jsonl", "w") as out:
    for line in f:
        s = json.loads(line)
        out.write(json.dumps({"id": s["id"], "messages": [{"role": "user", "content": template.replace("{{ text }}", s["text"])}]}) + "\\n")
"""
PEAK_RSS_MB = 256
STORE_X = 2.0


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


def size_of(paths):
    files, size = 0, 0
    for path in paths:
        if path.is_file():
            files, size = files + 1, size + path.stat().st_size
        for root, _, names in os.walk(path):
            for n in names:
                files += 1
                size += os.path.getsize(os.path.join(root, n))
    return files, size


def setup_ours(d, pipeline):
    (d / "digest.py").write_text(DIGEST)
    (d / "scale.toml").write_text(
        'seed = 1\n[stages.samples]\nkind = "dataset"\npath = "data.jsonl"\nlabel = "label"\n'
        '[stages.prompt]\nkind = "prompt"\ntemplate = "sample.j2"\n'
        '[stages.rendered]\nkind = "render"\nneeds = ["samples", "prompt"]\n'
        '[stages.digest]\nkind = "command"\nneeds = ["rendered"]\nrun = ["python3", "digest.py"]\nfiles = ["digest.py"]\n'
    )
    return [str(pipeline), "run", "scale.toml"], lambda: size_of([d / ".pipeline"])


def setup_dvc(d, dvc):
    (d / "digest.py").write_text(DIGEST)
    (d / "render.py").write_text(RENDER)
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=d, check=True)
    stages = {
        "render": {"cmd": "python3 render.py", "deps": ["data.jsonl", "sample.j2", "render.py"], "outs": ["rendered.jsonl"]},
        "digest": {"cmd": "python3 digest.py < rendered.jsonl > digest.json", "deps": ["rendered.jsonl", "digest.py"], "outs": ["digest.json"]},
    }
    (d / "dvc.yaml").write_text(json.dumps({"stages": stages}, indent=1))  # JSON is YAML
    return [dvc, "repro", "-q"], lambda: size_of([d / ".dvc", d / "rendered.jsonl", d / "digest.json", d / "dvc.lock"])


def measure(setup, tool, n):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        with open(d / "data.jsonl", "w") as f:
            for i in range(n):
                f.write(sample(i))
        input_mb = (d / "data.jsonl").stat().st_size / 1e6
        (d / "sample.j2").write_text(TEMPLATE)
        run, store = setup(d, tool)
        first, first_rss = timed(run, d)
        files, size = store()
        noop, noop_rss = timed(run, d)
        with open(d / "data.jsonl", "a") as f:
            f.write(sample(n))
        appended, appended_rss = timed(run, d)
        return {
            "n": n, "input_mb": input_mb, "first_s": first, "first_rss": first_rss, "noop_s": noop, "noop_rss": noop_rss,
            "appended_s": appended, "appended_rss": appended_rss, "store_files": files, "store_mb": size / 1e6,
        }


def show(name, r):
    print(
        f"  {name:<8} first run {r['first_s']:7.2f} s ({r['input_mb'] / r['first_s']:5.1f} MB/s, peak {r['first_rss']:5.0f} MB) · "
        f"nothing changed {r['noop_s'] * 1000:6.0f} ms (peak {r['noop_rss']:4.0f} MB) · one appended {r['appended_s']:6.2f} s (peak {r['appended_rss']:4.0f} MB) · "
        f"store {r['store_mb']:7.1f} MB ({r['store_mb'] / r['input_mb']:.2f}x the input) in {r['store_files']} files",
        flush=True,
    )


def growth(name, rows):
    for a, b in zip(rows, rows[1:]):
        grow = lambda k: b[k] / a[k] if a[k] else float("nan")
        print(
            f"  {name:<8} {a['n']} -> {b['n']} ({b['n'] / a['n']:.0f}x): first run {grow('first_s'):.1f}x, peak RSS {grow('first_rss'):.1f}x, "
            f"nothing changed {grow('noop_s'):.1f}x, one appended {grow('appended_s'):.1f}x, store {grow('store_mb'):.1f}x, files {grow('store_files'):.1f}x"
        )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", default="10000,100000")
    ap.add_argument("--profile", choices=["dev", "release"], default="dev")
    ap.add_argument("--no-dvc", action="store_true")
    ap.add_argument("--binary", help="a `pipeline` binary already built (CI passes the one its tests ran), instead of building one")
    ap.add_argument("--check", action="store_true", help=f"fail when our peak RSS passes {PEAK_RSS_MB} MB, the store {STORE_X}x the input, or the store's files grow with N")
    args = ap.parse_args()
    pipeline = Path(args.binary) if args.binary else binary(args.profile)
    tools = [("pipeline", setup_ours, pipeline)]
    if not args.no_dvc:
        dvc = dvc_bin()
        version = subprocess.run([dvc, "--version"], capture_output=True, text=True, check=True).stdout.strip()
        tools.append((f"dvc", setup_dvc, dvc))
        print(f"DVC {version}")
    rows = {name: [] for name, _, _ in tools}
    for n in [int(x) for x in args.samples.split(",")]:
        print(f"{n} samples:")
        for name, setup, tool in tools:
            r = measure(setup, tool, n)
            rows[name].append(r)
            show(name, r)
        if len(tools) == 2:
            o, d = rows["pipeline"][-1], rows["dvc"][-1]
            print(f"  dvc / ours: first run {d['first_s'] / o['first_s']:.2f}x, nothing changed {d['noop_s'] / o['noop_s']:.1f}x, one appended {d['appended_s'] / o['appended_s']:.2f}x, peak RSS {d['first_rss'] / o['first_rss']:.2f}x, store {d['store_mb'] / o['store_mb']:.2f}x")
    print("growth:")
    for name, _, _ in tools:
        growth(name, rows[name])
    if args.check:
        problems = []
        for r in rows["pipeline"]:
            for what in ["first_rss", "noop_rss", "appended_rss"]:
                if r[what] > PEAK_RSS_MB:
                    problems.append(f"{r['n']} samples: {what} {r[what]:.0f} MB > {PEAK_RSS_MB} MB")
            if r["store_mb"] > STORE_X * r["input_mb"]:
                problems.append(f"{r['n']} samples: the store is {r['store_mb'] / r['input_mb']:.2f}x the input (at most {STORE_X}x)")
            if r["store_files"] > 40:
                problems.append(f"{r['n']} samples: {r['store_files']} files in the store (a few per stage expected)")
        if problems:
            sys.exit("store_scale --check failed:\n  " + "\n  ".join(problems))
        print(f"check: peak RSS within {PEAK_RSS_MB} MB, the store within {STORE_X}x the input and a few files per stage at every N")


if __name__ == "__main__":
    main()
