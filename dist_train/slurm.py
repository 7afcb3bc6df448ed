"""What `dist-train launch` reads from a SLURM allocation, so batch scripts need no variable
plumbing: node count, this node's rank, the first node as rendezvous host, job id.

Read on each node at run time (never expanded on the submit host, where every node would
become rank 0), and without `scontrol`, which containers often lack.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from dist_train.errors import UserError


@dataclass(frozen=True)
class SlurmStep:
    job_id: str
    nnodes: int
    node_rank: int
    first_host: str

    # Below Linux's ephemeral range (32768-60999 by default), from which the kernel hands ports
    # to outgoing connections that could already hold ours; above the privileged ports.
    RDZV_PORT_BASE, RDZV_PORT_SPAN = 12000, 20000

    @property
    def rdzv_port(self) -> int:
        # Derived from the job id, so two jobs sharing a first node do not collide.
        return self.RDZV_PORT_BASE + int(re.sub(r"\D", "", self.job_id) or 0) % self.RDZV_PORT_SPAN

    @property
    def rdzv_endpoint(self) -> str:
        return f"{self.first_host}:{self.rdzv_port}"


def detect(environ: Mapping[str, str]) -> SlurmStep | None:
    """The srun step this process runs in, or None outside SLURM. Inside a multi-node
    allocation but outside srun (the batch script itself), one agent could not start the
    job on every node: that is an error, not a silent single-node run."""
    if "SLURM_JOB_ID" not in environ or "SLURM_JOB_NODELIST" not in environ:
        return None
    nnodes = int(environ.get("SLURM_NNODES") or environ.get("SLURM_JOB_NUM_NODES") or 1)
    if "SLURM_STEP_ID" not in environ:
        if nnodes > 1:
            raise UserError(
                f"dist-train launch runs in the batch script of a {nnodes}-node SLURM job: start it with "
                "`srun --ntasks-per-node=1 dist-train launch ...` so one agent runs on every node"
            )
        return None
    tasks_per_node = environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]
    if tasks_per_node not in ("", "1"):
        raise UserError(
            f"srun started {tasks_per_node} tasks per node; dist-train launch starts the workers itself, "
            "use srun --ntasks-per-node=1"
        )
    return SlurmStep(
        job_id=environ["SLURM_JOB_ID"],
        nnodes=nnodes,
        node_rank=int(environ.get("SLURM_NODEID", 0)),
        first_host=expand_hostlist(environ["SLURM_JOB_NODELIST"])[0],
    )


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list, as `scontrol show hostnames` prints it:
    'gpu[01-03,07],cpu-a5' -> ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'cpu-a5']."""
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[\]]+)\[([^\]]+)\]|([^,\[\]]+)", hostlist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            if not last:
                hosts.append(prefix + first)
                continue
            width = len(first)  # zero padding, as in node[001-128]
            hosts += [f"{prefix}{i:0{width}d}" for i in range(int(first), int(last) + 1)]
    if not hosts:
        raise UserError(f"cannot read the SLURM node list {hostlist!r}")
    return hosts
