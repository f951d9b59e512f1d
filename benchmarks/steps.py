"""DP-SGD step benchmark: every backend and DP mode side by side, DP vs non-private step.

Not a test (nothing is asserted). For each backend with an adapter (dpscale.backends.available())
and a built venv (dpscale.envs; build one with `.venv/bin/python -m dpscale.envs NAME`), and each
DP mode it offers (adapter options, MODES below), runs benchmarks/_step_worker.py inside that
backend's venv, which measures in one process the steady-state step time of a DP and of a
non-private step (interleaved, so both see the same load), compile / first-step time, peak RSS,
recompiles under a real Poisson plan and the runner's feed time.

Every row is measured --reps times (default 3) at each --threads count (default 1, the robust
figure, and all usable cores), by separate workers in an interleaved order (benchmarks/_reps.py);
a row's ratio is the median over its repetitions, with their range. /proc/stat windows around
each worker and its timed steps (benchmarks/_contention.py) say how much of the CPUs' time other
processes and the hypervisor took: a run above the limits is contended, its JSON is kept as
benchmarks/results/contended-steps-*.json and docs/benchmarks.md is left alone (the reasons are
printed). A clean run writes benchmarks/results/steps-<device>.json and the "## DP-SGD steps"
section of docs/benchmarks.md.

    .venv/bin/python benchmarks/steps.py [--reps 3] [--threads 1 2] [--steps 6]
        [--backends opacus,jax] [--python jax=/path/to/python] [--no-write] [--quick]
        [--modes '{"opacus": [{"grad_sample_mode": "ghost"}]}'] [--baseline DIR]
    .venv/bin/python benchmarks/steps.py --render benchmarks/results/steps-cpu.json  # doc only
    .venv/bin/python benchmarks/steps.py --devices 8 --backends reference,jax  # scaling only

--devices N (N > 1) measures data-parallel scaling instead (training.devices; docs/cluster.md):
each row on 1 and on N devices, a logical batch of one --batch-size chunk per device, and
prints the DP step's throughput and the scaling efficiency (throughput on N / (N x on 1)) into
benchmarks/results/scaling-<device>.json; docs/benchmarks.md is left alone.

--baseline DIR (another checkout, e.g. `git worktree add /tmp/old <rev>`) measures every row
with DIR/src first on the workers' path and with this tree's, back to back in each repetition
(which goes first alternates), and adds a before/after table (same run, same load) to the
section. --quick is a check of the ratios, not the doc's figure (see QUICK).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _contention  # benchmarks/, this script's folder
import _reps

from dpscale import backends, envs

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "benchmarks" / "results"
WORKER = Path(__file__).resolve().parent / "_step_worker.py"
SECTION = "DP-SGD steps"
GOAL = 2.0  # issue 9: every backend's DP step <= 2x its non-private step on CPU, width 16, B 64
FEED_GOAL = 0.05  # the runner's feed under 5% of the step time
BASELINE, CURRENT = "baseline", "current"  # --baseline: which code a row measured
# --quick: one thread, two repetitions of fewer steps, no Poisson phase (a check of the ratios).
QUICK = ("--threads", "1", "--reps", "2", "--steps", "6", "--poisson-steps", "0")

# The DP modes each backend offers, as adapter options (see each adapter's module docstring).
MODES: dict[str, list[dict]] = {
    # reference and jax default to mode bk: Book-Keeping (ghost norms / per-example gradients
    # per layer, one backward pass); mode vmap (per-example gradients) is their before.
    "reference": [{}, {"mode": "vmap"}],
    # fast_samplers=false: stock Opacus beside dpscale's samplers (_opacus_fast), same run;
    # bk: Book-Keeping in Opacus' fast-gradient-clipping hooks (_opacus_bk).
    "opacus": [{"grad_sample_mode": m} for m in ("hooks", "functorch", "ghost", "bk")]
    + [{"grad_sample_mode": "hooks", "fast_samplers": False}],
    # xla=false (about 10x slower per the adapter) is left out of the default run.
    # mode bk: TF Privacy's norm pass, the clipped sum from its layer inputs and output gradients.
    "tfprivacy": [{}, {"mode": "ghost"}, {"mode": "vmap"}],
    # conv: XLA's convolution vs conv_patches in the DP step (jax: patches by default on CPU;
    # objax: XLA's by default, as patches did not pay under its jax 0.5.3).
    "objax": [{}, {"use_norm_accumulation": True}, {"conv": "auto"}],
    "jax": [{}, {"mode": "vmap"}, {"mode": "vmap", "conv": "xla"}],
    "jaxprivacy": [{}],
}

# Why a mode's DP step costs what it does, by the adapter's `mode` label: printed under the table
# for modes above the goal. Mechanisms, not numbers; a label missing here gets no note.
WHY: dict[str, str] = {
    "reference-torch.func": (
        "vmap(grad) over the whole functional model materializes every example's full gradient "
        "(B x all parameters) through batch-of-one convolutions, then norms and a tensordot; it is "
        "the conformance oracle, kept simple on purpose; mode bk (Book-Keeping, the default) "
        "cuts it."
    ),
    "opacus-hooks": (
        "the ordinary backward still computes every layer's batch weight gradient, which DP "
        "discards, then the hooks build each layer's per-sample gradient (dpscale's grouped-"
        "convolution sampler on large maps, Opacus' unfold + einsum on small ones) and clip and "
        "sum them in per-parameter loops; grad_sample_mode=bk (Book-Keeping: ghost norms where "
        "T^2 is small, the clipped sum as one weighted matmul per layer, no batch weight "
        "gradient) cuts it."
    ),
    "opacus-hooks-stock": (
        "as opacus-hooks, with Opacus' unfold + einsum sampler on every conv (its im2col copy "
        "dominates on 32x32 maps) and a zero-filled copy of every per-sample gradient into a "
        "buffer of the module's max batch length; fast_samplers (the default) removes both."
    ),
    "opacus-functorch": (
        "as hooks, but each layer's per-sample gradient comes from functorch vmap(grad) of the "
        "layer, slower than the hand-written conv einsum on CPU; use hooks (or ghost norms)."
    ),
    "opacus-ghost": (
        "Opacus 1.6 registers ghost norm samplers only for Linear and Embedding, so every Conv2d "
        "and GroupNorm still materializes per-sample gradients to get their norms (the hooks "
        "cost), and ghost clipping then adds a second backward pass with the clip-weighted loss; "
        "grad_sample_mode=bk registers Book-Keeping norm samplers for every layer in the same "
        "machinery and forms the clipped sum from the hooks' activations and backprops, which "
        "removes both."
    ),
    "opacus-bk": (
        "one forward and one backward to the layers' outputs (no batch weight gradient), then per "
        "layer the Book-Keeping norm and clip-weighted sum (per-example gradients of the early "
        "convs by a grouped convolution backward, ghost-norm Gram matrices in the later ones); "
        "above reference-bk by Opacus' full backward hooks (a Python call per layer and "
        "backward) and its optimizer's accumulate / noise / scale passes."
    ),
    "dpmodel-vmap-xla": (
        "tf.vectorized_map over one-example tapes materializes every example's gradient and the "
        "per-example Conv2DBackpropFilter has no batched kernel (pfor falls back to a while loop "
        "over examples); the same backend's mode=bk (the default) and mode=ghost (TF Privacy's "
        "fast clipping) avoid both and are faster; vmap stays as the straightforward DPModel "
        "path."
    ),
    "dpmodel-vmap": "as dpmodel-vmap-xla without XLA: every vectorized op runs unfused.",
    "fast-clipping-ghost-xla": (
        "TF Privacy's fast clipping runs two passes: a forward/backward whose registry "
        "functions compute per-example norms (for the early convs by forming each example's "
        "kernel gradient from im2col patches, 9x the activations for 3x3 convs), then a second "
        "backward of the clip-weighted loss; forming the clipped sum from the first pass' "
        "patches and output gradients (Book-Keeping: sum_i c_i A_i^T G_i, one einsum per layer) "
        "drops the second backward: the same backend's mode=bk."
    ),
    "objax-pgv": (
        "PrivateGradValues with microbatch=1 vmaps the gradient over examples: XLA turns the "
        "per-example conv filter gradients into batch-grouped convolutions and materializes B "
        "gradients (conv=auto's batched-matmul form was no faster under objax's jax 0.5.3); "
        "ghost norms / Book-Keeping would cut it, but Objax 1.8 has no such mechanism (its only "
        "clipping is PrivateGradValues' vmap)."
    ),
    "objax-pgv-patches": (
        "PrivateGradValues vmaps the gradient over examples and materializes B gradients plus, "
        "with conv_patches, each conv's shifted slices (kh*kw x its input) before clipping; "
        "ghost norms (norms from activations and output gradients, then one weighted backward) "
        "would cut it."
    ),
    "objax-pgv-normacc": (
        "norm accumulation still takes per-example norms through vmapped gradients, then a "
        "second, weighted backward: two passes, less memory, no less compute on CPU."
    ),
    "jaxprivacy-clipped-grad": (
        "jax_privacy.clipped_grad vmaps the loss' gradient over examples (with a batch axis of "
        "one each), materializes B gradients, then clips (nan-safe) and sums them; JAX Privacy "
        "2.0 has no ghost-norm or Book-Keeping mechanism, and replacing its clipped_grad would "
        "leave nothing of it to measure (mode bk of the jax backend is that path)."
    ),
    "jax-vmap": (
        "vmap(grad) per example under jit materializes B gradients plus, with conv_patches, each "
        "conv's shifted slices (kh*kw x its input) before clipping; mode bk (Book-Keeping, the "
        "default: norms and the clipped sum from activations and output gradients) cuts it."
    ),
    "jax-vmap-xlaconv": (
        "vmap(grad) per example under jit: the per-example conv filter gradients become "
        "batch-grouped convolutions that XLA's CPU backend runs far slower than one batched conv, "
        "and all B gradients are materialized before clipping; mode bk (Book-Keeping, the default) "
        "cuts it."
    ),
}


def load_note(meta: dict, loads: list[float], threads: int) -> str:
    """What the load says about the absolute times. The workers' own threads count in the load
    average they see, so only the run's starting load and what exceeds `threads` is others'."""
    others = max([meta["loadavg_start"][0], *(x - threads for x in loads)])
    if others > 0.5:
        return ": other processes shared these cores, so absolute times are inflated and noisy"
    return ": no other load to speak of, but absolute times still vary from run to run"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def parse_pythons(items: list[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--python {item!r}: expected NAME=PATH (e.g. jax=/usr/bin/python3)")
        out[name] = Path(path)
    return out


def parse_modes(text: str | None) -> dict[str, list[dict]]:
    if not text:
        return MODES
    try:
        modes = json.loads(text)
    except json.JSONDecodeError as err:
        raise SystemExit(
            f"--modes is not JSON ({err}); expected {{backend: [options, ...]}}"
        ) from None
    ok = isinstance(modes, dict) and all(
        isinstance(v, list) and all(isinstance(o, dict) for o in v) for v in modes.values()
    )
    if not ok:
        raise SystemExit(f"--modes {text!r}: expected a JSON object {{backend: [options, ...]}}")
    return {**MODES, **modes}


def select_backends(requested: str | None, pythons: dict[str, Path]) -> list[tuple[str, Path]]:
    """(name, interpreter) for each backend with an adapter and a venv; skipped ones explained."""
    have = set(backends.available()) & set(envs.names())
    names = sorted(have)
    if requested:
        names = [n.strip() for n in requested.split(",") if n.strip()]
        unknown = [n for n in names if n not in have]
        if unknown:
            raise SystemExit(
                f"--backends {','.join(unknown)}: no adapter or requirements file; expected "
                f"some of {', '.join(sorted(have))}"
            )
    out = []
    for name in names:
        if name in pythons:
            out.append((name, pythons[name]))
        elif (envs.env_prefix(name) / envs.READY).exists():
            out.append((name, envs.python(name)))
        else:
            print(
                f"skipping {name}: its venv is not built "
                f"(run .venv/bin/python -m dpscale.envs {name})",
                flush=True,
            )
    return out


def has_backend(src: Path, name: str) -> bool:
    return (src / "dpscale" / "backends" / f"{name}.py").exists()


def run_worker(
    python: Path,
    backend: str,
    options: dict,
    batch: int,
    args,
    tmp: Path,
    src: Path | None = None,
    threads: int = 1,
    poisson_steps: int = 0,
    devices: int = 1,
) -> dict:
    """One worker process; its "[worker]" lines are echoed, the rest kept for errors.

    src: a dpscale source tree to import instead of this one (the venvs' .pth names this one;
    PYTHONPATH comes before it). The result's "contention" is the /proc/stat window around the
    whole worker (its process tree is "own") and "steady_contention" the worker's own window
    around its timed steps.
    """
    out = tmp / f"{backend}-{len(list(tmp.iterdir()))}.json"
    cmd = [
        str(python), str(WORKER), "--backend", backend, "--options", json.dumps(options),
        "--width", str(args.width), "--image-size", str(args.image_size),
        "--groups", str(args.groups), "--num-classes", str(args.num_classes),
        "--batch-size", str(batch), *(["--physical", str(args.physical)] if args.physical else []),
        "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--poisson-steps", str(poisson_steps), "--n-train", str(args.n_train),
        "--threads", str(threads), "--seed", str(args.seed), "--out", str(out),
        "--devices", str(devices),
    ]  # fmt: skip
    tail: collections.deque[str] = collections.deque(maxlen=30)
    started = time.perf_counter()
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
    before = _contention.sample(children=True)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tempfile.gettempdir(),
        env=env,
    )
    try:
        for line in proc.stdout:
            tail.append(line.rstrip())
            if line.startswith("[worker]"):
                print("   ", line.rstrip(), flush=True)
        proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    wall = time.perf_counter() - started
    window = _contention.window(before, _contention.sample(children=True))
    if proc.returncode == 0 and out.exists():
        return {**json.loads(out.read_text()), "worker_wall_s": wall, "contention": window}
    errors = [t for t in tail if re.match(r"^\w*(Error|Exception)\b", t)] or list(tail)[-1:]
    return {
        "backend": backend,
        "options": options,
        "batch_size": batch,
        "error": errors[-1] if errors else f"worker exited with {proc.returncode}",
        "returncode": proc.returncode,
        "log_tail": list(tail),
        "worker_wall_s": wall,
        "threads": threads,
        "contention": window,
    }


def is_cpu(device: str) -> bool:
    return device.lower().split(":")[0] == "cpu"


def device_tag(runs: list[dict]) -> str:
    """'cpu' unless an adapter reported an accelerator; then its name as a file-name slug."""
    for r in runs:
        dev = str(r.get("device", "cpu"))
        if not is_cpu(dev):
            return re.sub(r"[^a-z0-9]+", "-", dev.lower()).strip("-")
    return "cpu"


def options_label(options: dict) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in options.items()) or "defaults"


def ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f}"


def table(runs: list[dict]) -> list[str]:
    lines = [
        "| backend | mode (options) | non-private ms | DP ms | DP / non-private (min-max) | "
        "first step s (NP / DP) | peak RSS MB (NP / DP) | Poisson step ms (NP / DP), P | "
        "chunk shapes / batch sizes | compiles in 1st Poisson step / after | "
        "feed ms (plain / augment) | feed / step (NP / DP) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        label = f"{r.get('mode', '?')} ({options_label(r['options'])})"
        if "error" in r:
            lines.append(
                f"| {r['backend']} | {label} | failed: {r['error'][:160]} |"
                + " |" * 9
            )  # fmt: skip
            continue
        st, w = r["steady"], r["warm"]
        lines.append(
            f"| {r['backend']} | {label} | {ms(st['nonprivate']['median_s'])} | "
            f"{ms(st['dp']['median_s'])} | {_reps.ratio_cell(r)} | "
            f"{w['nonprivate']['first_step_s']:.1f} / {w['dp']['first_step_s']:.1f} | "
            f"{w['nonprivate']['peak_rss_mb']:.0f} / {w['dp']['peak_rss_mb']:.0f} | "
            f"{poisson_cells(r.get('poisson'))} |"
        )
    return lines


def poisson_cells(p: dict | None) -> str:
    """The Poisson phase's five cells ("-" where no repetition measured it)."""
    if not p:
        return " | ".join("-" * 5)
    pn, pd = p["nonprivate"], p["dp"]
    counter = pd["compile_counter"]
    compiles = (
        "n/a (eager)"
        if pd["compiles_first_step"] is None
        else f"{pd['compiles_first_step']} / {pd['recompiles']} ({counter}, DP); "
        f"{pn['compiles_first_step']} / {pn['recompiles']} (NP)"
    )
    feed = pd["feed_median_s"]
    share = " / ".join(
        "-" if not (feed and s) else f"{feed / s:.1%}"
        for s in (pn["step_median_s"], pd["step_median_s"])
    )
    shapes = "; ".join("x".join(map(str, s)) for s in pd["distinct_shapes"])
    return (
        f"{ms(pn['step_median_s'])} / {ms(pd['step_median_s'])}, {pd['physical_batch_size']} | "
        f"{shapes} / {pd['distinct_batch_sizes']} | {compiles} | "
        f"{feed * 1e3:.1f} / {pd['feed_augment_median_s'] * 1e3:.1f} | {share}"
    )


