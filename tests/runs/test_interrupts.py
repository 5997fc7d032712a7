"""Ctrl-C in compare and nuts, two processes on one cache entry, SIGKILL mid-write."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.usefixtures("no_leftover_processes")

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
PAUSE_HOOK = ROOT / "tests" / "pause_at_step"  # its sitecustomize pauses a fit at a step


def _pausing_env(
    folder: Path, step: int, guide: str | None = None, skip: int = 0
) -> dict[str, str]:
    """Environment in which fits (of ``guide``) pause after ``step`` until Ctrl-C.

    With ``skip``, the first ``skip`` fits of each process run to their end.

    The fit writes ``folder/<guide>.paused`` and waits: a test that sends SIGINT
    once the file exists interrupts the fit at that step on any machine, fast or
    loaded (see ``tests/pause_at_step/sitecustomize.py``).
    """
    env = {
        **ENV,
        "PYTHONPATH": os.pathsep.join([str(PAUSE_HOOK), str(ROOT)]),
        "VIMODELS_TEST_PAUSE_DIR": str(folder),
        "VIMODELS_TEST_PAUSE_STEP": str(step),
    }
    if guide is not None:
        env["VIMODELS_TEST_PAUSE_GUIDE"] = guide
    if skip:
        env["VIMODELS_TEST_PAUSE_SKIP"] = str(skip)
    return env


def _cli(*args: str, env: dict | None = None, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vimodels.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env or ENV,
        **popen,
    )


def _wait_for(stream, needle: str, timeout: float = 120) -> list[str]:
    """Read lines of ``stream`` until one contains ``needle``; return them."""
    lines, t0 = [], time.monotonic()
    while time.monotonic() - t0 < timeout:
        line = stream.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} never appeared: {''.join(lines)}")


def _finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    """``proc.communicate(timeout)``; the process is killed whatever happens."""
    try:
        return proc.communicate(timeout=timeout)
    finally:
        proc.kill()


_COMPARE_SCRIPT = textwrap.dedent(
    """
    import sys
    from vimodels.runs.compare import run_compare
    from vimodels import ConvergenceRule
    # no early stop: the first fit is still running when it pauses at its step 20
    run = run_compare("conjugate_linear_regression", guides=sys.argv[2:], steps=2000,
                      out=sys.argv[1], reference="exact", num_draws=200, iwae_k=10,
                      cache=False, netcdf=False, progress=True,
                      fit_options={"num_particles": 8, "lr_decay": 1.0, "jit": False,
                                   "convergence": ConvergenceRule(early_stop=False)})
    c = run.comparison
    print(c.interrupted_line())
    sys.exit(130 if c.partial else 0)
    """
)


def _wait_for_pause(folder: Path, guide: str, proc: subprocess.Popen, timeout: float = 300):
    """Wait until the fit of ``guide`` pauses (its marker file appears) or ``proc`` ends."""
    _wait_for_file(f"{guide}.paused", folder, proc, timeout)


@pytest.mark.slow
def test_ctrl_c_in_compare_keeps_a_partial_report(tmp_path):
    """In-process grid (``run_compare`` without an executor): Ctrl-C at the first fit's step 20."""
    out, marks = tmp_path / "cmp", tmp_path / "marks"
    marks.mkdir()
    guides = ["auto_normal", "auto_multivariate_normal", "auto_iaf_normal"]
    proc = subprocess.Popen(
        [sys.executable, "-c", _COMPARE_SCRIPT, str(out), *guides],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=_pausing_env(marks, 20, guides[0]),
    )
    _wait_for_pause(marks, guides[0], proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = _finish(proc)
    assert proc.returncode == 130, stderr
    diag = json.loads((out / "diagnostics.json").read_text())
    assert diag["partial"] is True
    assert diag["methods"] == [f"{guides[0]}/trace"]  # the fit running at Ctrl-C is kept
    assert diag["not_run"] == [f"{g}/trace" for g in guides[1:]]
    (row,) = diag["summary"]
    assert row["status"] == "interrupted" and row["num_steps"] == 20
    report = (out / "report.md").read_text()
    assert "interrupted: methods not run: " + ", ".join(diag["not_run"]) in report
    assert "PARTIAL RESULT" in (out / "report.html").read_text()
    assert "interrupted: methods not run" in stdout


@pytest.mark.slow
def test_ctrl_c_in_nuts_caches_nothing(tmp_path):
    cache = tmp_path / "cache"
    proc = _cli(
        "nuts",
        "eight_schools_noncentered",
        "--chains",
        "1",
        "--warmup",
        "200000",
        "--samples",
        "10",
        "--workers",
        "1",
        "--no-nuts-jit",
        "--cache",
        str(cache),
        "--out",
        str(tmp_path / "out"),
    )
    # the sampler's first progress line: the chains are about to run (200000 warm-up draws)
    try:
        _wait_for(proc.stderr, "NUTS on eight_schools_noncentered")
    except AssertionError:
        proc.kill()
        proc.communicate()
        raise
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert lines[-1] == "vimodels: NUTS interrupted; no reference was cached or written"
    written = [p for p in cache.rglob("*") if p.is_file() and p.suffix != ".lock"]
    assert written == [], written
    assert not (tmp_path / "out").exists()


_REFERENCE_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, sys
    from diagnostics.nuts.reference import run_nuts
    ref = run_nuts("conjugate_linear_regression",
                   settings={"num_chains": 2, "num_warmup": 50, "num_samples": 50},
                   seed=11, cache_dir=sys.argv[1], num_workers=1)
    h = hashlib.sha256()
    for site in sorted(ref.draws):
        h.update(ref.draws[site].tobytes())
    print(json.dumps({"from_cache": ref.from_cache, "sha": h.hexdigest()}))
    """
)


@pytest.mark.slow
def test_two_processes_computing_the_same_reference(tmp_path):
    cache = tmp_path / "cache"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _REFERENCE_SCRIPT, str(cache)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=ENV,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert "Warning" not in err, err  # no corrupted entry was seen
    results = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    assert results[0]["sha"] == results[1]["sha"]
    # the lock lets one compute; the other waits and loads its entry
    assert sorted(r["from_cache"] for r in results) == [False, True]
    assert len(list(cache.rglob("*.npz"))) == 1
    assert len(list(cache.rglob("*.json"))) == 1
    assert not list(cache.rglob("*.tmp"))


_WRITER_SCRIPT = textwrap.dedent(
    """
    import sys, threading, time
    from vimodels.io import atomic_write
    started = threading.Barrier(3)
    def write(tmp):
        with open(tmp, "wb") as fh:
            for i in range(10_000):
                fh.write(b"n" * (1 << 16))
                fh.flush()
                if i == 20:
                    started.wait()
                time.sleep(0.01)
    for target in sys.argv[1:]:
        threading.Thread(target=atomic_write, args=(target, write), daemon=True).start()
    started.wait()
    print("writing", flush=True)
    time.sleep(600)
    """
)


def test_sigkill_mid_write_leaves_old_file_or_none(tmp_path):
    existing, new = tmp_path / "old.nc", tmp_path / "new.nc"
    old = b"old complete file\n" * 1000
    existing.write_bytes(old)
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER_SCRIPT, str(existing), str(new)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=ENV,
    )
    _wait_for(proc.stdout, "writing", timeout=60)
    tmp = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(tmp) == 2 and all(p.stat().st_size > 20 * (1 << 16) for p in tmp)  # under way
    proc.kill()
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert existing.read_bytes() == old  # the old complete file, untouched
    assert not new.exists()  # no truncated file under the target's name
    # the partial temporary files stay, hidden (leading dot), never read as a target
    assert all(p.exists() and p.name.startswith(".") for p in tmp)


# ------------------------------------------------ Ctrl-C while an executor runs a grid

_EXECUTOR_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys, threading, time
    from pathlib import Path
    from vimodels.runs.executors import LocalExecutor
    from sweep_helpers import sleep_until_interrupted

    folder = Path(sys.argv[1])
    tasks = [str(folder / name) for name in "abcd"]

    def ctrl_c():  # once both workers run a task (the files are written inside it)
        while len(list(folder.glob("*.started"))) < 2:
            time.sleep(0.05)
        # a terminal's Ctrl-C reaches worker a as well; worker b hears only of this process
        os.kill(int((folder / "a.started").read_text()), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=ctrl_c, daemon=True).start()
    ex = LocalExecutor(2)
    try:
        for outcome in ex.map(sleep_until_interrupted, tasks):
            print("finished", outcome.task, flush=True)
    except KeyboardInterrupt:
        # a grace far beyond the test's timeout: interrupt() must return as soon as
        # the workers have saved and exited, not when the grace runs out
        ex.interrupt(grace=3600)
        print(json.dumps({"stopped": True}))
    """
)


