# Privacy stage: the one accountant turns each level (none / eps<target> / sigma<multiplier>)
# into sigma, sample rate, steps and epsilon for one split (n_train is the split's) and one
# variant (its batch size and epochs; a simulating variant's large batch, Sander et al. 2023).
# Every backend trains with the numbers in this file; see dpscale.privacy.


rule calibrate:
    input:
        split=split_file(),
    output:
        privacy_file(),
    log:
        str(RESULTS / "logs/calibrate/{split}/{variant}/{level}.log"),
    threads: 1
    params:
        plan=lambda w: privacy_plan(w.variant),
        delta=config["privacy"]["delta"],
        accountant=config["privacy"]["accountant"],
    run:
        run_step(
            "dpscale.privacy.calibrate",
            log,
            sys.executable,
            threads,
            split=input.split,
            level=wildcards.level,
            variant=wildcards.variant,
            **params.plan,
            delta=params.delta,
            accountant=params.accountant,
            out=output[0],
        )


# Every privacy file of the experiment: `snakemake privacy`.
rule privacy:
    input:
        [privacy_file(s, level, v) for s in SPLITS for level in LEVELS for v in VARIANTS],
