"""The run lifecycle as a hostile user meets it: interrupts inside writes, damaged and crafted
checkpoints, concurrent runs, resumes with other settings, umask, stale files."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from rbp.data import atomic as atomic_mod
from rbp.runner import checkpoint as ckpt_mod
from rbp.runner import cli, read_json, register, rng_state, set_rng_state, unregister
from rbp.runner.checkpoint import MAGIC, CheckpointError, load_checkpoint, save_checkpoint
from rbp.runner.lifecycle import RunContext
from rbp.runner.lock import LOCK_FILE, RunLock, RunLockedError
from rbp.runner.registry import Experiment
from rbp.runner.resume import settings_differences
from rbp.runner.signals import deferred_interrupts


@dataclass
class ToyConfig:
    methods: list[str] = field(default_factory=lambda: ["a", "b"])
    seed: int = 0
    steps: int = 12
    lr: float = 0.3
    checkpoint_every: int = 3
    interrupt_after: int | None = None


def toy_run(cfg: ToyConfig, ctx: RunContext) -> dict[str, Any]:
    """A noisy scalar descent per method, checkpointed like the real applications."""
    out: dict[str, Any] = {}
    for method in cfg.methods:
        prior = ctx.finished(method)
        if prior is not None:
            out[method] = prior
            continue
        w, step, losses = torch.zeros((), dtype=torch.float64), 0, []
        state = ctx.load(method)
        if state is not None:
            w, step, losses = state["w"], state["step"], state["losses"]
            set_rng_state(state["rng"])
        while step < cfg.steps:
            w = w - cfg.lr * (w - 2.0) + 0.1 * torch.randn((), dtype=torch.float64)
            step += 1
            losses.append(float((w - 2.0) ** 2))
            if ctx.should_checkpoint(step):
                ctx.save(method, {"w": w, "step": step, "losses": losses, "rng": rng_state()})
            ctx.tick()
        out[method] = {"w": float(w), "losses": losses}
        ctx.finish(method, out[method])
        ctx.write_results({"methods": out})
    return {"methods": out}


@pytest.fixture(autouse=True)
def toy_experiment(tmp_path_factory: pytest.TempPathFactory):
    yaml = tmp_path_factory.mktemp("cfg") / "toy.yaml"
    yaml.write_text("steps: 12\n")
    register(Experiment(name="lctoy", help="toy", config_cls=ToyConfig, run=toy_run,
                        methods=("a", "b", "c"), default_config=yaml))
    yield
    unregister("lctoy")


def _run(out: Path, *extra: str) -> int:
    return cli.main(["lctoy", "--out", str(out), "--no-progress", *extra])


def _methods(out: Path) -> dict[str, Any]:
    return read_json(out / "results.json")["methods"]


# ---------------------------------------------------------------- checkpoint files


class _HalfWriter:
    """A file whose second write stores half its bytes, then Ctrl-C arrives."""

    def __init__(self, f: Any) -> None:
        self.f, self.calls = f, 0

    def write(self, data: bytes) -> int:
        self.calls += 1
        if self.calls == 2:
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise KeyboardInterrupt
        return self.f.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)

    def __enter__(self) -> _HalfWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()


@pytest.mark.parametrize("where", ["mid-write", "at-fsync"])
def test_interrupt_inside_a_checkpoint_write_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    path = tmp_path / "checkpoints" / "a.pt"
    save_checkpoint(path, {"step": 3, "x": torch.arange(5.0)})
    before = path.read_bytes()
    if where == "mid-write":
        real = os.fdopen
        monkeypatch.setattr(atomic_mod.os, "fdopen", lambda fd, mode: _HalfWriter(real(fd, mode)))
    else:
        def fsync(fd: int) -> None:
            raise KeyboardInterrupt
        monkeypatch.setattr(atomic_mod.os, "fsync", fsync)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 6, "x": torch.arange(50_000.0)})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.pt"]  # no .tmp left


def test_signal_during_a_save_waits_for_the_write(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = RunContext(out_dir=tmp_path)
    real = ckpt_mod.atomic_write

    class Killed:
        def __init__(self, path: Path) -> None:
            self.cm = real(path)

        def __enter__(self) -> Any:
            f = self.cm.__enter__()
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the write
            return f

        def __exit__(self, *exc: Any) -> Any:
            return self.cm.__exit__(*exc)

    monkeypatch.setattr(ckpt_mod, "atomic_write", Killed)
    with pytest.raises(KeyboardInterrupt):
        ctx.save("u", {"x": torch.ones(3)})
    assert torch.equal(load_checkpoint(ctx.checkpoint_path("u"))["x"], torch.ones(3))
    with pytest.raises(KeyboardInterrupt), deferred_interrupts():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)


def test_a_signal_during_a_step_saves_the_state_where_the_step_ended(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C in the middle of a training step waits for the step's end; the interrupt then
    saves the state after that step, whole (both halves of its update), not the last
    periodic checkpoint."""
    ctx = RunContext(out_dir=tmp_path)
    state = {"step": 0, "a": 0, "b": 0}
    with pytest.raises(KeyboardInterrupt), ctx.saving_on_interrupt("u", lambda: dict(state)):
        while state["step"] < 10:
            with ctx.step():
                state["a"] += 1
                if state["step"] == 3:
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(0.01)
                state["b"] += 1
                state["step"] += 1
            if state["step"] == 2:
                ctx.save("u", dict(state))
    saved = load_checkpoint(ctx.checkpoint_path("u"))
    assert (saved["step"], saved["a"], saved["b"]) == (4, 4, 4)
    assert "interrupt received; saving once the training step under way ends" in \
        capsys.readouterr().err


