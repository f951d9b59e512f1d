# Report stage: each run's predictions -> evaluation.json (long-tail metrics, membership
# inference) and evaluation.npz (per-example losses, ROC points): the one metrics engine, which
# the figures read; every run's metrics.json and evaluation.json -> results/<exp>/summary.csv
# (one tidy row per run, every config parameter as a column); figures and the report build on
# them.


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
        json=f"{RUN}/evaluation.json",
        # Per-example losses and ROC points, too long for the JSON: the membership figures'.
        npz=f"{RUN}/evaluation.npz",
    log:
        str(RESULTS / "logs/evaluate/{split}/{backend}/{level}/{variant}/seed{seed}.log"),
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
            out=output.json,
            arrays=output.npz,
            seed=wildcards.seed,
        )


# Published numbers beside ours (the config's `paper:` rows), with the scale we ran at.
rule paper_comparison:
    input:
        summary=str(RESULTS / "summary.csv"),
    output:
        report(
            str(RESULTS / "paper_comparison.csv"),
            caption="../report/paper_comparison.rst",
            category="Paper comparison",
            labels={"table": "published vs ours"},
        ),
    log:
        str(RESULTS / "logs/paper_comparison.log"),
    localrule: True
    threads: 1
    params:
        paper=config["paper"],
        scale=config["scale"] or "",
    run:
        run_step(
            "dpscale.report.paper",
            log,
            sys.executable,
            threads,
            summary=input.summary,
            paper=params.paper,
            scale=params.scale,
            out=output[0],
        )


# Large-batch simulations (Sander et al. 2023) beside the real large-batch runs they predict.
rule simulation_check:
    input:
        summary=str(RESULTS / "summary.csv"),
    output:
        report(
            str(RESULTS / "simulation_check.csv"),
            caption="../report/simulation_check.rst",
            category="Paper comparison",
            labels={"table": "simulated vs real large batch"},
        ),
    log:
        str(RESULTS / "logs/simulation_check.log"),
    localrule: True
    threads: 1
    run:
        run_step(
            "dpscale.report.paper",
            log,
            sys.executable,
            threads,
            summary=input.summary,
            simulation_out=output[0],
        )
