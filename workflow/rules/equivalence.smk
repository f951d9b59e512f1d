# Equivalence: every backend takes the first few DP steps of this experiment (its model, the
# first split profile's training data, batch plan, lr schedule, momentum, clip norm) with noise
# off, from the canonical weights, in its own venv; one local step compares each to the
# reference (dpscale.equivalence). A backend outside the tolerance is reported on the report's
# first page and in its table, not raised: the report is wanted all the more then. The
# per-backend arrays are noise-free functions of the private data: temp(), deleted once read.
EQUIVALENCE = RESULTS / "equivalence"


rule equivalence_backend:
    input:
        unpack(equivalence_inputs),
    output:
        temp(str(EQUIVALENCE / "{backend}.npz")),
    log:
        str(RESULTS / "logs/equivalence/{backend}.log"),
    wildcard_constraints:
        backend="|".join(BACKENDS),
    threads: 1
    resources:
        gpu=lambda w: equivalence_gpus(),
    params:
        python=lambda w: env_python(w.backend),
    run:
        run_step(
            "dpscale.equivalence",
            log,
            params.python,
            threads,
            gpus=resources.gpu,
            gpu_total=declared_gpus(),
            **equivalence_args(wildcards, input, output, resources),
        )


rule equivalence:
    input:
        [str(EQUIVALENCE / f"{backend}.npz") for backend in BACKENDS],
    output:
        json=str(EQUIVALENCE / "equivalence.json"),
        table=report(
            str(EQUIVALENCE / "equivalence.csv"),
            caption="../report/equivalence.rst",
            category="Equivalence",
            labels={"table": "backends vs reference"},
        ),
        # The report's first page includes it (workflow/report/workflow.rst).
        page=str(EQUIVALENCE / "verdict.rst"),
    log:
        str(RESULTS / "logs/equivalence/compare.log"),
    localrule: True
    threads: 1
    params:
        reference=equivalence_reference(),
    run:
        run_step(
            "dpscale.equivalence",
            log,
            sys.executable,
            threads,
            action="compare",
            outputs=dict(zip(BACKENDS, input)),
            reference=params.reference,
            json=output.json,
            table=output.table,
            page=output.page,
        )
