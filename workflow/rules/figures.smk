# Figures and the Snakemake report: summary.csv and the runs' outputs -> results/<exp>/figures/
# (SVG in the report, PNG beside it for the README). Metrics come from the evaluate step
# (evaluation.json/.npz), never recomputed from predictions. One rule per figure family; each runs
# `python -m dpscale.plots --figure <name>` in the base env. Report: `snakemake --report
# results/<exp>/report.html` after a run; categories below, labels let a reader filter.
from dpscale.plots.targets import FigureGrid, run_dirs

FIG = FigureGrid(
    RUN, RESULTS / "figures", SPLITS, BACKENDS, LEVELS, SEEDS, list(VARIANTS), config["figures"]
)
# What all_targets() (common.smk) adds: every figure of the experiment, SVG and PNG.
figure_targets = FIG.targets


rule fig_accuracy:
    input:
        summary=report(
            str(RESULTS / "summary.csv"),
            caption="../report/summary.rst",
            category="Summary table",
            labels={"table": "summary.csv (one row per run)"},
        ),
    output:
        svg=report(
            FIG.path("accuracy_vs_epsilon"),
            caption="../report/accuracy_vs_epsilon.rst",
            category="Accuracy vs privacy",
            # Same first label, two metrics: the report shows one row with a metric toggle.
            labels={"figure": "accuracy vs epsilon", "metric": "test accuracy"},
        ),
        png=FIG.path("accuracy_vs_epsilon", "png"),
    log:
        str(RESULTS / "logs/figures/accuracy_vs_epsilon.log"),
    localrule: True
    threads: 1
    run:
        run_step(
            "dpscale.plots",
            log,
            sys.executable,
            threads,
            figure="accuracy",
            summary=input.summary,
            svg=output.svg,
            png=output.png,
        )


rule fig_balanced_accuracy:
    input:
        summary=str(RESULTS / "summary.csv"),
    output:
        svg=report(
            FIG.path("balanced_accuracy_vs_epsilon"),
            caption="../report/accuracy_vs_epsilon.rst",
            category="Accuracy vs privacy",
            labels={"figure": "accuracy vs epsilon", "metric": "balanced accuracy"},
        ),
        png=FIG.path("balanced_accuracy_vs_epsilon", "png"),
    log:
        str(RESULTS / "logs/figures/balanced_accuracy_vs_epsilon.log"),
    localrule: True
    threads: 1
    run:
        run_step(
            "dpscale.plots",
            log,
            sys.executable,
            threads,
            figure="balanced_accuracy",
            summary=input.summary,
            svg=output.svg,
            png=output.png,
        )


rule fig_epsilon_audit:
    input:
        summary=str(RESULTS / "summary.csv"),
    output:
        svg=report(
            FIG.path("membership/epsilon_audit"),
            caption="../report/epsilon_audit.rst",
            category="Membership inference",
            subcategory="Empirical epsilon",
            labels={"figure": "empirical vs accounted epsilon"},
        ),
        png=FIG.path("membership/epsilon_audit", "png"),
    log:
        str(RESULTS / "logs/figures/epsilon_audit.log"),
    localrule: True
    threads: 1
    run:
        run_step(
            "dpscale.plots",
            log,
            sys.executable,
            threads,
            figure="audit",
            summary=input.summary,
            svg=output.svg,
            png=output.png,
        )


rule fig_seconds:
    input:
        summary=str(RESULTS / "summary.csv"),
    output:
        svg=report(
            FIG.path("runtime/seconds_per_epoch"),
            caption="../report/seconds_per_epoch.rst",
            category="Runtime",
            labels={"figure": "seconds per epoch"},
        ),
        png=FIG.path("runtime/seconds_per_epoch", "png"),
    log:
        str(RESULTS / "logs/figures/seconds_per_epoch.log"),
    localrule: True
    threads: 1
    run:
        run_step(
            "dpscale.plots",
            log,
            sys.executable,
            threads,
            figure="seconds",
            summary=input.summary,
            svg=output.svg,
            png=output.png,
        )


rule fig_step_ratio:
    input:
        summary=str(RESULTS / "summary.csv"),
    output:
        svg=report(
            FIG.path("runtime/step_time_ratio"),
            caption="../report/step_time_ratio.rst",
            category="Runtime",
            labels={"figure": "DP / non-private step time"},
        ),
        png=FIG.path("runtime/step_time_ratio", "png"),
    log:
        str(RESULTS / "logs/figures/step_time_ratio.log"),
    localrule: True
    threads: 1
    run:
        run_step(
            "dpscale.plots",
            log,
            sys.executable,
            threads,
            figure="step_ratio",
            summary=input.summary,
            svg=output.svg,
            png=output.png,
        )


