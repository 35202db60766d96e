#!/usr/bin/env python3
"""Max load: the `capacity` stage against GuideLLM 0.8.1's sweep, on the same server, same run.

Both tools drive the same real server on loopback with the same requests — the main job's rendered
samples (`pipelines/select.toml`'s dataset, prompt template and system message; about 133 prompt
tokens), greedy, at most `--max-tokens` new, streamed — and judge them by the same SLO (time to
first token and end-to-end latency; 99% of requests within both):

  llama-server   llama.cpp's own server (built from the llama.cpp sources vendored in the
                 llama-cpp-python 0.3.36 sdist, as bench/infer_vs_llamacpp.py builds it) on
                 SmolLM2-135M-Instruct Q8_0, continuous batching with `--parallel N`;
  pipeline serve the embedded SmolLM2 (Q8_0) behind `pipeline serve`.

Ours: `pipeline run` on a pipeline whose `capacity` stage names the server as an
`openai_compatible` catalog model; its max load is the highest Poisson rate it found sustained.
GuideLLM's: `guidellm run` with a sweep profile (synchronous, throughput, then Poisson rates spread
evenly between the two), the same seconds per load, the same number of loads and requests in
flight, its own SLO attainment per load (`--metrics` slo); its max load is the highest Poisson rate
whose attainment is at least 99% and whose achieved rate is within 5% of the rate offered (our
stage's rule, applied to its figures). Wall time of each search, side by side.

The load generator must not be the bottleneck: at the saturating anchor (`--concurrency` in
flight) our achieved rate is compared with `wrk`'s (a raw HTTP load generator, the same request
bodies, the same connections) against the same server.

    python3 bench/capacity_vs_guidellm.py [--seconds 10] [--loads 8] [--parallel 4]

`PIPELINE_BIN=path` runs that `pipeline` binary instead of building this checkout's. GuideLLM is
installed into ~/.cache/pipeline-bench-venv on first use (it brings PyTorch: ~3 GB).
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from infer_vs_llamacpp import SHA, build_llama_server, served_entry  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
GUIDELLM = "0.8.1"
VENV = Path.home() / ".cache/pipeline-bench-venv"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(proc, url, what):
    deadline = time.time() + 300
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            sys.exit(f"{what} did not come up (exit {proc.poll()})")
        time.sleep(0.2)


def guidellm():
    exe = VENV / "bin/guidellm"
    ok = exe.exists() and subprocess.run([str(exe), "--version"], capture_output=True, text=True).stdout.strip().endswith(GUIDELLM)
    if not ok:
        print(f"installing guidellm=={GUIDELLM} into {VENV}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin/pip"), "install", "-q", f"guidellm=={GUIDELLM}"], check=True)
    return exe


def project(workdir):
    """A copy of `pipelines/` (and `catalogs/`) whose `select.toml` ends at its `rendered` stage."""
    shutil.copytree(ROOT / "pipelines", workdir / "pipelines", ignore=shutil.ignore_patterns(".pipeline", "*.lock"))
    shutil.copytree(ROOT / "catalogs", workdir / "catalogs")
    select = (workdir / "pipelines/select.toml").read_text()
    return workdir / "pipelines", select[: select.index("\n[stages.answers]") + 1]


def write_catalog(path, port, served_model):
    path.write_text(served_entry("bench-target", port, served_model))


def ours(binary, pipelines, head, args):
    """(max rps, loads, wall seconds) of our capacity stage against the catalog's `bench-target`."""
    (pipelines / "load.toml").write_text(head + f"""
[stages.load]
kind = "capacity"
needs = ["rendered"]
catalog = "bench-catalog.toml"
models = ["bench-target"]
sampler = {{ max_tokens = {args.max_tokens} }}
slo = {{ ttft_ms = {args.ttft_ms}, e2e_ms = {args.e2e_ms} }}
seconds_per_load = {args.seconds}
max_loads = {args.loads}
max_concurrency = {args.concurrency}
""")
    shutil.rmtree(pipelines / ".pipeline", ignore_errors=True)
    (pipelines / "load.lock").unlink(missing_ok=True)
    t0 = time.perf_counter()
    run = subprocess.run([binary, "run", "load.toml"], cwd=pipelines, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"pipeline run failed (exit {run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    wall = time.perf_counter() - t0
    load = json.loads(subprocess.run([binary, "show", "load.toml", "load"], cwd=pipelines, check=True, capture_output=True, text=True).stdout)
    timing = load["models"]["bench-target"]["timing"]
    return timing["max_rps"], timing["loads"], wall, timing["search_s"]


def rendered_messages(binary, pipelines):
    out = subprocess.run([binary, "show", "load.toml", "rendered"], cwd=pipelines, check=True, capture_output=True, text=True).stdout
    return [s["messages"] for s in json.loads(out)["samples"]]


def theirs(exe, port, served_model, messages, workdir, args, name):
    """(max rps, benchmarks as (kind, rate, attainment, achieved), wall seconds) of GuideLLM's sweep."""
    data = workdir / "guidellm-data.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in messages))
    out = workdir / f"guidellm-{name}.json"
    scenario = {"spec": {
        "backend": {"kind": "openai_http", "target": f"http://127.0.0.1:{port}", "model": served_model,
                    "request_format": "/v1/chat/completions", "max_tokens": args.max_tokens,
                    "extras": {"body": {"temperature": 0}}},
        "profile": {"kind": "sweep", "sweep_size": args.loads, "strategy_type": "poisson", "max_concurrency": args.concurrency, "warmup": 0.1},
        "data": [{"kind": "json_file", "path": str(data)}],
        "constraints": [{"kind": "max_duration", "seconds": args.seconds}],
        "metrics": {"kind": "generative", "slo": {"ttft_ms": args.ttft_ms, "e2el_ms": args.e2e_ms}},
        "outputs": [{"kind": "json", "path": str(out)}],
        "seed": {"kind": "static", "value": 42},
    }}
    (workdir / "guidellm-scenario.json").write_text(json.dumps(scenario, indent=1))
    # Its console goes to a file, not a pipe: a worker process it leaves behind holding a pipe open
    # would keep a reader waiting (seen once here).
    log = workdir / f"guidellm-{name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run([str(exe), "run", "-c", str(workdir / "guidellm-scenario.json"), "--disable-console-interactive"],
                              cwd=workdir, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, HF_HUB_OFFLINE="1"),
                              timeout=args.loads * args.seconds * 4 + 300).returncode
    wall = time.perf_counter() - t0
    if code != 0:
        sys.exit(f"guidellm failed (exit {code}):\n{log.read_text()[-4000:]}")
    report = json.loads(out.read_text())
    rows = []
    for b in report["benchmarks"]:
        strategy = b["config"]["strategy"]
        m = b["metrics"]
        achieved = m["requests_per_second"]["successful"]["mean"]
        rows.append((strategy["type_"], strategy.get("rate"), m.get("slo_attainment"), achieved))
    sustained = [rate for kind, rate, att, ach in rows
                 if kind == "poisson" and att is not None and att >= 0.99 and ach >= 0.95 * rate]
    return max(sustained, default=0.0), rows, wall


