# Report stage: every run's metrics.json -> results/<exp>/summary.csv (one tidy row per run,
# every config parameter as a column); figures and the HTML report build on the summary.


rule aggregate:
    input:
        metrics=[f"{run}/metrics.json" for run in all_runs()],
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
            config=params.config,
            out=output[0],
        )
