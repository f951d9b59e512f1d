"""Validate an experiment config: JSON schema (with defaults) then the checks a schema can't say.

Every failure is one line, `config error: <key>: <what is wrong>; expected <what>`, raised
before any job starts.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from dpscale import levels

PATH_SOURCES = {"imagefolder", "ilsvrc2012", "medmnist"}


class ConfigError(ValueError):
    """A config problem, with the offending key in the message."""


def _key(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _with_defaults(validator_class):
    """A validator that fills `default`s into the instance while it validates (jsonschema FAQ)."""
    import jsonschema

    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    def fill_additional(validator, additional, instance, schema):
        # Defaults inside `additionalProperties` (e.g. a split profile's rho) are filled too.
        if isinstance(instance, dict) and isinstance(additional, dict):
            known = set(schema.get("properties", {}))
            for name, value in instance.items():
                if name not in known:
                    yield from validator.descend(value, additional, path=name)
        elif additional is False:
            yield from validator_class.VALIDATORS["additionalProperties"](
                validator, additional, instance, schema
            )

    return jsonschema.validators.extend(
        validator_class, {"properties": set_defaults, "additionalProperties": fill_additional}
    )


def _explain(error) -> str:
    key = _key(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        where = ".".join([*map(str, error.absolute_path), extra[0]]) if extra else key
        return f"{where}: unknown key; expected one of {', '.join(allowed)}"
    if error.validator == "required":
        missing = error.message.split("'")[1]
        return f"{_key([*error.absolute_path, missing])}: missing; it is required"
    if error.validator == "enum":
        options = ", ".join(map(str, error.validator_value))
        return f"{key}: {error.instance!r} is not allowed; expected one of {options}"
    if error.validator == "oneOf":
        expected = error.schema.get("description", "one of the documented forms")
        return f"{key}: {error.instance!r} has the wrong form; expected {expected}"
    return f"{key}: {error.message}"


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` with `override` merged in: dicts key by key (recursively), anything else replaced."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_scale(config: dict[str, Any]) -> dict[str, Any]:
    """The config with the overrides of its selected `scale` (from `scales`) deep-merged in.

    A config without `scale` is returned as written; `--config scale=smoke` selects one.
    """
    scale = config.get("scale")
    scales = config.get("scales") or {}
    if scale is None:
        return copy.deepcopy(dict(config))
    if not isinstance(scales, dict) or scale not in scales:
        known = ", ".join(sorted(scales)) if isinstance(scales, dict) and scales else "none"
        _fail("scale", f"{scale!r} is not defined in scales; expected one of: {known}")
    override = scales[scale] or {}
    if not isinstance(override, dict):
        _fail(f"scales.{scale}", "expected a mapping of config keys to override")
    for key in ("scale", "scales"):
        if key in override:
            _fail(f"scales.{scale}.{key}", "a scale cannot select or define scales")
    return deep_merge(config, override)


def validate(config: dict[str, Any], schema_path: str | Path) -> dict[str, Any]:
    """Return a deep copy of `config` (its scale applied) with defaults filled, or raise."""
    import jsonschema
    import yaml

    schema = yaml.safe_load(Path(schema_path).read_text())
    config = apply_scale(config)
    given_rho = _balanced_with_rho(config)  # before the schema fills rho's default in
    validator = _with_defaults(jsonschema.validators.validator_for(schema))(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), e.path))
    if errors:
        raise ConfigError(f"config error: {_explain(errors[0])}")
    _canonical_levels(config)
    for name in given_rho:
        _fail(
            f"splits.profiles.{name}.rho",
            "given for a balanced profile; expected no rho (balanced means rho 1) or kind exp/step",
        )
    _check_semantics(config)
    # Each variant is the config with its overrides: it must pass the same checks, and a
    # failure names the variant's key (variants.<name>.training.batch_size: ...).
    for name, resolved in variant_configs(config).items():
        candidate = {**config, **{k: resolved[k] for k in ("training", "model")}}
        _check_derived(validator, candidate, f"variants.{name}.")
        try:
            _check_simulation(resolved)
        except ConfigError as err:
            where = str(err).removeprefix("config error: ")
            raise ConfigError(f"config error: variants.{name}.{where}") from None
    if config["transfer"]:
        candidate = {**config, "training": pretrain_training(config), "transfer": None}
        _check_derived(validator, candidate, "transfer.")
    _check_data(config)
    return config


def _check_derived(validator, candidate: dict[str, Any], prefix: str) -> None:
    """A config derived by overrides passes the same checks; a failure names `prefix`."""
    candidate = {**candidate, "variants": {"default": {}}}
    try:
        errors = sorted(validator.iter_errors(candidate), key=lambda e: len(e.absolute_path))
        if errors:
            raise ConfigError(f"config error: {_explain(errors[0])}")
        _check_semantics(candidate)
    except ConfigError as err:
        where = str(err).removeprefix("config error: ")
        raise ConfigError(f"config error: {prefix}{where}") from None


def pretrain_training(config: dict[str, Any]) -> dict[str, Any]:
    """The pre-training run's `training`: the config's, transfer.training merged in, nothing
    frozen (it trains the whole model)."""
    merged = deep_merge(config["training"], (config["transfer"] or {}).get("training") or {})
    return {**merged, "frozen_groups": 0}


def run_devices(training: dict[str, Any], backend: str) -> int:
    """training.devices for `backend`: the number, or its entry in a backend -> number map
    (1 for a backend the map leaves out)."""
    devices = training.get("devices", 1)
    return int(devices.get(backend, 1) if isinstance(devices, dict) else devices)


def run_training(training: dict[str, Any], gpus: int, backend: str | None = None) -> dict[str, Any]:
    """A run's `training` as the runner gets it: device null (unset) becomes gpu when the job
    was given a GPU (the slurm profile gives every training job one: it must be used, never
    silently replaced by the CPU), else auto; devices becomes the backend's number."""
    device = training.get("device") or ("gpu" if int(gpus or 0) > 0 else "auto")
    out = {**training, "device": device}
    if "devices" in training:
        out["devices"] = run_devices(training, backend or "")
    return out


