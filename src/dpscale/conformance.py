"""Drive one backend through the Adapter interface on a fixed case; write what it computed.

    python -m dpscale.conformance --backend NAME --case CASE.npz --out OUT.npz [--options JSON]

Runs inside the backend's own venv and only calls the Adapter interface of base.py, so every
backend with an adapter module joins by existing. The conformance tests (tests/conformance/,
base env) write cases with `make_case`, run this once per backend, and compare the outputs with
the reference backend's. `--case`/`--out` may repeat, in pairs.

A case (npz): `spec` (JSON of ResNetSpec), `w/<name>` canonical weights, one padded chunk `x`,
`y`, `mask` (some padding rows, filled with junk that must not matter), `clip_norm`, `sigma`,
`expected_batch_size`, `seed`.

The output (npz; `<key>/<name>` are canonical weight-shaped arrays):
- `num_params`, `roundtrip_max_abs` (set_weights then get_weights), `logits` (predict on x);
- `grad/*`: clipped gradient sum of the chunk (noise off); `grad_unclipped/*`: the same with a
  clip norm no gradient reaches (= plain per-example gradient sum);
- `dp_update/*`, `dp_loss`: one DP step, sigma=0, lr=1, momentum 0, the chunk split into two
  chunks by complementary masks (= -grad/B: accumulation over chunks);
  `dp_update_padding_chunk/*`: the same with an all-padding chunk between the two (= dp_update);
- `nonprivate_update/*`, `nonprivate_loss`: one non-private step over the same two chunks;
- `example<i>/*`: the unclipped gradient of real row i alone (a one-row mask), from which the
  tests clip per example in numpy, independently of the backend;
- `noise_update/*`: one DP step with sigma on an all-padding chunk (= -noise/B, std sigma*C/B);
  `noise_update_again/*` the same after reseed(seed) (must be identical), `noise_update_other/*`
  after reseed(seed + 1) (must differ), `noise_update_2chunks/*` over two all-padding chunks
  (noise once per logical step: same std);
- `noise_real_<k>/*` for k in NOISE_CHUNKS: a DP step with sigma over the real rows cut into k
  chunks (junk padding in each), minus the same step with sigma 0 (`dp_update_<k>chunks/*`):
  the noise alone, std sigma*C/B whatever k, drawn after reseed(seed + 10 + k);
- `trajectory_dp/*`, `trajectory_nonprivate/*` (+ `_losses`): the weight change over
  TRAJECTORY["steps"] noise-free steps over the two chunks, momentum 0.9, learning rates from
  the runner's schedule (warm-up, then cosine): lr, momentum and their interplay;
- `resume_max_abs`: a noisy step after setup_training + load_checkpoint in a fresh adapter
  against the unbroken adapter's next step (weights, momentum and the noise RNG's state all
  restored: no reseed in between); meta `load_before_setup`: the error a checkpoint loaded
  before setup_training raised (None if it raised none);
- `meta`: JSON with mode, device, versions, and backend_epsilons: the backend's own epsilon for
  each query of EPS_QUERIES (None where it has no accountant of its own).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dpscale import backends
from dpscale.backends.base import Batch, StepConfig
from dpscale.models.resnet import ResNetSpec
from dpscale.runner import schedule

#: a clip norm no per-example gradient of a tiny model reaches: clipping becomes the identity
NO_CLIP = 1e9
#: the privacy questions asked of every backend's own accountant: the step count and the rate
#: both matter, so an accountant that ignores either (or composes once) is caught. Rates stay at
#: or below 0.02: above it Opacus' series for fractional RDP orders parts from dp_accounting's
#: (1.5e-5 relative at q=0.05, 300 steps, where the best order is 5.8; 1e-8 at q=0.02).
EPS_QUERIES = (
    {"sample_rate": 0.01, "steps": 10, "delta": 1e-5},
    {"sample_rate": 0.01, "steps": 100, "delta": 1e-5},
    {"sample_rate": 0.01, "steps": 2000, "delta": 1e-5},
    {"sample_rate": 0.02, "steps": 300, "delta": 1e-6},
)
#: logical steps whose real rows are cut into this many chunks, for the noise with real rows
NOISE_CHUNKS = (1, 2, 3)
#: the noise-free trajectory: its length, warm-up, momentum and peak learning rates
TRAJECTORY = {"steps": 5, "warmup": 2, "momentum": 0.9, "lr_dp": 0.5, "lr_nonprivate": 0.1}


def make_case(
    spec: ResNetSpec,
    weights: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    mask: np.ndarray,
    *,
    clip_norm: float,
    sigma: float,
    expected_batch_size: float,
    seed: int,
) -> dict[str, np.ndarray]:
    """The arrays of a case file (np.savez(path, **make_case(...)))."""
    n = len(x)
    if x.shape != (n, spec.image_size, spec.image_size, spec.in_channels):
        raise ValueError(
            f"case x has shape {x.shape}; expected (n, {spec.image_size}, {spec.image_size}, "
            f"{spec.in_channels})"
        )
    if np.shape(y) != (n,) or np.shape(mask) != (n,):
        raise ValueError(f"case y {np.shape(y)} / mask {np.shape(mask)}; expected ({n},)")
    case = {
        "spec": np.array(json.dumps(spec.to_dict())),
        "x": np.asarray(x, np.float32),
        "y": np.asarray(y, np.int64),
        "mask": np.asarray(mask, bool),
        "clip_norm": np.float64(clip_norm),
        "sigma": np.float64(sigma),
        "expected_batch_size": np.float64(expected_batch_size),
        "seed": np.int64(seed),
    }
    case.update({f"w/{k}": np.asarray(v, np.float32) for k, v in weights.items()})
    return case


def read_case(path: Path) -> dict:
    with np.load(path) as z:
        missing = {"spec", "x", "y", "mask", "clip_norm", "sigma", "expected_batch_size", "seed"}
        missing -= set(z.files)
        if missing:
            raise ValueError(f"case {path} lacks {sorted(missing)}; expected a make_case file")
        return {
            "spec": ResNetSpec.from_dict(json.loads(str(z["spec"]))),
            "weights": {k[2:]: z[k] for k in z.files if k.startswith("w/")},
            "batch": Batch(z["x"], z["y"], z["mask"]),
            "clip_norm": float(z["clip_norm"]),
            "sigma": float(z["sigma"]),
            "expected_batch_size": float(z["expected_batch_size"]),
            "seed": int(z["seed"]),
        }


def split_chunks(batch: Batch, k: int) -> list[Batch]:
    """k chunks of the batch's physical size whose real rows together are the batch's (each
    chunk keeps the others' rows, and the padding's junk, as padding)."""
    chunks = []
    for rows in np.array_split(np.flatnonzero(batch.mask), k):
        mask = np.zeros_like(batch.mask)
        mask[rows] = True
        chunks.append(Batch(batch.x, batch.y, mask))
    return chunks


def trajectory_lrs(peak: float) -> list[float]:
    """The runner's learning rates (linear warm-up, then cosine) for the trajectory's steps."""
    n, warm = TRAJECTORY["steps"], TRAJECTORY["warmup"]
    return [schedule.learning_rate(s, n, peak, "cosine", warm) for s in range(n)]


def padding_only(batch: Batch) -> Batch:
    return Batch(batch.x, batch.y, np.zeros_like(batch.mask))


def _delta(after: dict, before: dict) -> dict[str, np.ndarray]:
    return {k: (after[k].astype(np.float64) - before[k]).astype(np.float32) for k in before}


def _max_abs(a: dict, b: dict) -> float:
    if set(a) != set(b):
        raise ValueError(
            f"weight names differ: {sorted(set(a) ^ set(b))[:3]}; expected the canonical names"
        )
    return max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])), initial=0)) for k in a)


def run(backend: str, case: dict, options: dict, threads: int = 1, log=sys.stderr) -> dict:
    """Everything the conformance tests compare, as a flat dict of arrays."""
    start = time.perf_counter()

    def say(what: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {backend}: {what}", file=log, flush=True)

    Adapter = backends.load(backend)
    spec, w0, batch = case["spec"], case["weights"], case["batch"]
    C, sigma, B, seed = case["clip_norm"], case["sigma"], case["expected_batch_size"], case["seed"]
    P = len(batch.x)
    chunks, empty = split_chunks(batch, 2), padding_only(batch)
    out: dict[str, np.ndarray] = {}

    def put(prefix: str, arrays: dict) -> None:
        out.update({f"{prefix}/{k}": np.asarray(v) for k, v in arrays.items()})

    def step_from(adapter, chunk_list, lr=1.0) -> tuple[dict, float]:
        adapter.set_weights(w0)
        before = adapter.get_weights()
        loss = adapter.train_step(chunk_list, lr)
        return _delta(adapter.get_weights(), before), float(loss)

    adapter = Adapter(spec, options, seed, threads)
    say(f"built, mode {adapter.mode!r}, device {adapter.device()}")
    out["num_params"] = np.int64(adapter.num_params())
    adapter.set_weights(w0)
    out["roundtrip_max_abs"] = np.float64(_max_abs(adapter.get_weights(), w0))
    out["logits"] = adapter.predict(batch.x)
    say("logits")
    put("grad", adapter.clipped_grad_sum(batch, C))
    put("grad_unclipped", adapter.clipped_grad_sum(batch, NO_CLIP))
    for i in np.flatnonzero(batch.mask):
        one = np.zeros_like(batch.mask)
        one[i] = True
        put(f"example{i}", adapter.clipped_grad_sum(Batch(batch.x, batch.y, one), NO_CLIP))
    say("clipped gradient sums, per-example gradients")

    adapter.setup_training(StepConfig(True, C, 0.0, B, 0.0, P))
    update, out["dp_loss"] = step_from(adapter, chunks)
    put("dp_update", update)
    put("dp_update_padding_chunk", step_from(adapter, [chunks[0], empty, chunks[1]])[0])
    adapter.setup_training(StepConfig(False, C, 0.0, B, 0.0, P))
    update, out["nonprivate_loss"] = step_from(adapter, chunks)
    put("nonprivate_update", update)
    say("noise-free DP step and non-private step")

    for key, private, peak in [
        ("trajectory_dp", True, TRAJECTORY["lr_dp"]),
        ("trajectory_nonprivate", False, TRAJECTORY["lr_nonprivate"]),
    ]:
        adapter.setup_training(StepConfig(private, C, 0.0, B, TRAJECTORY["momentum"], P))
        adapter.set_weights(w0)
        out[f"{key}_losses"] = np.array(
            [adapter.train_step(chunks, lr) for lr in trajectory_lrs(peak)]
        )
        put(key, _delta(adapter.get_weights(), w0))
    say("noise-free trajectories with momentum and a schedule")

    adapter.setup_training(StepConfig(True, C, sigma, B, 0.0, P))
    for key, reseed, batches in [
        ("noise_update", seed, [empty]),
        ("noise_update_again", seed, [empty]),
        ("noise_update_other", seed + 1, [empty]),
        ("noise_update_2chunks", seed + 2, [empty, empty]),
    ]:
        adapter.reseed(reseed)
        put(key, step_from(adapter, batches)[0])
    # The noise of steps with real rows: the sigma step minus the same step without noise.
    adapter.setup_training(StepConfig(True, C, 0.0, B, 0.0, P))
    free = {}
    for k in NOISE_CHUNKS:
        free[k] = step_from(adapter, split_chunks(batch, k))[0]
        put(f"dp_update_{k}chunks", free[k])
    adapter.setup_training(StepConfig(True, C, sigma, B, 0.0, P))
    for k in NOISE_CHUNKS:
        adapter.reseed(seed + 10 + k)
        noisy = step_from(adapter, split_chunks(batch, k))[0]
        put(f"noise_real_{k}", {n: noisy[n] - free[k][n] for n in noisy})
    say("noise-only steps, and the noise of steps with real rows")

    # Resume: a step after loading a checkpoint must equal the unbroken adapter's step.
    train_cfg = StepConfig(True, C, sigma, B, 0.9, P)
    adapter.setup_training(train_cfg)
    adapter.set_weights(w0)
    adapter.reseed(seed)
    adapter.train_step(chunks, 0.1)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "checkpoint"
        adapter.save_checkpoint(ckpt)
        adapter.train_step(chunks, 0.1)
        unbroken = adapter.get_weights()
        fresh = Adapter(spec, options, seed + 7, threads)
        try:
            fresh.load_checkpoint(ckpt)
            load_before_setup = None
        except RuntimeError as err:
            load_before_setup = str(err)
        fresh.setup_training(train_cfg)
        fresh.load_checkpoint(ckpt)
        fresh.train_step(chunks, 0.1)
        out["resume_max_abs"] = np.float64(_max_abs(fresh.get_weights(), unbroken))
    say("checkpoint resume")

    meta = {
        "backend": backend,
        "options": options,
        "mode": adapter.mode,
        "device": adapter.device(),
        "versions": adapter.versions(),
        "load_before_setup": load_before_setup,
        "epsilon_queries": EPS_QUERIES,
        "backend_epsilons": [adapter.backend_epsilon(**q) for q in EPS_QUERIES],
        "seconds": time.perf_counter() - start,
    }
    out["meta"] = np.array(json.dumps(meta))
    say("done")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", required=True, help="a dpscale.backends name")
    # Repeatable: several cases in one process pay the framework's import once.
    parser.add_argument("--case", required=True, type=Path, action="append", help="case .npz")
    parser.add_argument("--out", required=True, type=Path, action="append", help="output .npz")
    parser.add_argument("--options", default="{}", help="backend options as a JSON object")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as err:
        parser.error(f"--options is not JSON ({err}); expected an object like '{{\"k\": 1}}'")
    if not isinstance(options, dict):
        parser.error(f"--options is {type(options).__name__}; expected a JSON object")
    if len(args.case) != len(args.out):
        parser.error(f"{len(args.case)} --case but {len(args.out)} --out; expected one per case")
    for case in args.case:
        if not case.exists():
            parser.error(f"--case {case} does not exist; expected a make_case .npz")
    for case, out_path in zip(args.case, args.out, strict=True):
        out = run(args.backend, read_case(case), options, args.threads)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out_path, **out)


if __name__ == "__main__":
    main()
