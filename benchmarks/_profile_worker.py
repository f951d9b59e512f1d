"""Where one backend's DP and non-private steps spend their time (started by profile_step.py).

Not for direct use: `profile_step.py` runs `<venv>/bin/python benchmarks/_profile_worker.py
--backend NAME --options JSON ... --out FILE` and reads FILE (JSON). In one process, on one
random logical batch padded to the runner's physical batch, after warm-up steps:

- wall time of each kind of step, unprofiled, interleaved (NP, DP, DP, NP, ...);
- torch backends: torch.profiler (CPU) over `--profile-steps` steps of each kind, ops by self
  CPU time per step (key_averages);
- the jax backend: its DP step's pure pieces (dpscale.backends.jax) jitted and timed one by one,
  as XLA fuses a whole step into one program that an op profile cannot split: the batch forward,
  the non-private gradient, the per-example gradients (vmap(grad), materialized), norms + clip
  factors + clip-weighted sum from those gradients, the fused DP chunk, the update (noise,
  momentum SGD) and the whole DP step, timed round robin.

The frameworks come from the modules the adapter loaded (sys.modules); only their profiler
submodule is imported here, after the adapter.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from statistics import median

import _contention  # benchmarks/, this script's folder
import numpy as np
from _step_worker import LR, step_config, timed_step

from dpscale import backends
from dpscale.backends.base import Batch
from dpscale.models.resnet import ResNetSpec
from dpscale.runner import plan


def log(msg: str) -> None:
    print(f"[worker] {time.strftime('%H:%M:%S')} {msg}", flush=True)


def random_batch(args) -> Batch:
    rng = np.random.default_rng(args.seed)
    b, size = args.batch_size, args.image_size
    physical = plan.default_physical_batch_size(b)
    mask = np.arange(physical) < b
    x = rng.standard_normal((physical, size, size, 3)).astype(np.float32)
    y = rng.integers(0, args.num_classes, physical).astype(np.int64)
    return Batch(x=np.where(mask[:, None, None, None], x, 0), y=np.where(mask, y, 0), mask=mask)


def torch_ops(adapter, batch: Batch, steps: int, top: int) -> dict:
    """torch.profiler over `steps` steps: ops by self CPU time per step, and the profiled wall."""
    profiler = importlib.import_module("torch.profiler")
    with profiler.profile(activities=[profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            timed_step(adapter, [batch])
        wall = (time.perf_counter() - t0) / steps
    events = [
        {"op": e.key, "self_ms": e.self_cpu_time_total / 1e3 / steps, "calls": e.count / steps}
        for e in prof.key_averages()
    ]
    events.sort(key=lambda e: -e["self_ms"])
    return {
        "profiled_step_ms": wall * 1e3,
        "ops_self_ms": sum(e["self_ms"] for e in events),
        "ops": events[:top],
    }


def jax_pieces(adapter, batch: Batch, steps: int) -> dict[str, float]:
    """Milliseconds of each jitted piece of the jax backend's DP step (see the module doc)."""
    jax = sys.modules["jax"]
    jnp = sys.modules["jax.numpy"]
    m = sys.modules[type(adapter).__module__]
    spec, impl, clip = adapter.spec, adapter._conv_dp, 1.0
    x, y, mask = adapter._device_batch(batch)
    params = adapter.params

    def loss(p, x, y, mask):
        return jnp.sum(m.cross_entropy(m.forward(p, x, spec, adapter._conv), y) * mask)

    def clip_sum(grads, mask):
        return m.weighted_sum(grads, m.clip_factors(m.global_norms(grads), clip) * mask)

    per_example = jax.jit(m.per_example_grads, static_argnums=(3, 4))
    grads, _ = per_example(params, x, y, spec, impl)
    gsum, _ = m.nonprivate_chunk(params, x, y, mask, spec, adapter._conv)
    update = (params, adapter._opt_state, gsum, adapter._key, 1.0, float(len(batch.y)), LR, 0.9)
    pieces = {
        "forward (batch, no gradient)": (jax.jit(loss), (params, x, y, mask)),
        "non-private gradient (forward + backward)": (
            lambda: m.nonprivate_chunk(params, x, y, mask, spec, adapter._conv),
            (),
        ),
        "per-example gradients (vmap(grad), materialized)": (
            per_example,
            (params, x, y, spec, impl),
        ),
        "norms + clip factors + clip-weighted sum (from them)": (jax.jit(clip_sum), (grads, mask)),
        "DP chunk (the two above, fused)": (
            lambda: adapter.dp_chunk(params, x, y, mask, clip, spec, impl),
            (),
        ),
        "update: noise + momentum SGD": (adapter._apply_noisy, update),
        "DP step (the adapter's, with host copies)": (lambda: timed_step(adapter, [batch]), ()),
    }
    for fn, fn_args in pieces.values():
        jax.block_until_ready(fn(*fn_args))  # compile
    # Round robin, so that a change of load touches every piece alike.
    times: dict[str, list[float]] = {name: [] for name in pieces}
    for _ in range(steps):
        for name, (fn, fn_args) in pieces.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*fn_args))
            times[name].append(time.perf_counter() - t0)
    out = {name: median(t) * 1e3 for name, t in times.items()}
    log(", ".join(f"{name}: {ms:.1f} ms" for name, ms in out.items()))
    return out


def run(args) -> dict:
    cls = backends.load(args.backend)
    options = json.loads(args.options)
    spec = ResNetSpec(
        num_classes=args.num_classes, image_size=args.image_size, width=args.width, groups=32
    )
    batch = random_batch(args)
    b, physical = args.batch_size, batch.x.shape[0]
    adapters = {}
    for kind, private in (("nonprivate", False), ("dp", True)):
        adapters[kind] = cls(spec, options, args.seed, args.threads)
        adapters[kind].setup_training(step_config(private, b, physical))
        for _ in range(args.warmup):
            timed_step(adapters[kind], [batch])
    log(f"{args.backend} {options}: warm")
    before = _contention.sample()
    wall: dict[str, list[float]] = {k: [] for k in adapters}
    for i in range(args.steps):
        for k in list(adapters) if i % 2 == 0 else list(adapters)[::-1]:
            wall[k].append(timed_step(adapters[k], [batch]))
    out = {
        "backend": args.backend,
        "options": options,
        "mode": adapters["dp"].mode or args.backend,
        "threads": args.threads,
        "batch_size": b,
        "physical_batch_size": physical,
        "lr": LR,
        "step_ms": {k: median(v) * 1e3 for k, v in wall.items()},
        "versions": adapters["dp"].versions(),
    }
    if "torch" in sys.modules:
        out["ops"] = {
            k: torch_ops(a, batch, args.profile_steps, args.top) for k, a in adapters.items()
        }
    elif hasattr(sys.modules[cls.__module__], "per_example_grads"):
        out["pieces_ms"] = jax_pieces(adapters["dp"], batch, args.steps)
    out["contention"] = _contention.window(before, _contention.sample())
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", required=True)
    parser.add_argument("--options", default="{}")
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="unprofiled steps of each kind")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=40, help="ops kept per kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.write_text(json.dumps(run(args), indent=1))
    log(f"done: {args.out}")


if __name__ == "__main__":
    main()
