# One training rule per backend, all from one template: the backend's venv runs dpscale.runner.
# Adding a backend: `use rule train as train_<name> with:` and its wildcard constraint (below).
# One thread per training job locally: `--cores N` then trains N runs at once, which keeps every
# core busy through the single-threaded imports and XLA compiles (the default demo: 451 s at 2
# threads one run at a time, 320 s at 1 thread two at a time, on 2 cores). The SLURM profile
# gives each training job 8; `--set-threads train_<backend>=K` gives one run K threads.


rule train:
    input:
        unpack(train_inputs),
    output:
        metrics=f"{RUN}/metrics.json",
        history=f"{RUN}/history.csv",
        predictions=f"{RUN}/predictions.npz",
        weights=f"{RUN}/weights.npz",
    log:
        str(RESULTS / "logs/train/{split}/{backend}/{level}/{variant}/seed{seed}.log"),
    wildcard_constraints:
        backend="template",
    threads: 1
    resources:
        runtime=train_runtime,
        gpu=train_gpus,
    params:
        python=lambda w: env_python(w.backend),
        checkpoint=checkpoint_dir,
    run:
        run_step(
            "dpscale.runner",
            log,
            params.python,
            threads,
            gpus=resources.gpu,  # on a workstation, one of its GPUs (`--resources gpu=N`)
            gpu_total=declared_gpus(),
            **train_args(wildcards, input, output, params, resources),
        )


use rule train as train_reference with:
    wildcard_constraints:
        backend="reference",


use rule train as train_opacus with:
    wildcard_constraints:
        backend="opacus",


use rule train as train_tfprivacy with:
    wildcard_constraints:
        backend="tfprivacy",


use rule train as train_objax with:
    wildcard_constraints:
        backend="objax",


use rule train as train_jax with:
    wildcard_constraints:
        backend="jax",


use rule train as train_jaxprivacy with:
    wildcard_constraints:
        backend="jaxprivacy",


# Transfer (config `transfer:`): one non-private pre-training on the public split, whose body
# every run above starts from (train_inputs adds it as `init`). Outside the privacy guarantee
# by construction: the public classes are disjoint from the private ones.
rule pretrain:
    input:
        unpack(pretrain_inputs),
    output:
        privacy=f"{PRETRAIN}/privacy.json",
        metrics=f"{PRETRAIN}/metrics.json",
        history=f"{PRETRAIN}/history.csv",
        predictions=f"{PRETRAIN}/predictions.npz",
        weights=f"{PRETRAIN}/weights.npz",
    log:
        calibrate=str(RESULTS / "logs/pretrain/calibrate.log"),
        train=str(RESULTS / "logs/pretrain/train.log"),
    threads: 1
    resources:
        runtime=train_runtime,
    params:
        python=lambda w: env_python(config["transfer"]["backend"]),
        checkpoint=str(RESULTS / "checkpoints/pretrain"),
    run:
        run_step(
            "dpscale.privacy.calibrate",
            log.calibrate,
            sys.executable,
            1,
            **pretrain_privacy_args(input, output),
        )
        run_step(
            "dpscale.runner",
            log.train,
            params.python,
            threads,
            **pretrain_args(input, output, params, resources),
        )
