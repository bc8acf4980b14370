"""``suite --emit slurm``: the scripts ask SLURM for what Lightning expects, list every group
once, chain harvest -> groups -> gather, and, run by a stand-in sbatch/srun, leave the same
outputs as the suite run directly."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gs_lightning.cli import main
from gs_lightning.errors import ConfigError
from gs_lightning.suite.cli import build_parser, config_from
from gs_lightning.suite.run import plan_groups, write_resolved
from gs_lightning.suite.slurm import emit_slurm
from tests.suite_helpers import suite_yaml, write

SCRIPTS = ("harvest.sbatch", "groups.sbatch", "gather.sbatch", "submit.sh")

# Runs a job at once instead of queueing it: an array job once per index, with the
# variables SLURM sets in a batch job; prints a job id; logs each finished job to $FAKE_SLURM/jobs.
FAKE_SBATCH = r"""#!/bin/bash
set -euo pipefail
dependency=""
while [[ $1 == --* ]]; do
  case $1 in
    --parsable) ;;
    --dependency=*) dependency=${1#--dependency=} ;;
    *) echo "fake sbatch: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
script=$1
if [ -n "$dependency" ] && ! grep -q "^${dependency#afterok:} " "$FAKE_SLURM/jobs"; then
  echo "fake sbatch: $dependency names no finished job" >&2; exit 2
