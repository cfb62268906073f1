"""CLI latency benchmark: how long a user waits for `base info`, `pack` and `verify` (and `serve`).

    .venv/bin/python benchmarks/cli_latency_bench.py [--repeats 7] [--no-serve]

Each command runs as the user runs it, a fresh `adapterhub` process, on the embedded base and a small
PEFT LoRA adapter made for it here (rank 8 on q_proj/v_proj, about 135 KB of fp32 tensors). In the same
run, interleaved round by round so that load from other processes hits every variant alike:

- ``python -c pass``: the interpreter alone (the floor of any command)
- ``python -c "import torch"``: what a command that imports torch pays before doing anything
- ``base info``: check the embedded base (config, weights, tokenizer, ids in range) and fingerprint it
- ``pack``: pack the adapter into a bundle directory (vLLM's own PEFT check included, run from its source)
- ``verify``: verify that bundle, vLLM's check included (the default when vLLM is installed)
- ``verify --base``: the same, also checking every module's shape against the base (fingerprints it)
- ``verify --no-vllm``: without vLLM's check, to show what that check costs

Targets (issue 14): pack and verify <= 3 s, base info <= 1 s. Each figure is the median of `--repeats`
rounds (min and max kept too). The machine may be shared: the ratios to the baselines measured here say
more than the seconds. Unless `--no-serve`, one `adapterhub serve` is also started (a real vLLM CPU
server, about a minute) and the readiness phases it prints are recorded, then it is stopped with Ctrl-C.
Writes ``benchmarks/results/cli_latency.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TARGETS = {"pack": 3.0, "verify": 3.0, "base info": 1.0}


def adapterhub() -> list[str]:
    """The console script next to this interpreter (what a user of this venv runs)."""
    script = Path(sys.executable).parent / "adapterhub"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from cli.main import app; sys.argv[0] = 'adapterhub'; app()"]


def make_adapter(out: Path) -> Path:
    """A rank-8 PEFT LoRA adapter for the embedded base, with non-zero B (a real, servable adapter)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from adapterhub_lite.base import EMBEDDED_BASE_DIR

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_BASE_DIR)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    peft_model.save_pretrained(out)
    return out


def timed(cmd: list[str], before=None) -> float:
    if before is not None:
        before()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return elapsed


def latencies(work: Path, repeats: int) -> dict[str, dict]:
    cli = adapterhub()
    adapter = make_adapter(work / "small-adapter")
    bundle = work / "small.bundle"
    packed = work / "packed.bundle"
    subprocess.run([*cli, "pack", str(adapter), "-o", str(bundle), "--json"], check=True, capture_output=True)

    def fresh_out() -> None:
        shutil.rmtree(packed, ignore_errors=True)

    variants: dict[str, tuple[list[str], object]] = {
        "python -c pass": ([sys.executable, "-c", "pass"], None),
        "python -c 'import torch'": ([sys.executable, "-c", "import torch"], None),
        "base info": ([*cli, "base", "info", "--json"], None),
        "pack": ([*cli, "pack", str(adapter), "-o", str(packed), "--json"], fresh_out),
        "verify": ([*cli, "verify", str(bundle), "--json"], None),
        "verify --base": ([*cli, "verify", str(bundle), "--base", "embedded", "--json"], None),
        "verify --no-vllm": ([*cli, "verify", str(bundle), "--no-vllm", "--json"], None),
    }
    for cmd, before in variants.values():  # warm the page cache and .pyc files; not counted
        timed(cmd, before)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (cmd, before) in variants.items():
            samples[name].append(timed(cmd, before))
    floor = statistics.median(samples["python -c pass"])
    torch_import = statistics.median(samples["python -c 'import torch'"])
    out = {}
    for name, xs in samples.items():
        med = statistics.median(xs)
        out[name] = {
            "median_s": round(med, 3),
            "min_s": round(min(xs), 3),
            "max_s": round(max(xs), 3),
            "x_python_pass": round(med / floor, 2),
            "x_import_torch": round(med / torch_import, 3),
            "target_s": TARGETS.get(name),
            "meets_target": med <= TARGETS[name] if name in TARGETS else None,
        }
    out["_adapter_bytes"] = (adapter / "adapter_model.safetensors").stat().st_size  # type: ignore[assignment]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_READY = re.compile(r"ready in ([\d.]+) s \((.*)\)")


def serve_phases(work: Path, timeout: float = 900.0) -> dict:
    """Start `adapterhub serve` (embedded base, empty registry), read the phases it prints, stop it."""
    port = _free_port()
    cmd = [*adapterhub(), "serve", "--port", str(port), "--registry", str(work / "registry"),
           "--tenants-db", str(work / "tenants.db"), "--cache-dir", str(work / "cache"),
           "--log", str(work / "vllm.log")]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    result: dict = {"command": "adapterhub serve (embedded base)"}
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        for line in proc.stdout:
            m = _READY.search(line)
            if m:
                result["until_ready_line_s"] = round(time.perf_counter() - t0, 2)
                result["launcher_total_s"] = float(m.group(1))
                result["phases_s"] = {
                    k.strip(): float(v)
                    for k, v in (p.rsplit(" ", 2)[:2] for p in m.group(2).split(", ") if p.endswith(" s"))
                }
                break
            if time.monotonic() > deadline:
                result["error"] = "not ready in time"
                break
        else:
            result["error"] = f"serve exited with code {proc.wait()} before it was ready"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # what Ctrl-C does: the launcher stops vLLM in order
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-serve", action="store_true", help="skip the `serve` readiness run")
    parser.add_argument("--out", type=Path, default=RESULTS / "cli_latency.json")
    args = parser.parse_args()

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cli-latency-") as tmp:
        work = Path(tmp)
        os.environ["ADAPTERHUB_CONFIG_DIR"] = str(work / "config")  # no user state touched
        results = latencies(work, args.repeats)
        load_after = os.getloadavg()
        serve = None
        if not args.no_serve:
            try:
                serve = serve_phases(work)
            except Exception as exc:  # noqa: BLE001 - the latencies above are still worth writing
                serve = {"error": f"{type(exc).__name__}: {exc}"}

    report = {
        "benchmark": "cli_latency_bench",
        "note": "measured on a machine that may be shared with other jobs: compare each command with the "
        "baselines of this run (x_python_pass, x_import_torch), not seconds across runs",
        "repeats": args.repeats,
        "adapter_bytes": results.pop("_adapter_bytes"),
        "commands": results,
        "serve": serve,
        "load_average": {"before": [round(x, 2) for x in load_before],
                         "after": [round(x, 2) for x in load_after]},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": sys.version.split()[0]},
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from provenance import provenance  # benchmarks/ is sys.path[0] for a script run as a file

    args.out.write_text(json.dumps({**report, "provenance": provenance()}, indent=2) + "\n")
    width = max(len(k) for k in results)
    print(f"{'command':<{width}}  median    min    max  x pass  x torch  target")
    for name, r in results.items():
        target = f"<= {r['target_s']:g} s {'ok' if r['meets_target'] else 'MISSED'}" if r["target_s"] else ""
        print(f"{name:<{width}}  {r['median_s']:6.2f} {r['min_s']:6.2f} {r['max_s']:6.2f}  "
              f"{r['x_python_pass']:6.1f}  {r['x_import_torch']:7.3f}  {target}")  # fmt: skip
    if serve:
        print("serve:", json.dumps(serve))
    print(f"load average before {load_before}, after {load_after} (shared machine); wrote {args.out}")


if __name__ == "__main__":
    main()
