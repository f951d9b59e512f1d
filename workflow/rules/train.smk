# One training rule per backend, all from one template: the backend's venv runs dpscale.runner.
# Adding a backend: `use rule train as train_<name> with:` and its wildcard constraint (below).


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
    threads: 4
    resources:
        runtime=train_runtime,
    params:
        python=lambda w: env_python(w.backend),
        checkpoint=checkpoint_dir,
    run:
        run_step(
            "dpscale.runner",
            log,
            params.python,
            threads,
            **train_args(wildcards, input, output, params),
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
