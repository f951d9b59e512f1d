"""The training loop every backend runs: plan, feed, step, evaluate, time, checkpoint, write.

Framework-free (numpy only): the adapter is the only thing that touches a framework.

Randomness: the batch plan, the augmentation and the noise of epoch e derive from (root, e). The
root is the run's public seed (reproducible), or with secure_randomness 128 bits drawn from the
OS's entropy once per run (`secrets`; one draw for all ranks of a data-parallel run, see
runner.launch), kept only in the checkpoint's state.json so that a
resumed run continues its plan and noise (the checkpoint is as secret as the model, and is
deleted when the run completes); no output, log line or metric holds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import platform
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dpscale import atomic
from dpscale.backends.base import Adapter, StepConfig
from dpscale.metrics.losses import per_example_loss
from dpscale.models.resnet import ResNetSpec
from dpscale.runner import feed, launch, outputs, plan, schedule

STATE_FILE = "state.json"
STATE_VERSION = 1
LOG_EVERY_S = 30.0  # a progress line at least this often, also in long epochs

TRAINING_DEFAULTS = {
    "epochs": 10,
    "batch_size": 256,
    "physical_batch_size": None,
    "lr": 1.0,
    "lr_nonprivate": None,
    "momentum": 0.9,
    "schedule": "cosine",
    "warmup_epochs": 0,
    "clip_norm": 1.0,
    "augment": False,
    "eval_every": 1,
    "frozen_groups": 0,
    # The device policy (backends.base.Runtime): auto | cpu | gpu, fp32 | tf32, determinism.
    "device": "auto",
    "precision": "fp32",
    "deterministic": False,
    # Data-parallel workers sharing each logical step (backends.base: Runtime.devices).
    "devices": 1,
}
PRIVACY_REQUIRED = ("private", "sample_rate", "steps", "noise_multiplier", "expected_batch_size")


class RunnerError(Exception):
    """Bad input or a failed run, with a one-line message naming what is wrong."""


class NonFiniteLoss(RunnerError):
    pass


QUIET = False  # a data-parallel run's ranks other than 0: rank 0 logs for the run


def log(msg: str) -> None:
    if QUIET:
        return
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- inputs -----------------------------------------------------------------------------------
@dataclass
class Data:
    images: np.ndarray  # uint8 (N, H, W, 3), memory-mapped
    labels: np.ndarray  # int64 (N,): model label (position in `classes`), -1 if not selected
    train: np.ndarray
    holdout: np.ndarray
    test: np.ndarray
    classes: np.ndarray
    split_name: str
    meta: dict = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_data(data_dir: Path, split_path: Path) -> Data:
    data_dir, split_path = Path(data_dir), Path(split_path)
    for f in (data_dir / "images.npy", data_dir / "labels.npy", split_path):
        if not f.exists():
            raise RunnerError(f"{f}: not found; expected the prepared arrays and the split file")
    images = np.load(data_dir / "images.npy", mmap_mode="r")
    ds_labels = np.load(data_dir / "labels.npy")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise RunnerError(
            f"{data_dir / 'images.npy'}: dtype {images.dtype} shape {images.shape}; "
            "expected uint8 (N, H, W, 3)"
        )
    if images.shape[1] != images.shape[2]:
        raise RunnerError(f"{data_dir / 'images.npy'}: {images.shape[1:3]} images; expected square")
    if ds_labels.shape != (images.shape[0],) or not np.issubdtype(ds_labels.dtype, np.integer):
        raise RunnerError(
            f"{data_dir / 'labels.npy'}: dtype {ds_labels.dtype} shape {ds_labels.shape}; "
            f"expected integer ({images.shape[0]},)"
        )
    with np.load(split_path, allow_pickle=False) as z:
        missing = [k for k in ("train", "holdout", "test", "classes") if k not in z.files]
        if missing:
            raise RunnerError(f"{split_path}: missing {', '.join(missing)}; expected split arrays")
        split = {k: z[k] for k in z.files}
    meta = json.loads(str(split["meta"])) if "meta" in split else {}
    classes = split["classes"].astype(np.int64)
    if len(classes) < 2 or len(np.unique(classes)) != len(classes):
        raise RunnerError(
            f"{split_path}: classes {classes.tolist()}; expected >= 2 distinct labels"
        )
    labels = np.full(len(ds_labels), -1, dtype=np.int64)
    lut = {int(c): i for i, c in enumerate(classes)}
    for c, i in lut.items():
        labels[ds_labels == c] = i
    parts = {}
    for part in ("train", "holdout", "test"):
        idx = split[part].astype(np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(labels)):
            raise RunnerError(f"{split_path}: {part} indices outside 0..{len(labels) - 1}")
        if len(idx) and (labels[idx] < 0).any():
            raise RunnerError(f"{split_path}: {part} holds examples of classes not in 'classes'")
        parts[part] = idx
    if not len(parts["train"]) or not len(parts["test"]):
        raise RunnerError(f"{split_path}: empty train or test split; expected examples in both")
    name = meta.get("name") or split_path.stem
    return Data(
        images, labels, parts["train"], parts["holdout"], parts["test"], classes, name, meta
    )


def load_privacy(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise RunnerError(f"{path}: not found; expected the calibrate step's privacy JSON")
    try:
        privacy = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RunnerError(f"{path}: not valid JSON ({err})") from err
    missing = [k for k in PRIVACY_REQUIRED if k not in privacy]
    if missing:
        raise RunnerError(f"{path}: missing {', '.join(missing)}; expected calibrate's fields")
    q = privacy["sample_rate"]
    if not isinstance(q, int | float) or not 0 < q <= 1:
        raise RunnerError(f"{path}: sample_rate={q!r}; expected a number in (0, 1]")
    if not isinstance(privacy["steps"], int) or privacy["steps"] < 1:
        raise RunnerError(f"{path}: steps={privacy['steps']!r}; expected a positive integer")
    if privacy["private"] and not privacy["noise_multiplier"] >= 0:
        raise RunnerError(
            f"{path}: noise_multiplier={privacy['noise_multiplier']!r}; expected >= 0"
        )
    if privacy["private"] and not 0 < (privacy.get("delta") or 0) < 1:
        raise RunnerError(f"{path}: delta={privacy.get('delta')!r}; expected 0 < delta < 1")
    if not privacy["expected_batch_size"] > 0:
        raise RunnerError(f"{path}: expected_batch_size must be positive")
    return privacy


def training_config(training: dict) -> dict:
    unknown = sorted(set(training) - set(TRAINING_DEFAULTS))
    if unknown:
        raise RunnerError(
            f"training.{unknown[0]}: unknown key; expected one of {', '.join(TRAINING_DEFAULTS)}"
        )
    cfg = {**TRAINING_DEFAULTS, **training}
    if cfg["schedule"] not in schedule.SCHEDULES:
        expected = ", ".join(schedule.SCHEDULES)
        raise RunnerError(f"training.schedule={cfg['schedule']!r}; expected one of {expected}")
    if not isinstance(cfg["devices"], int) or cfg["devices"] < 1:
        raise RunnerError(f"training.devices={cfg['devices']!r}; expected an integer >= 1")
    if int(cfg["eval_every"]) < 1:
        raise RunnerError(f"training.eval_every={cfg['eval_every']!r}; expected >= 1")
    return cfg


def model_spec(model: dict, num_classes: int, image_size: int) -> ResNetSpec:
    model = dict(model)
    arch = model.pop("arch", "resnet18")
    if arch != "resnet18":
        raise RunnerError(f"model.arch={arch!r}; expected resnet18")
    unknown = sorted(set(model) - {"width", "groups", "stem"})
    if unknown:
        raise RunnerError(f"model.{unknown[0]}: unknown key; expected width, groups, stem, arch")
    try:
        spec = ResNetSpec(num_classes=num_classes, image_size=image_size, **model)
        for w in spec.widths():
            spec.gn_groups(w)
    except ValueError as err:
        raise RunnerError(str(err)) from err
    return spec


def steps_per_epoch(privacy: dict) -> int:
    """The calibrate step's value if given, else round(1/q): one expected pass over the data."""
    spe = privacy.get("steps_per_epoch")
    return int(spe) if spe else max(1, round(1.0 / privacy["sample_rate"]))


