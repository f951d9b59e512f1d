# Report stage: each run's predictions -> evaluation.json (long-tail metrics, membership
# inference); every run's metrics.json and evaluation.json -> results/<exp>/summary.csv (one
# tidy row per run, every config parameter as a column); figures and the report build on them.


rule aggregate:
    input:
        metrics=[f"{run}/metrics.json" for run in all_runs()],
        evaluations=[f"{run}/evaluation.json" for run in all_runs()],
    output:
        str(RESULTS / "summary.csv"),
    log:
        str(RESULTS / "logs/aggregate.log"),
    localrule: True
    threads: 1
    params:
        # The whole validated config: it becomes the summary's parameter columns.
        config=dict(config),
    run:
        run_step(
            "dpscale.report.aggregate",
            log,
            sys.executable,
            threads,
            metrics=list(input.metrics),
            evaluations=list(input.evaluations),
            config=params.config,
            out=output[0],
        )


rule evaluate:
    input:
        predictions=f"{RUN}/predictions.npz",
        privacy=privacy_file(),
        split=split_file(),
    output:
        f"{RUN}/evaluation.json",
    log:
        str(RESULTS / "logs/evaluate/{split}/{backend}/{level}/seed{seed}.log"),
    threads: 1
    run:
        run_step(
            "dpscale.metrics.evaluate",
            log,
            sys.executable,
            threads,
            predictions=input.predictions,
            privacy=input.privacy,
            split=input.split,
            out=output[0],
            seed=wildcards.seed,
        )
