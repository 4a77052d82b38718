"""The Slurm commands hpcjobs runs, and the parsing of what they print.

Every call goes through :meth:`Slurm.run`, with the profile's ``SLURM_CONF`` and a
timeout, and fails as :class:`SlurmError` carrying the command and its stderr.
Status needs exactly one ``squeue`` and one ``sacct`` call per refresh, whatever
the number of stages or chains: both take a list of job ids.

We call sbatch directly rather than through submitit's executor: submitit
submits pickled Python callables, while hpcjobs submits rendered scripts that
a user can read and ``sbatch`` by hand. (submitit's sacct parser keeps one row
per job id; status needs every run of a requeued job, so sacct is parsed here.)
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from .errors import SlurmError

TIMEOUT = 60

# Job states in Slurm's own words, grouped.
LIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
               "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED",
               "RESV_DEL_HOLD", "SPECIAL_EXIT"}
FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                 "DEADLINE", "PREEMPTED", "REVOKED"}
DONE_STATES = {"COMPLETED"}


class AccountingUnavailable(SlurmError):
    """sacct could not reach slurmdbd (or accounting is off)."""


@dataclass
class QueueInfo:
    job_id: str
    name: str
    state: str
    reason: str
    elapsed: str
    nodes: str
    start: str


@dataclass
class AcctInfo:
    job_id: str
    name: str
    state: str          # first word: "CANCELLED by 0" -> "CANCELLED"
    exit_code: Optional[int]
    signal: Optional[int]
    elapsed: str
    nodes: str
    start: str
    end: str


def parse_job_id(text: str) -> str:
    """``sbatch --parsable`` prints ``JOBID`` or ``JOBID;CLUSTER``."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    job_id = first.split(";")[0].strip()
    if not job_id.isdigit():
        raise SlurmError(f"sbatch printed no job id: {text.strip()!r}")
    return job_id


