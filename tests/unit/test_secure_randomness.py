"""privacy.secure_randomness: the batch plan and noise from the OS's entropy, recorded nowhere;
the runner end to end in the reference venv (tiny arrays, as test_runner_reference)."""

from __future__ import annotations

import json
import re
import subprocess

import numpy as np

from dpscale.runner import plan
from dpscale.runner.synthetic import write_inputs
from dpscale.workflow import step_command, thread_env
from tests.conformance.test_resume import kill_at_first_checkpoint
from tests.conftest import venv_python
from tests.unit.test_runner_reference import runner_args, train

EPOCHS = 6  # the kill lands after epoch 1's checkpoint, with epochs to spare


def weights(out) -> dict[str, np.ndarray]:
    with np.load(out / "weights.npz") as z:
        return {k: z[k] for k in z.files}


def test_secure_runs_differ(tmp_path):
    """Two secure runs differ, and differ from the seeded run (which repeats exactly: the
    kill-and-resume tests, tests/conformance/test_resume.py, compare two seeded runs)."""
    inputs = write_inputs(tmp_path / "in", epochs=1, private=True)
    public = train(tmp_path, inputs, "p")[0]
    secure = [train(tmp_path, inputs, f"s{i}", secure_randomness=True)[0] for i in range(2)]
    p0, (s0, s1) = weights(public), [weights(o) for o in secure]
    assert any(not np.array_equal(s0[k], s1[k]) for k in s0), "two secure runs were identical"
    assert any(not np.array_equal(s0[k], p0[k]) for k in s0), "the secure run used the seed"
    for out, flag in [(public, False), (secure[0], True)]:
        assert json.loads((out / "metrics.json").read_text())["secure_randomness"] is flag


def logged_batches(log: str) -> dict[int, list[int]]:
    """epoch -> the batch sizes its progress lines name (every step is logged at 4 per epoch)."""
    sizes: dict[int, list[int]] = {}
    for m in re.finditer(r"epoch (\d+)/\d+ step \d+/\d+ .* batch (\d+) ", log):
        sizes.setdefault(int(m[1]), []).append(int(m[2]))
    return sizes


def test_secure_run_resumes_its_secret_plan_and_writes_it_nowhere(tmp_path):
    inputs = write_inputs(tmp_path / "in", epochs=EPOCHS, private=True)
    out, ck = tmp_path / "out", tmp_path / "ck"
    args = runner_args(inputs, out, ck, secure_randomness=True)
    cmd = step_command("dpscale.runner", venv_python("reference"), threads=1, **args)
    killed_log = tmp_path / "killed.log"
    kill_at_first_checkpoint(cmd, ck, killed_log)
    state = json.loads((ck / "state.json").read_text())  # the one place the root is kept
    root, killed_at = state["secret_root"], state["epoch"]
    assert 1 <= killed_at < EPOCHS and root.bit_length() > 64
    resumed = subprocess.run(
        cmd, capture_output=True, text=True, env=thread_env(1), timeout=300, check=True
    )
    log2 = resumed.stdout + resumed.stderr
    assert "resumed from checkpoint" in log2 and not ck.exists()

    # Both processes drew the plan of the secret root, the second one from the checkpoint's.
    n, q = 64, 0.25
    seen = {**logged_batches(killed_log.read_text()), **logged_batches(log2)}
    assert sorted(seen) == list(range(1, EPOCHS + 1))
    for epoch, sizes in seen.items():
        assert sizes == [len(b) for b in plan.epoch_plan(n, q, 4, root, epoch)], epoch

    # Neither the root nor a seed derived from it is in any output or log: as text, and the
    # 31-bit epoch noise seeds also as int32/int64 bytes in the arrays.
    derived = [plan.noise_seed(root, e) for e in range(1, EPOCHS + 1)]
    as_text = [str(root), f"{root:x}", *map(str, derived)]
    as_bytes = [np.array(d, t).tobytes() for d in derived for t in (np.int32, np.int64)]
    texts = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    texts["killed.log"], texts["resumed.log"] = killed_log.read_bytes(), log2.encode()
    assert len(texts) == 6
    for name, data in texts.items():
        if name.endswith(".npz"):
            with np.load(out / name) as z:
                data = b"".join(z[k].tobytes() + str(z[k].tolist()).encode() for k in z.files)
            assert not any(b in data for b in as_bytes), f"{name} holds an epoch noise seed"
        assert not any(t.encode() in data for t in as_text), f"{name} holds a secret seed"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["secure_randomness"] is True and metrics["resumes"] == 1
