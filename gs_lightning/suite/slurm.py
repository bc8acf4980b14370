"""``suite --emit slurm``: job scripts that run a suite on a SLURM cluster.

Three jobs, chained by ``submit.sh`` with ``afterok`` dependencies: the harvest (one job,
one forward pass over every site), one array task per group (each task trains and
evaluates one group, on ``trainer.num_nodes`` nodes of ``devices_per_group`` GPUs through
Lightning's SLURM support), then the gather (table, release, report; CPU only). Every job
reads the fully resolved ``<output>/suite.yaml``, and every step skips what is already on
disk, so a requeued task or a second ``submit.sh`` continues where the suite stopped.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from gs_lightning.errors import ConfigError
from gs_lightning.suite.config import SuiteConfig
from gs_lightning.suite.groups import Group
from gs_lightning.suite.state import EVALUATED, STATE_FILE

PYTHON = "python"
"""The interpreter the scripts call: whatever ``python`` the ``slurm.setup`` lines put on PATH."""

SLURM_DIR = "slurm"
GROUPS_FILE = "groups.txt"


def emit_slurm(config: SuiteConfig, groups: list[Group], resolved: Path) -> Path:
    """Write ``<output>/slurm/``: ``groups.txt``, ``harvest.sbatch``, ``groups.sbatch``,
    ``gather.sbatch`` and an executable ``submit.sh``; print them and how to submit; return
    the folder.

    The scripts run ``python -m gs_lightning`` with the ``python`` found on PATH after the
    ``slurm.setup`` lines (load modules, activate the environment there). Jobs start in
    the current directory (``--chdir``), so relative paths of the suite YAML mean the same
    in a job as they do here.
    """
    if not groups:
        raise ConfigError("suite --emit slurm: the suite has no groups")
    gpus = _gpus_per_node(config)
    folder = Path(config.output).resolve() / SLURM_DIR
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    suite = f"{PYTHON} -m gs_lightning suite --config {shlex.quote(str(resolved.resolve()))}"
    files = {
        GROUPS_FILE: "".join(f"{group.id}\n" for group in groups),
        "harvest.sbatch": _harvest(config, folder, suite, gpus),
        "groups.sbatch": _groups(config, folder, suite, gpus, len(groups)),
        "gather.sbatch": _gather(config, folder, suite),
        "submit.sh": _submit(folder, len(groups)),
    }
    for name, text in files.items():
        (folder / name).write_text(text)
    (folder / "submit.sh").chmod(0o755)
    print(f"suite: wrote {len(groups)} group(s) as one array job to {folder}/")
    for name in files:
        print(f"  {name}")
    print(f"submit with: bash {shlex.quote(str(folder / 'submit.sh'))}")
    return folder


def _gpus_per_node(config: SuiteConfig) -> int:
    """GPUs a group job asks for on each node (0 for a CPU suite)."""
    spec = config.trainer
    if spec.accelerator == "cpu":
        return 0
    gpus = config.slurm.gpus_per_node or spec.devices_per_group
    if gpus < spec.devices_per_group:
        raise ConfigError(f"slurm.gpus_per_node={gpus} is fewer than trainer.devices_per_group="
                          f"{spec.devices_per_group}: each node runs one task per device")
    return gpus


def _header(config: SuiteConfig, name: str, log: Path, *, nodes: int = 1, tasks: int = 1, gpus: int = 0) -> list[str]:
    spec = config.slurm
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={config.release_name}-{name}",
        f"#SBATCH --nodes={nodes}",
        f"#SBATCH --ntasks-per-node={tasks}",
        f"#SBATCH --cpus-per-task={spec.cpus_per_task}",
        f"#SBATCH --mem={spec.mem}",
        f"#SBATCH --time={spec.time}",
        f"#SBATCH --chdir={Path.cwd()}",
        f"#SBATCH --output={log}",
        "#SBATCH --open-mode=append",  # a requeued job adds to its log instead of replacing it
    ]
    if gpus:
        lines.append(f"#SBATCH --gres=gpu:{gpus}")
    if spec.partition:
        lines.append(f"#SBATCH --partition={spec.partition}")
    if spec.account:
        lines.append(f"#SBATCH --account={spec.account}")
    return lines


def _body(config: SuiteConfig, commands: list[str]) -> list[str]:
    # The setup lines run before `set -u`: module and conda scripts read unset variables.
    return ["", "set -eo pipefail", *config.slurm.setup, "set -u", "", *commands, ""]


def _harvest(config: SuiteConfig, folder: Path, suite: str, gpus: int) -> str:
    header = _header(config, "harvest", folder / "logs" / "%x_%j.out", gpus=min(gpus, 1))
    lines = [*header, "# Every site of the suite, train and held-out splits, in one pass of the model.",
             "# A rerun harvests only the sites that are not complete."]
    return "\n".join(lines + _body(config, [f"{suite} --stage harvest"]))


def _groups(config: SuiteConfig, folder: Path, suite: str, gpus: int, n: int) -> str:
    spec = config.trainer
    header = _header(config, "groups", folder / "logs" / "%x_%A_%a.out", nodes=spec.num_nodes,
                     tasks=spec.devices_per_group, gpus=gpus)
    header += [f"#SBATCH --array=0-{n - 1}", "#SBATCH --requeue"]
    header += [
        f"# Task i trains and evaluates the group on line i+1 of {GROUPS_FILE}. The suite's driver runs",
        "# once, on the first node; a group on more than one device runs its fit with srun, one process",
        "# per device on every node, and Lightning reads its ranks from SLURM (the group's fit config has",
        f"# devices={spec.devices_per_group} and num_nodes={spec.num_nodes}, equal to --ntasks-per-node and --nodes).",
        "# A preempted or requeued task resumes from the group's last.ckpt; a finished group is skipped.",
    ]
    state = shlex.quote(str(Path(config.output).resolve() / "groups")) + f'/"$GROUP"/{STATE_FILE}'
    commands = [
        f'GROUP=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(str(folder / GROUPS_FILE))})',
        '[ -n "$GROUP" ] || { echo "suite: no group for array task $SLURM_ARRAY_TASK_ID" >&2; exit 1; }',
        'echo "suite: array task $SLURM_ARRAY_TASK_ID: group $GROUP"',
        # srun (22.05+) no longer inherits --cpus-per-task from the batch job.
        f"export SRUN_CPUS_PER_TASK={config.slurm.cpus_per_task}",
        f'{suite} --group "$GROUP"',
        "# A fit stopped by SIGTERM saves preempted.ckpt and exits 143; whatever the exit, the task",
        "# only succeeds (and lets the gather start) if the group is really evaluated.",
        f"{PYTHON} -c 'import json, sys; sys.exit(json.load(open(sys.argv[1]))[\"status\"] != \"{EVALUATED}\")' "
        f"{state} || {{ echo \"suite: group $GROUP is not evaluated; resubmit to resume it\" >&2; exit 1; }}",
    ]
    return "\n".join(header + _body(config, commands))


def _gather(config: SuiteConfig, folder: Path, suite: str) -> str:
    header = _header(config, "gather", folder / "logs" / "%x_%j.out")
    lines = [*header, "# The table, release and report from the finished groups (no GPU)."]
    return "\n".join(lines + _body(config, [f"{suite} --stage gather"]))


def _submit(folder: Path, n: int) -> str:
    script = {name: shlex.quote(str(folder / name)) for name in ("harvest.sbatch", "groups.sbatch", "gather.sbatch")}
    return "\n".join([
        "#!/bin/bash",
        f"# Submit the suite: harvest, then {n} array task(s) (one per group), then gather, each",
        "# waiting for the previous to succeed (afterok on an array waits for all its tasks).",
        "# Running it again resumes the suite: finished steps are skipped.",
        "set -euo pipefail",
        "",
        f"h=$(sbatch --parsable {script['harvest.sbatch']})",
        "h=${h%%;*}  # --parsable prints jobid;cluster on a federation",
        f"a=$(sbatch --parsable --dependency=afterok:$h {script['groups.sbatch']})",
        "a=${a%%;*}",
        f"g=$(sbatch --parsable --dependency=afterok:$a {script['gather.sbatch']})",
        'echo "suite: submitted harvest $h, groups $a, gather ${g%%;*}"',
        "",
    ])