def test_a_signal_held_while_an_error_escapes_is_not_lost() -> None:
    """Ctrl-C during a step that then fails (a divergence the loop would catch and go on
    from) still interrupts: KeyboardInterrupt, caused by the error."""
    with pytest.raises(KeyboardInterrupt) as info, deferred_interrupts():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        raise ValueError("diverged")
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(ValueError), deferred_interrupts():  # no signal: the error as it was
        raise ValueError("diverged")


def test_an_interrupt_raised_inside_a_step_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    """An interrupt that escapes from inside a step (the state half updated) saves nothing;
    one between steps (the interrupt_after hook) saves."""
    ctx = RunContext(out_dir=tmp_path)
    ctx.save("u", {"step": 2})
    with (pytest.raises(KeyboardInterrupt),
          ctx.saving_on_interrupt("u", lambda: {"step": 99}), ctx.step()):
        raise KeyboardInterrupt
    assert load_checkpoint(ctx.checkpoint_path("u"))["step"] == 2
    ctx.interrupt_after = 1
    with pytest.raises(KeyboardInterrupt), ctx.saving_on_interrupt("u", lambda: {"step": 3}):
        with ctx.step():
            pass
        ctx.tick()
    assert load_checkpoint(ctx.checkpoint_path("u"))["step"] == 3


def test_run_interrupted_inside_a_checkpoint_write_resumes_to_the_same_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert _run(full) == 0
    real, calls = atomic_mod.os.fsync, [0]

    def fsync(fd: int) -> None:
        if ".a.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            calls[0] += 1
            if calls[0] == 3:  # the write of method a's checkpoint at step 9
                raise KeyboardInterrupt
        real(fd)

    monkeypatch.setattr(atomic_mod.os, "fsync", fsync)
    assert _run(cut) == 130
    monkeypatch.undo()
    assert load_checkpoint(cut / "checkpoints" / "a.pt")["step"] == 6
    assert not list(cut.rglob("*.tmp"))
    assert read_json(cut / "results.json")["status"] == "interrupted"
    assert _run(cut, "--resume") == 0
    assert _methods(cut) == _methods(full)


