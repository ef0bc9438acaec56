"""Crashes never lose work: a real training script killed (SIGKILL during a step, during a save, at random
times) or stopped (SIGTERM) resumes from its newest complete checkpoint and ends with the same loss curve
and bit-identical weights as a run that was never interrupted. Non-finite losses are skipped exactly."""

import json
import math
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, script_env
from safetensors.torch import load_file


STEPS = 12
MODEL = ["--dim", "32", "--depth", "1", "--heads", "2"]


def command(data, out, *extra):
    return [sys.executable, "train/train_dalle.py", "--data", str(data / "tokens"), "--tokenizer", str(data / "tok"),
            "--out", str(out), *MODEL, "--steps", str(STEPS), "--batch_size", "8", "--warmup_steps", "2",
            "--lr", "3e-3", "--save_every", "3", "--log_every", "1", "--null_cond_prob", "0.2", "--no-progress",
            *extra]


def run(data, out, fault=None, timeout=300):
    env = script_env()
    if fault:
        env["DALLE_AR_FAULT"] = fault
    return subprocess.run(command(data, out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def curve(out) -> dict[int, float]:
    """step -> loss from metrics.jsonl; a step logged twice (run again after a crash) keeps its last value."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def final_weights(out):
    return load_file(str(out / "export" / "model.safetensors"))


def assert_same_run(a, b):
    ca, cb = curve(a), curve(b)
    assert sorted(ca) == list(range(1, STEPS + 1)) and ca == cb, "loss curves differ after resume"
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), "final weights differ"


@pytest.fixture(scope="module")
def straight(token_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    proc = run(token_data, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_sigkill_during_a_step_resumes_with_the_same_loss_curve(token_data, straight, tmp_path):
    out = tmp_path / "run"
    proc = run(token_data, out, fault="step:8")  # killed inside step 8; last checkpoint: step 6
    assert proc.returncode == -signal.SIGKILL
    assert (out / "checkpoints" / "latest").read_text() == "step_00000006"
    proc = run(token_data, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "step 6" in proc.stdout
    assert_same_run(straight, out)


def test_sigkill_during_a_save_keeps_the_previous_checkpoint(token_data, straight, tmp_path):
    out = tmp_path / "run"
    proc = run(token_data, out, fault="save:9")  # killed after writing step 9's files, before marking it complete
    assert proc.returncode == -signal.SIGKILL
    ckpts = out / "checkpoints"
    assert (ckpts / "step_00000009").is_dir() and not (ckpts / "step_00000009" / "complete").exists()
    assert (ckpts / "latest").read_text() == "step_00000006" and (ckpts / "step_00000006" / "complete").exists()
    proc = run(token_data, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(straight, out)
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000009", "step_00000012"]  # keep_checkpoints 2


def test_sigkill_at_random_times_then_resume_is_step_exact(token_data, straight, tmp_path):
    out, rng = tmp_path / "run", random.Random(1)
    env = script_env()
    for attempt in range(3):
        proc = subprocess.Popen(command(token_data, out), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        # wait until the run trains (metrics.jsonl grows), then kill it a random moment later
        deadline = time.time() + 120
        start_rows = len(curve(out)) if (out / "metrics.jsonl").exists() else 0
        while proc.poll() is None and time.time() < deadline:
            if (out / "metrics.jsonl").exists() and len(curve(out)) > start_rows:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err[-3000:]
    proc = run(token_data, out)  # finish (a no-op export if the last attempt already did)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(straight, out)


def test_sigterm_after_some_steps_saves_and_exits_cleanly(token_data, straight, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(command(token_data, out), cwd=ROOT, env=script_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").exists() and len(curve(out)) >= 2) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    if "stopped by SIGTERM" in stdout:  # (the run may also have finished before the signal landed)
        step = int(stdout.split("stopped by SIGTERM at step ")[1].split(";")[0])
        assert (out / "checkpoints" / "latest").read_text() == f"step_{step:08d}"
        assert (out / "checkpoints" / f"step_{step:08d}" / "complete").exists()
        assert not (out / "export").exists() or step == STEPS
        proc = run(token_data, out)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(straight, out)


# -- non-finite losses (in process, through the real engine) -------------------------------------

def _train(tmp_path, name, batches, poison=(), max_nonfinite=10, steps=6):
    from dalle_ar.config import DalleConfig, TrainConfig, preset
    from dalle_ar.engine import Trainer
    from dalle_ar.model import DalleTransformer

    cfg_m = preset(DalleConfig, "tiny", dim=32, depth=1, heads=2, text_vocab_size=40, text_len=8, image_fmap_size=4,
                   num_image_tokens=64)
    torch.manual_seed(0)
    cfg = TrainConfig(out=str(tmp_path / name), steps=steps, batch_size=4, zero_stage=2, lr=3e-3, warmup_steps=1,
                      save_every=0, wandb="disabled", progress=False, max_nonfinite=max_nonfinite)
    trainer = Trainer(DalleTransformer(cfg_m), cfg, name=name, export_config={"model": cfg_m.__dict__})

    def stream():
        for i in range(10 ** 6):
            g = torch.Generator().manual_seed(i)
            yield (torch.randint(0, cfg_m.num_text_tokens, (4, 8), generator=g),
                   torch.randint(0, 64, (4, 16), generator=g), torch.tensor(float(i in poison)))

    def loss_fn(engine, batch, step):
        text, codes, bad = batch
        loss, metrics = engine.module.loss_from_logits(*engine(text, codes), text, codes)
        return loss + (math.nan if bad.item() else 0.0), metrics

    kept = (b for i, b in enumerate(stream()) if i in batches)
    return trainer, trainer.fit(kept if batches is not None else stream(), loss_fn)


def test_nan_loss_skips_exactly_that_micro_batch(tmp_path):
    """A run whose batch 2 gives NaN ends with the same weights as a run that never saw batch 2."""
    trainer, poisoned = _train(tmp_path, "poisoned", None, poison={2})
    assert trainer.nonfinite == 1 and trainer.consumed == 7
    _, clean = _train(tmp_path, "clean", set(range(10 ** 6)) - {2})
    a, b = final_weights(poisoned.parent), final_weights(clean.parent)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.isfinite().all() for v in a.values())


def test_nan_losses_in_a_row_stop_with_a_message(tmp_path):
    with pytest.raises(FloatingPointError, match="3 non-finite losses in a row.*Last good checkpoint"):
        _train(tmp_path, "nan", None, poison={1, 2, 3}, max_nonfinite=3)


# -- stop signals at any point ---------------------------------------------------------------------

def _start(cmd, out, timeout=120):
    """Start a training command; return once its Trainer is set up (it wrote ds_config.resolved.json)."""
    (out / "ds_config.resolved.json").unlink(missing_ok=True)  # a resumed run writes it anew
    proc = subprocess.Popen(cmd, cwd=ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while not (out / "ds_config.resolved.json").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    return proc


def _sigterm(cmd, out, delay: float) -> tuple[subprocess.Popen, str, str, float]:
    """Start `cmd`, send SIGTERM `delay` s after its Trainer is set up; (process, stdout, stderr, seconds it took to end)."""
    proc = _start(cmd, out)
    time.sleep(delay)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    return proc, stdout, stderr, time.time() - sent


def test_sigterm_while_waiting_for_data_ends_within_seconds(token_data, tmp_path):
    """A run waiting for data that does not come (here a shard behind a pipe that trickles a byte every 0.2 s) used
    to ignore SIGTERM until a step completed; now it ends within seconds with 128 + 15, nothing to save."""
    out = tmp_path / "run"
    cmd = command(token_data, out)
    cmd[cmd.index("--data") + 1] = "pipe:while true; do printf x; sleep 0.2; done"
    proc, stdout, stderr, seconds = _sigterm(cmd, out, delay=2)  # in the data wait by then
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert seconds < 20
    assert "dalle: stopped by SIGTERM before the first step; nothing to save." in stdout
    assert not list((out / "checkpoints").glob("step_*")) and (out / "run.lock").read_text() == ""


def test_sigterm_mid_step_saves_the_step_boundary_and_resumes_exactly(token_data, straight, tmp_path):
    """SIGTERM at many moments of a run (in the data wait, a forward, a backward, an update or a save): the run
    checkpoints the last step boundary (or finds it saved) and exits 0; resuming gives the uninterrupted run."""
    out = tmp_path / "run"
    for delay in (0.3, 0.9, 1.7):
        proc, stdout, stderr, _ = _sigterm(command(token_data, out), out, delay)
        if "before the first step" in stdout:
            assert proc.returncode == 128 + signal.SIGTERM
            continue
        assert proc.returncode == 0, stderr[-3000:]
        if "stopped by SIGTERM" in stdout:
            step = int(stdout.split("stopped by SIGTERM at step ")[1].split(";")[0])
            assert (out / "checkpoints" / f"step_{step:08d}" / "complete").exists()
    proc = run(token_data, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(straight, out)


def test_sigterm_after_the_run_completed_exits_0(token_data, straight, tmp_path):
    """A stop that lands after the run's export is written (a scheduler stopping the job as it ends) loses nothing:
    exit 0 and a complete run, not a process killed by the signal (it used to be -15)."""
    out = tmp_path / "run"
    proc = run(token_data, out, fault="SIGTERM@finished")  # as `fit` returns
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(straight, out)
    # while the interpreter shuts down (about a second with torch loaded): 0.3 s after the run's last line
    out = tmp_path / "again"
    proc = subprocess.Popen(command(token_data, out), cwd=ROOT, env=script_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("dalle: done at step"):
            time.sleep(0.3)  # past the script's return, into the teardown
            proc.send_signal(signal.SIGTERM)
            break
    else:
        pytest.fail("the run never printed its last line ('dalle: done at step ...')")
    proc.stdout.read()
    assert proc.wait(timeout=120) == 0
    assert_same_run(straight, out)


def test_a_second_run_on_a_live_run_directory_is_refused_and_a_dead_ones_lock_is_taken_over(token_data, tmp_path):
    out = tmp_path / "run"
    first = _start(command(token_data, out, "--steps", "4000"), out)
    try:
        second = subprocess.run(command(token_data, out), cwd=ROOT, env=script_env(), capture_output=True, text=True,
                                timeout=120)
        last = second.stderr.strip().splitlines()[-1]
        assert second.returncode == 1 and last.startswith(f"error: {out}: another run is writing here (pid {first.pid} on ")
        assert "pass another --out" in last
    finally:
        first.kill()  # dies holding the lock: the kernel releases it
        first.communicate()
    proc = run(token_data, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"taking over the lock of a run that is no longer alive (pid {first.pid} on" in proc.stdout


@pytest.mark.parametrize("error", ["ENOSPC", "EIO"])
def test_a_failed_save_keeps_the_previous_checkpoint_and_stops_with_one_line(token_data, straight, tmp_path, error):
    """A full disk (or an I/O error) while saving step 6: the run stops with a one-line error naming the checkpoint
    that resumes (step 3); the half-written step 6 never counts; the rerun ends like an uninterrupted run."""
    out = tmp_path / "run"
    proc = run(token_data, out, fault=f"{error}@save:6")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {out / 'checkpoints' / 'step_00000006'}: saving failed (") and "run stops" in last
    assert f"{out / 'checkpoints' / 'step_00000003'} is the checkpoint that resumes" in last
    assert (out / "checkpoints" / "latest").read_text() == "step_00000003"
    assert not (out / "checkpoints" / "step_00000006" / "complete").exists()
    proc = run(token_data, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(straight, out)


def test_sigterm_during_compilation_ends_within_seconds(token_data, tmp_path):
    """--compile: the first forward spends many seconds in torch.compile; a SIGTERM there stops the run at once."""
    out = tmp_path / "run"
    proc, stdout, stderr, seconds = _sigterm(command(token_data, out, "--compile"), out, delay=3)  # compiling
    assert seconds < 30
    if proc.returncode == 128 + signal.SIGTERM:  # stopped in the compilation (the usual case)
        assert "stopped by SIGTERM before the first step" in stdout
    else:  # a warm compile cache made it quick: stopped at a step instead
        assert proc.returncode == 0 and "stopped by SIGTERM at step" in stdout, stderr[-3000:]