INTRO = (
    "`benchmarks/steps.py`: for every backend and DP mode, one worker process in the backend's "
    "own venv builds the adapter through the Adapter interface on random data and measures, side "
    "by side in that process: the steady-state time of a DP step (clip C=1, sigma=1, divisor B) "
    "and of a non-private step (median over steps interleaved NP, DP, DP, NP, ..., after the "
    "warm-up; one logical batch of B real rows padded to the physical batch P the runner uses, "
    "by default B + 4 sqrt(B) rounded up to 8: jit backends compute the padding rows, eager torch "
    "slices them away); the first step (compilation / warm-up) on its own; peak RSS of each phase "
    "(getrusage, its high-water mark reset between phases; device memory where the adapter "
    "reports it); then a real Poisson plan (dpscale.runner.plan, q = B / n) fed through "
    "dpscale.runner.feed from a memory-mapped uint8 array as the runner does: distinct chunk "
    "shapes and batch sizes, compiles during its first step and after it (jax: backend-compile "
    "events, tf: tf.function traces, torch: eager, n/a; the shape P is already compiled, so both "
    "should be 0), and the feed's time per step. Step times include the adapter's host-to-"
    "framework copies. Nothing is asserted.\n\n"
    "Repetitions and contention: each row is measured R times (default 3) at 1 thread (the "
    "robust figure) and at all usable cores, by separate workers, repetition by repetition with "
    "the rows in an order rotated by one each time; the table's ratio is the median over the "
    "repetitions with their range (min-max), the step times the median of their medians, and "
    "the Poisson columns come from the first repetition at the first thread count (the only "
    "worker of a row that runs the plan: it does not enter the ratio). "
    "/proc/stat is sampled around every worker and around its timed steps: the share of the "
    "usable CPUs' time that other processes took (busy time less the worker's own CPU time and "
    "steal) and steal itself. A shared core slows the non-private step more than the DP step "
    "(issue 20), so a run whose 1-minute load average exceeds 0.5 before its first worker, or "
    "in which other processes took over 5% or steal over 2% of the CPUs' time in any window, "
    "is contended: its JSON is kept (`benchmarks/results/contended-steps-*.json`) and this "
    "section is not rewritten from it. Each table is one run on one machine "
    "(`benchmarks/results/steps-<device>.json`); a run on another device adds its own table. "
    "Tables from runs before repetitions (one repetition, one thread count) say their load "
    "in their header.\n\n"
    "Cost: a worker's fixed part (interpreter, framework import, adapter build, both compiles) "
    "dominates: measured 2026-12-03 as the workers' own CPU time (/proc/stat, under load 15; "
    "`benchmarks/results/contended-steps-cpu-20261203-*-cost-*.json`, 1 thread, 4 steps), "
    "it is ~7 CPU-minutes per pass over the 13 CPU rows (5-16 s for torch and jax, 50-75 s "
    "for TF Privacy, Objax and JAX Privacy) plus ~31 s per steady step pair (DP + non-"
    "private) over all rows. The default run (3 repetitions x 2 thread counts = 6 passes, 6 "
    "steady steps each, the Poisson phase once) adds up to ~67 CPU-minutes there; CPU time "
    "under that load runs ~1.5-2x an idle machine's wall time, so expect ~35-45 minutes on an "
    "idle 2-core machine (`--threads 1`: about half). `--quick` (1 thread, 2 repetitions of 6 "
    "steps, no Poisson phase; never writes this section, its JSON is "
    "`benchmarks/results/quick-steps-*.json`) is ~10-12 minutes; "
    "`--backends`/`--modes` narrow any run."
)


