"""Scale: streaming to a parquet dataset, resume after a kill, sharding over devices, bounded host memory."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import doses

from vpop import posterior, trial
from vpop.trial import runner
from vpop.cli import Progress
from vpop.simulate import Arm, prepare_arm, simulate_arm
from vpop.store import PatientStore
from vpop.trial.table import patient_table

EXPERIMENT = {"reference_arm": "iv", "arms": {
    "iv": {"drug": "mosunetuzumab", "route": "iv", "population": "fl_rr",
           "regimen": doses((1, 1, 1, "mg"), (1, 8, 2, "mg"), (1, 15, 60, "mg"), cycle_days=21)},
    "sc": {"drug": "mosunetuzumab", "route": "sc", "population": "fl_rr", "regimen": "mosunetuzumab_fl_sc"}}}
SETTINGS = trial.TrialSettings(n=50, seed=2, chunk_size=20, horizon_days=21, trajectories=0)


def _run(tmp_path, **kw):
    arms, ref = trial.arms_from_config(EXPERIMENT)
    return trial.run_trial(arms, ref, SETTINGS, draws=posterior.draws("default", 2, 0), **kw)


def _dataset(result) -> pd.DataFrame:
    p = pd.read_parquet(result.dataset)
    p["arm"], p["draw"] = p["arm"].astype(str), p["draw"].astype(int)
    return p.sort_values(["arm", "draw", "patient_id"]).reset_index(drop=True)


def test_streamed_trial_equals_in_memory_and_resumes_after_a_kill(tmp_path, monkeypatch):
    memory = _run(tmp_path)
    whole = _run(tmp_path, checkpoint_dir=tmp_path / "a")
    pd.testing.assert_frame_equal(whole.summary, memory.summary)
    pd.testing.assert_frame_equal(whole.comparisons, memory.comparisons)
    rows = _dataset(whole)
    expected = memory.patients.sort_values(["arm", "draw", "patient_id"]).reset_index(drop=True)
    assert len(rows) == 2 * 2 * 50
    np.testing.assert_array_equal(rows["crs_grade_dose1"], expected["crs_grade_dose1"])
    np.testing.assert_array_equal(rows["best_change_percent"], expected["best_change_percent"])

    # Kill the run on its 4th chunk write: 3 complete parts are on disk, nothing else.
    original, writes = PatientStore.write, []

    def dying_write(self, *args):
        if len(writes) == 3:
            raise KeyboardInterrupt
        writes.append(args[:3])
        original(self, *args)

    monkeypatch.setattr(PatientStore, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, checkpoint_dir=tmp_path / "b")
    monkeypatch.setattr(PatientStore, "write", original)
    parts = [p for p in (tmp_path / "b").rglob("part-*.parquet") if p.is_file()]
    assert len(parts) == 3
    stale = parts[0].with_name(".part-000009.parquet.999.tmp")  # as a kill in the middle of a write leaves
    stale.write_bytes(b"half a parquet file")

    simulated = []
    real = runner.dispatch_draws
    monkeypatch.setattr(runner, "dispatch_draws", lambda *a, **k: simulated.append(1) or real(*a, **k))
    quiet = Progress(False, 2 * 2 * 50)  # the CLI's progress, as off a terminal
    again = _run(tmp_path, checkpoint_dir=tmp_path / "b", progress=quiet)
    quiet.close()
    assert len(simulated) == 2 * 2 * 3 - 3  # arms x draws x chunks, less the 3 written before the kill
    assert quiet.simulated == 200 - 3 * 20  # the 3 parts on disk held 20 patients each
    assert not stale.exists()
    pd.testing.assert_frame_equal(_dataset(again), rows)
    pd.testing.assert_frame_equal(again.summary, whole.summary)
    pd.testing.assert_frame_equal(again.comparisons, whole.comparisons)

    # Once more with the bar shown: every chunk is resumed and none counts towards patients/s.
    shown = Progress(True, 2 * 2 * 50)
    _run(tmp_path, checkpoint_dir=tmp_path / "b", progress=shown)
    shown.close()
    assert shown.bar.n == 200 and shown.bar.initial == 200 and shown.simulated == 0


def test_resume_false_and_other_inputs_do_not_reuse_chunks(tmp_path, monkeypatch):
    first = _run(tmp_path, checkpoint_dir=tmp_path)
    simulated = []
    real = runner.dispatch_draws
    monkeypatch.setattr(runner, "dispatch_draws", lambda *a, **k: simulated.append(1) or real(*a, **k))
    _run(tmp_path, checkpoint_dir=tmp_path)
    assert simulated == []  # everything resumed
    _run(tmp_path, checkpoint_dir=tmp_path, resume=False)
    assert len(simulated) == 12
    arms, ref = trial.arms_from_config(EXPERIMENT)
    other = trial.run_trial(arms, ref, trial.TrialSettings(**{**vars(SETTINGS), "seed": 3}), checkpoint_dir=tmp_path)
    assert other.dataset.parent != first.dataset.parent  # another seed is another run


def test_writer_threads_write_the_parts_the_caller_would(tmp_path, monkeypatch):
    """Parts handed to the store's writer threads read back equal to the table and to parts written in
    the caller's thread, nullable columns of dose periods an arm lacks included (dtypes kept); a failed
    write is raised (at the next write that waits for it, or when the run finishes), and the parts handed
    over before it land whole."""
    from vpop import store as store_module

    prepared = prepare_arm(Arm("iv", "mosunetuzumab", "iv", "fl_rr", "mosunetuzumab_fl_iv"), horizon_days=21)
    table = patient_table(prepared, simulate_arm(prepared, 30, seed=1), draw=0, n_doses=5)
    assert len(prepared.compiled.periods) == 3
    assert table["dose4"].isna().all() and str(table["dose4"].dtype) == "string"
    assert str(table["crs_grade_dose5"].dtype) == "Int64" and str(table["crs_any_dose4"].dtype) == "boolean"
    assert (table["dose1"] == prepared.compiled.periods[0].label).all() and str(table["dose1"].dtype) == "string"
    stores = {w: PatientStore(tmp_path / f"w{w}", writers=w) for w in (0, 2)}
    for s in stores.values():
        for c in range(5):
            s.write("iv", 0, c, table)
        s.finish()
    expected = table.drop(columns=["arm", "draw"])
    for c in range(5):
        pd.testing.assert_frame_equal(pd.read_parquet(stores[2].part("iv", 0, c)), expected)
        pd.testing.assert_frame_equal(pd.read_parquet(stores[2].part("iv", 0, c)), pd.read_parquet(stores[0].part("iv", 0, c)))

    real = store_module.pq.write_table

    def fail_third(arrow, where, **kw):
        if ".part-000002.parquet" in str(where):
            Path(where).write_bytes(b"half a parquet file")
            raise OSError("disk full")
        real(arrow, where, **kw)

    monkeypatch.setattr(store_module.pq, "write_table", fail_third)
    failing = PatientStore(tmp_path / "failing", writers=2)
    with pytest.raises(OSError, match="disk full"):  # at the write that waits for it, or at the end
        for c in range(5):
            failing.write("iv", 0, c, table)
        failing.finish()
    failing.close()  # the runner's cleanup: the parts handed over before the error land whole
    written = sorted(p.name for p in (tmp_path / "failing").rglob("*") if p.is_file())
    assert written[:2] == ["part-000000.parquet", "part-000001.parquet"] and "part-000002.parquet" not in written
    assert all(name.startswith("part-") for name in written)  # no temporary file left


FOUR_DEVICES = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jax
    from vpop.simulate import Arm, patient_sharding, prepare_arm, simulate_arm
    assert jax.local_device_count() == 4 and patient_sharding().num_devices == 4
    prepared = prepare_arm(Arm(*sys.argv[2:7]), horizon_days=21)
    red = simulate_arm(prepared, 50, seed=5, chunk_size=18).reductions  # 18 -> 20 per call: 5 patients per device
    np.savez(sys.argv[1], **red)
""")


