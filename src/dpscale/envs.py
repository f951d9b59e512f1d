"""Per-backend virtual environments, keyed by the hash of their requirements.

`workflow/envs/<name>.txt` is installed normally; an optional `<name>.nodeps.txt` is then
installed with --no-deps (for packages whose declared pins are wrong but whose code runs, see
docs/environments.md). The venv lives in `.venvs/<name>-<hash>/`, so editing a requirements
file builds a new venv and leaves the others alone. dpscale itself is installed editable.
"""

from __future__ import annotations

import fcntl
import hashlib
import subprocess
import sys
from pathlib import Path

# The project checkout (src/dpscale/envs.py -> ../..): venvs are shared by every working
# directory the workflow runs in, so a test's temporary directory reuses the built ones.
PROJECT = Path(__file__).resolve().parents[2]
ENVS_DIR = Path("workflow/envs")
VENVS_DIR = Path(".venvs")
READY = "ready"


def requirement_files(name: str, root: Path = PROJECT) -> list[Path]:
    files = [root / ENVS_DIR / f"{name}.txt", root / ENVS_DIR / f"{name}.nodeps.txt"]
    if not files[0].exists():
        raise FileNotFoundError(f"no requirements file {files[0]} for environment {name!r}")
    return [f for f in files if f.exists()]


def env_hash(name: str, root: Path = PROJECT) -> str:
    h = hashlib.sha256()
    for f in requirement_files(name, root):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def env_prefix(name: str, root: Path = PROJECT) -> Path:
    """Where the venv for `name` lives: <project>/.venvs/<name>-<hash>."""
    return root / VENVS_DIR / f"{name}-{env_hash(name, root)}"


def python(name: str, root: Path = PROJECT) -> Path:
    return env_prefix(name, root) / "bin" / "python"


def names(root: Path = PROJECT) -> list[str]:
    """Environments that have a requirements file (base is the Makefile's, not a venv here)."""
    return sorted(
        p.stem for p in (root / ENVS_DIR).glob("*.txt") if "." not in p.stem and p.stem != "base"
    )


def build(name: str, prefix: Path, root: Path = PROJECT, log: str | Path | None = None) -> None:
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
        if log is None:
            _build(name, prefix, root, sys.stdout)
            return
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out:
            _build(name, prefix, root, out)


def _build(name: str, prefix: Path, root: Path, out) -> None:
    files = requirement_files(name, root)
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
    (prefix / READY).write_text("\n".join(f.read_text() for f in files))


def main(argv=None) -> None:
    """`python -m dpscale.envs NAME...`: build the named venvs unless they are ready."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("names", nargs="*", help="environments (default: all)")
    for name in parser.parse_args(argv).names or names():
        prefix = env_prefix(name)
        if (prefix / READY).exists():
            print(f"{name}: ready at {prefix}")
            continue
        build(name, prefix)
        print(f"{name}: built at {prefix}")


if __name__ == "__main__":
    main()
