"""`python -m dpscale.runner`: train one run in a backend's venv (arguments of the train rule)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dpscale.backends.base import DeviceError, Runtime
from dpscale.runner import launch, loop, transfer
from dpscale.runner.loop import (
    Run,
    RunnerError,
    check_consistency,
    load_data,
    load_privacy,
    log,
    model_spec,
    training_config,
)


def _json(name: str):
    def parse(text: str):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise argparse.ArgumentTypeError(f"--{name}: not valid JSON ({err})") from err
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"--{name}: {text!r}; expected a JSON object")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dpscale.runner", description=__doc__)
    p.add_argument("--backend", required=True, help="adapter module dpscale.backends.<name>")
    p.add_argument("--data-dir", required=True, type=Path, help="holds images.npy, labels.npy")
    p.add_argument("--split", required=True, type=Path, help="the split .npz")
    p.add_argument("--privacy", required=True, type=Path, help="the calibrate step's JSON")
    p.add_argument("--model", type=_json("model"), default={}, help="model config (JSON)")
    p.add_argument("--training", type=_json("training"), default={}, help="training (JSON)")
    p.add_argument("--options", type=_json("options"), default={}, help="backend options (JSON)")
    p.add_argument(
        "--init", type=Path, help="pre-trained weights.npz: start from its body (transfer)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--secure-randomness",
        action="store_true",
        help="batch plan and noise from OS entropy, recorded nowhere (privacy.secure_randomness)",
    )
    p.add_argument("--out-dir", required=True, type=Path)
    p.add_argument("--checkpoint-dir", required=True, type=Path)
    p.add_argument("--threads", type=int, default=int(os.environ.get("DPSCALE_THREADS", "1")))
    return p


def device_runtime(training: dict) -> Runtime:
    """The run's device policy. `cpu` hides the GPUs from every framework before it is
    imported (CUDA_VISIBLE_DEVICES; JAX_PLATFORMS also spares jax its GPU probe)."""
    try:
        runtime = Runtime(
            device=training["device"],
            precision=training["precision"],
            deterministic=bool(training["deterministic"]),
            devices=training["devices"],
        )
    except ValueError as err:
        raise RunnerError(f"training.{err}") from err
    if runtime.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["JAX_PLATFORMS"] = "cpu"
    return runtime


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    try:
        data = load_data(args.data_dir, args.split)
        privacy = load_privacy(args.privacy)
        training = training_config(args.training)
        spec = model_spec(args.model, data.num_classes, data.image_size)
        check_consistency(data, privacy)
        runtime = device_runtime(training)
        from dpscale import backends

        if runtime.devices > 1 and args.backend in backends.PROCESS_PER_DEVICE:
            if not launch.is_rank():  # the launcher: one runner per device
                sys.exit(
                    launch.run_ranks(
                        [sys.executable, "-m", "dpscale.runner", *(argv or sys.argv[1:])],
                        runtime.devices,
                        args.threads,
                    )
                )
            loop.QUIET = launch.quiet_rank()

        try:
            adapter_class = backends.load(args.backend)
        except ValueError as err:
            raise RunnerError(f"--backend: {err}") from err
        except ImportError as err:
            raise RunnerError(
                f"backend {args.backend!r} cannot be imported here ({err}); expected to run "
                f"in its venv, .venvs/{args.backend}-<hash>/bin/python (python -m dpscale.envs)"
            ) from err
        log(f"building {args.backend} adapter: {spec}, options {args.options}, seed {args.seed}")
        try:
            adapter = adapter_class(spec, args.options, args.seed, args.threads, runtime)
        except ValueError as err:  # adapters reject bad options with ValueError
            raise RunnerError(f"backend {args.backend!r}: {err}") from err
        except DeviceError as err:  # names the backend, what it sees and the fix
            raise RunnerError(str(err)) from err
        log(f"device {adapter.device()}, precision {runtime.precision}")
        try:
            transferred = transfer.start_from(
                adapter, args.backend, spec, args.init, int(training["frozen_groups"])
            )
        except transfer.TransferError as err:
            raise RunnerError(str(err)) from err
        Run(
            adapter=adapter,
            backend=args.backend,
            data=data,
            privacy=privacy,
            training=training,
            model=args.model,
            options=args.options,
            seed=args.seed,
            threads=args.threads,
            out_dir=args.out_dir,
            checkpoint_dir=args.checkpoint_dir,
            transfer=transferred,
            secure_randomness=args.secure_randomness,
        ).train()
        if runtime.devices > 1:  # the weights every rank ends with: equal, or the run is wrong
            print(f"rank {adapter.rank} weights sha256 {adapter.weights_digest()}", flush=True)
        adapter.close()
    except RunnerError as err:
        print(f"dpscale.runner: error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