def thread_counts(meta: dict) -> list[int]:
    """The run's thread counts (a results JSON from before repetitions holds one int)."""
    t = meta["args"]["threads"]
    return list(t) if isinstance(t, list) else [t]


def setup_line(meta: dict, runs: list[dict], shown) -> str:
    """The run's settings, repetitions and load in one paragraph."""
    a = meta["args"]
    ok = [r for r in runs if "error" not in r]
    loads = [r["loadavg_start"][0] for r in ok] + [r["loadavg_end"][0] for r in ok]
    reps = a.get("reps", 1)
    threads = " and ".join(map(str, thread_counts(meta)))
    text = (
        f"{meta['date']}; host CPU {meta['cpu']}, {meta['usable_cores']} usable cores, "
        f"{threads} thread(s) per backend; ResNet-18 (GroupNorm, at most {a['groups']} "
        f"groups) width {a['width']}, {a['image_size']} px, {a['num_classes']} classes; "
        f"{a['warmup']} warm-up step(s) (the first is the compile step), median of "
        f"{a['steps']} interleaved steady steps of each kind"
        + (
            f"; {reps} repetitions (worker processes, rows in rotating order; the ratio is the "
            "median over them, its range in brackets, step times the median of their medians)"
            if reps > 1
            else "; one repetition"
        )
        + f"; Poisson plan n = {a['n_train']}, {a['poisson_steps']} steps"
        + (" (first repetition only)" if reps > 1 else "")
        + (f" at {thread_counts(meta)[0]} thread(s)" if len(thread_counts(meta)) > 1 else "")
        + "; P = "
        + (str(a["physical"]) if a.get("physical") else "the runner's default")
        + "".join(
            f"; rows re-measured or added {x['date']} (load {x['loadavg_start'][0]:.1f})"
            for x in meta.get("appended", [])
        )
        + f". Raw data: `{shown}`. 1-minute load average "
        f"{meta['loadavg_start'][0]:.1f} at the start, {meta['loadavg_end'][0]:.1f} at the end"
        + (f" ({min(loads):.1f}-{max(loads):.1f} across workers)" if loads else "")
    )
    if "contention" not in meta:  # a run from before /proc/stat windows: the load says it all
        threads_max = max(thread_counts(meta))
        return (
            text
            + load_note(meta, loads, threads_max)
            + ("; the ratios come from interleaved steps in one process and are the robust figure.")
        )
    c = meta["contention"]
    return (
        text + f". Other processes took at most {c['max_others']:.1%} and steal "
        f"{c['max_steal']:.1%} of the CPUs' time in a worker's steady window (/proc/stat): "
        + (
            "contended (" + "; ".join(c["reasons"]) + "), so the ratios are not the idle figure."
            if c["reasons"]
            else "the machine was ours."
        )
    )


