"""Per-backend venvs (dpscale.envs): named by their requirement files' hash, built once, marked
ready last.

Fake project roots in tmp_path stand in for the checkout. The two real builds install only
local packages whose build backend (BACKEND, below) needs nothing, with pip told not to use any
index: they work offline and take seconds each, mostly `python -m venv`.
"""

from __future__ import annotations

import fcntl
import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dpscale import backends, envs
from tests.conftest import venv_python

# A PEP 517/660 backend with no build requirements, so pip's isolated build installs nothing
# (setuptools would have to come from an index). It writes a pure-Python wheel from src/, or an
# editable one holding a .pth that points at src/.
BACKEND = """
import base64, hashlib, tomllib, zipfile
from pathlib import Path

def _wheel(directory, files):
    project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
    dist = f"{project['name']}-{project['version']}"
    meta = ["Metadata-Version: 2.1", f"Name: {project['name']}", f"Version: {project['version']}"]
    meta += [f"Requires-Dist: {d}" for d in project["dependencies"]]
    files[f"{dist}.dist-info/METADATA"] = "\\n".join(meta) + "\\n"
    wheel = ["Wheel-Version: 1.0", "Root-Is-Purelib: true", "Tag: py3-none-any"]
    files[f"{dist}.dist-info/WHEEL"] = "\\n".join(wheel) + "\\n"
    record = [f"{dist}.dist-info/RECORD,,"]
    for arcname, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{arcname},sha256={digest.decode()},{len(text.encode())}")
    files[f"{dist}.dist-info/RECORD"] = "\\n".join(record) + "\\n"
    name = f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(Path(directory) / name, "w") as whl:
        for arcname, text in files.items():
            whl.writestr(arcname, text)
    return name

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    src = Path("src")
    code = {str(p.relative_to(src)): p.read_text() for p in src.rglob("*.py")}
    return _wheel(wheel_directory, code)

def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    return _wheel(wheel_directory, {"editable.pth": str(Path("src").resolve()) + "\\n"})
"""


def package(where: Path, name: str, *dependencies: str) -> Path:
    """A pure-Python project at `where` whose module `name` is installable offline."""
    (where / "src" / name).mkdir(parents=True)
    (where / "src" / name / "__init__.py").write_text("")
    (where / "offline_backend.py").write_text(BACKEND)
    (where / "pyproject.toml").write_text(
        '[build-system]\nrequires = []\nbuild-backend = "offline_backend"\nbackend-path = ["."]\n'
        f'[project]\nname = "{name}"\nversion = "0.1"\ndependencies = {json.dumps(dependencies)}\n'
    )
    return where


def write_envs(root: Path, files: dict[str, str]) -> Path:
    """workflow/envs/<key>.txt for each entry (e.g. "demo", "demo.nodeps"), in a project root."""
    folder = root / envs.ENVS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for stem, text in files.items():
        (folder / f"{stem}.txt").write_text(text)
    return folder