def _corrupt(path: Path, n: int = 20) -> None:
    data = bytearray(path.read_bytes())
    start = len(MAGIC) + 65 + 40
    for i in range(n):
        data[start + 7 * i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_checkpoint_is_refused_clearly(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    cut = tmp_path / "cut"
    assert _run(cut, "--set", "interrupt_after=8") == 130
    _corrupt(cut / "checkpoints" / "a.pt")
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(cut / "checkpoints" / "a.pt")
    capsys.readouterr()
    assert _run(cut, "--resume") == 2
    err = capsys.readouterr().err
    assert "damaged (SHA-256 mismatch)" in err and "Traceback" not in err
    res = read_json(cut / "results.json")
    assert res["status"] == "failed" and "damaged" in res["error"]
    assert "a" not in res.get("methods", {})  # nothing resumed to other numbers


class _Payload:
    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, ("open(__import__('os').environ['RBP_PWNED'], 'w').write('x')",))


def _with_header(payload: bytes) -> bytes:
    return MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload


@pytest.mark.parametrize("kind", ["pickle", "torch-zip", "no-header"])
def test_crafted_checkpoint_never_runs_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            kind: str) -> None:
    marker = tmp_path / "pwned"
    monkeypatch.setenv("RBP_PWNED", str(marker))
    path = tmp_path / "checkpoints" / "a.pt"
    path.parent.mkdir()
    if kind == "pickle":
        path.write_bytes(_with_header(pickle.dumps({"step": _Payload()}, protocol=2)))
    else:
        buf = io.BytesIO()
        torch.save({"step": _Payload()}, buf)
        path.write_bytes(_with_header(buf.getvalue()) if kind == "torch-zip" else buf.getvalue())
    with pytest.raises(CheckpointError, match="refusing|not written by"):
        load_checkpoint(path)
    assert not marker.exists()


def test_checkpoint_rejects_objects_at_save_time(tmp_path: Path) -> None:
    import numpy as np

    with pytest.raises(TypeError, match=r"state\['arr'\] is a ndarray"):
        save_checkpoint(tmp_path / "x.pt", {"arr": np.zeros(3)})
    save_checkpoint(tmp_path / "y.pt", {"n": np.float64(1.5), "k": np.int64(2)})
    got = load_checkpoint(tmp_path / "y.pt")
    assert got == {"n": 1.5, "k": 2} and type(got["n"]) is float


# ---------------------------------------------------------------- file modes


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        out = tmp_path / "r"
        assert _run(out, "--set", "interrupt_after=5") == 130
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    for path in (out / "results.json", out / "checkpoints" / "a.pt", out / LOCK_FILE):
        assert path.stat().st_mode & 0o777 == want, path


# ---------------------------------------------------------------- resume rules