def run_lines(meta: dict, runs: list[dict], json_path: Path) -> list[str]:
    """One results file: its setup line, a table per batch size and thread count, goals, notes
    and versions."""
    a = meta["args"]
    shown = json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT) else json_path
    rows = _reps.aggregate(runs)
    ok = [r for r in rows if "error" not in r]
    devices = sorted({str(r["device"]) for r in ok}) or ["?"]
    accel = [d for d in devices if not is_cpu(d)]
    lines = [
        f"### {', '.join(accel) if accel else 'CPU: ' + meta['cpu']} "
        f"(width {a['width']}, {a['image_size']} px, "
        f"{' and '.join(map(str, thread_counts(meta)))} thread(s))",
        "",
        setup_line(meta, runs, shown),
    ]
    for batch in a["batch_sizes"]:
        for threads in thread_counts(meta):
            lines += batch_lines(rows, batch, threads, meta, accel)
    versions: dict[str, dict] = {}
    for r in ok:
        versions.setdefault(r["backend"], r["versions"])
    lines += ["", "Versions (adapter.versions()):"]
    for name, v in sorted(versions.items()):
        lines.append(f"- {name}: " + ", ".join(f"{k} {val}" for k, val in v.items()))
    return lines


def batch_lines(rows: list[dict], batch: int, threads: int, meta: dict, accel) -> list[str]:
    """The tables, before/after, goal and notes of one batch size at one thread count."""
    mine = [r for r in rows if r["batch_size"] == batch and r.get("threads", threads) == threads]
    current = [r for r in mine if r.get("code") != BASELINE]
    if not current:
        return []
    lines = []
    # One table per device: a backend that fell back to the CPU never sits under a GPU's.
    by_device: dict[str, list[dict]] = {}
    for r in current:
        by_device.setdefault(str(r.get("device", "not measured")), []).append(r)
    for dev, dev_rows in sorted(by_device.items(), key=lambda kv: is_cpu(kv[0])):
        fallback = accel and is_cpu(dev)
        lines += [
            "",
            f"Batch {batch}, {threads} thread(s), device {dev}"
            + (" (CPU fallback: not comparable with the rows above)" if fallback else "")
            + ":",
            "",
            *table(dev_rows),
        ]
    lines += before_after(mine, meta)
    good = [r for r in current if "error" not in r]
    above = [r for r in good if r["ratio"] > GOAL]
    lines += [
        "",
        f"Goal DP <= {GOAL:g}x non-private ({threads} thread(s)): "
        + (
            "met by every mode measured."
            if good and not above
            else "above it: "
            + ", ".join(f"{r['backend']} {r['mode']} {r['ratio']:.2f}x" for r in above)
            + "."
        ),
    ]
    lines += [f"- {r['mode']}: {WHY[r['mode']]}" for r in above if r["mode"] in WHY]
    shares = [
        r["poisson"]["dp"]["feed_median_s"] / r["poisson"]["nonprivate"]["step_median_s"]
        for r in good
        if r.get("poisson") and r["poisson"]["nonprivate"]["step_median_s"]
    ]
    if shares:
        lines += [
            "",
            f"Feed goal < {FEED_GOAL:.0%} of the step: the feed takes at most "
            f"{max(shares):.2%} of a non-private step (the stricter denominator): "
            f"{'met' if max(shares) < FEED_GOAL else 'missed'}.",
        ]
    return lines