def test_interrupting_a_local_executor_stops_every_worker(tmp_path):
    """Running tasks get one KeyboardInterrupt and time to save; queued ones never start.

    Worker a gets SIGINT twice (as from a terminal, then from ``interrupt``): the
    second must not cut its saving short. Worker b gets it only from ``interrupt``
    (``kill -INT`` of the main process): without that it would run on and the
    main process would wait for it at exit.
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", _EXECUTOR_SCRIPT, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])},
    )
    stdout, stderr = _finish(proc)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    # returned within communicate()'s timeout, far shorter than the grace
    assert json.loads(stdout.strip().splitlines()[-1]) == {"stopped": True}
    files = sorted(p.name for p in tmp_path.iterdir())
    # a and b ran and saved; c (already handed to the pool) and d never started
    assert files == ["a.saved", "a.started", "b.saved", "b.started"], files
    for name in "ab":
        pid = int((tmp_path / f"{name}.started").read_text())
        with pytest.raises(ProcessLookupError):  # exited and reaped: no zombie, nothing running
            os.kill(pid, 0)


STEPS = 1500


def _compare_args(out: Path, guides: list[str], executor: str) -> list[str]:
    """``vimodels compare`` of the conjugate model (exact reference) through an executor."""
    return [
        "compare",
        "conjugate_linear_regression",
        "--guides",
        *guides,
        "--steps",
        str(STEPS),
        "--reference",
        "exact",
        "--draws",
        "200",
        "--iwae-k",
        "10",
        "--no-netcdf",
        "--executor",
        executor,
        "--jobs",
        "1",  # local: one worker, so the cells run one after another, in grid order
        "--out",
        str(out),
    ]


def _wait_for_file(pattern: str, folder: Path, proc: subprocess.Popen, timeout: float = 240):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and proc.poll() is None:
        if list(folder.glob(pattern)):
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"{pattern} never appeared in {folder}: {proc.communicate()[1]}")


def _start_paused(
    args_for, tmp_path: Path, name: str, guide: str, skip: int = 0
) -> tuple[Path, Path, subprocess.Popen]:
    """Start ``vimodels *args_for(out)`` in a session of its own; wait until a fit pauses.

    Fits of ``guide`` pause after step 20 (the first ``skip`` of each process run
    to their end). Returns the output folder ``tmp_path / name``, the marker
    folder and the running process.
    """
    out, marks = tmp_path / name, tmp_path / "marks"
    marks.mkdir()
    proc = _cli(
        *args_for(out),
        env=_pausing_env(marks, 20, guide, skip=skip),
        start_new_session=True,
    )
    _wait_for_file(f"{guide}.paused", marks, proc)
    return out, marks, proc


def _session_processes(sid: int) -> dict[int, str]:
    """Processes of session ``sid`` still running, pid -> command line (Linux ``/proc``).

    Zombies do not count: an orphan may stay one for a while where nothing reaps orphans.
    """
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, _, session = stat.read_text().rsplit(")", 1)[1].split()[:4]
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue  # gone meanwhile
        if int(session) == sid and state != "Z":
            found[int(stat.parent.name)] = cmdline
    return found


def _trackers(sid: int) -> set[int]:
    """Pids of multiprocessing's resource trackers in session ``sid`` (while they run)."""
    found = _session_processes(sid).items()
    return {pid for pid, cmd in found if "multiprocessing.resource_tracker" in cmd}