def test_resume_with_other_settings_is_refused(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r"
    assert _run(out, "--set", "interrupt_after=15") == 130
    before = (out / "results.json").read_bytes()
    for extra, key in ((("--set", "lr=0.1"), "lr"), (("--method", "a"), "methods"),
                       (("--seed", "1"), "seed")):
        capsys.readouterr()
        assert _run(out, *extra, "--resume") == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"other settings ({key}:" in err and "--force" in err
        assert (out / "results.json").read_bytes() == before  # nothing rewritten or relabelled
    # run-control settings may change
    assert _run(out, "--set", "checkpoint_every=2", "--resume") == 0
    assert set(_methods(out)) == {"a", "b"}
    # a new run with other settings only with --force
    assert _run(out, "--set", "lr=0.1", "--force") == 0
    assert read_json(out / "results.json")["config"]["lr"] == 0.1


@pytest.mark.parametrize("damage", ["missing", "garbage"])
def test_resume_without_readable_settings_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    out = tmp_path / "r"
    assert _run(out, "--set", "interrupt_after=5") == 130
    if damage == "missing":
        (out / "results.json").unlink()
    else:
        (out / "results.json").write_text('{"status": "runn')
    capsys.readouterr()
    assert _run(out, "--resume") == 2
    err = capsys.readouterr().err
    assert "settings of the run to resume are unknown" in err and "--force" in err
    assert load_checkpoint(out / "checkpoints" / "a.pt")["step"] == 3  # kept
    assert _run(out, "--force") == 0


def test_resume_of_a_finished_run_changes_nothing(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r"
    assert _run(out) == 0
    before = (out / "results.json").read_bytes()
    assert _run(out, "--resume") == 0
    assert "nothing to do" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before


def test_wall_time_adds_up_over_sessions(tmp_path: Path) -> None:
    out = tmp_path / "r"
    assert _run(out, "--set", "interrupt_after=15") == 130
    first = read_json(out / "results.json")["wall_time_s"]
    assert _run(out, "--resume") == 0
    assert read_json(out / "results.json")["wall_time_s"] >= first


def test_one_resume_message_per_unit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r"
    assert _run(out, "--set", "interrupt_after=15") == 130
    capsys.readouterr()
    assert _run(out, "--resume") == 0
    err = capsys.readouterr().err
    assert err.count("a: finished earlier") == 1 and err.count("b: resuming") == 1


def test_settings_differences_ignores_control_keys() -> None:
    old = {"lr": 0.1, "methods": ["a"], "interrupt_after": 3, "checkpoint_every": 2}
    assert settings_differences(old, {**old, "interrupt_after": None}) == []
    assert settings_differences(old, {**old, "methods": ("a",)}) == []
    assert settings_differences(old, {**old, "lr": 0.2, "new": 1}) == ["lr", "new"]


def test_stale_tmp_files_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "r"
    assert _run(out, "--set", "interrupt_after=5") == 130
    junk = out / "checkpoints" / ".a.pt.999.deadbeef.tmp"
    junk.write_bytes(b"half a checkpoint")
    assert _run(out, "--resume") == 0
    assert not junk.exists()


# ---------------------------------------------------------------- directories


def test_impossible_out_is_one_clear_line(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in (blocker, blocker / "sub"):
        assert _run(out) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("rbp lctoy: error:") and "--out" in err and "\n" not in err


@pytest.mark.parametrize("name", ["checkpoints", "results.json"])
def test_a_file_or_folder_in_place_of_the_runs_own_is_one_clear_line(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r"
    out.mkdir()
    if name == "checkpoints":
        (out / name).write_text("x")
    else:
        (out / name).mkdir()
    for extra in ((), ("--force",)):
        assert _run(out, *extra) == 2
        err = capsys.readouterr().err
        assert f"{out / name} is a" in err and "move it away" in err and "Errno" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_out_is_one_clear_line(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert _run(ro / "run") == 2
        assert _run(ro) == 2
    finally:
        ro.chmod(0o700)
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 2


@pytest.mark.parametrize("kind", ["data", "disk", "other", "runtime"])
def test_failing_run_is_marked_failed(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      kind: str) -> None:
    import errno

    from rbp.data import DataError

    def broken(cfg: ToyConfig, ctx: RunContext) -> dict[str, Any]:
        if kind == "disk":
            raise OSError(errno.ENOSPC, "No space left on device: damaged sparse matrix")
        if kind == "other":  # anything else (a TypeError from a setting, out of memory, ...)
            raise TypeError("'float' object cannot be interpreted as an integer: damaged")
        if kind == "runtime":  # torch's errors from deep inside are RuntimeErrors
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied: damaged")
        raise DataError("ind.cora.x is a damaged sparse matrix")

    register(Experiment(name="lcbroken", help="x", config_cls=ToyConfig, run=broken))
    try:
        code = cli.main(["lcbroken", "--out", str(tmp_path / "b"), "--no-progress"])
        assert code == (1 if kind in ("other", "runtime") else 2)
        err = capsys.readouterr().err
        assert "damaged" in err and "Traceback" not in err and err.count("\n") == 1
        assert "run with -v for the traceback" in err
        res = read_json(tmp_path / "b" / "results.json")
        assert res["status"] == "failed" and "damaged" in res["error"]
        if kind in ("other", "runtime"):  # -v shows where
            assert cli.main(["lcbroken", "--out", str(tmp_path / "c"), "--no-progress",
                             "-v"]) == 1
            assert "Traceback" in capsys.readouterr().err
    finally:
        unregister("lcbroken")


# ---------------------------------------------------------------- two processes


_WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from dataclasses import dataclass
    from rbp.runner import cli, register
    from rbp.runner.registry import Experiment

    @dataclass
    class C:
        seed: int = 0
        wait_for: str = ""

    def run(cfg, ctx):
        Path(cfg.wait_for + ".started").touch()
        while not Path(cfg.wait_for).exists():
            time.sleep(0.02)
        return {"ok": 1}

    register(Experiment(name="lockdemo", help="x", config_cls=C, run=run))
    sys.exit(cli.main(["lockdemo", *sys.argv[1:]]))
""")


def _spawn(script: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 120
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the first run did not start"
        time.sleep(0.05)


def test_second_concurrent_run_fails_and_a_stale_lock_is_reported(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    out, go = tmp_path / "run", tmp_path / "go"
    first = _spawn(script, "--out", str(out), "--no-progress", "--set", f"wait_for={go}")
    try:
        _wait_for(Path(str(go) + ".started"), first)
        second = _spawn(script, "--out", str(out), "--no-progress", "--force",
                        "--set", f"wait_for={go}")
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2, err
        assert f"another run (pid {first.pid}" in err and "Traceback" not in err
        assert read_json(out / "results.json")["status"] == "running"  # --force deleted nothing
        first.kill()  # like kill -9: no chance to release the lock
        first.wait(timeout=60)
        go.touch()
        third = _spawn(script, "--out", str(out), "--no-progress", "--resume",
                       "--set", f"wait_for={go}")
        _, err = third.communicate(timeout=120)
        assert third.returncode == 0, err
        assert f"ended without releasing it (pid {first.pid}" in err
        assert read_json(out / "results.json")["status"] == "finished"
        assert (out / LOCK_FILE).read_text() == ""  # released cleanly
    finally:
        if first.poll() is None:
            first.kill()


def test_lock_in_one_process_blocks_a_second_holder(tmp_path: Path) -> None:
    lock = RunLock(tmp_path, ["rbp", "x"])
    try:
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path)
    finally:
        lock.release()
    RunLock(tmp_path).release()  # free again


# ---------------------------------------------------------------- damaged data


PLANETOID = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "planetoid"


@pytest.mark.skipif(not (PLANETOID / "ind.cora.allx").is_file(), reason="no Planetoid data")
def test_damaged_planetoid_file_fails_the_run_cleanly(tmp_path: Path) -> None:
    """A sparse matrix with an out-of-range index used to crash SciPy (SIGSEGV) and leave the
    run marked 'running'; in a subprocess, so a crash fails this test instead of pytest."""
    pytest.importorskip("scipy")
    from rbp.data.planetoid import _unpickle

    data = tmp_path / "data"
    data.mkdir()
    for f in PLANETOID.glob("ind.cora.*"):
        (data / f.name).write_bytes(f.read_bytes())
    allx = _unpickle(data / "ind.cora.allx")
    allx.indices[5] = 10**8
    (data / "ind.cora.allx").write_bytes(pickle.dumps(allx, protocol=2))
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "rbp.runner.cli", "citation", "--quick", "--dataset", "cora",
         "--data-dir", str(data), "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "ind.cora.allx is a damaged sparse matrix" in proc.stderr
    assert "Traceback" not in proc.stderr
    res = read_json(out / "results.json")
    assert res["status"] == "failed" and "damaged sparse matrix" in res["error"]


# ---------------------------------------------------------------- never silently wrong


def test_a_plain_rerun_over_a_damaged_finished_run_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r"
    assert _run(out) == 0
    for damaged in ('{"status": "fini', "[1, 2]", "\x00\x01"):
        (out / "results.json").write_text(damaged)
        capsys.readouterr()
        assert _run(out) == 2
        err = capsys.readouterr().err
        assert "cannot be read as a run's results" in err and "--force" in err, err
        assert (out / "results.json").read_text() == damaged  # not overwritten
        assert _run(out, "--dry-run") == 2
        assert "cannot be read" in capsys.readouterr().err
    assert _run(out, "--force") == 0
    assert read_json(out / "results.json")["status"] == "finished"


def test_a_checkpoint_from_a_run_with_other_settings_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mine, other = tmp_path / "mine", tmp_path / "other"
    assert _run(mine, "--set", "interrupt_after=5") == 130
    assert _run(other, "--set", "interrupt_after=5", "--set", "lr=0.1") == 130
    before = load_checkpoint(mine / "checkpoints" / "a.pt")
    (mine / "checkpoints" / "a.pt").write_bytes((other / "checkpoints" / "a.pt").read_bytes())
    capsys.readouterr()
    assert _run(mine, "--resume") == 2
    err = capsys.readouterr().err
    assert "written by a run with other settings (lr: 0.1 -> 0.3)" in err, err
    assert "--force" in err and "fresh --out" in err and "Traceback" not in err
    # a run-control setting does not count; the settings key is not handed to the run
    (mine / "checkpoints" / "a.pt").unlink()
    save_checkpoint(mine / "checkpoints" / "a.pt", before)
    assert _run(mine, "--resume", "--set", "checkpoint_every=2") == 0


@dataclass
class NetConfig:
    width: int = 4
    seed: int = 0
    interrupt_after: int | None = None


def net_run(cfg: NetConfig, ctx: RunContext) -> dict[str, Any]:
    torch.set_num_threads(1)
    net = torch.nn.Linear(cfg.width, 1)
    state = ctx.load("net")
    if state is not None:
        net.load_state_dict(state["model"])
    ctx.save("net", {"model": net.state_dict()})
    ctx.tick()
    return {"out": float(net.weight.detach().sum())}


def test_an_old_checkpoint_that_does_not_fit_the_model_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    register(Experiment(name="lcnet", help="net", config_cls=NetConfig, run=net_run))
    try:
        out = tmp_path / "r"
        assert cli.main(["lcnet", "--out", str(out), "--set", "interrupt_after=1"]) == 130
        # a checkpoint written without the settings record, for a wider model
        save_checkpoint(out / "checkpoints" / "net.pt",
                        {"model": torch.nn.Linear(7, 1).state_dict()})
        capsys.readouterr()
        assert cli.main(["lcnet", "--out", str(out), "--resume"]) == 2
        err = capsys.readouterr().err
        assert "does not fit the model these settings build" in err, err
        assert "size mismatch" in err and "--force" in err and "Traceback" not in err
        assert read_json(out / "results.json")["status"] == "failed"
    finally:
        unregister("lcnet")


def test_results_record_the_threads_the_run_used(tmp_path: Path) -> None:
    register(Experiment(name="lcnet", help="net", config_cls=NetConfig, run=net_run))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # the run sets 1 once it has started
        assert cli.main(["lcnet", "--out", str(tmp_path / "r")]) == 0
        assert read_json(tmp_path / "r" / "results.json")["machine"]["torch_threads"] == 1
    finally:
        torch.set_num_threads(threads)
        unregister("lcnet")


def test_dry_run_of_a_resume_says_what_the_resume_would_refuse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r"
    assert _run(out, "--set", "interrupt_after=5") == 130
    capsys.readouterr()
    assert _run(out, "--resume", "--dry-run") == 0
    assert "ready to run" in capsys.readouterr().out
    assert _run(out, "--resume", "--dry-run", "--set", "lr=0.1") == 2
    assert "cannot --resume" in capsys.readouterr().err
    (out / "results.json").write_text('{"status": "runn')
    assert _run(out, "--resume", "--dry-run") == 2
    assert "settings of the run to resume are unknown" in capsys.readouterr().err


def test_a_run_reuses_the_finished_units_of_another_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """--reuse-from DIR: a unit finished there is copied here and not trained again; a
    unit there written with other settings is refused naming them; a damaged one is skipped
    with a warning; the run's own folder, or a file, is one clear line."""
    worker, main = tmp_path / "worker", tmp_path / "main"
    assert _run(worker) == 0
    caplog.set_level(logging.INFO)
    assert _run(main, "--reuse-from", str(worker)) == 0
    assert _methods(main) == _methods(worker)
    assert "a: finished by the run in" in caplog.text and "b: finished by the run in" in caplog.text
    assert (main / "checkpoints" / "a.pt").read_bytes() == (
        worker / "checkpoints" / "a.pt").read_bytes()
    # the worker's unit is damaged: skipped, trained here instead (same numbers: same seed)
    data = (worker / "checkpoints" / "b.pt").read_bytes()
    (worker / "checkpoints" / "b.pt").write_bytes(data[:-7] + b"garbage")
    caplog.clear()
    assert _run(tmp_path / "third", "--set", "methods=[b]", "--reuse-from", str(worker)) == 0
    assert "damaged" in caplog.text and "not reused" in caplog.text
    # other numbers there: refused, naming the setting and the remedy
    other = tmp_path / "other"
    assert _run(other, "--set", "lr=0.1") == 0
    capsys.readouterr()
    assert _run(tmp_path / "fourth", "--reuse-from", str(other)) == 2
    err = capsys.readouterr().err
    assert "other settings (lr: 0.1 -> 0.3)" in err and f"drop --reuse-from {other}" in err
    assert "Traceback" not in err
    assert _run(main, "--force", "--reuse-from", str(main)) == 2
    assert "this run's own --out" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert _run(tmp_path / "fifth", "--reuse-from", str(tmp_path / "file")) == 2
    assert "is not a folder" in capsys.readouterr().err
    # --dry-run says what would be reused, and refuses the same mistakes
    assert _run(tmp_path / "sixth", "--dry-run", "--reuse-from", str(worker)) == 0
    assert f"reuse: {worker} (2 checkpoint(s) there now" in capsys.readouterr().out
    assert _run(tmp_path / "sixth", "--dry-run", "--reuse-from", str(tmp_path / "file")) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert not (tmp_path / "sixth").exists()


# ---------------------------------------------------------------- data moved to another folder


@dataclass
class DataConfig:
    data_dir: str | None = None
    steps: int = 12
    checkpoint_every: int = 3
    interrupt_after: int | None = None


def data_run(cfg: DataConfig, ctx: RunContext) -> dict[str, Any]:
    """A descent towards the mean of the numbers in ``<data_dir>/x.txt``."""
    x = torch.tensor([float(v) for v in (Path(cfg.data_dir) / "x.txt").read_text().split()],
                     dtype=torch.float64)
    ctx.record_data("x", x)
    w, step, losses = torch.zeros((), dtype=torch.float64), 0, []
    state = ctx.load("fit")
    if state is not None:
        w, step, losses = state["w"], state["step"], state["losses"]
    while step < cfg.steps:
        w = w - 0.3 * (w - x.mean())
        step += 1
        losses.append(float((w - x.mean()) ** 2))
        if ctx.should_checkpoint(step):
            ctx.save("fit", {"w": w, "step": step, "losses": losses})
        ctx.tick()
    return {"w": float(w), "losses": losses}


@pytest.fixture
def data_experiment(tmp_path: Path):
    yaml = tmp_path / "data.yaml"
    yaml.write_text("steps: 12\n")
    register(Experiment(name="lcdata", help="toy with data", config_cls=DataConfig,
                        run=data_run, default_config=yaml))
    yield
    unregister("lcdata")


def _data_run(out: Path, data: Path, *extra: str) -> int:
    return cli.main(["lcdata", "--out", str(out), "--data-dir", str(data), "--no-progress",
                     *extra])


def _folder_with(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "x.txt").write_text(text)
    return path


def test_a_run_resumes_with_the_same_data_in_another_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], data_experiment: None
) -> None:
    """A run moved to a machine whose data live elsewhere resumes (its checkpoints hold the
    data's SHA-256, not only the folder), to the numbers of an uninterrupted run; other data
    there are refused in one line, nothing rewritten."""
    here = _folder_with(tmp_path / "here", "1 2 6")
    there = _folder_with(tmp_path / "there", "1 2 6")
    whole, out = tmp_path / "whole", tmp_path / "moved"
    assert _data_run(whole, here) == 0
    assert _data_run(out, here, "--set", "interrupt_after=7") == 130
    ckpt = out / "checkpoints" / "fit.pt"
    assert set(load_checkpoint(ckpt)["_rbp_data"]) == {"x"}
    assert _data_run(out, there, "--resume") == 0
    assert read_json(out / "results.json")["losses"] == read_json(whole / "results.json")["losses"]
    # a finished run resumed where its data lie elsewhere: checked, not "nothing to do"
    capsys.readouterr()
    assert _data_run(whole, there, "--resume") == 0
    assert "checking the data here against its checkpoints" in capsys.readouterr().err
    before = (whole / "results.json").read_bytes()
    assert _data_run(whole, _folder_with(tmp_path / "else", "0 0 1"), "--resume") == 2
    assert "other data than this run read" in capsys.readouterr().err
    assert (whole / "results.json").read_bytes() == before  # refused, not marked failed
    # no checkpoints to compare with: refused before anything is written, never retrained
    for path in (whole / "checkpoints").glob("*.pt"):
        path.unlink()
    assert _data_run(whole, here, "--resume") == 2   # it last read them from `there`
    err = capsys.readouterr().err
    assert "no checkpoints to compare the data here with" in err and "Traceback" not in err
    assert (whole / "results.json").read_bytes() == before
    # other data in the folder named: refused, naming what differs and what to do
    other = _folder_with(tmp_path / "other", "1 2 7")
    assert _data_run(out, here, "--force", "--set", "interrupt_after=7") == 130
    before = ckpt.read_bytes()
    capsys.readouterr()
    assert _data_run(out, other, "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "other data than this run read (x: SHA-256" in err
    assert "--data-dir" in err and "Traceback" not in err
    assert ckpt.read_bytes() == before


def test_a_checkpoint_without_data_fingerprints_needs_its_own_data_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], data_experiment: None
) -> None:
    """Checkpoints written before runs recorded their data: resumed only with the same
    data_dir (as before), and then given the fingerprints, so they move from then on."""
    here, there = _folder_with(tmp_path / "here", "3 4"), _folder_with(tmp_path / "there", "3 4")
    out = tmp_path / "r"
    assert _data_run(out, here, "--set", "interrupt_after=4") == 130
    ckpt = out / "checkpoints" / "fit.pt"
    state = load_checkpoint(ckpt)
    del state["_rbp_data"]
    save_checkpoint(ckpt, state)
    capsys.readouterr()
    assert _data_run(out, there, "--resume", "--set", "interrupt_after=1") == 2
    assert "other settings (data_dir:" in capsys.readouterr().err
    assert _data_run(out, here, "--resume", "--set", "interrupt_after=1") == 130
    assert set(load_checkpoint(ckpt)["_rbp_data"]) == {"x"}  # noted on the way
    assert _data_run(out, there, "--resume") == 0


def test_data_fingerprint_is_of_the_values() -> None:
    import numpy as np

    from rbp.runner.resume import data_fingerprint

    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert data_fingerprint(x) == data_fingerprint(x.numpy()) == data_fingerprint(x.t().t())
    assert data_fingerprint(x) == data_fingerprint(torch.tensor(x.tolist()))
    for other in (x.double(), x.reshape(3, 2), x + 1e-7 * (x == 0), x[:1]):
        assert data_fingerprint(other) != data_fingerprint(x)
    assert data_fingerprint(x, x) != data_fingerprint(x)
    assert data_fingerprint(torch.tensor([True])) == data_fingerprint(np.array([True]))