def test_four_devices_give_the_results_of_one(tmp_path):
    arm = Arm("a", "mosunetuzumab", "sc", "fl_rr", "mosunetuzumab_fl_sc")
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip(), JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", FOUR_DEVICES, str(tmp_path / "four.npz"), *list(vars(arm).values())[:5]],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    four = np.load(tmp_path / "four.npz")
    one = simulate_arm(prepare_arm(arm, horizon_days=21), 50, seed=5, chunk_size=50).reductions
    for name, value in one.items():
        # float32: a sharded run may round the last bit differently (seen: 5e-7 on a log-scale index)
        np.testing.assert_allclose(four[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(four["crs_grade"], one["crs_grade"])


MEMORY = textwrap.dedent("""
    import gc, json, sys
    from pathlib import Path
    from vpop import trial

    def mb(key):
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key))
        return int(line.split()[1]) / 1024

    regimen = {"cycle_days": 21, "cycles": 1, "doses": [{"cycle": 1, "day": 1, "amount": 1, "unit": "mg"}]}
    arms, ref = trial.arms_from_config({"arms": {"iv": {"drug": "mosunetuzumab", "route": "iv", "population": "fl_rr",
                                                         "regimen": regimen}}})
    run = lambda n: trial.run_trial(arms, ref, trial.TrialSettings(n=n, chunk_size=1000, horizon_days=7, trajectories=0),
                                    checkpoint_dir=sys.argv[2], resume=False)
    run(1000)  # compile first: the measured runs share one warm process
    out = {}
    for n in (int(sys.argv[1]), 10 * int(sys.argv[1])):
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set (VmHWM)
        base = mb("VmRSS")
        run(n)
        out[n] = {"base_mb": base, "peak_mb": mb("VmHWM")}
    print(json.dumps(out))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to reset the peak RSS")
def test_host_memory_does_not_grow_with_n(tmp_path):
    """Peak resident memory of 300,000 patients vs 30,000, in one warm process: an in-memory table
    would add ~70 MB at 300,000 (measured: 5 -> 24 MB growth from 1e4 to 1e5 patients); streamed,
    the growth stays at the size of a chunk."""
    # Without the suite's cheap-compile flag (conftest): this run is simulation, not compilation, bound.
    env = dict(os.environ)
    flags = env.pop("XLA_FLAGS", "").replace("--xla_backend_optimization_level=0", "").strip()
    if flags:  # XLA reads a value that is not "--..." as a file name
        env["XLA_FLAGS"] = flags
    run = subprocess.run([sys.executable, "-c", MEMORY, "30000", str(tmp_path)], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    small, large = json.loads(run.stdout.strip().splitlines()[-1]).values()
    assert large["peak_mb"] < 1.5 * small["peak_mb"]
    growth = {k: r["peak_mb"] - r["base_mb"] for k, r in (("small", small), ("large", large))}
    assert growth["large"] < 1.5 * growth["small"] + 8.0, growth


def test_draws_packed_into_one_call_give_the_same_patients(monkeypatch):
    """With few patients, several draws of an arm share a device call (up to chunk_size simulations);
    every patient row is the same as with one draw per call."""
    arms, ref = trial.arms_from_config(EXPERIMENT)
    draws = posterior.draws("default", 3, 0)
    settings = trial.TrialSettings(n=20, seed=2, chunk_size=20, horizon_days=21, trajectories=0)
    calls = []
    real = runner.dispatch_draws
    monkeypatch.setattr(runner, "dispatch_draws", lambda ds, *a, **k: calls.append(len(ds)) or real(ds, *a, **k))
    alone = trial.run_trial(arms, ref, settings, draws=draws)
    assert calls == [1] * 6  # 3 draws x 2 arms
    calls.clear()
    packed = trial.run_trial(arms, ref, trial.TrialSettings(**{**vars(settings), "chunk_size": 40}), draws=draws)
    assert calls == [2, 2, 1, 1]  # draws 0-1 of each arm, then draw 2 (padded to 2)
    # Grades, rescues and responses are the same; continuous values (peaks, onset times) agree to
    # float32 rounding (XLA vectorises the typical parameters' arithmetic differently once stacked:
    # the draws' susceptibility spreads too, s exp(omega z), and an onset interpolated within a step
    # carries that rounding, 1.1e-5 relative seen).
    pd.testing.assert_frame_equal(packed.patients, alone.patients, check_exact=False, rtol=1e-4)
    exact = [c for c in alone.patients.columns
             if c.startswith(("crs_grade", "crs_any", "toci_rescue")) or c in ("crs_max_grade", "best_response", "orr", "cr")]
    assert len(exact) > 10
    pd.testing.assert_frame_equal(packed.patients[exact], alone.patients[exact], check_exact=True)
    pd.testing.assert_frame_equal(packed.summary, alone.summary, check_exact=True)