def _assert_no_worker_left(sid: int, trackers: set[int]) -> None:
    """Nothing of the command's session runs on, but multiprocessing's resource tracker.

    The command reaps its workers before it exits (:meth:`LocalExecutor.interrupt`
    joins them), so none may be found. The resource tracker (``trackers``, its
    pids seen while the command ran: an exiting process has an empty command
    line) is not the command's to reap: it exits by itself once the command has
    exited (end of file on its pipe), closing its copy of stderr a moment before
    the kernel marks it exited, so it may still be seen here; wait for its exit
    (a pidfd becomes readable), which must come.
    """
    left = _session_processes(sid)
    others = {pid: cmd for pid, cmd in left.items() if pid not in trackers}
    assert others == {}, f"processes still running after the command exited: {others}"
    for pid in left:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue  # exited and reaped meanwhile
        try:
            ready, _, _ = select.select([fd], [], [], 60)
        finally:
            os.close(fd)
        assert ready, f"multiprocessing's resource tracker {pid} did not exit after the command"


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["local", "serial"])
def test_ctrl_c_in_compare_with_an_executor_keeps_a_partial_report(tmp_path, capsys, executor):
    """``vimodels compare --executor local|serial``: finished fits, the one stopped early, a report.

    Grid of three cells run in order. The second cell pauses at its step 20 (a test
    hook), and Ctrl-C comes then: the first is reported as finished, the second with
    what it learned (status ``interrupted``), the third as not run.
    local: a terminal's Ctrl-C (the whole process group); serial: ``kill -INT``.
    """
    first, second, third = "auto_normal", "auto_diagonal_normal", "auto_multivariate_normal"
    line = (
        f"interrupted: methods not run: {third}/trace; "
        f"stopped early (what they learned is kept): {second}/trace"
    )
    out, _, proc = _start_paused(
        lambda out: _compare_args(out, [first, second, third], executor), tmp_path, "cmp", second
    )
    trackers = _trackers(proc.pid)  # seen now, while the command runs
    if executor == "local":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGINT)
    stdout, stderr = _finish(proc)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    _assert_no_worker_left(proc.pid, trackers)  # the workers were stopped and reaped
    assert f"PARTIAL RESULT: {line}" in stdout
    assert f"**PARTIAL RESULT: {line}**" in (out / "report.md").read_text()
    diag = json.loads((out / "diagnostics.json").read_text())
    assert diag["partial"] is True and diag["not_run"] == [f"{third}/trace"]
    summary = pd.read_csv(out / "summary.csv").set_index("method")
    assert list(summary.index) == [f"{first}/trace", f"{second}/trace"]
    assert summary.loc[f"{first}/trace", "status"] in ("max_steps", "converged")
    assert summary.loc[f"{second}/trace", "status"] == "interrupted"
    assert summary.loc[f"{second}/trace", "num_steps"] == 20
    # only the first cell's folder is finished; the second keeps its partial result apart
    (done,) = (out / "fits").glob(f"*__{first}__*")
    (stopped,) = (out / "fits").glob(f"*__{second}__*")
    assert (done / "summary.json").exists() and not (stopped / "summary.json").exists()
    assert (stopped / "partial" / "summary.json").exists()
    if executor == "serial":
        return
    # a rerun (here, in this process) reuses the finished fit and recomputes nothing
    from vimodels.cli.main import main

    before = (done / "summary.json").read_bytes()
    args = _compare_args(out, [first], "serial")
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "1 fit(s) already finished" in captured.err and "PARTIAL" not in captured.out
    assert (done / "summary.json").read_bytes() == before
    assert list(pd.read_csv(out / "summary.csv")["method"]) == [f"{first}/trace"]


