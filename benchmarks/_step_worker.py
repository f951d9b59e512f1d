"""One backend and DP mode, measured inside that backend's venv (started by benchmarks/steps.py).

Not a test and not for direct use: `steps.py` runs `<venv>/bin/python benchmarks/_step_worker.py
--backend NAME --options JSON ... --out FILE` and reads FILE (JSON). In one process:

1. a non-private adapter and a private one (Adapter interface only), each built, set up and
   stepped `--warmup` times on one random logical batch of B real rows padded to the runner's
   physical batch P (plan.default_physical_batch_size(B) unless --physical): build time,
   first-step (compile / warm-up) time, and peak RSS of that phase (the kernel's high-water
   mark is reset between phases through /proc/self/clear_refs, so each phase has its own);
2. `--steps` steady-state steps of each on that batch, interleaved (NP, DP, DP, NP, ...) so both
   see the same load from other processes: the DP / non-private ratio is measured side by side;
3. a real Poisson plan (dpscale.runner.plan, q = B / n_train, the same P) fed through
   dpscale.runner.feed from a memory-mapped uint8 array, as the runner does: distinct chunk
   shapes, chunk counts and real batch sizes, compiles during the plan's first step and after it
   (jax: backend-compile events; tf: tf.function trace counts; torch: eager, "n/a"); with one
   compiled shape P both should be 0. Step time and the feed's time per step (plain and with
   augmentation). Skipped with --poisson-steps 0 (steps.py measures it in the first repetition
   only: it does not enter the ratio).

The steady phase is framed by /proc/stat samples (benchmarks/_contention.py): how much of the
CPUs' time other processes and the hypervisor took while the ratio was measured.

Frameworks are never imported here: compile probes use only modules the adapter already loaded.
Progress lines go to stdout with the prefix "[worker]".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import _contention  # benchmarks/, this script's folder
import numpy as np

from dpscale import backends
from dpscale.backends.base import Batch, Runtime, StepConfig
from dpscale.models.resnet import ResNetSpec
from dpscale.runner import feed, launch, loop, plan

RUNTIME = Runtime()  # --devices sets it
LR = 0.01  # small: random labels must not blow the loss up within a few dozen steps
MOMENTUM = 0.9
CLIP = 1.0
SIGMA = 1.0


def log(msg: str) -> None:
    if launch.quiet_rank():  # a data-parallel worker's other ranks stay quiet
        return
    print(f"[worker] {time.strftime('%H:%M:%S')} {msg}", flush=True)


# -- memory -----------------------------------------------------------------------------------
def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (getrusage's ru_maxrss) to the current RSS.

    Linux >= 4.0; returns False where it is not allowed, so peaks then cover the process so far.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB else


def current_rss_mb() -> float | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


# -- compile probes ---------------------------------------------------------------------------
class CompileProbe:
    """Counts compilations with the hooks of whichever framework the adapter has loaded."""

    JAX_EVENT = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch, 0.4-0.10

    def __init__(self) -> None:
        self.kind = "n/a"
        self._jax_compiles = 0
        self._adapters: list = []

    def attach(self, adapters: list) -> None:
        self._adapters = adapters
        jax = sys.modules.get("jax")
        if jax is not None:
            self.kind = "jax backend compiles"

            def listener(event: str, _duration: float, **_kw) -> None:
                if event == self.JAX_EVENT:
                    self._jax_compiles += 1

            jax.monitoring.register_event_duration_secs_listener(listener)
        elif "tensorflow" in sys.modules:
            self.kind = "tf.function traces"

    def count(self) -> int | None:
        if self.kind == "jax backend compiles":
            return self._jax_compiles
        if self.kind == "tf.function traces":
            return sum(int(fn.experimental_get_tracing_count()) for fn in self._tf_functions())
        return None

    def _tf_functions(self) -> list:
        """tf.functions held by the adapters or by their attributes (e.g. a shared engine)."""
        found: dict[int, object] = {}
        for a in self._adapters:
            for value in vars(a).values():
                for obj in (value, *getattr(value, "__dict__", {}).values()):
                    if callable(getattr(obj, "experimental_get_tracing_count", None)):
                        found[id(obj)] = obj
        return list(found.values())


# -- phases -----------------------------------------------------------------------------------
def step_config(private: bool, batch: int, physical: int) -> StepConfig:
    return StepConfig(
        private=private,
        clip_norm=CLIP,
        noise_multiplier=SIGMA if private else 0.0,
        expected_batch_size=float(batch),
        momentum=MOMENTUM,
        physical_batch_size=physical,
    )


def timed_step(adapter, chunks: list[Batch]) -> float:
    """Seconds of one step as the runner times it (the device's queued work included)."""
    loss, dt = loop.timed_step(adapter, chunks, LR)
    if not np.isfinite(loss):
        raise RuntimeError(f"loss is {loss}; expected a finite loss on random data at lr {LR}")
    return dt


def warm_phase(cls, spec, options, seed, threads, cfg: StepConfig, batch: Batch, warmup: int):
    """Build, set up and warm one adapter; its own memory peak and compile time. With
    --devices N (RUNTIME), a logical batch is N chunks: one of `batch` per device."""
    reset_ok = reset_peak_rss()
    rss_start = current_rss_mb()
    t0 = time.perf_counter()
    adapter = cls(spec, options, seed, threads, RUNTIME)
    adapter.setup_training(cfg)
    build_s = time.perf_counter() - t0
    first_s = timed_step(adapter, [batch] * RUNTIME.devices)
    warm = [timed_step(adapter, [batch] * RUNTIME.devices) for _ in range(max(0, warmup - 1))]
    device_peak = adapter.peak_memory_bytes()
    out = {
        "build_s": build_s,
        "first_step_s": first_s,
        "warmup_steps_s": warm,
        "peak_rss_mb": peak_rss_mb(),
        "rss_at_start_mb": rss_start,
        "peak_rss_is_phase_only": reset_ok,
        "peak_device_mb": device_peak / 2**20 if device_peak is not None else None,
    }
    return adapter, out


def interleaved(adapters: dict, batch: Batch, steps: int) -> dict[str, list[float]]:
    """`steps` timed steps of each adapter, alternating which goes first (ABBA)."""
    times: dict[str, list[float]] = {k: [] for k in adapters}
    keys = list(adapters)
    for i in range(steps):
        for k in keys if i % 2 == 0 else keys[::-1]:
            times[k].append(timed_step(adapters[k], [batch] * RUNTIME.devices))
        if (i + 1) % max(1, steps // 4) == 0:
            log(
                f"steady {i + 1}/{steps}: "
                + ", ".join(f"{k} {median(v) * 1e3:.1f} ms" for k, v in times.items())
            )
    return times


def poisson_phase(adapter, probe, cfg, data, labels, batches, seed) -> dict:
    """The runner's feed and step over a real Poisson plan, as dpscale.runner.loop does it."""
    shapes, n_chunks, sizes = set(), set(), set()
    step_s, feed_s, feed_aug_s = [], [], []
    compiles_start = probe.count()
    compiles_after_first = None
    aug_rng = plan.epoch_rng(seed, 1, plan.AUGMENT_STREAM)
    for i, positions in enumerate(batches):
        if len(positions) == 0 and not cfg.private:
            continue  # the runner skips empty non-private steps
        t0 = time.perf_counter()
        chunks = [
            feed.make_batch(data, labels, pos, mask)
            for pos, mask in plan.chunk_indices(positions, cfg.physical_batch_size)
        ]
        feed_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for pos, mask in plan.chunk_indices(positions, cfg.physical_batch_size):
            feed.make_batch(data, labels, pos, mask, aug_rng)
        feed_aug_s.append(time.perf_counter() - t0)
        shapes.update(tuple(c.x.shape) for c in chunks)
        n_chunks.add(len(chunks))
        sizes.add(len(positions))
        step_s.append(timed_step(adapter, chunks))
        if i == 0:
            compiles_after_first = probe.count()
    compiles_end = probe.count()
    known = compiles_start is not None
    return {
        "physical_batch_size": cfg.physical_batch_size,
        "steps": len(step_s),
        "distinct_shapes": sorted(list(s) for s in shapes),
        "distinct_chunk_counts": sorted(n_chunks),
        "distinct_batch_sizes": len(sizes),
        "batch_size_range": [min(sizes), max(sizes)] if sizes else None,
        "compile_counter": probe.kind,
        "compiles_first_step": compiles_after_first - compiles_start if known else None,
        "recompiles": compiles_end - compiles_after_first if known else None,
        "first_step_s": step_s[0] if step_s else None,
        "step_s": step_s[1:],
        "step_median_s": median(step_s[1:]) if len(step_s) > 1 else None,
        "feed_median_s": median(feed_s[1:]) if len(feed_s) > 1 else None,
        "feed_augment_median_s": median(feed_aug_s[1:]) if len(feed_aug_s) > 1 else None,
    }


def poisson_phases(adapters: dict, probe, configs: dict, rng, args) -> dict:
    """poisson_phase of each adapter over one plan, from a memory-mapped uint8 array."""
    n_train, size = args.n_train, args.image_size
    batches = plan.epoch_plan(n_train, args.batch_size / n_train, args.poisson_steps, args.seed, 1)
    out = {}
    with tempfile.TemporaryDirectory(prefix="dpscale-steps-") as tmp:
        # The runner memory-maps prepared uint8 arrays; so does this.
        path = Path(tmp) / "images.npy"
        np.save(path, rng.integers(0, 256, (n_train, size, size, 3), dtype=np.uint8))
        images = np.load(path, mmap_mode="r")
        labels = rng.integers(0, args.num_classes, n_train).astype(np.int64)
        for key, cfg in configs.items():
            p = out[key] = poisson_phase(
                adapters[key], probe, cfg, images, labels, batches, args.seed
            )
            log(
                f"poisson {key}: P={cfg.physical_batch_size}, {p['steps']} steps, batch sizes "
                f"{p['batch_size_range']}, shapes {p['distinct_shapes']}, compiles "
                f"{p['compiles_first_step']} in step 1 and {p['recompiles']} after "
                f"({probe.kind}), feed {(p['feed_median_s'] or 0) * 1e3:.2f} ms"
            )
        del images
    return out


def run(args) -> dict:
    load_start = os.getloadavg()
    options = json.loads(args.options)
    cls = backends.load(args.backend)
    spec = ResNetSpec(
        num_classes=args.num_classes, image_size=args.image_size, width=args.width,
        groups=args.groups,
    )  # fmt: skip
    rng = np.random.default_rng(args.seed)
    size, b = args.image_size, args.batch_size
    physical = args.physical or plan.default_physical_batch_size(b)
    mask = np.arange(physical) < b
    batch = Batch(
        x=np.where(mask[:, None, None, None], rng.standard_normal((physical, size, size, 3)), 0)
        .astype(np.float32),
        y=np.where(mask, rng.integers(0, args.num_classes, physical), 0).astype(np.int64),
        mask=mask,
    )  # fmt: skip
    configs = {k: step_config(p, b, physical) for k, p in (("nonprivate", False), ("dp", True))}
    probe = CompileProbe()
    adapters, phases = {}, {}
    for key, cfg in configs.items():
        log(
            f"{args.backend} {options}: building and warming the {key} adapter "
            f"(B={b}, P={physical})"
        )
        adapters[key], phases[key] = warm_phase(
            cls, spec, options, args.seed, args.threads, cfg, batch, args.warmup
        )
        log(
            f"{key}: build {phases[key]['build_s']:.2f} s, first step "
            f"{phases[key]['first_step_s']:.2f} s, peak RSS {phases[key]['peak_rss_mb']:.0f} MB"
        )
    probe.attach(list(adapters.values()))  # after the imports; counts the Poisson phase only
    before = _contention.sample()
    times = interleaved(adapters, batch, args.steps)
    steady_window = _contention.window(before, _contention.sample())

    n_train = args.n_train
    q = b / n_train
    poisson = poisson_phases(adapters, probe, configs, rng, args) if args.poisson_steps else {}

    dp = adapters["dp"]
    return {
        "backend": args.backend,
        "options": options,
        "mode": dp.mode or args.backend,
        "num_params": int(dp.num_params()),
        "device": dp.device(),
        "versions": {"python": sys.version.split()[0], "numpy": np.__version__, **dp.versions()},
        "threads": args.threads,
        "width": args.width,
        "image_size": args.image_size,
        "batch_size": b,
        "physical_batch_size": physical,
        "groups": args.groups,
        "warm": phases,
        "steady": {
            k: {"step_s": v, "median_s": median(v), "mean_s": float(np.mean(v))}
            for k, v in times.items()
        },
        "ratio": median(times["dp"]) / median(times["nonprivate"]),
        "poisson": poisson,
        "steady_contention": steady_window,
        "n_train": n_train,
        "sample_rate": q,
        "loadavg_start": list(load_start),
        "loadavg_end": list(os.getloadavg()),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", required=True)
    parser.add_argument("--options", default="{}", help="adapter options as a JSON object")
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--physical", type=int, help="padded chunk size (default: the runner's)")
    parser.add_argument("--steps", type=int, required=True, help="steady-state steps of each")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps, the first timed")
    parser.add_argument("--poisson-steps", type=int, required=True)
    parser.add_argument("--n-train", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=1, help="training.devices (one chunk each)")
    args = parser.parse_args(argv)
    global RUNTIME
    RUNTIME = Runtime(devices=args.devices)
    launcher = args.backend in backends.PROCESS_PER_DEVICE and not launch.is_rank()
    if args.devices > 1 and launcher:  # one worker per device, as the runner starts them
        cmd = [sys.executable, str(Path(__file__).resolve()), *(argv or sys.argv[1:])]
        sys.exit(launch.run_ranks(cmd, args.devices, args.threads))
    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as err:
        parser.error(f"--options {args.options!r} is not JSON ({err}); expected an object")
    if not isinstance(options, dict):
        parser.error(f"--options {args.options!r}; expected a JSON object")
    if args.steps < 1 or args.poisson_steps in (1,) or args.poisson_steps < 0 or args.warmup < 1:
        parser.error("expected --steps >= 1, --poisson-steps 0 (skip) or >= 2, --warmup >= 1")
    if args.physical is not None and args.physical < args.batch_size:
        parser.error(f"--physical {args.physical}; expected >= --batch-size {args.batch_size}")
    if not 0 < args.batch_size <= args.n_train:
        parser.error(f"--batch-size {args.batch_size}; expected 1..--n-train ({args.n_train})")
    result = run(args)
    if launch.quiet_rank():
        return  # rank 0 reports for all
    result["devices"] = args.devices
    args.out.write_text(json.dumps(result, indent=1))
    log(f"done: ratio DP/non-private {result['ratio']:.2f}; results in {args.out}")


if __name__ == "__main__":
    main()
