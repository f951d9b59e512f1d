"""Where a DP step's time goes: a per-op breakdown of one DP and one non-private step.

Not a test (nothing is asserted). Profile before optimizing (issue 20): for the reference and
Opacus hooks modes, torch.profiler's ops by self CPU time per step, DP beside non-private; for
jax, its DP step's pieces jitted and timed one by one (benchmarks/_profile_worker.py says why).
Each backend runs in its own venv, one worker process each, at 1 thread by default (the robust
figure). Writes benchmarks/results/profile-cpu.json and the "## Where a DP step's time goes"
section of docs/benchmarks.md, labelled with the load and /proc/stat contention of the run:
shares of a step move less under contention than absolute times, but they do move (a shared
core slows memory-bound ops more than compute-bound ones).

    .venv/bin/python benchmarks/profile_step.py [--threads 1] [--targets reference,opacus,jax]
        [--no-write]

(Not named profile.py: a script's folder comes first on its sys.path, and the standard
library's cProfile, which torch imports, imports `profile`.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _contention  # benchmarks/, this script's folder
import steps

WORKER = Path(__file__).resolve().parent / "_profile_worker.py"
OUT = steps.RESULTS / "profile-cpu.json"
SECTION = "Where a DP step's time goes"
# name -> (backend, adapter options): the two slowest torch modes and jax's, as issue 20 found
# them (reference's and jax's vmap were their defaults before Book-Keeping).
TARGETS: dict[str, tuple[str, dict]] = {
    "reference": ("reference", {"mode": "vmap"}),
    "opacus": ("opacus", {"grad_sample_mode": "hooks"}),
    "jax": ("jax", {"mode": "vmap"}),
}
TOP = 12  # ops shown per mode

# What each candidate change removes, by the adapter's mode label: the mechanism, tied to the
# ops (or pieces) of the table above it. Printed under each mode's table.
CHANGES: dict[str, list[str]] = {
    "reference-torch.func": [
        "Per-example gradient materialization -> Book-Keeping / ghost norm (issue 20, item 2): "
        "vmap(grad) runs the weight gradient of every conv once per example (the DP-only share "
        "of `aten::convolution_backward`, with the `aten::copy_`/`aten::add` around it) and "
        "writes B x all parameters; ghost norms take each layer's per-example norm from its "
        "activations and output gradients (Gram matrices, T^2 per example, where T^2 < p; a "
        "per-sample gradient elsewhere) and keep one batch backward.",
        "Norms over the materialized gradients -> gone with them: `aten::pow` + `aten::sum` "
        "(g.pow(2).sum over B x all parameters) become per-layer Gram reductions.",
        "The clipped sum (`aten::tensordot`, here `aten::mm`) -> one clip-weighted matmul per "
        "layer of stored activations and output gradients (no second backward).",
    ],
    "opacus-hooks": [
        "Per-sample gradients built by the hooks (`aten::bmm` from Opacus' einsum samplers, "
        "dpscale's grouped convolutions inside `aten::convolution_backward`/"
        "`aten::mkldnn_convolution`'s DP-only share, `aten::copy_` of the unfolded "
        "activations) -> Book-Keeping (grad_sample_mode=bk): ghost norms where T^2 < p, then "
        "the clipped sum as one weighted matmul per layer.",
        "The batch weight gradient that the ordinary backward computes and DP discards (the "
        "weight-gradient part of the non-private-sized `aten::convolution_backward`) -> "
        "Book-Keeping's weighted sum replaces it (the input gradients stay).",
        "Per-parameter clip-and-sum loops (`aten::linalg_vector_norm`, `aten::mul`, "
        "`aten::sum`) -> one clip factor vector and one weighted matmul per layer; the hooks' "
        "Python in `BackwardHookFunctionBackward` stays in mode bk (Opacus' hooks still hand "
        "over each layer).",
        "Noise (`aten::normal_`, DP only) and the optimizer step (both kinds) stay whatever the "
        "clipping: they bound the ratio from below.",
    ],
    "jax-vmap": [
        "Per-example gradients (vmap(grad), materialized) -> Book-Keeping / ghost norm: norms "
        "from each layer's activations and output gradients, the clipped sum as one weighted "
        "contraction per layer; what stays is about the non-private gradient piece plus the "
        "norm Grams.",
        "Norms + clip-weighted sum from materialized gradients: small beside them here; they go "
        "with the materialization.",
        "The update (noise + momentum SGD) is the floor no clipping change removes.",
    ],
}


def run_worker(python: Path, backend: str, options: dict, args, tmp: Path) -> dict:
    out = tmp / f"{backend}.json"
    cmd = [
        str(python), str(WORKER), "--backend", backend, "--options", json.dumps(options),
        "--width", str(args.width), "--image-size", str(args.image_size),
        "--batch-size", str(args.batch_size), "--threads", str(args.threads),
        "--out", str(out),
    ]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("[worker]"):
            print("   ", line, flush=True)
    if proc.returncode or not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"backend": backend, "options": options, "error": tail[-1]}
    return {**json.loads(out.read_text()), "worker_wall_s": time.perf_counter() - started}


def op_table(r: dict) -> list[str]:
    """DP ops by self CPU time per step, with the same op's time in the non-private step."""
    dp, np_ = r["ops"]["dp"], r["ops"]["nonprivate"]
    np_ms = {e["op"]: e["self_ms"] for e in np_["ops"]}
    step = dp["profiled_step_ms"]
    lines = [
        "| op (DP step, by self CPU time) | DP ms / step | % of DP step | non-private ms | "
        "DP - non-private ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for e in dp["ops"][:TOP]:
        other = np_ms.get(e["op"], 0.0)
        lines.append(
            f"| `{e['op']}` | {e['self_ms']:.1f} | {e['self_ms'] / step:.1%} | {other:.1f} | "
            f"{e['self_ms'] - other:+.1f} |"
        )
    outside = step - dp["ops_self_ms"]
    lines.append(
        f"| (outside ops: Python, dispatch) | {outside:.1f} | {outside / step:.1%} | "
        f"{np_['profiled_step_ms'] - np_['ops_self_ms']:.1f} | |"
    )
    return lines


def piece_table(r: dict) -> list[str]:
    p = dict(r["pieces_ms"])
    step = p.pop("DP step (the adapter's, with host copies)")
    lines = ["| piece (jitted alone) | ms | % of DP step |", "|---|---:|---:|"]
    lines += [f"| {name} | {ms:.1f} | {ms / step:.1%} |" for name, ms in p.items()]
    lines.append(f"| DP step (the adapter's, with host copies) | {step:.1f} | 100% |")
    return lines


def section(results: list[dict], meta: dict) -> str:
    c = meta["contention"]
    lines = [
        f"`benchmarks/profile_step.py`, {meta['date']}: width {meta['width']}, "
        f"{meta['image_size']} px, batch {meta['batch_size']}, {meta['threads']} thread(s); "
        "torch: torch.profiler (CPU) over 3 steps of each kind after 3 warm-up steps, ops by "
        "self CPU time per step as a share of the profiled step's wall time; jax: the DP step's "
        "pieces jitted and timed alone, round robin (median of 6), as XLA fuses a step into one "
        "program (the pieces overlap: the fused chunk is per-example gradients + clipping). "
        f"Raw data: `{OUT.relative_to(steps.ROOT)}`.",
        "",
        f"Load: 1-minute load average {meta['loadavg_start']:.1f} at the start, "
        f"{meta['loadavg_end']:.1f} at the end; other processes took up to "
        f"{c['max_others']:.0%} of the CPUs' time during a worker (/proc/stat), steal "
        f"{c['max_steal']:.1%}"
        + (
            ": **contended**. Shares of a step move less than absolute times under contention, "
            "but they move (a shared core slows memory-bound ops such as copies and "
            "element-wise ops more than compute-bound convolutions): rerun on an idle machine "
            "before acting on small differences."
            if c["reasons"]
            else ": the machine was ours."
        ),
    ]
    for r in results:
        lines += ["", f"### {r['backend']}: {r.get('mode', '?')}", ""]
        if "error" in r:
            lines.append(f"Failed: {r['error']}")
            continue
        st = r["step_ms"]
        lines.append(
            f"Unprofiled step: non-private {st['nonprivate']:.0f} ms, DP {st['dp']:.0f} ms "
            f"({st['dp'] / st['nonprivate']:.2f}x)"
            + (
                f"; profiled: non-private {r['ops']['nonprivate']['profiled_step_ms']:.0f} ms, "
                f"DP {r['ops']['dp']['profiled_step_ms']:.0f} ms."
                if "ops" in r
                else "."
            )
        )
        lines += ["", *(op_table(r) if "ops" in r else piece_table(r))]
        if r["mode"] in CHANGES:
            lines += ["", "Candidate changes and what they remove:"]
            lines += [f"- {text}" for text in CHANGES[r["mode"]]]
    return "\n".join(lines)


def write_section(text: str) -> None:
    """Replace (or add before '## GPU') this section of docs/benchmarks.md."""
    doc = steps.DOC.read_text()
    body = f"## {SECTION}\n\n{text.rstrip()}\n\n"
    head = f"## {SECTION}\n"
    if head in doc:
        start = doc.index(head)
        end = doc.find("\n## ", start + len(head))
        doc = doc[:start] + body + (doc[end + 1 :] if end >= 0 else "")
    elif "\n## GPU\n" in doc:
        doc = doc.replace("\n## GPU\n", "\n" + body + "## GPU\n", 1)
    else:
        doc = doc.rstrip() + "\n\n" + body
    steps.DOC.write_text(doc.rstrip() + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--targets", default=",".join(TARGETS), help="some of " + ",".join(TARGETS))
    parser.add_argument("--timeout", type=float, default=900, help="seconds per worker")
    parser.add_argument("--no-write", action="store_true", help="leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"--targets {','.join(unknown)}; expected some of {','.join(TARGETS)}")
    chosen = dict(steps.select_backends(",".join(TARGETS[n][0] for n in names), {}))
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": steps.cpu_name(),
        "width": args.width,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "loadavg_start": os.getloadavg()[0],
    }
    results = []
    with tempfile.TemporaryDirectory(prefix="dpscale-profile-") as tmp:
        for name in names:
            backend, options = TARGETS[name]
            if backend not in chosen:
                continue
            print(f"{backend} {steps.options_label(options)}:", flush=True)
            before = _contention.sample(children=True)
            r = run_worker(chosen[backend], backend, options, args, Path(tmp))
            r["worker_contention"] = _contention.window(before, _contention.sample(children=True))
            results.append(r)
    meta["loadavg_end"] = os.getloadavg()[0]
    windows = [r.get(k) for r in results if "error" not in r for k in ("contention",)]
    seen = [w for w in windows if w]
    meta["contention"] = {
        "max_others": max((w["others"] for w in seen), default=0.0),
        "max_steal": max((w["steal"] for w in seen), default=0.0),
        "reasons": _contention.verdict(meta["loadavg_start"], windows),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    text = section(results, meta)
    print("\n" + text + f"\n\nresults in {OUT}")
    if not args.no_write:
        write_section(text)
        print(f"section written to {steps.DOC}")
    sys.exit(1 if any("error" in r for r in results) else 0)


if __name__ == "__main__":
    main()