fi
touch "$FAKE_SLURM/jobs"
id=$((1000 + $(wc -l < "$FAKE_SLURM/jobs")))
directive() { sed -n "s/^#SBATCH --$1=//p" "$script"; }
export SLURM_JOB_ID=$id SLURM_JOB_NAME=$(directive job-name) SLURM_NNODES=$(directive nodes)
export SLURM_NTASKS_PER_NODE=$(directive ntasks-per-node) SLURM_CPUS_PER_TASK=$(directive cpus-per-task)
export SLURM_NTASKS=$((SLURM_NNODES * SLURM_NTASKS_PER_NODE)) SLURM_NODELIST=localhost
export SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0
cd "$(directive chdir)"
array=$(directive array)
if [ -n "$array" ]; then
  export SLURM_ARRAY_JOB_ID=$id
  for ((i = ${array%-*}; i <= ${array#*-}; i++)); do SLURM_ARRAY_TASK_ID=$i bash "$script" 1>&2; done
else
  bash "$script" 1>&2
fi
echo "$id $(basename "$script") ${dependency:-none}" >> "$FAKE_SLURM/jobs"
echo "$id"
"""

FAKE_SRUN = """#!/bin/bash
[ "$SLURM_NTASKS" = 1 ] || { echo "fake srun: runs one task, not $SLURM_NTASKS" >&2; exit 2; }
exec "$@"
"""


def directives(script: Path) -> dict[str, str]:
    """``#SBATCH --key=value`` lines as a dict (a bare flag maps to "")."""
    pairs = [line.removeprefix("#SBATCH --").partition("=") for line in script.read_text().splitlines()
             if line.startswith("#SBATCH --")]
    return {key: value for key, _, value in pairs}


MULTINODE = {"accelerator": "auto", "devices_per_group": 4, "num_nodes": 2, "checkpoint_every_n_steps": 4}
SLURM = {"partition": "gpu", "account": "sae", "time": "02:00:00", "mem": "32G", "cpus_per_task": 6,
         "setup": ["module load cuda", "source .venv/bin/activate"]}


def test_multinode_scripts(tmp_path: Path, capsys) -> None:
    config = suite_yaml(tmp_path / "out", trainer=MULTINODE, slurm=SLURM)
    main(["suite", "--config", str(write(config, tmp_path / "suite.yaml")), "--emit", "slurm"])
    folder = tmp_path / "out" / "slurm"
    assert "submit.sh" in capsys.readouterr().out
    parsed = build_parser().parse_args(["--config", str(tmp_path / "suite.yaml")])
    groups = [group.id for group in plan_groups(config_from(parsed)[0])]
    assert len(groups) == 4  # 2 layers x 2 site kinds x 1 width
    assert (folder / "groups.txt").read_text().splitlines() == groups
    resolved = str((tmp_path / "out" / "suite.yaml").resolve())
    assert yaml.safe_load(Path(resolved).read_text())["trainer"]["num_nodes"] == 2

    array = directives(folder / "groups.sbatch")
    assert array["array"] == f"0-{len(groups) - 1}"
    # Lightning's SLURMEnvironment: --nodes == num_nodes, --ntasks-per-node == devices.
    assert (array["nodes"], array["ntasks-per-node"], array["gres"]) == ("2", "4", "gpu:4")
    assert (array["partition"], array["account"], array["time"], array["mem"]) == ("gpu", "sae", "02:00:00", "32G")
    assert array["cpus-per-task"] == "6" and "requeue" in array
    assert array["output"] == str(folder / "logs" / "%x_%A_%a.out") and (folder / "logs").is_dir()
    text = (folder / "groups.sbatch").read_text()
    assert f'\npython -m gs_lightning suite --config {resolved} --group "$GROUP"' in text
    assert "SLURM_ARRAY_TASK_ID + 1" in text and "set -u" in text
    assert text.index("module load cuda") < text.index("python -m gs_lightning suite")

    harvest = directives(folder / "harvest.sbatch")
    assert (harvest["nodes"], harvest["ntasks-per-node"], harvest["gres"]) == ("1", "1", "gpu:1")
    assert f"--config {resolved} --stage harvest" in (folder / "harvest.sbatch").read_text()
    gather = directives(folder / "gather.sbatch")
    assert "gres" not in gather and "array" not in gather
    assert f"--config {resolved} --stage gather" in (folder / "gather.sbatch").read_text()

    submit = (folder / "submit.sh").read_text()
    assert f"h=$(sbatch --parsable {folder / 'harvest.sbatch'})" in submit
    assert f"a=$(sbatch --parsable --dependency=afterok:$h {folder / 'groups.sbatch'})" in submit
    assert f"--dependency=afterok:$a {folder / 'gather.sbatch'}" in submit
    assert os.access(folder / "submit.sh", os.X_OK)
    for name in SCRIPTS:
        subprocess.run(["bash", "-n", str(folder / name)], check=True)


def test_gpus_per_node_and_cpu_suites(tmp_path: Path) -> None:
    def emit(trainer: dict, slurm: dict) -> Path:
        parsed = build_parser().parse_args(["--config", str(write(suite_yaml(tmp_path / "out", trainer=trainer,
                                                                              slurm=slurm), tmp_path / "s.yaml"))])
        config, plain = config_from(parsed)
        return emit_slurm(config, plan_groups(config), write_resolved(config, plain))

    assert directives(emit(MULTINODE, {"gpus_per_node": 8}) / "groups.sbatch")["gres"] == "gpu:8"
    with pytest.raises(ConfigError, match="gpus_per_node=2"):
        emit(MULTINODE, {"gpus_per_node": 2})
    folder = emit({"accelerator": "cpu"}, {})
    assert not any("gres" in directives(folder / name) for name in SCRIPTS[:3])


def test_submit_runs_the_suite(tmp_path: Path) -> None:
    """submit.sh through a stand-in sbatch/srun: every group evaluated, one row per SAE."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    slurm = {"setup": [f'export PATH="{Path(sys.executable).parent}:$PATH"']}
    # One layer: two groups are enough to run the array twice, and each task is a new process.
    config = write(suite_yaml(tmp_path / "out", layers=[0], slurm=slurm), tmp_path / "suite.yaml")
    main(["suite", "--config", str(config), "--emit", "slurm"])
    folder = tmp_path / "out" / "slurm"
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "FAKE_SLURM": str(tmp_path)}
    done = subprocess.run(["bash", str(folder / "submit.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "submitted harvest 1000, groups 1001, gather 1002" in done.stdout
    jobs = (tmp_path / "jobs").read_text().splitlines()
    assert jobs == ["1000 harvest.sbatch none", "1001 groups.sbatch afterok:1000",
                    "1002 gather.sbatch afterok:1001"]

    groups = (folder / "groups.txt").read_text().splitlines()
    for group in groups:
        assert json.loads((tmp_path / "out" / "groups" / group / "state.json").read_text())["status"] == "evaluated"
    with open(tmp_path / "out" / "suite.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(groups) * 2  # one per SAE: 2 sparsity levels per group