def raw_rate(port, served_model, messages, args):
    """Requests per second `wrk` completes with `--concurrency` connections and our request bodies."""
    bodies = [json.dumps({"model": served_model, "messages": m, "max_tokens": args.max_tokens, "temperature": 0,
                          "stream": True, "stream_options": {"include_usage": True}}) for m in messages]
    script = Path(tempfile.mkdtemp()) / "bodies.lua"
    lua_bodies = ",\n".join("[==[" + b + "]==]" for b in bodies)
    script.write_text(f"""
local bodies = {{
{lua_bodies}
}}
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  i = i % #bodies + 1
  return wrk.format(nil, "/v1/chat/completions", nil, bodies[i])
end
done = function(summary, latency, requests)
  -- Not counted: read errors, which are llama-server closing the connection after each stream.
  io.write(string.format("RATE %f ERRORS %d\\n", summary.requests / (summary.duration / 1e6), summary.errors.status + summary.errors.connect + summary.errors.write + summary.errors.timeout))
end
""")
    out = subprocess.run(["wrk", "-t", "1", "-c", str(args.concurrency), "-d", f"{round(args.seconds)}s", "--timeout", "60s",
                          "-s", str(script), f"http://127.0.0.1:{port}"], capture_output=True, text=True, check=True).stdout
    line = next(l for l in out.splitlines() if l.startswith("RATE"))
    return float(line.split()[1]), int(line.split()[3])