def before_after(rows: list[dict], meta: dict) -> list[str]:
    """The --baseline table: each mode's step times with the baseline's code and this tree's."""
    pairs: dict[tuple, dict] = {}
    for r in rows:
        if "error" not in r and r.get("code"):
            pairs.setdefault((r["backend"], json.dumps(r["options"])), {})[r["code"]] = r
    pairs = {k: v for k, v in pairs.items() if len(v) == 2}
    if not pairs:
        return []
    lines = [
        "",
        f"Before / after (`--baseline {meta.get('baseline', '?')}`): each mode measured with the "
        "baseline's code and with this tree's, back to back in one run (which went first "
        "alternates from mode to mode and repetition to repetition); after / before < 1 is "
        "faster.",
        "",
        "| backend | mode (options) | NP ms before / after | DP ms before / after | "
        "DP after / before | ratio before / after (min-max) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for (backend, _), v in pairs.items():
        b, c = v[BASELINE], v[CURRENT]
        dp = [x["steady"]["dp"]["median_s"] for x in (b, c)]
        np_ = [x["steady"]["nonprivate"]["median_s"] for x in (b, c)]
        lines.append(
            f"| {backend} | {c['mode']} ({options_label(c['options'])}) | "
            f"{ms(np_[0])} / {ms(np_[1])} | {ms(dp[0])} / {ms(dp[1])} | "
            f"**{dp[1] / dp[0]:.2f}** | "
            f"{_reps.ratio_cell(b, bold=False)} / {_reps.ratio_cell(c, bold=False)} |"
        )
    return lines


def section(results: list[tuple[Path, dict, list[dict]]]) -> str:
    lines = [INTRO]
    for path, meta, runs in results:
        lines += ["", *run_lines(meta, runs, path)]
    return "\n".join(lines)


def saved_results(current: Path) -> list[tuple[Path, dict, list[dict]]]:
    """Every steps-*.json beside `current` (CPU and GPU tables side by side), `current` included."""
    files = {current.resolve()}
    if current.resolve().parent == RESULTS.resolve() and current.name.startswith("steps-"):
        files |= {f.resolve() for f in RESULTS.glob("steps-*.json")}
    out = []
    for f in sorted(files):
        try:
            saved = json.loads(f.read_text())
            out.append((f, saved["meta"], saved["runs"]))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise SystemExit(f"{f}: {err}; expected a steps.py results JSON") from None
    return out


def write_section(text: str) -> None:
    """Replace (or append) the '## DP-SGD steps' section of docs/benchmarks.md, leave the rest."""
    doc = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    body = f"## {SECTION}\n" + text.rstrip() + "\n"
    pattern = re.compile(rf"^## {re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(doc):
        doc = pattern.sub(lambda m: body + ("\n" if m.end() < len(doc) else ""), doc)
    else:
        doc = doc.rstrip() + "\n\n" + body
    DOC.write_text(doc)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--groups", type=int, default=32, help="GroupNorm groups (spec default)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument(
        "--batch-size", type=int, nargs="+", default=[64], help="one or more, e.g. 64 256"
    )
    parser.add_argument("--physical", type=int, help="padded chunk size (default: the runner's)")
    parser.add_argument(
        "--steps", type=int, default=6, help="steady-state steps of each kind, per repetition"
    )
    parser.add_argument("--warmup", type=int, default=2, help="steps before timing (1st timed)")
    parser.add_argument("--poisson-steps", type=int, default=8)
    parser.add_argument("--n-train", type=int, default=10_000, help="Poisson plan: q = B / n")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=sorted({1, usable_cores()}),
        help="thread counts, each a table (default: 1, the robust figure, and all usable cores)",
    )
    parser.add_argument(
        "--reps", type=int, default=3, help="repetitions of every row (worker processes)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a check, not the doc's figure: {' '.join(QUICK)}, never rewrites the doc",
    )
    parser.add_argument(
        "--allow-contended",
        action="store_true",
        help="rewrite the doc even from a contended run (its section then says so)",
    )
    parser.add_argument("--backends", help="comma-separated (default: every one with a venv)")
    parser.add_argument("--modes", help="JSON {backend: [options, ...]} replacing MODES entries")
    parser.add_argument(
        "--python", action="append", default=[], help="NAME=PATH: interpreter for a backend"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per worker")
    parser.add_argument("--out", type=Path, help="JSON (default results/steps-<device>.json)")
    parser.add_argument(
        "--append",
        type=Path,
        help="add these modes to (or re-measure them in) a saved results JSON of the same settings",
    )
    parser.add_argument("--no-write", action="store_true", help="leave docs/benchmarks.md alone")
    parser.add_argument("--devices", type=int, default=1, help="N > 1: data-parallel scaling")
    parser.add_argument(
        "--baseline", type=Path, help="another checkout: every row measured with its code too"
    )
    parser.add_argument(
        "--render",
        type=Path,
        help="no run: rewrite the doc section from this results JSON (and its neighbours)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args = parser.parse_args([*(argv if argv is not None else sys.argv[1:]), *QUICK])
        args.no_write = True
    if args.render:
        reasons = (json_meta(args.render).get("contention") or {}).get("reasons")
        if reasons and not (args.allow_contended or args.no_write):
            raise SystemExit(
                f"--render {args.render}: a contended run ({'; '.join(reasons)}); the doc is "
                "left alone (--allow-contended to write it anyway, labelled)"
            )
        text = section(saved_results(args.render))
        print(text)
        if not args.no_write:
            write_section(text)
        return
    if min(args.batch_size) < 1 or args.steps < 1 or min(args.threads) < 1 or args.reps < 1:
        parser.error("expected --batch-size, --steps, --threads and --reps >= 1")
    args.threads = list(dict.fromkeys(args.threads))
    modes = parse_modes(args.modes)
    chosen = select_backends(args.backends, parse_pythons(args.python))
    if not chosen:
        raise SystemExit(
            "no backend with a built venv; build one: .venv/bin/python -m dpscale.envs"
        )
    if args.devices > 1:
        sys.exit(scaling(args, chosen, modes))

    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu_name(),
        "usable_cores": usable_cores(),
        "python": platform.python_version(),
        "clip_norm": 1.0,
        "noise_multiplier": 1.0,
        "loadavg_start": list(os.getloadavg()),
        "args": {
            "width": args.width,
            "image_size": args.image_size,
            "groups": args.groups,
            "num_classes": args.num_classes,
            "batch_sizes": args.batch_size,
            "physical": args.physical,
            "steps": args.steps,
            "warmup": args.warmup,
            "poisson_steps": args.poisson_steps,
            "n_train": args.n_train,
            "threads": args.threads,
            "reps": args.reps,
            "seed": args.seed,
        },
    }
    runs: list[dict] = []
    codes = {CURRENT: None}
    if args.baseline:
        src = args.baseline.resolve() / "src"
        if not (src / "dpscale" / "__init__.py").exists():
            raise SystemExit(f"--baseline {args.baseline}: no src/dpscale; expected a checkout")
        codes = {BASELINE: src, CURRENT: None}
        meta["baseline"] = str(args.baseline.resolve())
    rows = [
        (batch, name, python, options)
        for batch in args.batch_size
        for name, python in chosen
        for options in modes.get(name, [{}])
    ]
    plan = _reps.schedule(list(range(len(rows))), args.reps, args.threads, list(codes))
    if args.append:
        meta, runs = appended_to(args.append, meta)
        measured = {(b, n, json.dumps(o, sort_keys=True)) for b, n, _, o in rows}
        # A re-measured mode replaces all its old repetitions.
        runs = [
            r
            for r in runs
            if (r["batch_size"], r["backend"], json.dumps(r["options"], sort_keys=True))
            not in measured
        ]
    partial = RESULTS / f"partial-steps-{time.strftime('%Y%m%d-%H%M%S')}.json"
    kept = len(runs)  # --append: the saved rows not re-measured
    with tempfile.TemporaryDirectory(prefix="dpscale-steps-") as tmp:
        for n, (rep, threads, row, code) in enumerate(plan, 1):
            batch, name, python, options = rows[row]
            if codes[code] is not None and not has_backend(codes[code], name):
                continue  # a backend the baseline does not have: this tree only
            print(
                f"[{n}/{len(plan)}] rep {rep + 1}/{args.reps}, {threads} thread(s): {name} "
                f"{options_label(options)}, batch {batch}, {code}:",
                flush=True,
            )
            started = time.strftime("%Y-%m-%d %H:%M %Z")
            # The Poisson phase is not in the ratio: once per row, at the first thread count.
            poisson = args.poisson_steps if (rep, threads) == (0, args.threads[0]) else 0
            r = run_worker(
                python, name, options, batch, args, Path(tmp), codes[code], threads, poisson
            )
            runs.append({**r, "started": started, "code": code, "rep": rep})
            print(f"    {worker_summary(r)}", flush=True)
            # After every worker, so a long run interrupted keeps what it measured.
            write_json(partial, meta, runs)
    finish(meta, runs, kept, args, partial)


def worker_summary(r: dict) -> str:
    """One line per worker: its ratio and what else ran meanwhile."""
    c = r.get("steady_contention") or r.get("contention")
    busy = f", others {c['others']:.1%}, steal {c['steal']:.1%}" if c else ""
    if "error" in r:
        return f"failed: {r['error']}{busy}"
    st = r["steady"]
    return (
        f"{r['mode']}: non-private {ms(st['nonprivate']['median_s'])} ms, DP "
        f"{ms(st['dp']['median_s'])} ms, ratio {r['ratio']:.2f}x ({r['worker_wall_s']:.0f} s"
        f"{busy})"
    )


def run_verdict(meta: dict, runs: list[dict]) -> dict:
    """meta["contention"]: the worst windows of this run's workers and why it is contended."""
    ok = [r for r in runs if "error" not in r]
    windows = [r.get(k) for r in ok for k in ("steady_contention", "contention")]
    seen = [w for w in windows if w]
    return {
        "max_others": max((w["others"] for w in seen), default=0.0),
        "max_steal": max((w["steal"] for w in seen), default=0.0),
        "limits": {
            "others": _contention.MAX_OTHERS,
            "steal": _contention.MAX_STEAL,
            "start_load": _contention.MAX_START_LOAD,
        },
        "reasons": _contention.verdict(meta["loadavg_start"][0], windows),
    }


def own_cpu_s(window: dict | None) -> float | None:
    """CPU seconds of the measured process tree in a /proc/stat window."""
    return window["own"] * window["cpus"] * window["seconds"] if window else None


def timing_summary(runs: list[dict]) -> str:
    """Where the run's time went, by repetition, and the workers' own CPU time: on an idle
    machine a 1-thread worker's wall time is about its CPU time, whatever the load was here."""
    wall: dict[int, float] = {}
    for r in runs:
        wall[r.get("rep", 0)] = wall.get(r.get("rep", 0), 0.0) + r["worker_wall_s"]
    cpu = [own_cpu_s(r.get("contention")) for r in runs if r.get("threads") == 1]
    text = f"workers took {sum(wall.values()) / 60:.1f} min: " + ", ".join(
        f"repetition {rep + 1} {s / 60:.1f} min" for rep, s in sorted(wall.items())
    )
    if cpu and None not in cpu:
        text += f"; the 1-thread workers used {sum(cpu) / 60:.1f} min of CPU"
    return text


def finish(meta: dict, runs: list[dict], kept: int, args, partial: Path) -> None:
    """The verdict on this run's workers (runs[kept:]), the JSON where it belongs, and the doc
    section if the run may write it."""
    meta["contention"] = run_verdict(meta, runs[kept:])
    reasons = meta["contention"]["reasons"]
    out = args.out or args.append or RESULTS / f"steps-{device_tag(runs)}.json"
    picked_up = out.resolve().parent == RESULTS.resolve() and out.name.startswith("steps-")
    kind = "contended" if reasons else "quick" if args.quick else None
    if kind and picked_up:
        # Never where --render and the doc pick results up (steps-*.json beside it).
        out = RESULTS / f"{kind}-{out.stem}-{partial.stem.removeprefix('partial-steps-')}.json"
    write_json(out, meta, runs)
    partial.unlink(missing_ok=True)
    text = section(saved_results(out))
    print("\n" + text)
    print(f"\n{timing_summary(runs[kept:])}\nresults in {out}")
    if reasons:
        print("contended run: " + "; ".join(reasons), flush=True)
    if args.no_write:
        pass
    elif reasons and not args.allow_contended:
        print(f"{DOC} left alone (--allow-contended to write it anyway, labelled)")
    else:
        write_section(text)
        print(f"section written to {DOC}")
    sys.exit(1 if any("error" in r for r in runs) else 0)


def appended_to(path: Path, meta: dict) -> tuple[dict, list[dict]]:
    """The saved run at `path`, to which this run adds (or in which it replaces) modes.

    Only a run with the same settings can take them, so every row stays comparable.
    """
    try:
        saved = json.loads(Path(path).read_text())
        old_meta, runs = saved["meta"], saved["runs"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise SystemExit(f"--append {path}: {err}; expected a steps.py results JSON") from None
    a, b = dict(old_meta["args"]), dict(meta["args"])
    a.pop("batch_sizes"), b.pop("batch_sizes")
    if a != b or old_meta["cpu"] != meta["cpu"]:
        diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k)) or ["cpu"]
        raise SystemExit(
            f"--append {path}: settings differ ({', '.join(diff)}); expected the same as that run"
        )
    old_meta["args"]["batch_sizes"] = sorted(
        set(old_meta["args"]["batch_sizes"]) | set(meta["args"]["batch_sizes"])
    )
    old_meta.setdefault("appended", []).append(
        {"date": meta["date"], "loadavg_start": meta["loadavg_start"]}
    )
    return old_meta, runs


def scaling(args, chosen: list[tuple[str, Path]], modes: dict[str, list[dict]]) -> int:
    """--devices N: each multi-device backend's modes on 1 and N devices; throughput of the DP
    step (examples of its logical batch per second) and the scaling efficiency."""
    from dpscale.backends import MULTI_DEVICE

    n, rows = args.devices, []
    with tempfile.TemporaryDirectory(prefix="dpscale-scaling-") as tmp:
        for batch in args.batch_size:
            for name, python in (c for c in chosen if c[0] in MULTI_DEVICE):
                for options in modes.get(name, [{}]):
                    row = {"backend": name, "options": options, "batch_per_device": batch}
                    for d in (1, n):
                        r = run_worker(
                            python,
                            name,
                            options,
                            batch,
                            args,
                            Path(tmp),
                            None,
                            threads=max(args.threads),
                            devices=d,
                        )
                        if "error" in r:
                            row[f"error_{d}"] = r["error"]
                            continue
                        row.update(mode=r["mode"], device=r["device"])
                        row[f"ex_per_s_{d}"] = d * batch / r["steady"]["dp"]["median_s"]
                    if f"ex_per_s_{n}" in row and "ex_per_s_1" in row:
                        row["efficiency"] = row[f"ex_per_s_{n}"] / (n * row["ex_per_s_1"])
                    rows.append(row)
                    print(
                        f"{name} {options_label(options)}, {batch}/device: "
                        + ", ".join(
                            f"{row[k]:.1f} ex/s on {k.rsplit('_', 1)[1]}"
                            for k in ("ex_per_s_1", f"ex_per_s_{n}")
                            if k in row
                        )
                        + (f", efficiency {row['efficiency']:.2f}" if "efficiency" in row else "")
                        + "".join(f" ({k}: {v})" for k, v in row.items() if k.startswith("error")),
                        flush=True,
                    )
    tag = "cpu" if all(is_cpu(r.get("device", "cpu")) for r in rows) else "gpu"
    out = args.out or RESULTS / f"scaling-{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "devices": n, "threads": args.threads}
    meta["loadavg"] = list(os.getloadavg())
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"results in {out}")
    return int(any("efficiency" not in r for r in rows))


def write_json(out: Path, meta: dict, runs: list[dict]) -> None:
    """The results JSON (small: per-step lists dropped)."""
    meta["loadavg_end"] = list(os.getloadavg())
    out.parent.mkdir(parents=True, exist_ok=True)
    for r in runs:
        for kind in (*r.get("steady", {}).values(), *r.get("poisson", {}).values()):
            kind.pop("step_s", None)
    out.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1) + "\n")


def json_meta(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())["meta"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise SystemExit(f"{path}: {err}; expected a steps.py results JSON") from None


if __name__ == "__main__":
    main()