class Slurm:
    def __init__(self, slurm_conf: Optional[str] = None):
        self.slurm_conf = slurm_conf
        self.env = dict(os.environ)
        if slurm_conf:
            self.env["SLURM_CONF"] = slurm_conf

    def run(self, args: Sequence[str], *, timeout: float = TIMEOUT, check: bool = True,
            error_cls: type = SlurmError) -> subprocess.CompletedProcess:
        try:
            proc = subprocess.run(list(args), env=self.env, capture_output=True, text=True,
                                  timeout=timeout)
        except FileNotFoundError:
            raise SlurmError(f"{args[0]} not found: hpcjobs needs the Slurm client commands on PATH "
                             "(run it on a login node, or install slurm-client)") from None
        except subprocess.TimeoutExpired:
            raise error_cls(f"`{' '.join(args)}` did not answer within {timeout:.0f}s "
                            "(is slurmctld up?)") from None
        if check and proc.returncode != 0:
            msg = (proc.stderr or proc.stdout).strip()
            raise error_cls(f"`{' '.join(args)}` failed (exit {proc.returncode}): {msg}")
        return proc

    # ---- submission

    def sbatch(self, script: Path, *, dependency: Iterable[str] = (), hold: bool = False,
               extra: Sequence[str] = ()) -> str:
        args = ["sbatch", "--parsable"]
        deps = list(dependency)
        if deps:
            args.append("--dependency=afterok:" + ":".join(deps))
        if hold:
            args.append("--hold")
        args += list(extra)
        args.append(str(script))
        return parse_job_id(self.run(args).stdout)

    def release(self, job_ids: Sequence[str]) -> None:
        if job_ids:
            self.run(["scontrol", "release", ",".join(job_ids)])

    def cancel(self, job_ids: Sequence[str], *, signal: Optional[str] = None) -> None:
        """Cancel (or signal) jobs; ids slurmctld no longer knows are ignored."""
        if not job_ids:
            return
        args = ["scancel"] + ([f"--signal={signal}"] if signal else []) + list(job_ids)
        proc = self.run(args, check=False)
        problems = [line for line in proc.stderr.splitlines()
                    if line.strip() and "Invalid job id" not in line and "already completing" not in line]
        if proc.returncode != 0 and problems:
            raise SlurmError(f"`{' '.join(args)}` failed (exit {proc.returncode}): {' '.join(problems)}")

    # ---- state

    def squeue(self, job_ids: Sequence[str]) -> Dict[str, QueueInfo]:
        """Jobs slurmctld still knows, by id. Unknown ids are simply absent."""
        if not job_ids:
            return {}
        proc = self.run(["squeue", "--noheader", "--states=all", f"--jobs={','.join(job_ids)}",
                         "--format=%i|%j|%T|%r|%M|%N|%S"], check=False)
        if proc.returncode != 0:
            if "Invalid job id" in proc.stderr:
                return {}  # none of them is known any more
            raise SlurmError(f"squeue failed (exit {proc.returncode}): {proc.stderr.strip()}")
        return _parse_squeue(proc.stdout)

    def sacct(self, job_ids: Sequence[str], *, starttime: str) -> Dict[str, List[AcctInfo]]:
        """Accounting records of the jobs (allocations only): every run of each, oldest first.

        A requeued job has one record per run (``--duplicates``); the last is the current one.
        """
        if not job_ids:
            return {}
        proc = self.run(["sacct", "--parsable2", "--noheader", "--allocations", "--duplicates",
                         f"--jobs={','.join(job_ids)}", f"--starttime={starttime}",
                         "--format=JobID,JobName,State,ExitCode,Elapsed,NodeList,Start,End"],
                        check=False, error_cls=AccountingUnavailable)
        if proc.returncode != 0:
            raise AccountingUnavailable(f"sacct failed: {(proc.stderr or proc.stdout).strip()}")
        out: Dict[str, List[AcctInfo]] = {}
        for line in proc.stdout.splitlines():
            parts = line.split("|")
            if len(parts) < 8 or not parts[0].isdigit():
                continue  # job steps (123.batch) and array/het ids are not ours
            jid, name, state, exit_code, elapsed, nodes, start, end = parts[:8]
            code, _, sig = exit_code.partition(":")
            out.setdefault(jid, []).append(AcctInfo(
                jid, name, (state or "UNKNOWN").split()[0], int(code) if code.isdigit() else None,
                int(sig) if sig.isdigit() else None, elapsed, nodes, start, end))
        return out

    def squeue_mine(self) -> Dict[str, QueueInfo]:
        """Every job of this user slurmctld knows, to find jobs whose id was never recorded."""
        proc = self.run(["squeue", "--noheader", "--states=all", "--me", "--format=%i|%j|%T|%r|%M|%N|%S"])
        return _parse_squeue(proc.stdout)

    def partition_nodes(self, partition: Optional[str]) -> Dict[str, Dict[str, str]]:
        """Nodes of a partition (default partition if None): name -> {state, gres}."""
        args = ["sinfo", "--noheader", "--Node", "--format=%N|%T|%G|%P"]
        if partition:
            args.append(f"--partition={partition}")
        proc = self.run(args)
        nodes: Dict[str, Dict[str, str]] = {}
        for line in proc.stdout.splitlines():
            parts = line.split("|")
            if len(parts) < 4:
                continue
            if not partition and not parts[3].endswith("*"):
                continue  # only the default partition
            nodes[parts[0].strip()] = {"state": parts[1].strip(), "gres": parts[2].strip()}
        return nodes


def _parse_squeue(text: str) -> Dict[str, QueueInfo]:
    out: Dict[str, QueueInfo] = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) < 7:
            continue
        jid = parts[0].strip()
        out[jid] = QueueInfo(jid, parts[1], parts[2].strip(), parts[3].strip(), parts[4].strip(),
                             parts[5].strip(), parts[6].strip())
    return out


def gres_gpus(gres: str) -> int:
    """GPUs in a sinfo %G field like ``gpu:4``, ``gpu:a800:8(S:0-1)``, ``gpu:2,shard:8``."""
    total = 0
    for part in gres.split(","):
        m = re.match(r"^gpu(?::[^:(]+)?:(\d+)", part.strip())
        if m:
            total += int(m.group(1))
    return total
