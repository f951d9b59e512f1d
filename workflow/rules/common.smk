# The validated config turned into paths and targets. Rules use only the functions below.
import sys
from pathlib import Path

from dpscale import backends as dp_backends
from dpscale import config as dp_config
from dpscale import envs as dp_envs
from dpscale import levels as dp_levels
from dpscale import resources as dp_resources
from dpscale import workflow as dp_workflow
from dpscale.workflow import run_step

try:
    config.update(dp_config.validate(config, Path(workflow.basedir) / "schemas/config.schema.yaml"))
except dp_config.ConfigError as err:
    sys.exit(str(err))

EXP = config["experiment"]
RESULTS = Path("results") / EXP
DATASET = config["dataset"]
DATA_DIR = f"resources/datasets/{DATASET['name']}/{DATASET['resolution']}px"
SPLITS = list(config["splits"]["profiles"])
LEVELS = config["privacy"]["levels"]  # canonical names (eps8.0 -> eps8), see dpscale.levels
SEEDS = config["seeds"]
BACKENDS = config["backends"]
# name -> effective training, model and simulate_batch_size (the config's, overrides merged in)
VARIANTS = dp_config.variant_configs(config)

# One run = one cell of the grid; its directory holds the four outputs of the backend contract.
RUN = str(RESULTS / "runs/{split}/{backend}/{level}/{variant}/seed{seed}")
RUN_OUTPUTS = ("metrics.json", "history.csv", "predictions.npz", "weights.npz")
# The transfer experiment's pre-training run (config `transfer:`), shared by every run.
PRETRAIN = str(RESULTS / "pretrain")


wildcard_constraints:
    split="|".join(SPLITS),
    level=dp_levels.WILDCARD,
    variant="|".join(VARIANTS),
    seed=r"\d+",


def data_files():
    return {k: f"{DATA_DIR}/{k}" for k in ("images.npy", "labels.npy", "manifest.json")}


def split_file(split="{split}"):
    return str(RESULTS / f"splits/{split}.npz")


def privacy_file(split="{split}", level="{level}", variant="{variant}"):
    return str(RESULTS / f"privacy/{split}/{variant}/{level}.json")


def privacy_plan(variant):
    """What a variant's accounting depends on: changing lr or the model keeps the plan."""
    v = VARIANTS[variant]
    return {
        "batch_size": v["training"]["batch_size"],
        "epochs": v["training"]["epochs"],
        "simulate_batch_size": v["simulate_batch_size"],
    }


ACCELERATOR = config["accelerator"]  # cpu or cuda: which venvs (workflow/envs[/cuda]/)
SITE_PYTHONS = {name: env["python"] for name, env in config["envs"].items()}


def env_ready(backend):
    """The venv's ready marker, or the check that the site's interpreter can run the backend."""
    if backend in SITE_PYTHONS:
        return str(dp_envs.site_check_file(backend, SITE_PYTHONS[backend]))
    return str(dp_envs.env_prefix(backend, accelerator=ACCELERATOR) / dp_envs.READY)


def all_envs():
    names = set(dp_envs.names(accelerator=ACCELERATOR)) | set(SITE_PYTHONS)
    return [env_ready(name) for name in sorted(names)]


def env_python(backend):
    if backend in SITE_PYTHONS:
        return SITE_PYTHONS[backend]
    return str(dp_envs.python(backend, accelerator=ACCELERATOR))


def declared_gpus():
    """The workstation's GPUs (`--resources gpu=N`; the default profile says 0)."""
    declared = workflow.global_resources.get("gpu")
    return int(getattr(declared, "value", declared) or 0)


def train_gpus(w):
    """training.devices GPUs for a run that requires them (training.device gpu). The slurm
    profile gives every training job as many (dpscale.workflow.job_devices), which a run with
    device unset then requires (config.run_training)."""
    training = VARIANTS[w.variant]["training"]
    return dp_config.run_devices(training, w.backend) * int(training["device"] == "gpu")


# The devices of every training job, for the slurm profile's gpu and threads expressions.
dp_workflow.RUN_DEVICES.update(
    {
        (backend, variant): dp_config.run_devices(v["training"], backend)
        for backend in BACKENDS
        for variant, v in VARIANTS.items()
    }
)
if config["transfer"]:
    dp_workflow.RUN_DEVICES[("pretrain", "")] = dp_config.run_devices(
        dp_config.pretrain_training(config), config["transfer"]["backend"]
    )


def run_dir(split, backend, level, variant, seed):
    return RUN.format(split=split, backend=backend, level=level, variant=variant, seed=seed)


def checkpoint_dir(w):
    """Kept outside declared outputs so a killed or preempted job resumes from it."""
    return str(RESULTS / f"checkpoints/{w.split}/{w.backend}/{w.level}/{w.variant}/seed{w.seed}")


def all_runs():
    return [
        run_dir(split, backend, level, variant, seed)
        for split in SPLITS
        for backend in BACKENDS
        for level in LEVELS
        for variant in VARIANTS
        for seed in SEEDS
    ]