def serve_cmd(binary, port):
    return [binary, "serve", "--catalog", str(ROOT / "catalogs/open-models.toml"), "--model", MODEL, "--prepare", "q8_0", "--listen", f"127.0.0.1:{port}"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20, help="seconds per load, both tools")
    ap.add_argument("--loads", type=int, default=8, help="loads per search, anchors included, both tools")
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight at most (the saturating anchor)")
    ap.add_argument("--parallel", type=int, default=4, help="llama-server slots (continuous batching)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--ttft-ms", type=float, default=1500)
    ap.add_argument("--e2e-ms", type=float, default=2500)
    ap.add_argument("--servers", default="llama-server,pipeline-serve")
    args = ap.parse_args()
    binary = os.environ.get("PIPELINE_BIN")
    if not binary:
        target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
        subprocess.run(["cargo", "build", "--locked", "-q"], cwd=ROOT, check=True)
        binary = str(target / "debug/pipeline")
    exe = guidellm()
    workdir = Path(tempfile.mkdtemp(prefix="capacity-bench-"))
    pipelines, head = project(workdir)
    cache = Path(os.environ.get("PIPELINE_MODEL_CACHE", Path.home() / ".cache/pipeline/models")) / SHA
    gguf = cache / "SmolLM2-135M-Instruct.Q4_1.to-q8_0-v1.gguf"
    results = []
    for name in args.servers.split(","):
        port = free_port()
        threads = str(os.cpu_count())
        if name == "llama-server":
            if not gguf.exists():
                # `pipeline serve --prepare q8_0` makes the Q8_0 file from the shipped Q4_1 (cached).
                make = subprocess.Popen(serve_cmd(binary, port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                wait_up(make, f"http://127.0.0.1:{port}/v1/models", "pipeline serve")
                make.terminate()
                make.wait()
            cmd = [str(build_llama_server()), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", threads, "-tb", threads,
                   "-c", str(2048 * args.parallel), "--parallel", str(args.parallel), "-a", "smollm2", "--no-webui"]
            served, health = "smollm2", f"http://127.0.0.1:{port}/health"
        elif name == "pipeline-serve":
            cmd = serve_cmd(binary, port)
            served, health = MODEL, f"http://127.0.0.1:{port}/v1/models"
        else:
            sys.exit(f"unknown server {name!r}: llama-server or pipeline-serve")
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_up(proc, health, name)
            write_catalog(pipelines / "bench-catalog.toml", port, served)
            our_max, our_loads, our_wall, our_search = ours(binary, pipelines, head, args)
            messages = rendered_messages(binary, pipelines)
            their_max, their_rows, their_wall = theirs(exe, port, served, messages, workdir, args, name)
            raw, raw_errors = raw_rate(port, served, messages, args)
        finally:
            proc.terminate()
            proc.wait()
        our_sat = next(l["achieved_rps"] for l in our_loads if l["kind"] == "throughput")
        their_sat = next(ach for kind, _, _, ach in their_rows if kind == "throughput")
        print(f"{name}: GuideLLM's console and report are in {workdir}", file=sys.stderr)
        results.append((name, our_max, their_max, our_wall, our_search, their_wall, our_sat, their_sat, raw, raw_errors))
        print(f"\n{name}: ours", file=sys.stderr)
        for l in our_loads:
            print(f"  {l['kind']:11} rate {l.get('rate_rps') or 0:6.2f} offered {l['offered_rps']:6.2f} achieved {l['achieved_rps']:6.2f} "
                  f"attainment {l['attainment']:.3f} ttft p99 {l['ttft_ms']['p99']:7.0f} e2e p99 {l['e2e_ms']['p99']:7.0f} sustained {l['sustained']}", file=sys.stderr)
        print(f"{name}: GuideLLM", file=sys.stderr)
        for kind, rate, att, ach in their_rows:
            print(f"  {kind:11} rate {rate or 0:6.2f} achieved {ach:6.2f} attainment {att if att is not None else float('nan'):.3f}", file=sys.stderr)
    print(f"\nSLO: TTFT <= {args.ttft_ms:.0f} ms and end-to-end <= {args.e2e_ms:.0f} ms for 99% of requests; {args.loads} loads of {args.seconds:.0f} s, "
          f"{args.concurrency} in flight at most, <= {args.max_tokens} new tokens; llama-server --parallel {args.parallel}; {os.cpu_count()} cores")
    print("| server | max RPS, ours | max RPS, GuideLLM | ours / GuideLLM | search wall, ours (s) | GuideLLM (s) | saturating anchor, ours / GuideLLM / wrk (req/s) | ours / wrk |")
    print("|---|---|---|---|---|---|---|---|")
    for name, om, tm, ow, os_, tw, osat, tsat, raw, raw_err in results:
        ratio = f"{om / tm:.2f}" if tm > 0 else "–"
        raw_ratio = f"{osat / raw:.2f}" if raw > 0 else "– (wrk completed none)"
        print(f"| {name} | {om:.2f} | {tm:.2f} | {ratio} | {ow:.1f} | {tw:.1f} | {osat:.2f} / {tsat:.2f} / {raw:.2f}{f' ({raw_err} errors)' if raw_err else ''} | {raw_ratio} |")


if __name__ == "__main__":
    main()
