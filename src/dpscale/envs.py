"""Per-backend virtual environments, keyed by the hash of their requirements.

`workflow/envs/<name>.txt` is installed normally; an optional `<name>.nodeps.txt` is then
installed with --no-deps (for packages whose declared pins are wrong but whose code runs, see
docs/environments.md). The venv lives in `.venvs/<name>-<hash>/`, so editing a requirements
file builds a new venv and leaves the others alone. dpscale itself is installed editable.

Accelerator `cuda` (config `accelerator:`) takes `workflow/envs/cuda/<name>.txt` instead, into
`.venvs/cuda/<name>-<hash>/`: both kinds of venv coexist. A requirements file may include
another (`-r ../jax.txt`, pip's syntax, relative to the file); the hash covers what it includes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

# The project checkout (src/dpscale/envs.py -> ../..): venvs are shared by every working
# directory the workflow runs in, so a test's temporary directory reuses the built ones.
PROJECT = Path(__file__).resolve().parents[2]
ENVS_DIR = Path("workflow/envs")
VENVS_DIR = Path(".venvs")
READY = "ready"
ACCELERATORS = ("cpu", "cuda")
INCLUDE = re.compile(r"^\s*(?:-r|--requirement)[\s=]\s*(\S+)")


def _subdir(accelerator: str) -> Path:
    """'' for cpu (the folders as they always were), 'cuda' for cuda."""
    if accelerator not in ACCELERATORS:
        raise ValueError(f"accelerator {accelerator!r}: expected one of {', '.join(ACCELERATORS)}")
    return Path("" if accelerator == "cpu" else accelerator)


def envs_dir(accelerator: str = "cpu", root: Path = PROJECT) -> Path:
    return root / ENVS_DIR / _subdir(accelerator)


def requirement_files(name: str, root: Path = PROJECT, accelerator: str = "cpu") -> list[Path]:
    """The main file, then the nodeps file if there is one."""
    folder = envs_dir(accelerator, root)
    files = [folder / f"{name}.txt", folder / f"{name}.nodeps.txt"]
    if not files[0].exists():
        raise FileNotFoundError(
            f"no requirements file {files[0]} for environment {name!r} (accelerator {accelerator})"
        )
    return [f for f in files if f.exists()]


def included_files(path: Path, _seen: frozenset = frozenset()) -> list[Path]:
    """`path` and, depth first, every file it includes with `-r` (pip resolves them relative
    to the including file)."""
    if path in _seen:
        raise ValueError(f"{path}: includes itself (through -r)")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such requirements file (included with -r)")
    out = [path]
    for line in path.read_text().splitlines():
        match = INCLUDE.match(line)
        if match:
            out += included_files((path.parent / match.group(1)).resolve(), _seen | {path})
    return out


def env_hash(name: str, root: Path = PROJECT, accelerator: str = "cpu") -> str:
    h = hashlib.sha256()
    for main in requirement_files(name, root, accelerator):
        for i, f in enumerate(included_files(main)):
            # The top file by name (main vs nodeps matters), included ones by their content.
            h.update((f.name if i == 0 else "-r").encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def venvs_dir(accelerator: str = "cpu", root: Path = PROJECT) -> Path:
    return root / VENVS_DIR / _subdir(accelerator)


def env_prefix(name: str, root: Path = PROJECT, accelerator: str = "cpu") -> Path:
    """Where the venv for `name` lives: <project>/.venvs/[cuda/]<name>-<hash>."""
    return venvs_dir(accelerator, root) / f"{name}-{env_hash(name, root, accelerator)}"


# -- a site's own interpreter (config `envs: {<backend>: {python: ...}}`) ---------------------
SITE_CHECK = """
import json, sys
from importlib import metadata
name = sys.argv[1]
try:
    import dpscale
    from dpscale.backends import load
    load(name)
except Exception as err:
    print(json.dumps({"error": f"{type(err).__name__}: {err}"}))
    sys.exit(0)