def variant_configs(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each variant's effective `training` and `model` (the config's, overrides merged in)."""
    out = {}
    for name, variant in (config.get("variants") or {"default": {}}).items():
        variant = variant or {}
        out[name] = {
            "training": deep_merge(config.get("training") or {}, variant.get("training") or {}),
            "model": deep_merge(config.get("model") or {}, variant.get("model") or {}),
            "simulate_batch_size": variant.get("simulate_batch_size"),
        }
    return out


def _check_simulation(resolved: dict[str, Any]) -> None:
    large = resolved["simulate_batch_size"]
    batch = resolved["training"]["batch_size"]
    if large is not None and not large > batch:
        raise ConfigError(
            f"config error: simulate_batch_size: {large} is not above training.batch_size "
            f"{batch}; expected the larger batch B0 that this smaller-batch run simulates"
        )


def _fail(key: str, message: str):
    raise ConfigError(f"config error: {key}: {message}")


def _check_semantics(config: dict[str, Any]) -> None:
    ds = config["dataset"]
    source = ds["source"]
    if source in PATH_SOURCES:
        if not ds.get("path"):
            _fail("dataset.path", f"missing; source {source!r} needs the path of its data")
        if not Path(ds["path"]).exists():
            _fail(
                "dataset.path", f"{ds['path']!r} does not exist; expected the {source} data there"
            )
    if source == "url":
        if not ds.get("url"):
            _fail("dataset.url", "missing; source 'url' needs the archive's address")
        if not ds.get("sha256"):
            _fail("dataset.sha256", "missing; a downloaded archive must be pinned by its sha256")

    model = config["model"]
    for stage, mult in enumerate((1, 2, 4, 8), start=1):
        channels = model["width"] * mult
        if channels % min(model["groups"], channels):
            _fail(
                "model.groups",
                f"{model['groups']} groups do not divide stage {stage}'s {channels} channels; "
                "expected a divisor of model.width",
            )

    train = config["training"]
    if train["physical_batch_size"] is not None and train["physical_batch_size"] < 1:
        _fail("training.physical_batch_size", "expected a positive integer")
    if train["warmup_epochs"] >= train["epochs"]:
        _fail("training.warmup_epochs", "expected fewer warm-up epochs than training.epochs")

    for name, profile in config["splits"]["profiles"].items():
        if profile["kind"] != "balanced" and profile["rho"] <= 1:
            _fail(f"splits.profiles.{name}.rho", f"profile kind {profile['kind']!r} needs rho > 1")

    from dpscale import backends

    known = backends.available()
    for i, name in enumerate(config["backends"]):
        if name not in known:
            _fail(f"backends.{i}", f"unknown backend {name!r}; expected one of {', '.join(known)}")
    for name in config["backend_options"]:
        if name not in config["backends"]:
            _fail(f"backend_options.{name}", "options for a backend that is not in backends")
    for name, env in config["envs"].items():
        if name not in known:
            _fail(f"envs.{name}", f"unknown backend {name!r}; expected one of {', '.join(known)}")
        if not Path(env["python"]).is_absolute():
            _fail(f"envs.{name}.python", f"{env['python']!r}; expected an absolute path")
    _check_transfer(config, known)
    _check_devices(config, known)


def _check_devices(config: dict[str, Any], known: list[str]) -> None:
    from dpscale.backends import MULTI_DEVICE

    devices = config["training"]["devices"]
    if isinstance(devices, dict):
        for name in devices:
            if name not in known:
                _fail(
                    f"training.devices.{name}",
                    f"unknown backend {name!r}; expected one of {', '.join(known)}",
                )
    transfer = [config["transfer"]["backend"]] if config.get("transfer") else []
    cannot = [
        b
        for b in dict.fromkeys([*config["backends"], *transfer])
        if run_devices(config["training"], b) > 1 and b not in MULTI_DEVICE
    ]
    if cannot:
        _fail(
            "training.devices",
            f"backend(s) {', '.join(cannot)} train on one device; expected devices 1 for them "
            f"(a map such as {{jax: 2}} sets it per backend), or backends among "
            f"{', '.join(MULTI_DEVICE)}",
        )


def _balanced_with_rho(config: dict[str, Any]) -> list[str]:
    """Profiles written as kind balanced with a rho (which balanced would silently ignore)."""
    profiles = (config.get("splits") or {}).get("profiles")
    if not isinstance(profiles, dict):
        return []
    return [
        name
        for name, p in profiles.items()
        if isinstance(p, dict) and p.get("kind") == "balanced" and "rho" in p
    ]


#: Integer keys of the data stage; JSON schema's `integer` accepts 32.0, argparse does not.
_DATA_INTEGERS = (
    ("dataset", "resolution"),
    ("dataset", "max_per_class"),
    ("dataset", "classes"),
    ("splits", "seed"),
    ("splits", "classes"),
    ("splits", "train_per_class"),
    ("splits", "holdout_per_class"),
    ("splits", "test_per_class"),
    ("transfer", "public_classes"),
    ("transfer", "public_per_class"),
)
#: Classes of the sources whose class list the config alone tells.
_KNOWN_CLASSES = {"digits": 10}


def _check_data(config: dict[str, Any]) -> None:
    """What the config alone says about the data stage, before any job (issue 17, item 5)."""
    for section, key in _DATA_INTEGERS:
        value = (config.get(section) or {}).get(key)
        if isinstance(value, float):
            _fail(
                f"{section}.{key}",
                f"{value!r} is a decimal number; expected a whole number ({int(value)})",
            )
    ds, splits, transfer = config["dataset"], config["splits"], config.get("transfer")
    chosen = ds.get("classes")
    available = (
        len(chosen) if isinstance(chosen, list) else chosen or _KNOWN_CLASSES.get(ds["source"])
    )
    wanted = splits["classes"]
    n_wanted = len(wanted) if isinstance(wanted, list) else wanted
    public = transfer["public_classes"] if transfer else 0
    where = "dataset.classes" if chosen is not None else f"source {ds['source']!r}"
    if available is not None and n_wanted + public > available:
        what = f"{n_wanted}" + (f" + transfer.public_classes {public}" if public else "")
        _fail(
            "splits.classes",
            f"{what} classes; expected at most the {available} that {where} gives",
        )
    if isinstance(wanted, list) and isinstance(chosen, list):
        missing = [w for w in wanted if w not in set(chosen)]
        if missing:
            _fail(
                "splits.classes",
                f"{missing[0]!r} is not in dataset.classes; expected names among those decoded",
            )
    official = splits["test"] == "official"
    if ds["val"] and ds["source"] != "ilsvrc2012":
        _fail("dataset.val", f"true for source {ds['source']!r}; expected it only for ilsvrc2012")
    if official and not ds["val"]:
        _fail(
            "splits.test",
            "official needs the official validation images; expected dataset.val: true "
            "(source ilsvrc2012)",
        )
    n_test = 0 if official else splits["test_per_class"]
    cap = ds.get("max_per_class")
    need = splits["train_per_class"] + splits["holdout_per_class"] + n_test
    if cap is not None and cap < need:
        _fail(
            "dataset.max_per_class",
            f"{cap} images per class; the split needs {need} (train_per_class "
            f"{splits['train_per_class']} + holdout_per_class {splits['holdout_per_class']}"
            + (f" + test_per_class {n_test})" if n_test else ", test official)"),
        )
    if cap is not None and transfer and not official:
        need_public = transfer["public_per_class"] + splits["test_per_class"]
        if cap < need_public:
            _fail(
                "dataset.max_per_class",
                f"{cap} images per class; the public split needs {need_public} "
                f"(transfer.public_per_class {transfer['public_per_class']} + test_per_class "
                f"{splits['test_per_class']})",
            )
    if ds["source"] == "ilsvrc2012" and ds.get("path"):
        from dpscale.data.sources import (
            ILSVRC_DEVKIT,
            ILSVRC_LOC_CSV,
            ILSVRC_TRAIN_TAR,
            ILSVRC_VAL_TAR,
        )

        path = Path(ds["path"])
        if path.is_dir() and not (path / ILSVRC_TRAIN_TAR).is_file():
            _fail(
                "dataset.path",
                f"no {ILSVRC_TRAIN_TAR} in {str(path)!r}; expected the folder holding the "
                "official ILSVRC2012 training tar",
            )
        folder = path if path.is_dir() else path.parent
        if ds["val"] and not (folder / ILSVRC_VAL_TAR).is_file():
            _fail(
                "dataset.val",
                f"no {ILSVRC_VAL_TAR} in {str(folder)!r}; expected the official validation tar "
                "beside the training tar",
            )
        if ds["val"] and not any((folder / n).is_file() for n in (ILSVRC_DEVKIT, ILSVRC_LOC_CSV)):
            _fail(
                "dataset.val",
                f"no {ILSVRC_DEVKIT} or {ILSVRC_LOC_CSV} in {str(folder)!r}; expected the "
                "official validation labels",
            )


def _check_transfer(config: dict[str, Any], known: list[str]) -> None:
    from dpscale.backends import FREEZING

    transfer, frozen = config.get("transfer"), config["training"]["frozen_groups"]
    if frozen and not transfer:
        _fail(
            "training.frozen_groups",
            f"{frozen} without a transfer block; expected pre-trained weights to freeze "
            "(transfer: {public_classes: N}) or 0",
        )
    if frozen:
        cannot = [b for b in config["backends"] if b not in FREEZING]
        if cannot:
            _fail(
                "training.frozen_groups",
                f"backend(s) {', '.join(cannot)} cannot freeze block groups; expected backends "
                f"among {', '.join(FREEZING)}",
            )
    if not transfer:
        return
    if "public" in config["splits"]["profiles"]:
        _fail("splits.profiles.public", "the name is taken by the transfer's public split")
    if transfer["backend"] not in known:
        _fail(
            "transfer.backend",
            f"unknown backend {transfer['backend']!r}; expected one of {', '.join(known)}",
        )


def _canonical_levels(config: dict[str, Any]) -> None:
    """Levels (and the paper rows' `match: {level: ...}`) in their canonical spelling, so that
    eps8.0 in a config runs, and is found, as eps8; one level named twice is an error."""
    names = config["privacy"]["levels"]
    for i, name in enumerate(names):
        try:
            levels.parse(name)
        except levels.LevelError as err:
            _fail(f"privacy.levels.{i}", str(err))
    try:
        config["privacy"]["levels"] = levels.distinct(names)
    except levels.LevelError as err:
        _fail("privacy.levels", str(err))
    for i, row in enumerate(config["paper"]):
        if "level" in row["match"]:
            try:
                row["match"]["level"] = levels.canonical(row["match"]["level"])
            except levels.LevelError as err:
                _fail(f"paper.{i}.match.level", str(err))