def all_targets():
    # The equivalence check when there is something to compare (rules/equivalence.smk).
    equivalence = [str(RESULTS / "equivalence/equivalence.json")] if len(BACKENDS) > 1 else []
    return [str(RESULTS / "summary.csv"), *figure_targets(), *paper_targets(), *equivalence]


def paper_targets():
    """paper_comparison.csv when the config cites published numbers; simulation_check.csv when
    a variant simulates a large batch."""
    out = [str(RESULTS / "paper_comparison.csv")] if config["paper"] else []
    if any(v["simulate_batch_size"] for v in VARIANTS.values()):
        out.append(str(RESULTS / "simulation_check.csv"))
    return out


def train_inputs(w):
    pretrained = {"init": f"{PRETRAIN}/weights.npz"} if config["transfer"] else {}
    return {
        "env": env_ready(w.backend),
        **data_files(),
        "split": split_file(w.split),
        "privacy": privacy_file(w.split, w.level, w.variant),
        **pretrained,
    }


def pretrain_inputs(w):
    return {
        "env": env_ready(config["transfer"]["backend"]),
        **data_files(),
        "split": split_file("public"),
    }


def train_args(wildcards, input, output, params, resources):
    training = VARIANTS[wildcards.variant]["training"]
    return dict(
        backend=wildcards.backend,
        data_dir=Path(input["images.npy"]).parent,
        split=input.split,
        privacy=input.privacy,
        model=VARIANTS[wildcards.variant]["model"],
        training=dp_config.run_training(training, resources.get("gpu", 0), wildcards.backend),
        options=config["backend_options"].get(wildcards.backend, {}),
        seed=wildcards.seed,
        secure_randomness=config["privacy"]["secure_randomness"],
        init=input.get("init"),
        out_dir=Path(output.metrics).parent,
        checkpoint_dir=params.checkpoint,
    )


def pretrain_privacy_args(input, output):
    """Level none (the public data is not protected) with the pre-training's batch and epochs."""
    training = dp_config.pretrain_training(config)
    return dict(
        split=input.split,
        level="none",
        variant="pretrain",
        batch_size=training["batch_size"],
        epochs=training["epochs"],
        delta=config["privacy"]["delta"],
        accountant=config["privacy"]["accountant"],
        out=output.privacy,
    )


def pretrain_args(input, output, params, resources):
    backend = config["transfer"]["backend"]
    return dict(
        backend=backend,
        data_dir=Path(input["images.npy"]).parent,
        split=input.split,
        privacy=output.privacy,
        model=config["model"],
        training=dp_config.run_training(
            dp_config.pretrain_training(config), resources.get("gpu", 0), backend
        ),
        options=config["backend_options"].get(backend, {}),
        seed=0,
        out_dir=Path(output.metrics).parent,
        checkpoint_dir=params.checkpoint,
    )


def train_runtime(wildcards, attempt):
    """SLURM time limit (minutes) of a training job, from the experiment's size; ignored locally."""
    classes = config["splits"]["classes"]
    n_classes = classes if isinstance(classes, int) else len(classes)
    return dp_resources.train_minutes(
        n_train=n_classes * config["splits"]["train_per_class"],  # balanced: the largest split
        epochs=config["training"]["epochs"],
        resolution=DATASET["resolution"],
        width=config["model"]["width"],
        stem=config["model"]["stem"],
        attempt=attempt,
    )


# -- equivalence (rules/equivalence.smk): the experiment's first split, level and variant ------
def equivalence_case():
    """(split, level, variant): the first private level's plan if there is one."""
    private = [level for level in LEVELS if level != "none"]
    return SPLITS[0], (private or LEVELS)[0], next(iter(VARIANTS))


def equivalence_reference():
    """The reference backend when it runs, else the first configured one."""
    return "reference" if "reference" in BACKENDS else BACKENDS[0]


def equivalence_gpus():
    return int(VARIANTS[equivalence_case()[2]]["training"]["device"] == "gpu")


def equivalence_inputs(w):
    split, level, variant = equivalence_case()
    return {
        "env": env_ready(w.backend),
        **data_files(),
        "split": split_file(split),
        "privacy": privacy_file(split, level, variant),
    }


def equivalence_args(wildcards, input, output, resources):
    variant = VARIANTS[equivalence_case()[2]]
    return dict(
        action="run",
        backend=wildcards.backend,
        data_dir=Path(input["images.npy"]).parent,
        split=input.split,
        privacy=input.privacy,
        model=variant["model"],
        # One device (equivalence_gpus): the check is of each framework's step; several devices'
        # sameness with one is tests/conformance/test_devices.py's (a torch backend given
        # devices > 1 here would wait for ranks no launcher starts).
        training={
            **dp_config.run_training(variant["training"], resources.get("gpu", 0)),
            "devices": 1,
        },
        options=config["backend_options"].get(wildcards.backend, {}),
        seed=SEEDS[0],
        out=output[0],
    )