def epsilon_after(privacy: dict, epoch: int) -> float | None:
    """Epsilon spent after `epoch` (1-based) from privacy['eps_by_epoch'] (list or dict)."""
    if not privacy.get("private"):
        return None
    if epoch < 1:
        return 0.0
    by_epoch = privacy.get("eps_by_epoch")
    if isinstance(by_epoch, list) and by_epoch:
        return by_epoch[min(epoch, len(by_epoch)) - 1]
    if isinstance(by_epoch, dict):
        return by_epoch.get(str(epoch))
    return None


def epsilon_so_far(privacy: dict, lengths: list[int], steps: int) -> tuple[int, float | None]:
    """(k, epsilon after k steps) for the largest k <= `steps` the privacy file has a value for:
    an epoch's end (eps_by_epoch, `lengths` = steps per epoch) or, inside the first epoch, a
    power of 2 (eps_first_epoch_steps). (0, 0.0) before any; (steps, None) if not private."""
    if not privacy.get("private"):
        return steps, None
    ends = np.cumsum(lengths)
    done = int(np.searchsorted(ends, steps, side="right"))  # epochs finished after `steps`
    if done:
        return int(ends[done - 1]), epsilon_after(privacy, done)
    inside = [int(k) for k in privacy.get("eps_first_epoch_steps") or {} if int(k) <= steps]
    if not inside:
        return 0, 0.0
    k = max(inside)
    return k, privacy["eps_first_epoch_steps"][str(k)]


