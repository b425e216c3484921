"""runs.launch: job specs, submitit parameters, and real array jobs through LocalExecutor."""

import argparse
import os
import stat

import numpy as np
import pytest
import torch

from probes.evaluate import main as probe_main
from probes.evaluate import parser as probe_parser
from runs.checkpoint import save_checkpoint
from runs.errors import UserError
from runs.launch import (
    FLAGS,
    ShardTask,
    add_launcher_args,
    check_output,
    executor_parameters,
    failure_reason,
    job_specs,
    launch_config,
    make_executor,
    run_job,
)
from runs.models import create_model
from runs.results import open_result, shard_path

PROBE = ["--dataset", "digits", "--probes", "knn", "--ks", "5", "--seeds", "0",
         "--subset", "40"]


def launcher_args(argv) -> argparse.Namespace:
    return add_launcher_args(argparse.ArgumentParser()).parse_args(argv)


def test_job_specs_pass_the_allowed_modules_on_as_import_flags():
    """--import was taken off argv before main: each task must import the same modules."""
    from runs import usercode
    usercode.allow("my_lab.models")
    assert job_specs(["a", "--shards", "2"], 2)[1] == ["--import", "my_lab.models", "a",
                                                      "--shard", "1/2"]


def test_job_specs_give_each_task_its_shard_and_no_launcher_flags():
    argv = ["a.pt", "b.pt", "--grid=-1:1:5", "--launcher", "slurm", "--shards=3", "--no-wait",
            "--slurm-partition", "gpu", "--slurm-options", "gres=gpu:1", "mail-type=END",
            "--out", "x.h5", "--slurm-time=30", "--slurm-mem-gb", "8", "--wait"]
    before = list(argv)
    specs = job_specs(argv, 3)
    assert argv == before  # pure
    assert specs == [["a.pt", "b.pt", "--grid=-1:1:5", "--out", "x.h5", "--shard", f"{i}/3"]
                     for i in range(3)]
    for spec in specs:
        assert not {item.split("=")[0] for item in spec} & set(FLAGS)
    # The task's own parse: runs here, its shard, nothing left of the launch.
    args = probe_parser().parse_args(["pixels", *PROBE, "--launcher", "submitit-local",
                                      "--shards", "2"])
    task = probe_parser().parse_args(job_specs(["pixels", *PROBE, "--launcher",
                                                "submitit-local", "--shards", "2"], 2)[1])
    assert (args.launcher, task.launcher, task.shard, task.shards) == \
        ("submitit-local", "local", "1/2", 1)
    # A `--` ends the options: the shard goes before it.
    assert job_specs(["--shards", "2", "--", "-x"], 2)[0] == ["--shard", "0/2", "--", "-x"]


def test_abbreviated_launcher_flags_are_refused():
    with pytest.raises(UserError, match="--launch: write launcher flags in full"):
        job_specs(["a", "--launch", "slurm"], 2)
    assert job_specs(["a", "--shard", "0/2"], 1)  # --shard itself is no abbreviation