@pytest.fixture
def offline(monkeypatch):
    """pip (in the builds' subprocesses) may read local paths only, never an index."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")


def test_the_prefix_is_keyed_by_the_requirement_files(tmp_path):
    files = {"alpha": "numpy==2.0\n", "beta": "torch==2.0\n"}
    root = tmp_path / "root"
    folder = write_envs(root, files)
    first = {name: envs.env_prefix(name, root) for name in files}
    assert first["alpha"].parent == root / envs.VENVS_DIR
    assert re.fullmatch(r"alpha-[0-9a-f]+", first["alpha"].name)
    assert envs.python("alpha", root) == first["alpha"] / "bin" / "python"
    # The same files in another checkout name the same venv: the path is not hashed.
    assert envs.env_prefix("alpha", write_envs(tmp_path / "clone", files).parent.parent) == (
        tmp_path / "clone" / envs.VENVS_DIR / first["alpha"].name
    )

    seen = {first["alpha"]}
    for stem, text in [
        ("alpha", "numpy==2.1\n"),  # a pin bump
        ("alpha.nodeps", "six\n"),  # a nodeps file added
        ("alpha.nodeps", "six==1.17.0\n"),  # and edited
    ]:
        write_envs(root, {stem: text})
        prefix = envs.env_prefix("alpha", root)
        assert prefix not in seen, stem
        seen.add(prefix)
        assert envs.env_prefix("beta", root) == first["beta"]  # other venvs are left alone

    # Back to the original files: back to the original (already built) venv.
    (folder / "alpha.nodeps.txt").unlink()
    write_envs(root, {"alpha": files["alpha"]})
    assert envs.env_prefix("alpha", root) == first["alpha"]


def test_moving_a_requirement_into_the_nodeps_file_is_a_new_venv(tmp_path):
    # Same lines, but one is now installed --no-deps: a different environment.
    together, apart = tmp_path / "together", tmp_path / "apart"
    write_envs(together, {"demo": "tf-keras\ntensorflow-privacy\n"})
    write_envs(apart, {"demo": "tf-keras\n", "demo.nodeps": "tensorflow-privacy\n"})
    assert envs.env_prefix("demo", together).name != envs.env_prefix("demo", apart).name


def test_requirement_files_main_then_nodeps(tmp_path):
    folder = write_envs(tmp_path, {"plain": "", "split": "", "split.nodeps": ""})
    assert envs.requirement_files("plain", tmp_path) == [folder / "plain.txt"]
    assert envs.requirement_files("split", tmp_path) == [
        folder / "split.txt",
        folder / "split.nodeps.txt",
    ]


def test_an_env_without_its_requirements_file_is_an_error_naming_both(tmp_path):
    folder = write_envs(tmp_path, {"orphan.nodeps": "six\n"})  # a nodeps file alone is no env
    for call in (envs.requirement_files, envs.env_prefix):
        with pytest.raises(FileNotFoundError) as err:
            call("orphan", tmp_path)
        assert str(folder / "orphan.txt") in str(err.value) and "'orphan'" in str(err.value)


def test_names_lists_envs_with_a_requirements_file_but_not_base_or_nodeps(tmp_path):
    folder = write_envs(
        tmp_path,
        {"base": "", "tfprivacy": "", "tfprivacy.nodeps": "", "jax": "", "orphan.nodeps": ""},
    )
    (folder / "README.md").write_text("")
    assert envs.names(tmp_path) == ["jax", "tfprivacy"]


def test_a_second_builder_waits_for_the_first_then_finds_the_venv_ready(tmp_path):
    write_envs(tmp_path, {"demo": ""})
    prefix = envs.env_prefix("demo", tmp_path)
    prefix.mkdir(parents=True)
    (prefix / "kept").write_text("")  # a build would empty the folder (venv --clear)
    log = tmp_path / "second.log"
    with ThreadPoolExecutor(1) as pool:
        # This test is the first builder: it holds the lock build() takes beside the venv.
        with open(prefix.with_name(prefix.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            second = pool.submit(envs.build, "demo", prefix, tmp_path, log)
            time.sleep(0.5)
            assert not second.done() and not log.exists(), "it must wait, not build"
            (prefix / envs.READY).write_text("")  # the first build finishes
        second.result(timeout=30)  # the lock is released on close
    assert not log.exists() and (prefix / "kept").exists(), "ready: nothing to build"


def test_build_installs_the_main_file_then_nodeps_then_the_project_once(tmp_path, offline):
    pkgs = tmp_path / "pkgs"
    gamma = package(pkgs / "envtest_gamma", "envtest_gamma")
    # alpha (main file) needs gamma, which pip finds only by following alpha's dependencies;
    # beta (nodeps file) needs a package that exists nowhere: it installs only with --no-deps.
    alpha = package(pkgs / "envtest_alpha", "envtest_alpha", f"envtest_gamma @ {gamma.as_uri()}")
    beta = package(pkgs / "envtest_beta", "envtest_beta", "envtest_nowhere")
    root = package(tmp_path / "root", "envtest_root")
    write_envs(root, {"demo": f"# main\n{alpha}\n", "demo.nodeps": f"{beta}\n"})
    main, nodeps = envs.requirement_files("demo", root)
    prefix = envs.env_prefix("demo", root)

    # Two builders at once (a test and `make envs`): one builds, the other waits.
    logs = [tmp_path / "logs" / f"builder{i}.log" for i in (1, 2)]
    with ThreadPoolExecutor(2) as pool:
        for done in [pool.submit(envs.build, "demo", prefix, root, log) for log in logs]:
            done.result(timeout=300)
    [log] = [log for log in logs if log.exists()]  # the one that built; the other found it ready
    assert (prefix / envs.READY).exists()

    steps = [line.split()[1:] for line in log.read_text().splitlines() if line.startswith("+ ")]
    assert steps[0][1:3] == ["-m", "venv"] and steps[0][-1] == str(prefix)
    assert [str(main) in s for s in steps[1:]] == [True, False, False]
    assert [str(nodeps) in s for s in steps[1:]] == [False, True, False]
    assert "--no-deps" not in steps[1] and "--no-deps" in steps[2]
    assert steps[3][-2:] == ["-e", str(root.resolve())]

    where = subprocess.run(
        [
            str(envs.python("demo", root)),
            "-c",
            "import json, envtest_alpha, envtest_beta, envtest_gamma, envtest_root as r;"
            "print(json.dumps(r.__file__))",
        ],
        capture_output=True,
        text=True,
    )
    assert where.returncode == 0, where.stderr  # gamma came with alpha, beta without its dep
    assert Path(json.loads(where.stdout)).is_relative_to(root / "src")  # editable: the checkout


def test_a_failed_build_is_not_ready_and_names_the_command_and_its_log(tmp_path, offline):
    write_envs(tmp_path, {"demo": "envtest-nowhere==1.0\n"})  # on no index, and none is read
    [requirements] = envs.requirement_files("demo", tmp_path)
    prefix = envs.env_prefix("demo", tmp_path)
    log = tmp_path / "logs" / "demo.log"
    with pytest.raises(RuntimeError) as err:
        envs.build("demo", prefix, tmp_path, log)
    message = str(err.value)
    assert "'demo'" in message and f"-r {requirements}" in message and str(log) in message
    assert (prefix / "bin" / "python").exists()  # the venv exists, half built...
    assert not (prefix / envs.READY).exists()  # ...and is not taken for a finished one
    assert "envtest-nowhere" in log.read_text()  # pip's own reason is in the log


def test_each_accelerator_has_its_own_files_and_venvs_and_both_coexist(tmp_path):
    folder = write_envs(tmp_path, {"demo": "jax==0.10.2\n"})
    (folder / "cuda").mkdir()
    (folder / "cuda" / "demo.txt").write_text("jax==0.10.2\n")  # the same text, another venv
    cpu_prefix = envs.env_prefix("demo", tmp_path)
    cuda_prefix = envs.env_prefix("demo", tmp_path, accelerator="cuda")
    assert envs.requirement_files("demo", tmp_path, accelerator="cuda") == [
        folder / "cuda" / "demo.txt"
    ]
    assert cpu_prefix.parent == tmp_path / envs.VENVS_DIR
    assert cuda_prefix.parent == tmp_path / envs.VENVS_DIR / "cuda"
    assert envs.python("demo", tmp_path, "cuda") == cuda_prefix / "bin" / "python"
    # Editing the cuda file moves the cuda venv only.
    (folder / "cuda" / "demo.txt").write_text("jax==0.10.2\nplugin==1\n")
    assert envs.env_prefix("demo", tmp_path) == cpu_prefix
    assert envs.env_prefix("demo", tmp_path, accelerator="cuda") != cuda_prefix
    with pytest.raises(ValueError, match="accelerator 'rocm': expected one of cpu, cuda"):
        envs.env_prefix("demo", tmp_path, accelerator="rocm")
    with pytest.raises(FileNotFoundError, match="accelerator cuda"):
        envs.requirement_files("other", tmp_path, accelerator="cuda")


def test_the_hash_covers_included_files(tmp_path):
    folder = write_envs(tmp_path, {"common": "numpy==2.0\n"})
    (folder / "cuda").mkdir()
    (folder / "cuda" / "demo.txt").write_text("-r ../common.txt\nplugin==1\n")
    before = envs.env_prefix("demo", tmp_path, accelerator="cuda")
    assert envs.included_files(folder / "cuda" / "demo.txt") == [
        folder / "cuda" / "demo.txt",
        (folder / "common.txt").resolve(),
    ]
    (folder / "common.txt").write_text("numpy==2.1\n")  # a pin bump in the included file
    assert envs.env_prefix("demo", tmp_path, accelerator="cuda") != before
    (folder / "cuda" / "loop.txt").write_text("--requirement=loop.txt\n")
    with pytest.raises(ValueError, match="includes itself"):
        envs.env_hash("loop", tmp_path, accelerator="cuda")
    (folder / "cuda" / "gone.txt").write_text("-r missing.txt\n")
    with pytest.raises(FileNotFoundError, match="missing.txt: no such requirements file"):
        envs.env_hash("gone", tmp_path, accelerator="cuda")


@pytest.mark.parametrize("accelerator", envs.ACCELERATORS)
def test_every_backend_has_an_env_file_for_each_accelerator(accelerator):
    # The train rules run each backend in its venv (common.smk); `make envs` builds names().
    assert set(backends.available()) <= set(envs.names(accelerator=accelerator))
    for name in envs.names(accelerator=accelerator):
        for main in envs.requirement_files(name, accelerator=accelerator):
            assert envs.included_files(main)  # every include resolves


def test_a_site_interpreter_that_runs_the_backend_is_recorded(tmp_path):
    # An existing venv's python stands in for a cluster's module or container.
    python = venv_python("reference")
    out = envs.site_check_file("reference", python, tmp_path)
    assert out.parent == tmp_path / envs.VENVS_DIR / "site"
    found = envs.check_site_python("reference", python, out)
    record = json.loads(out.read_text())
    assert record["interpreter"] == str(python) and record["python"] == found["python"]
    assert Path(record["dpscale"]).is_relative_to(envs.PROJECT / "src")


@pytest.mark.parametrize(
    ("python", "says"),
    [
        (sys.executable, "install the backend's framework into it"),  # dpscale, no torch
        (sys.base_prefix + "/bin/python3", "install dpscale into it"),  # neither
        ("/nowhere/python", "does not exist"),
    ],
)
def test_a_site_interpreter_that_cannot_run_the_backend_is_one_clear_line(tmp_path, python, says):
    with pytest.raises(RuntimeError) as err:
        envs.check_site_python("reference", python, tmp_path / "check.json")
    message = str(err.value)
    assert message.startswith(f"envs.reference.python: {python} ") and says in message
    assert "\n" not in message and not (tmp_path / "check.json").exists()