def check_consistency(data: Data, privacy: dict) -> None:
    """The privacy file must be the one calibrated for this split."""
    n_train = len(data.train)
    if "n_train" in privacy and int(privacy["n_train"]) != n_train:
        raise RunnerError(
            f"privacy n_train={privacy['n_train']} but the split has {n_train} training "
            "examples; expected the privacy file calibrated for this split"
        )


# -- pure helpers -----------------------------------------------------------------------------
def cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean softmax cross-entropy: evaluate's function, so metrics.json and evaluation agree."""
    return float(per_example_loss(logits, y).mean()) if len(y) else math.nan


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == y).mean()) if len(y) else math.nan


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB else


def predict(adapter: Adapter, data: Data, rows: np.ndarray, size: int) -> np.ndarray:
    """Logits for `rows`, in fixed-size padded chunks (one compiled shape)."""
    out = [np.zeros((0, data.num_classes), dtype=np.float32)]
    for x, n in feed.eval_chunks(data.images, rows, size):
        out.append(np.asarray(adapter.predict(x), dtype=np.float32)[:n])
    return np.concatenate(out)


def timed_step(adapter: Adapter, chunks: list, lr: float) -> tuple[float, float]:
    """(loss, seconds) of one logical step, the device's queued work included: on a GPU,
    train_step returns while the update still runs, and only synchronize() waits for it."""
    t0 = time.perf_counter()
    loss = adapter.train_step(chunks, lr)
    adapter.synchronize()
    return float(loss), time.perf_counter() - t0


