# Privacy stage: the one accountant turns each level (none / eps<target> / sigma<multiplier>)
# into sigma, sample rate, steps and epsilon for one split (n_train is the split's).
# Every backend trains with the numbers in this file; see dpscale.privacy.


rule calibrate:
    input:
        split=split_file(),
    output:
        privacy_file(),
    log:
        str(RESULTS / "logs/calibrate/{split}/{level}.log"),
    threads: 1
    params:
        # Only what the accounting depends on: changing lr or the model keeps the plan.
        batch_size=config["training"]["batch_size"],
        epochs=config["training"]["epochs"],
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
            batch_size=params.batch_size,
            epochs=params.epochs,
            delta=params.delta,
            accountant=params.accountant,
            out=output[0],
        )


# Every privacy file of the experiment: `snakemake privacy`.
rule privacy:
    input:
        [privacy_file(s, level) for s in SPLITS for level in LEVELS],
