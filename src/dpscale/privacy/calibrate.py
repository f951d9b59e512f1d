"""`python -m dpscale.privacy.calibrate`: a level -> privacy/<split>/<variant>/<level>.json.

The only place the pipeline computes epsilon for planning. From the split's training-set size
and the variant's batch size, epochs, delta and headline accountant it fixes the Poisson sample
rate q, the step count and sigma (calibrated for eps<target>, given for sigma<multiplier>, 0
for none) and records epsilon under both accountants, plus the headline epsilon after each
epoch so the training log can show epsilon so far without dp-accounting in a backend's venv.

Large-batch simulation (Sander et al. 2023, `simulate_batch_size` B0): the plan of the large
run (batch B0, its steps S, its sigma0) is fixed first; this run then trains at the small batch
B for the same S steps with sigma0 * B / B0, so that sigma / B, the noise on the averaged
gradient, is the large run's. Its `epsilon` stays this run's own (much weaker) guarantee; the
large run's epsilon, the one its accuracy predicts, is `simulated_epsilon`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dpscale import atomic, levels
from dpscale.config import ConfigError
from dpscale.privacy import accountant as acc


def schedule(n_train: int, batch_size: int, epochs: float) -> dict:
    """Sample rate, steps per epoch and steps: the batch plan the accountant assumes."""
    if n_train < 1:
        raise ConfigError("config error: splits: the training set is empty; expected n_train >= 1")
    q = batch_size / n_train
    if q > 1:
        raise ConfigError(
            f"config error: training.batch_size: {batch_size} is larger than the training set "
            f"({n_train} examples); expected batch_size <= n_train"
        )
    if not epochs > 0:
        raise ConfigError(f"config error: training.epochs: {epochs}; expected a positive number")
    steps_per_epoch = max(1, round(1 / q))
    return {
        "sample_rate": q,
        "steps_per_epoch": steps_per_epoch,
        "steps": max(1, round(epochs * steps_per_epoch)),
        "expected_batch_size": q * n_train,
    }


def privacy_plan(
    level: str,
    n_train: int,
    batch_size: int,
    epochs: float,
    delta: float,
    accountant: str = "rdp",
    progress: Callable[[str], None] | None = None,
    variant: str = "default",
    simulate_batch_size: int | None = None,
) -> dict:
    """The privacy file's content for one level (see docs/architecture.md).

    Pure but for `progress`, which receives progress lines (PLD takes seconds per epsilon).
    """
    say = progress or (lambda _line: None)
    if accountant not in acc.ACCOUNTANTS:
        raise ConfigError(
            f"config error: privacy.accountant: {accountant!r}; expected one of rdp, pld"
        )
    try:
        parsed = levels.parse(level)
    except levels.LevelError as err:
        raise ConfigError(f"config error: privacy.levels: {err}") from None
    plan = schedule(n_train, batch_size, epochs)
    large, large_epochs = None, None
    if simulate_batch_size is not None:
        if not simulate_batch_size > batch_size:
            raise ConfigError(
                f"config error: variants.{variant}.simulate_batch_size: {simulate_batch_size} "
                f"is not above training.batch_size {batch_size}; expected the larger batch"
            )
        # The large run's steps: this run takes as many, at its own (smaller) sample rate.
        large = schedule(n_train, simulate_batch_size, epochs)
        plan["steps"] = large["steps"]
        large_epochs, epochs = epochs, large["steps"] / plan["steps_per_epoch"]
    q, steps, per_epoch = plan["sample_rate"], plan["steps"], plan["steps_per_epoch"]
    n_epochs = len(acc.epoch_steps(steps, per_epoch))
    record = {
        "level": parsed.name,
        "variant": variant,
        "private": parsed.private,
        "noise_multiplier": 0.0,
        **plan,
        "n_train": int(n_train),
        "epochs": epochs,
        "delta": delta,
        "epsilon": None,
        "accountant": accountant,
        "eps_rdp": None,
        "eps_pld": None,
        "rdp_orders": list(acc.RDP_ORDERS),
        "pld_value_discretization_interval": None,
        "sampling": acc.SAMPLING,
        "neighboring_relation": acc.NEIGHBORING,
        "target_epsilon": parsed.target_epsilon,
        "calibration_rtol": None,
        # Large-batch simulation only (see the module docstring); null otherwise.
        "simulated_batch_size": simulate_batch_size,
        "simulated_sample_rate": large["sample_rate"] if large else None,
        "simulated_epochs": large_epochs,
        "simulated_noise_multiplier": None,
        "simulated_epsilon": None,
        "epsilon_note": (
            f"epsilon is this run's own guarantee; simulated_epsilon is the predicted epsilon "
            f"of the large-batch run (batch {simulate_batch_size}, simulated_noise_multiplier, "
            f"same steps) whose accuracy this run estimates (Sander et al. 2023); this run is "
            f"not private at simulated_epsilon"
            if large
            else None
        ),
        # null = infinite epsilon (non-private); one entry per epoch either way.
        "eps_by_epoch": [None] * n_epochs,
    }
    if not parsed.private:
        return record
    if not delta < 1 / n_train:
        raise ConfigError(
            f"config error: privacy.delta: {delta:g} is not below 1/n_train = {1 / n_train:.3g} "
            f"(n_train = {n_train}); expected delta < 1/n_train"
        )
    # The level fixes the noise of the run it describes: this one, or the simulated large one.
    q_level = large["sample_rate"] if large else q
    if parsed.target_epsilon is not None:
        say(f"calibrating sigma for epsilon {parsed.target_epsilon:g} ({accountant}) ...")
        sigma = acc.calibrate_sigma(parsed.target_epsilon, q_level, steps, delta, accountant)
        record["calibration_rtol"] = acc.CALIBRATION_RTOL
        say(f"sigma = {sigma:.6g}")
    else:
        sigma = parsed.noise_multiplier  # > 0: levels.parse rejects sigma0
    if large:
        sigma0 = record["simulated_noise_multiplier"] = sigma
        eps0 = record["simulated_epsilon"] = acc.epsilon(q_level, sigma, steps, delta, accountant)
        # sigma / B held fixed, with B the expected batch sizes q n (Sander et al. 2023).
        sigma = sigma0 * plan["expected_batch_size"] / large["expected_batch_size"]
        say(
            f"simulating batch {simulate_batch_size} (sigma0 {sigma0:.6g}, predicted eps "
            f"{eps0:.6g}) at batch {batch_size}: sigma {sigma:.6g}"
        )
    record["noise_multiplier"] = sigma
    record["eps_rdp"] = acc.epsilon_rdp(q, sigma, steps, delta)
    record["eps_pld"] = acc.epsilon_pld(q, sigma, steps, delta)
    record["pld_value_discretization_interval"] = acc.pld_discretization_interval(
        q, sigma, steps, delta
    )
    record["epsilon"] = record[f"eps_{accountant}"]
    by_epoch = acc.epoch_steps(steps, per_epoch)
    # The last epoch is the whole run, already computed above.
    every = max(1, len(by_epoch) // 10)
    eps_by_epoch = []
    for epoch, k in enumerate(by_epoch[:-1], start=1):
        eps_by_epoch.append(acc.epsilon(q, sigma, k, delta, accountant))
        if epoch % every == 0:
            say(f"epoch {epoch}/{len(by_epoch)}: eps {eps_by_epoch[-1]:.6g} after {k} steps")
    record["eps_by_epoch"] = [*eps_by_epoch, record["epsilon"]]
    # Inside the first epoch, at 1, 2, 4, ... steps: the training log's "eps so far" there.
    record["eps_first_epoch_steps"] = {
        str(k): acc.epsilon(q, sigma, k, delta, accountant)
        for k in (2**i for i in range(by_epoch[0].bit_length()))
        if k < by_epoch[0]
    }
    return record


def n_train_of(split_path: str | Path) -> int:
    """Training-set size of a split file (`train` indices, docs/architecture.md)."""
    with np.load(split_path, allow_pickle=False) as split:
        if "train" not in split.files:
            raise ConfigError(
                f"{split_path}: no 'train' array; expected a split file with train/holdout/test"
            )
        return int(split["train"].shape[0])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", required=True, help="results/<exp>/splits/<split>.npz")
    parser.add_argument("--level", required=True, help="none, eps<target> or sigma<multiplier>")
    parser.add_argument("--batch-size", type=int, required=True, help="training.batch_size")
    parser.add_argument("--epochs", type=float, required=True, help="training.epochs")
    parser.add_argument("--delta", type=float, required=True, help="privacy.delta")
    parser.add_argument("--accountant", default="rdp", choices=acc.ACCOUNTANTS)
    parser.add_argument("--variant", default="default", help="the variant's name (recorded)")
    parser.add_argument(
        "--simulate-batch-size", type=int, help="B0 of a simulated large-batch run (Sander et al.)"
    )
    parser.add_argument("--out", required=True, help="the privacy file to write")
    parser.add_argument("--threads", type=int, default=1, help="unused: accounting is serial")
    args = parser.parse_args(argv)
    # dp-accounting warns for every RDP order it drops at small sigma; dropping orders only
    # loosens the bound, and the warnings would bury the progress lines.
    logging.getLogger("absl").setLevel(logging.ERROR)

    start = time.perf_counter()
    try:
        n_train = n_train_of(args.split)
        print(
            f"calibrate {args.level} ({args.variant}): n_train={n_train} "
            f"batch_size={args.batch_size} simulate_batch_size={args.simulate_batch_size} "
            f"epochs={args.epochs:g} delta={args.delta:g} accountant={args.accountant} "
            f"(sampling {acc.SAMPLING})",
            flush=True,
        )
        epochs = int(args.epochs) if args.epochs == int(args.epochs) else args.epochs
        record = privacy_plan(
            args.level,
            n_train,
            args.batch_size,
            epochs,
            args.delta,
            args.accountant,
            progress=lambda line: print(line, flush=True),
            variant=args.variant,
            simulate_batch_size=args.simulate_batch_size,
        )
    except (ValueError, OSError) as err:
        sys.exit(f"dpscale.privacy.calibrate: {err}")
    # Strict: a non-finite number in a privacy record is a bug, never an epsilon to read as missing.
    atomic.write_json(args.out, record, strict=True)
    if record["private"]:
        print(
            f"sigma={record['noise_multiplier']:.6g} q={record['sample_rate']:.6g} "
            f"steps={record['steps']} ({record['steps_per_epoch']}/epoch): "
            f"eps={record['epsilon']:.6g} ({args.accountant}, delta={args.delta:g}, poisson); "
            f"eps_rdp={record['eps_rdp']:.6g} eps_pld={record['eps_pld']:.6g}",
            flush=True,
        )
    else:
        print(f"non-private: q={record['sample_rate']:.6g} steps={record['steps']}", flush=True)
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