# ------------------------------------------------------- calibrate: Ctrl-C, a lost worker

CAL_SIMS = 4


def _calibrate_args(out: Path, executor: str) -> list[str]:
    """``vimodels calibrate`` of the conjugate model: 4 simulations of one short fit each."""
    return [
        "calibrate",
        "conjugate_linear_regression",
        "--guides",
        "mean_field",
        "--sims",
        str(CAL_SIMS),
        "--steps",
        "60",
        "--no-jit",
        "--draws",
        "20",
        "--seed",
        "3",
        "--executor",
        executor,
        "--jobs",
        "1",  # local: one worker, so the simulations run one after another, in order
        "--out",
        str(out),
    ]


def _paused_calibration(tmp_path: Path) -> tuple[Path, Path, subprocess.Popen]:
    """``vimodels calibrate --executor local`` (one worker), paused in the third fit's step 20."""
    return _start_paused(
        lambda out: _calibrate_args(out, "local"), tmp_path, "cal", "mean_field", skip=2
    )


def _sim_records(folder: Path) -> dict[str, dict]:
    """File name -> simulation record without its timings."""
    out = {}
    for path in sorted((folder / "sims").glob("*.json")):
        rec = json.loads(path.read_text())
        rec.pop("wall_time_s")
        for m in rec["methods"].values():
            m.pop("wall_time_s")
        out[path.name] = rec
    return out