rule fig_training:
    input:
        history=lambda w: FIG.run_files("history.csv", split=w.split),
        metrics=lambda w: FIG.run_files("metrics.json", split=w.split),
    output:
        svg=report(
            FIG.path("training/{split}"),
            caption="../report/training.rst",
            category="Training curves",
            labels={"figure": "loss per epoch", "split": "{split}"},
        ),
        png=FIG.path("training/{split}", "png"),
    log:
        str(RESULTS / "logs/figures/training/{split}.log"),
    localrule: True
    threads: 1
    run:
        run_step(
            "dpscale.plots",
            log,
            sys.executable,
            threads,
            figure="training",
            runs=run_dirs(input.metrics),
            svg=output.svg,
            png=output.png,
        )


rule fig_disparate:
    input:
        evaluations=lambda w: FIG.run_files("evaluation.json", split=w.split),
        metrics=lambda w: FIG.run_files("metrics.json", split=w.split),
    output:
        svg=report(
            FIG.path("disparate_impact/{split}"),
            caption="../report/disparate_impact.rst",
            category="Disparate impact",
            labels={"figure": "per-class accuracy drop", "split": "{split}"},
        ),
        png=FIG.path("disparate_impact/{split}", "png"),
    log:
        str(RESULTS / "logs/figures/disparate_impact/{split}.log"),
    localrule: True
    threads: 1
    run:
        run_step(
            "dpscale.plots",
            log,
            sys.executable,
            threads,
            figure="disparate",
            runs=run_dirs(input.metrics),
            svg=output.svg,
            png=output.png,
        )


rule fig_membership_histograms:
    input:
        arrays=lambda w: FIG.run_files("evaluation.npz", split=w.split, backend=w.backend),
        metrics=lambda w: FIG.run_files("metrics.json", split=w.split, backend=w.backend),
    output:
        svg=report(
            FIG.path("membership/histograms/{split}/{backend}"),
            caption="../report/membership_histograms.rst",
            category="Membership inference",
            subcategory="Loss histograms",
            labels={"figure": "train vs holdout loss", "split": "{split}", "backend": "{backend}"},
        ),
        png=FIG.path("membership/histograms/{split}/{backend}", "png"),
    log:
        str(RESULTS / "logs/figures/membership_histograms/{split}/{backend}.log"),
    wildcard_constraints:
        backend="|".join(BACKENDS),
    localrule: True
    threads: 1
    run:
        run_step(
            "dpscale.plots",
            log,
            sys.executable,
            threads,
            figure="mia_hist",
            runs=run_dirs(input.metrics),
            svg=output.svg,
            png=output.png,
        )


rule fig_membership_roc:
    input:
        arrays=lambda w: FIG.run_files("evaluation.npz", split=w.split),
        evaluations=lambda w: FIG.run_files("evaluation.json", split=w.split),
        metrics=lambda w: FIG.run_files("metrics.json", split=w.split),
    output:
        svg=report(
            FIG.path("membership/roc/{split}"),
            caption="../report/membership_roc.rst",
            category="Membership inference",
            subcategory="ROC curves",
            labels={"figure": "loss-attack ROC", "split": "{split}", "backend": "all (panels)"},
        ),
        png=FIG.path("membership/roc/{split}", "png"),
    log:
        str(RESULTS / "logs/figures/membership_roc/{split}.log"),
    localrule: True
    threads: 1
    run:
        run_step(
            "dpscale.plots",
            log,
            sys.executable,
            threads,
            figure="mia_roc",
            runs=run_dirs(input.metrics),
            svg=output.svg,
            png=output.png,
        )


rule fig_confusion:
    input:
        evaluations=lambda w: FIG.run_files(
            "evaluation.json", split=w.split, backend=w.backend, level=w.level, variant=w.variant
        ),
        metrics=lambda w: FIG.run_files(
            "metrics.json", split=w.split, backend=w.backend, level=w.level, variant=w.variant
        ),
    output:
        svg=report(
            FIG.path("confusion/{split}/{backend}/{level}/{variant}"),
            caption="../report/confusion.rst",
            category="Confusion matrices",
            # Per split, so that with two levels the report offers a DP / non-private toggle.
            subcategory="{split}",
            labels=lambda w: {
                "backend": w.backend,
                "split": w.split,
                "epsilon": dp_levels.text(w.level),
                "variant": w.variant,
            },
        ),
        png=FIG.path("confusion/{split}/{backend}/{level}/{variant}", "png"),
    log:
        str(RESULTS / "logs/figures/confusion/{split}/{backend}/{level}/{variant}.log"),
    wildcard_constraints:
        backend="|".join(BACKENDS),
    localrule: True
    threads: 1
    run:
        run_step(
            "dpscale.plots",
            log,
            sys.executable,
            threads,
            figure="confusion",
            runs=run_dirs(input.metrics),
            svg=output.svg,
            png=output.png,
        )


# Every figure of the experiment (and summary.csv, their input): `snakemake figures`.
rule figures:
    input:
        figure_targets(),