def test_launch_flags_are_checked(tmp_path, capsys):
    out = str(tmp_path / "p.h5")
    assert probe_main(["pixels", *PROBE, "--out", out, "--shards", "2"]) == 2
    assert "--shards 2 needs --launcher slurm or submitit-local" in capsys.readouterr().err
    assert probe_main(["pixels", *PROBE, "--out", out, "--shard", "0/2", "--launcher",
                       "submitit-local"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert probe_main(["pixels", *PROBE, "--out", out, "--launcher", "slurm",
                       "--slurm-options", "gres"]) == 2
    assert "expected key=value" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_slurm_parameters_from_flags(tmp_path):
    cfg = launch_config(launcher_args([
        "--launcher", "slurm", "--shards", "4", "--slurm-partition", "gpu", "--slurm-time",
        "90", "--slurm-gpus-per-node", "2", "--slurm-cpus-per-task", "8", "--slurm-mem-gb",
        "32", "--slurm-account", "acc", "--slurm-qos", "high", "--slurm-constraint", "a100",
        "--slurm-options", "gres=gpu:a100:2", "mail-type=END"]))
    params = executor_parameters(cfg, "landscape.interpolate")
    assert params == {
        "name": "landscape.interpolate", "timeout_min": 90, "gpus_per_node": 2,
        "cpus_per_task": 8, "mem_gb": 32.0, "slurm_partition": "gpu", "slurm_account": "acc",
        "slurm_qos": "high", "slurm_constraint": "a100", "slurm_array_parallelism": 4,
        "slurm_additional_parameters": {"gres": "gpu:a100:2", "mail-type": "END"}}
    # Defaults leave the cluster's own choices alone.
    assert executor_parameters(launch_config(launcher_args(["--launcher", "slurm"])), "x") == \
        {"name": "x", "timeout_min": 240, "gpus_per_node": 1, "slurm_array_parallelism": 1}
    # The same dict is valid for LocalExecutor (slurm_* ignored, shared names honoured).
    local = make_executor("submitit-local", tmp_path / "jobs", params)
    assert local._executor.parameters["timeout_min"] == 90
    assert local._executor.parameters["gpus_per_node"] == 2


def fake_slurm(tmp_path, monkeypatch):
    """`srun` and `sbatch` stand-ins on PATH: sbatch keeps the script and prints a job id."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {"srun": "#!/bin/sh\nexit 0\n",
               "sbatch": f'#!/bin/sh\ncp "$1" {bin_dir}/last.sbatch\n'
                         'echo "Submitted batch job 4242"\n'}
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir / "last.sbatch"


def test_slurm_array_is_one_sbatch_without_a_cluster(tmp_path, monkeypatch, capsys):
    sbatch = fake_slurm(tmp_path, monkeypatch)
    out = tmp_path / "p.h5"
    argv = ["pixels", *PROBE, "--out", str(out), "--launcher", "slurm", "--shards", "2",
            "--no-wait", "--slurm-partition", "gpu", "--slurm-time", "90",
            "--slurm-mem-gb", "16", "--slurm-options", "gres=gpu:a100:1"]
    assert probe_main(argv) == 0
    captured = capsys.readouterr()
    assert "job 4242_0, 4242_1" in captured.err
    assert f"python -m runs.results merge --overwrite {out} " \
           f"{tmp_path / 'p.shard*of2.h5'}" in captured.out
    text = sbatch.read_text()
    for line in ("--array=0-1%2", "--partition=gpu", "--time=90", "--gpus-per-node=1",
                 "--mem=16GB", "--gres=gpu:a100:1", "--job-name=probes.evaluate"):
        assert f"#SBATCH {line}\n" in text
    from submitit.core.utils import DelayedSubmission
    task = DelayedSubmission.load(tmp_path / "p.jobs" / "4242_1_submitted.pkl")
    assert isinstance(task.function, ShardTask)  # requeued by submitit on time-out
    assert task.function.checkpoint(*task.args).args == task.args  # the same call again
    assert "#SBATCH --signal=USR2@90\n" in text  # how SLURM warns it before the kill
    assert task.args == ("probes.evaluate", job_specs(argv, 2)[1])
    assert not out.exists()  # --no-wait: nothing merged


def test_no_slurm_here_is_a_user_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    assert probe_main(["pixels", *PROBE, "--out", str(tmp_path / "p.h5"),
                       "--launcher", "slurm"]) == 2
    assert "--launcher submitit-local runs the same array locally" in capsys.readouterr().err


def test_failure_reason_names_the_exception():
    from submitit.core.utils import FailedJobError, UncompletedJobError
    trace = ("Traceback (most recent call last):\n  File x\nruns.errors.UserError: "
             "bad.pt has NaN features\n")
    failed = FailedJobError(f"Job (task=0) failed during processing with trace:\n"
                            f"----------------------\n{trace}----------------------\nlogs")
    assert failure_reason(failed) == "bad.pt has NaN features"
    lost = UncompletedJobError("Job 12_1 (task: 0) with path x\nhas not produced any output "
                               "(state: TIMEOUT)\nError stream produced:")
    assert failure_reason(lost) == \
        "Job 12_1 (task: 0) with path x has not produced any output (state: TIMEOUT)"


def test_check_output_refuses_a_file_it_did_not_merge(tmp_path):
    out = tmp_path / "p.h5"
    assert probe_main(["pixels", *PROBE, "--out", str(out)]) == 0
    with pytest.raises(UserError, match="pass --overwrite"):
        check_output(str(out), [shard_path(out, i, 2) for i in range(2)], overwrite=False)
    check_output(str(out), [], overwrite=True)


def test_run_job_raises_what_the_command_refused():
    with pytest.raises(UserError, match="unknown probe 'svm'"):
        run_job("probes.evaluate", ["pixels", "--dataset", "digits", "--probes", "svm"])


@pytest.mark.slow
def test_submitit_local_array_equals_one_local_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the tasks: as this process, 1 thread each
    model = create_model("convnet", width=0.125, in_channels=1, num_classes=10, seed=3)
    ckpt = str(save_checkpoint(tmp_path / "m.pt", model, step=0))
    single, merged = tmp_path / "single.h5", tmp_path / "array.h5"
    assert probe_main([ckpt, "pixels", *PROBE, "--out", str(single)]) == 0
    argv = [ckpt, "pixels", *PROBE, "--out", str(merged), "--launcher", "submitit-local",
            "--shards", "2", "--slurm-gpus-per-node", "0"]
    assert probe_main(argv) == 0
    assert "merged 2 shards" in capsys.readouterr().out
    one, two = open_result(single, "probe"), open_result(merged, "probe")
    assert two.done.all() and two.shard is None
    assert np.array_equal(one.metrics["accuracy"], two.metrics["accuracy"])
    assert one.config == two.config and list(one.coords) == list(two.coords)
    for i in range(2):  # each task wrote its own shard, owning one checkpoint
        part = open_result(shard_path(merged, i, 2), "probe")
        assert part.shard == (i, 2) and part.done.tolist() == [i == 0, i == 1]
    check_output(str(merged), [shard_path(merged, i, 2) for i in range(2)], overwrite=False)


@pytest.mark.slow
def test_a_failing_task_names_its_job_and_log(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    model = create_model("convnet", width=0.125, in_channels=1, seed=0)
    with torch.no_grad():
        model.encoder[0].weight.fill_(float("nan"))
    broken = str(save_checkpoint(tmp_path / "broken.pt", model, step=0))
    out = tmp_path / "p.h5"
    assert probe_main(["pixels", broken, *PROBE, "--out", str(out), "--launcher",
                       "submitit-local", "--shards", "2", "--slurm-gpus-per-node", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: 1 of 2 array tasks failed; shard 1/2 (job ")
    assert "broken.pt" in err and "NaN" in err
    log = err.split("(log: ")[1].split(")")[0]
    assert os.path.exists(log) and "NaN" in open(log).read()
    assert not out.exists()  # nothing merged
    assert open_result(shard_path(out, 0, 2), "probe").done.tolist() == [True, False]
