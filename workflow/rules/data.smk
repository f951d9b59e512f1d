# Data stage: fetch (url source only) -> prepare (decode once into uint8 arrays) -> split.
# Prepared data is shared by every experiment; splits belong to the experiment.
# The config -> arguments mapping lives in dpscale.data.rules.
from dpscale.data import rules as dp_data

DATASET_DIR = f"resources/datasets/{DATASET['name']}"
RAW_DIR = f"{DATASET_DIR}/raw"


rule fetch:
    output:
        directory(RAW_DIR),
    log:
        f"{DATASET_DIR}/logs/fetch.log",
    # Downloads need the network: on a cluster that is the submitting host.
    localrule: True
    params:
        url=DATASET["url"],
        sha256=DATASET["sha256"],
    run:
        run_step(
            "dpscale.data.fetch",
            log,
            sys.executable,
            threads,
            url=params.url,
            sha256=params.sha256,
            out_dir=output[0],
        )


rule prepare:
    input:
        unpack(lambda w: dp_data.prepare_inputs(DATASET, RAW_DIR)),
    output:
        **data_files(),
    log:
        f"{DATASET_DIR}/logs/prepare_{DATASET['resolution']}px.log",
    threads: 16
    params:
        # Any change of the dataset settings, or of any file under an image folder (its
        # listing), re-prepares (Snakemake's params rerun trigger).
        dataset=lambda w: dp_data.prepare_params(DATASET),
    run:
        run_step(
            "dpscale.data.prepare",
            log,
            sys.executable,
            threads,
            **dp_data.prepare_args(DATASET, input, DATA_DIR),
        )


rule split:
    input:
        labels=data_files()["labels.npy"],
        manifest=data_files()["manifest.json"],
    output:
        split_file(),
    log:
        str(RESULTS / "logs/split/{split}.log"),
    threads: 1
    params:
        splits=lambda w: {k: v for k, v in config["splits"].items() if k != "profiles"},
        profile=lambda w: config["splits"]["profiles"][w.split],
    run:
        run_step(
            "dpscale.data.split",
            log,
            sys.executable,
            threads,
            **dp_data.split_args(
                config["splits"], wildcards.split, input.labels, input.manifest, output[0]
            ),
        )


# The transfer experiment's public split: classes disjoint from every private split's.
rule split_public:
    input:
        labels=data_files()["labels.npy"],
        manifest=data_files()["manifest.json"],
    output:
        split_file("public"),
    log:
        str(RESULTS / "logs/split/public.log"),
    threads: 1
    params:
        splits=lambda w: {k: v for k, v in config["splits"].items() if k != "profiles"},
        transfer=lambda w: config["transfer"],
    run:
        run_step(
            "dpscale.data.split",
            log,
            sys.executable,
            threads,
            **dp_data.public_split_args(
                config["splits"], config["transfer"], input.labels, input.manifest, output[0]
            ),
        )


# Every split of the experiment (and so the prepared data): `snakemake splits`.
rule splits:
    input:
        [split_file(s) for s in SPLITS],
    localrule: True
