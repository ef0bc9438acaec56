"""Launchers: rank discovery under torchrun / the deepspeed launcher (they set RANK...), SLURM srun and MPI, and a
refusal of half-set launches (N processes that each think they are rank 0 of 1 would share one --out)."""

import subprocess
import sys

import pytest
from conftest import ROOT, script_env

from dalle_ar.config import ConfigError
from dalle_ar.engine import free_port
from dalle_ar.engine.distributed import first_host, launch_env


def test_first_host_of_a_slurm_nodelist():
    assert first_host("gpu[07-09,12],cpu3") == "gpu07"
    assert first_host("node5,node6") == "node5" and first_host("a[1-2]") == "a1"


def test_launch_env_per_launcher():
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "29500"}
    assert launch_env(torchrun) == {}
    srun = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
            "SLURM_JOB_NODELIST": "gpu[07-10]", "SLURM_JOB_ID": "4321"}
    assert launch_env(srun) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                                "MASTER_PORT": "29821"}
    # the batch step of an sbatch script (one task runs python directly) is a single process
    assert launch_env({**srun, "SLURM_STEP_NUM_TASKS": "1"})["WORLD_SIZE"] == "1"
    mpi = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
           "MASTER_ADDR": "n0"}
    assert launch_env(mpi) == {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_PORT": "29500"}
    alone = launch_env({})
    assert (alone["RANK"], alone["WORLD_SIZE"], alone["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")


def test_half_set_launches_are_refused_with_a_one_line_error():
    with pytest.raises(ConfigError, match="sets RANK but not WORLD_SIZE, MASTER_ADDR, MASTER_PORT"):
        launch_env({"RANK": "1"})
    with pytest.raises(ConfigError, match="MPI launch of 4 ranks needs MASTER_ADDR"):
        launch_env({"PMI_RANK": "0", "PMI_SIZE": "4"})


def test_srun_style_launch_of_two_processes_is_one_two_rank_run(token_data, tmp_path):
    """Two processes with only SLURM's variables (as `srun -n 2 python train/train_dalle.py ...` gives them) train
    together as ranks 0 and 1 of one run: one metrics.jsonl, checkpoints with both ranks' optimizer shards."""
    out, port = tmp_path / "run", str(free_port())
    cmd = [sys.executable, "train/train_dalle.py", "--data", str(token_data / "tokens"), "--tokenizer",
           str(token_data / "tok"), "--out", str(out), "--dim", "32", "--depth", "1", "--heads", "2", "--steps", "3",
           "--batch_size", "4", "--save_every", "0", "--log_every", "1", "--progress", "false", "--wandb", "disabled"]
    procs = []
    for rank in range(2):
        env = {**script_env(), "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NTASKS": "2",
               "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "7",
               "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert "x 2 ranks" in results[0][0] and "DeepSpeed ZeRO" not in results[1][0]  # rank 0 speaks for the run
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    shards = sorted(p.name for p in (out / "checkpoints" / "step_00000003").glob("*optim_states.pt"))
    assert len(shards) == 2 and (out / "export" / "model.safetensors").exists()