print(json.dumps({"python": sys.version.split()[0], "dpscale": dpscale.__file__}))
"""


def site_check_file(name: str, python: str | Path, root: Path = PROJECT) -> Path:
    """The record that `python` runs backend `name`; keyed by the interpreter's path."""
    digest = hashlib.sha256(str(python).encode()).hexdigest()[:12]
    return root / VENVS_DIR / "site" / f"{name}-{digest}.json"


def check_site_python(name: str, python: str | Path, out: Path) -> dict:
    """Check that the site's interpreter imports dpscale and backend `name` (its framework
    included); write what it found to `out`. One-line error naming the fix otherwise."""
    fix = "install dpscale into it (pip install -e <checkout>) or put <checkout>/src on PYTHONPATH"
    if not Path(python).is_file():
        raise RuntimeError(f"envs.{name}.python: {python} does not exist; expected an interpreter")
    proc = subprocess.run(
        [str(python), "-c", SITE_CHECK, name], capture_output=True, text=True, timeout=600
    )
    try:
        found = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        found = {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    if "error" in found:
        hint = fix if "dpscale" in found["error"] else "install the backend's framework into it"
        raise RuntimeError(
            f"envs.{name}.python: {python} cannot run backend {name} ({found['error']}); {hint}"
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"backend": name, "interpreter": str(python), **found}) + "\n")
    return found


def python(name: str, root: Path = PROJECT, accelerator: str = "cpu") -> Path:
    return env_prefix(name, root, accelerator) / "bin" / "python"


def names(root: Path = PROJECT, accelerator: str = "cpu") -> list[str]:
    """Environments that have a requirements file (base is the Makefile's, not a venv here)."""
    return sorted(
        p.stem
        for p in envs_dir(accelerator, root).glob("*.txt")
        if "." not in p.stem and p.stem != "base"
    )


def build(
    name: str,
    prefix: Path,
    root: Path = PROJECT,
    log: str | Path | None = None,
    accelerator: str = "cpu",
) -> None:
    """Create the venv at `prefix` and install its requirements and dpscale into it.

    pip's output goes to the file `log` (stdout if None); `ready` is written last, so a venv
    whose build was interrupted is never taken for a finished one.
    """
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    # Two builders of one venv (a test and `make envs`, two sessions on a login node) would
    # delete each other's files: the second waits, then finds the venv ready.
    with open(prefix.with_name(prefix.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (prefix / READY).exists():
            return
        files = requirement_files(name, root, accelerator)
        if log is None:
            _build(name, files, prefix, root, sys.stdout)
            return
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out:
            _build(name, files, prefix, root, out)


def _build(name: str, files: list[Path], prefix: Path, root: Path, out) -> None:
    steps = [[sys.executable, "-m", "venv", "--clear", str(prefix)]]
    pip = [str(prefix / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
    steps.append([*pip, "-r", str(files[0])])
    if len(files) > 1:
        steps.append([*pip, "--no-deps", "-r", str(files[1])])
    steps.append([*pip, "--no-deps", "-e", str(root.resolve())])
    for cmd in steps:
        print("+", " ".join(cmd), file=out, flush=True)
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
        if proc.returncode:
            where = f"; see {out.name}" if hasattr(out, "name") else ""
            raise RuntimeError(f"building the {name!r} venv failed at: {' '.join(cmd)}{where}")
    # What was installed, includes expanded: `cat ready` answers "which pins is this venv?".
    (prefix / READY).write_text(
        "\n".join(f.read_text() for main in files for f in included_files(main))
    )


def main(argv=None) -> None:
    """`python -m dpscale.envs NAME...`: build the named venvs unless they are ready."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("names", nargs="*", help="environments (default: all)")
    parser.add_argument("--accelerator", choices=ACCELERATORS, default="cpu")
    args = parser.parse_args(argv)
    for name in args.names or names(accelerator=args.accelerator):
        prefix = env_prefix(name, accelerator=args.accelerator)
        if (prefix / READY).exists():
            print(f"{name}: ready at {prefix}")
            continue
        build(name, prefix, accelerator=args.accelerator)
        print(f"{name}: built at {prefix}")


if __name__ == "__main__":
    main()