@pytest.fixture(scope="module")
def uninterrupted_calibration(tmp_path_factory):
    """The same calibration run to its end in one go (serial, in this process)."""
    from vimodels.cli.main import main

    out = tmp_path_factory.mktemp("calibrate") / "ref"
    assert main([*_calibrate_args(out, "serial"), "--quiet"]) == 0
    return _sim_records(out), json.loads((out / "calibration.json").read_text())


def _assert_same_calibration(out: Path, reference: tuple[dict, dict]) -> None:
    """Same records bit for bit (seeds, ranks, statuses), each simulation ranked once."""
    records, payload = reference
    assert _sim_records(out) == records
    assert sorted(r["index"] for r in records.values()) == list(range(CAL_SIMS))
    got = json.loads((out / "calibration.json").read_text())
    assert got["partial"] is False and got["ranks"] == payload["ranks"]
    assert all(len(r) == CAL_SIMS for r in got["ranks"]["mean_field/trace"].values())
    assert got["summary"][0]["ranked"] == CAL_SIMS and got["failures"] == payload["failures"]


@pytest.mark.slow
def test_ctrl_c_in_calibrate_keeps_finished_simulations_and_resumes(
    tmp_path, capsys, uninterrupted_calibration
):
    """``vimodels calibrate --executor local``: Ctrl-C (the whole process group) while the
    third simulation's fit is at its step 20 (a test hook; the first two fits of the worker
    run to their end). Exit 130, no traceback, no worker left, a PARTIAL report of the two
    finished simulations; a rerun runs the other two only and ends with the records and
    ranks of an uninterrupted run, bit for bit."""
    out, _, proc = _paused_calibration(tmp_path)
    trackers = _trackers(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = _finish(proc)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    _assert_no_worker_left(proc.pid, trackers)
    assert "PARTIAL RESULT" in stdout
    assert "interrupted: stopping; finished simulations are kept for a rerun" in stderr
    kept = sorted((out / "sims").glob("*.json"))
    assert [p.name[:8] for p in kept] == ["sim00000", "sim00001"]  # nothing of the third
    before = {p.name: p.read_bytes() for p in kept}
    partial = json.loads((out / "calibration.json").read_text())
    assert partial["partial"] is True and (partial["executed"], partial["reused"]) == (2, 0)
    assert partial["summary"][0]["ranked"] == 2
    assert all(f["status"] != "failed" for f in partial["failures"])
    assert "PARTIAL RESULT" in (out / "report.md").read_text()

    from vimodels.cli.main import main

    assert main(_calibrate_args(out, "serial")) == 0  # the rerun, here
    err = capsys.readouterr().err
    assert "2 simulation(s) already finished" in err
    assert "[1/2]" in err and "[2/2]" in err and "[3/" not in err  # only the other two ran
    assert {p.name: p.read_bytes() for p in kept} == before  # the finished ones untouched
    done = json.loads((out / "calibration.json").read_text())
    assert (done["executed"], done["reused"]) == (2, 2)
    _assert_same_calibration(out, uninterrupted_calibration)


@pytest.mark.slow
def test_calibrate_survives_a_lost_worker(tmp_path, uninterrupted_calibration):
    """The worker process is killed (SIGKILL: out of memory, a node gone) in the middle of
    the third simulation: the pool reruns that simulation in a new worker, the run ends
    normally, and every simulation is ranked once, as in an uninterrupted run."""
    # the first worker pauses in its third fit; its replacement starts counting afresh
    out, marks, proc = _paused_calibration(tmp_path)
    worker = int((marks / "mean_field.paused").read_text())
    assert worker != proc.pid
    os.kill(worker, signal.SIGKILL)
    stdout, stderr = _finish(proc, timeout=300)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "FAILED" not in stderr, stderr
    progress = [line for line in stderr.splitlines() if line.startswith("[")]
    sims = sorted(int(line.split(" sim ")[1].split()[0]) for line in progress)
    assert sims == list(range(CAL_SIMS)), progress  # each simulation reported once
    done = json.loads((out / "calibration.json").read_text())
    assert (done["executed"], done["reused"]) == (CAL_SIMS, 0)
    _assert_same_calibration(out, uninterrupted_calibration)