# -- the run ----------------------------------------------------------------------------------
@dataclass
class Run:
    adapter: Adapter
    backend: str
    data: Data
    privacy: dict
    training: dict
    model: dict
    options: dict
    seed: int
    threads: int
    out_dir: Path
    checkpoint_dir: Path
    transfer: dict = field(default_factory=dict)  # what runner.transfer did, for metrics.json
    secure_randomness: bool = False  # plan and noise from OS entropy, not the seed (see above)

    def __post_init__(self) -> None:
        p, t = self.privacy, self.training
        # Rank 0 of a data-parallel run (and every single-process run) evaluates, checkpoints
        # and writes the outputs; the other ranks only take the steps.
        self.writer = self.adapter.rank == 0
        check_consistency(self.data, p)
        self.n_train = len(self.data.train)
        self.q = float(p["sample_rate"])
        self.total_steps = int(p["steps"])
        self.spe = steps_per_epoch(p)
        self.lengths = plan.epoch_lengths(self.total_steps, self.spe)
        self.epochs = len(self.lengths)
        self.private = bool(p["private"])
        # Clipped, noised DP gradients take a far larger step than raw ones (lr 1 with C=1 is
        # common for DP-SGD and diverges without clipping): the baseline may use its own lr.
        nonprivate_lr = t["lr_nonprivate"]
        self.base_lr = float(t["lr"] if self.private or nonprivate_lr is None else nonprivate_lr)
        try:
            self.physical = plan.physical_batch_size(
                p["expected_batch_size"], t["physical_batch_size"]
            )
        except ValueError as err:
            raise RunnerError(str(err)) from err
        self.warmup = schedule.warmup_steps(t["warmup_epochs"], self.spe, self.total_steps)
        self.step_config = StepConfig(
            private=self.private,
            clip_norm=float(t["clip_norm"]),
            noise_multiplier=float(p["noise_multiplier"]) if self.private else 0.0,
            expected_batch_size=float(p["expected_batch_size"]),
            momentum=float(t["momentum"]),
            physical_batch_size=self.physical,
        )
        self.eps_note = (
            f"{p.get('accountant', '?')}, delta={p.get('delta', '?')}, "
            f"{p.get('sampling', 'poisson')} sampling"
            if self.private
            else "non-private"
        )

    # -- checkpoint -------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """What must match for a checkpoint to be resumed (else it belongs to another run)."""
        keys = ("private", "sample_rate", "steps", "noise_multiplier", "expected_batch_size")
        ident = {
            "backend": self.backend,
            "options": self.options,
            "seed": self.seed,
            "model": self.model,
            "training": self.training,
            "privacy": {k: self.privacy[k] for k in keys},
            "steps_per_epoch": self.spe,
            "train": hashlib.sha256(self.data.train.tobytes()).hexdigest(),
        }
        if self.secure_randomness:  # only then: earlier runs' checkpoints stay resumable
            ident["secure_randomness"] = True
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    def load_state(self) -> dict | None:
        path = self.checkpoint_dir / STATE_FILE
        if not path.exists():
            return None
        try:
            state = json.loads(path.read_text())
        except json.JSONDecodeError:
            log(f"checkpoint {path} is unreadable; starting from scratch")
            return None
        if state.get("version") != STATE_VERSION or state.get("fingerprint") != self.fingerprint():
            log(f"checkpoint {path} belongs to another configuration; starting from scratch")
            return None
        if not (self.checkpoint_dir / state["adapter_checkpoint"]).exists():
            log(f"checkpoint {path} names a missing adapter checkpoint; starting from scratch")
            return None
        return state

    def save_state(self, state: dict) -> None:
        """Adapter checkpoint into a fresh epoch folder, then state.json (atomic), then cleanup.

        A kill at any point leaves state.json naming a complete checkpoint (or none).
        """
        name = f"epoch-{state['epoch']:05d}"
        folder = self.checkpoint_dir / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self.adapter.save_checkpoint(folder / "adapter.ckpt")
        atomic.write_json(
            self.checkpoint_dir / STATE_FILE,
            {**state, "adapter_checkpoint": f"{name}/adapter.ckpt"},
        )
        for old in self.checkpoint_dir.glob("epoch-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    def remove_checkpoint(self) -> None:
        (self.checkpoint_dir / STATE_FILE).unlink(missing_ok=True)
        for tmp in self.checkpoint_dir.glob(f".{STATE_FILE}.*.tmp"):  # left by a kill mid-write
            tmp.unlink(missing_ok=True)
        for old in self.checkpoint_dir.glob("epoch-*"):
            shutil.rmtree(old, ignore_errors=True)
        with contextlib.suppress(OSError):  # not empty: someone else's files, leave them
            self.checkpoint_dir.rmdir()

    # -- training ---------------------------------------------------------------------------
    def fresh_state(self) -> dict:
        state = {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint(),
            "epoch": 0,
            "history": [],
            "resumes": 0,
            "timing": {
                "step_time_first_s": None,  # the run's first step: compilation / warm-up
                "warmup_steps_s": [],  # first step after each (re)start, excluded from steady
                "steady_steps_s": [],
                "steady_examples": 0,
                "epochs": [],  # per epoch: steps, train seconds, whether it held a warm-up step
                "eval_seconds": 0.0,
                "peak_rss_mb": 0.0,
                "skipped_empty_steps": 0,
            },
        }
        if self.secure_randomness:
            state["secret_root"] = launch.secret_root()
        return state

    def random_root(self, state: dict) -> int:
        """What the plan, augmentation and noise of every epoch derive from (module docstring)."""
        return state["secret_root"] if self.secure_randomness else self.seed

    def evaluate_test(self) -> tuple[np.ndarray, float, float]:
        logits = predict(self.adapter, self.data, self.data.test, self.physical)
        y = self.data.labels[self.data.test]
        return logits, cross_entropy(logits, y), accuracy(logits, y)

    def learning_rate(self, step: int) -> float:
        """The rate of 0-based global `step`: warm-up, then the configured schedule."""
        return schedule.learning_rate(
            step, self.total_steps, self.base_lr, self.training["schedule"], self.warmup
        )

    def chunks(self, positions: np.ndarray, aug: np.random.Generator | None) -> list:
        """The padded chunks of one logical batch (positions into the training rows)."""
        data = self.data
        return [
            feed.make_batch(data.images, data.labels, data.train[pos], mask, aug)
            for pos, mask in plan.chunk_indices(positions, self.physical)
        ]

    def train(self) -> dict:
        a, t = self.adapter, self.training
        a.secure_noise = self.secure_randomness
        a.setup_training(self.step_config)
        state = self.load_state()
        if state is None:
            state = self.fresh_state()
        else:
            a.load_checkpoint(self.checkpoint_dir / state["adapter_checkpoint"])
            state["resumes"] += 1
            log(
                f"resumed from checkpoint {self.checkpoint_dir / STATE_FILE} after epoch "
                f"{state['epoch']}/{self.epochs}"
            )
        timing = state["timing"]
        log(
            f"training {self.backend} ({a.mode or self.backend}): {self.epochs} epochs, "
            f"{self.total_steps} steps ({self.spe}/epoch), q={self.q:.6g}, "
            f"B={self.step_config.expected_batch_size:g}, physical batch {self.physical}, "
            f"private={self.private}, sigma={self.step_config.noise_multiplier:g}, "
            f"C={self.step_config.clip_norm:g}, n_train={self.n_train}, threads={self.threads}, "
            + (
                "plan and noise from OS entropy (secure_randomness; not recorded)"
                if self.secure_randomness
                else f"plan and noise from seed {self.seed}"
            )
        )
        test_logits = None
        warm_pending = True  # the first step of this process compiles / warms up
        root = self.random_root(state)
        for epoch in range(state["epoch"] + 1, self.epochs + 1):
            a.reseed(plan.noise_seed(root, epoch))
            batches = plan.epoch_plan(self.n_train, self.q, self.lengths[epoch - 1], root, epoch)
            aug = plan.epoch_rng(root, epoch, plan.AUGMENT_STREAM) if t["augment"] else None
            t_epoch = time.perf_counter()
            loss_sum, loss_n, held_warmup = 0.0, 0, False
            log_every = max(1, len(batches) // 4)
            last_log = time.monotonic()
            for i, positions in enumerate(batches):
                step = (epoch - 1) * self.spe + i
                lr = self.learning_rate(step)
                b = len(positions)
                if b == 0 and not self.private:
                    # A non-private step has no gradient to average; a private one still adds
                    # noise (the accountant counts it), so only this case is skipped.
                    timing["skipped_empty_steps"] += 1
                    continue
                loss, dt = timed_step(a, self.chunks(positions, aug), lr)
                if b and not math.isfinite(loss):
                    raise NonFiniteLoss(
                        f"loss is {loss} at step {step + 1} (epoch {epoch}, batch of {b}, "
                        f"lr {lr:.4g}); stopping: lower training.lr or check the data"
                    )
                if warm_pending:
                    warm_pending, held_warmup = False, True
                    timing["warmup_steps_s"].append(dt)
                    if timing["step_time_first_s"] is None:
                        timing["step_time_first_s"] = dt
                else:
                    timing["steady_steps_s"].append(dt)
                    timing["steady_examples"] += b
                if b:
                    loss_sum += loss * b
                    loss_n += b
                due = (i + 1) % log_every == 0 or time.monotonic() - last_log > LOG_EVERY_S
                if i == 0 or due or i + 1 == len(batches):
                    last_log = time.monotonic()
                    k, eps = epsilon_so_far(self.privacy, self.lengths, step + 1)
                    log(
                        f"epoch {epoch}/{self.epochs} step {i + 1}/{len(batches)} "
                        f"(global {step + 1}/{self.total_steps}) loss {loss:.4f} lr {lr:.4g} "
                        f"batch {b} step {dt * 1e3:.1f} ms ({b / dt if dt > 0 else 0:.1f} ex/s) "
                        f"eps so far {_fmt_eps(eps)}"
                        + (f" after {k} steps" if eps is not None else "")
                        + f" ({self.eps_note})"
                    )
            train_seconds = time.perf_counter() - t_epoch
            timing["epochs"].append(
                {
                    "epoch": epoch,
                    "steps": len(batches),
                    "seconds": train_seconds,
                    "warmup": held_warmup,
                }
            )
            row = {
                "epoch": epoch,
                "step": (epoch - 1) * self.spe + len(batches),
                "lr": lr,
                "train_loss": loss_sum / loss_n if loss_n else math.nan,
                "test_loss": math.nan,
                "test_accuracy": math.nan,
                "epsilon": epsilon_after(self.privacy, epoch),
                "seconds": sum(e["seconds"] for e in timing["epochs"]),
            }
            if self.writer and (epoch % int(t["eval_every"]) == 0 or epoch == self.epochs):
                t0 = time.perf_counter()
                test_logits, row["test_loss"], row["test_accuracy"] = self.evaluate_test()
                timing["eval_seconds"] += time.perf_counter() - t0
            state["history"].append(row)
            timing["peak_rss_mb"] = max(timing["peak_rss_mb"], peak_rss_mb())
            log(
                f"epoch {epoch}/{self.epochs} done in {train_seconds:.2f} s: train loss "
                f"{row['train_loss']:.4f} test loss {row['test_loss']:.4f} test acc "
                f"{row['test_accuracy']:.4f} eps {_fmt_eps(row['epsilon'])} ({self.eps_note})"
            )
            state["epoch"] = epoch
            if self.writer:
                self.save_state(state)
        if not self.writer:  # another rank of a data-parallel run: rank 0 writes
            return state
        if test_logits is None:
            test_logits = self.evaluate_test()[0]  # resumed after the last epoch's checkpoint
        self.write_outputs(state, test_logits)
        self.remove_checkpoint()
        return state

    # -- outputs ----------------------------------------------------------------------------
    def write_outputs(self, state: dict, test_logits: np.ndarray) -> dict:
        a, data, timing = self.adapter, self.data, state["timing"]
        logits = {"test": test_logits}
        for part in ("train", "holdout"):
            logits[part] = predict(a, data, getattr(data, part), self.physical)
        arrays = {}
        for part in ("train", "holdout", "test"):
            idx = getattr(data, part)
            arrays[f"{part}_logits"] = logits[part]
            arrays[f"{part}_labels"] = data.labels[idx]
            arrays[f"{part}_indices"] = idx
        y = {part: data.labels[getattr(data, part)] for part in logits}

        steady = timing["steady_steps_s"]
        steady_epochs = [e for e in timing["epochs"] if not e["warmup"]] or timing["epochs"]
        epoch_steps = sum(e["steps"] for e in steady_epochs)
        epoch_secs = sum(e["seconds"] for e in steady_epochs)
        backend_eps = None
        if self.private:
            try:
                backend_eps = a.backend_epsilon(
                    self.q, self.total_steps, float(self.privacy["delta"])
                )
            except Exception as err:  # a reporting failure must not discard the trained run
                log(f"warning: {self.backend}'s own epsilon failed: {type(err).__name__}: {err}")
                backend_eps = {"error": f"{type(err).__name__}: {err}"}
        device_peak = a.peak_memory_bytes()
        versions = {"python": platform.python_version(), "numpy": np.__version__}
        versions.update(a.versions())

        metrics = {
            "backend": self.backend,
            "mode": a.mode or self.backend,
            "split": data.split_name,
            "level": self.privacy.get("level"),
            "seed": self.seed,
            **outputs.flat_scalars(self.privacy),
            "backend_epsilon": (backend_eps or {}).get("epsilon"),
            "backend_accountant": (backend_eps or {}).get("accountant"),
            **outputs.flat_scalars(
                {
                    k: v
                    for k, v in (backend_eps or {}).items()
                    if k not in ("epsilon", "accountant")
                },
                "backend_",
            ),
            "test_accuracy": accuracy(logits["test"], y["test"]),
            "test_loss": cross_entropy(logits["test"], y["test"]),
            "train_accuracy": accuracy(logits["train"], y["train"]),
            "train_loss": cross_entropy(logits["train"], y["train"]),
            "holdout_accuracy": accuracy(logits["holdout"], y["holdout"]),
            "holdout_loss": cross_entropy(logits["holdout"], y["holdout"]),
            "n_train": self.n_train,
            "n_holdout": len(data.holdout),
            "n_test": len(data.test),
            "num_classes": data.num_classes,
            "image_size": data.image_size,
            "num_params": a.num_params(),
            "epochs_trained": state["epoch"],
            "steps_trained": self.total_steps,
            "steps_per_epoch": self.spe,
            "skipped_empty_steps": timing["skipped_empty_steps"],
            "physical_batch_size": self.physical,
            "clip_norm": self.step_config.clip_norm,
            "lr": self.base_lr,
            "momentum": self.step_config.momentum,
            "schedule": self.training["schedule"],
            "warmup_steps": self.warmup,
            "augment": bool(self.training["augment"]),
            "seconds_per_epoch": epoch_secs / epoch_steps * self.spe if epoch_steps else None,
            "seconds_train_total": sum(e["seconds"] for e in timing["epochs"]),
            "seconds_eval_total": timing["eval_seconds"],
            "step_time_first_s": timing["step_time_first_s"],
            "step_time_steady_s": float(np.median(steady)) if steady else None,
            "step_time_steady_mean_s": float(np.mean(steady)) if steady else None,
            "steady_steps": len(steady),
            "examples_per_s": timing["steady_examples"] / sum(steady) if steady else None,
            "peak_rss_mb": max(timing["peak_rss_mb"], peak_rss_mb()),
            "peak_device_memory_mb": device_peak / 2**20 if device_peak is not None else None,
            "device": a.device(),
            "precision": self.training["precision"],
            "deterministic": bool(self.training["deterministic"]),
            "secure_randomness": self.secure_randomness,
            "threads": self.threads,
            "devices": int(self.training["devices"]),
            "resumes": state["resumes"],
            **self.transfer,
            **{f"version_{k}": str(v) for k, v in versions.items()},
        }
        out = self.out_dir
        atomic.write_npz(out / "predictions.npz", arrays)
        atomic.write_npz(out / "weights.npz", a.get_weights())
        outputs.write_history(out / "history.csv", state["history"])
        atomic.write_json(out / "metrics.json", metrics)
        log(
            f"done: test accuracy {metrics['test_accuracy']:.4f} loss {metrics['test_loss']:.4f}, "
            f"train accuracy {metrics['train_accuracy']:.4f}, epsilon "
            f"{_fmt_eps(metrics.get('epsilon'))} ({self.eps_note}); outputs in {out}"
        )
        return metrics


def _fmt_eps(eps) -> str:
    return "n/a" if eps is None else f"{eps:.4g}"
