"""The ``hpcjobs`` command line. Thin: each command parses, calls one module, prints.

Login-node commands (--help, render, submit, status, list, ...) never import
torch, deepspeed or transformers; ``demo-assets`` imports them when it runs.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import click

from . import __version__
from .errors import ConfigError, HpcjobsError

EPILOG_OVERRIDES = """\b
Overrides are KEY=VALUE pairs on the merged configuration, e.g.
  finetune.lr=2e-4 finetune.zero_stage=3 data.path=/data/dialogues.parquet
Layers, lowest first: package defaults < cluster profile < recipe
< ~/.config/hpcjobs/config.yaml < --config FILE < options and overrides.
"""


def _echo_err(msg: str) -> None:
    click.echo(msg, err=True)


# ---------------------------------------------------------------- shared options

def chain_options(f):
    """Options that select and shape a chain (render and submit)."""
    options = [
        click.argument("recipe"),
        click.option("--nodes", "-N", type=int, default=None,
                     help="Nodes for the multi-node (finetune) stage. Default: 1, or the hosts "
                          "a --hostfile/--include names."),
        click.option("--profile", "-p", default="local", envvar="HPCJOBS_PROFILE", show_default=True,
                     show_envvar=True, help="Cluster profile name or YAML path (`hpcjobs profiles` lists them)."),
        click.option("--name", default=None, help="Chain name (default: the recipe name)."),
        click.option("--config", "config_files", multiple=True, type=click.Path(dir_okay=False),
                     help="YAML file layered over the recipe; repeatable."),
        click.option("--hostfile", default=None, type=click.Path(dir_okay=False),
                     help="DeepSpeed hostfile (HOST slots=N): finetune runs on exactly these hosts."),
        click.option("--include", default=None,
                     help="DeepSpeed include spec, e.g. 'node1:0,1@node2:0'."),
        click.option("--exclude", default=None,
                     help="DeepSpeed exclude spec, e.g. 'node2:3' or 'node3'."),
        click.argument("overrides", nargs=-1),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _plan(recipe, nodes, profile, name, config_files, hostfile, include, exclude, overrides,
          *, run_dir: Optional[Path] = None, extra: Optional[Dict[str, Any]] = None,
          extra_text: Sequence[str] = ()):
    from . import config, plan

    cli: Dict[str, Any] = dict(extra or {})
    text: List[str] = list(extra_text)
    if nodes is not None:
        cli["run.nodes"] = nodes
        text.append(f"--nodes {nodes}")
    if name is not None:
        config.check_name(name, key="--name")
        cli["run.name"] = name
        text.append(f"--name {name}")
    launch = {"hostfile": hostfile, "include": include, "exclude": exclude}
    text += [f"--{k} {v}" for k, v in launch.items() if v is not None]
    composed = config.compose(recipe, profile, config_files=config_files, overrides=overrides,
                              cli=cli, launch=launch, cli_text=text)
    return composed, plan.build(composed, run_dir=run_dir)


# ---------------------------------------------------------------- the group

@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="hpcjobs")
def cli() -> None:
    """Run LLM training pipelines on Slurm as chains of dependent jobs.

    \b
    hpcjobs render llama2-lora --nodes 2 --profile a800     # see every script first
    hpcjobs submit llama2-lora --nodes 2 --profile a800 \\
        model.source=/data/llama-2-7b data.path=/data/dialogues.parquet
    hpcjobs status CHAIN        # where it stands, and why a stage failed
    hpcjobs list                # every chain you submitted

    Try it without a cluster: `hpcjobs devcluster up` starts a two-node Slurm
    cluster on this machine (profile `local`).

    Exit status: 0 done; 1 something failed (a chain, a Slurm command); 2 bad
    input or a file that cannot be read or written (one `error:` line, nothing
    submitted); 70 an internal error, a bug: HPCJOBS_DEBUG=1 shows its traceback.
    """


@cli.command(epilog=EPILOG_OVERRIDES)
@chain_options
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Write the run directory here (scripts, configs, submit.sh) instead of printing.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def render(recipe, nodes, profile, name, config_files, hostfile, include, exclude, overrides, out, as_json):
    """Show exactly what `submit` would run, touching no Slurm command.

    Prints every stage's sbatch script and generated config. With --out DIR the
    run directory is written to DIR, with a submit.sh that submits the stages
    in order with sbatch.
    """
    from . import preflight
    from . import render as rendering

    run_dir = Path(out).absolute() if out else None
    if run_dir is not None:  # written now, so refused now (a file in the way, read-only, /proc, ...)
        problem = preflight.run_dir_text_problem(run_dir) or preflight.run_dir_problem(run_dir)
        if problem:
            raise ConfigError(problem, key="--out")
    composed, plan = _plan(recipe, nodes, profile, name, config_files, hostfile, include, exclude,
                           overrides, run_dir=run_dir)
    if run_dir is None:  # a run root sbatch cannot take makes every script printed here unusable
        preflight.check_run_dir(plan, composed, writable=False)
    try:
        preflight.check_inputs(plan, composed)
    except ConfigError as e:  # rendering is for inspection: inputs may live on the cluster only
        _echo_err(f"warning: {e}\n  (`hpcjobs submit` refuses this)")
    rendered = rendering.render(plan)
    if as_json:
        click.echo(json.dumps(_plan_json(rendered), indent=2))
        return
    if out:
        if (Path(out) / "chain.json").exists():
            raise HpcjobsError(f"{out} holds a submitted chain; choose another --out directory")
        written = rendering.write_tree(rendered, Path(out).absolute())
        click.echo(f"wrote {len(written)} files to {out}:")
        for p in written:
            click.echo(f"  {p.relative_to(Path(out).absolute())}")
        click.echo(f"submit by hand with: bash {Path(out) / 'submit.sh'}   (or use `hpcjobs submit`)")
    else:
        _print_rendered(rendered)
    _print_memory(plan)


def _print_memory(plan) -> None:
    """The memory planner's verdict on each training stage (render and submit)."""
    from .memplan import report

    for sm in report.plan_chain(plan, strict=False):
        for line in report.verdict_lines(sm):
            click.echo(line)


def _print_rendered(rendered) -> None:
    for st in rendered.stages:
        for fname, text in st.files.items():
            click.echo(f"==> {st.attempt_dir / fname} <==")
            click.echo(text)


def _plan_json(rendered) -> dict:
    plan = rendered.plan
    return {
        "chain": plan.chain_id, "run_dir": str(plan.run_dir), "recipe": plan.recipe,
        "profile": plan.profile, "overrides": plan.overrides,
        "stages": [{"name": sp.name, "kind": sp.kind, "after": sp.after, "nodes": sp.nodes,
                    "gpus_per_node": sp.gpus_per_node, "world_size": sp.world_size,
                    "sbatch": {k: v for k, v in sp.sbatch.items() if v is not None},
                    "script": str(st.script_path), "files": st.files}
                   for sp, st in zip(plan.stages, rendered.stages)],
        "memory": _memory_json(plan),
    }


def _memory_json(plan) -> list:
    from .memplan import report

    return [sm.to_json() for sm in report.plan_chain(plan, strict=False)]


@cli.command("plan", epilog=EPILOG_OVERRIDES)
@chain_options
@click.option("--json", "as_json", is_flag=True, help="Print the memory plan as JSON.")
def plan_memory(recipe, nodes, profile, name, config_files, hostfile, include, exclude, overrides, as_json):
    """Predict each training stage's peak memory per GPU and per node; no Slurm call.

    The chain is planned exactly as `render` plans it; the model's config.json
    (or a Meta params.json) gives the exact parameter count. Shows weights,
    gradients, optimizer states, activations, logits/loss, DeepSpeed buffers
    and CUDA/NCCL overhead, the phase of the peak, and whether it fits the
    profile's gpu_mem and mem_per_node. Settings set to `auto`
    (finetune.micro_batch_size, zero_stage, gradient_checkpointing,
    offload_optimizer) show the planner's choice and why; `submit` refuses a
    stage that does not fit unless --force.
    """
    from .memplan import report

    composed, plan = _plan(recipe, nodes, profile, name, config_files, hostfile, include, exclude, overrides)
    stages = report.plan_chain(plan)
    if as_json:
        click.echo(json.dumps({"profile": plan.profile, "stages": [sm.to_json() for sm in stages]}, indent=2))
    else:
        report.print_report(stages, plan.profile)


@cli.command(epilog=EPILOG_OVERRIDES)
@chain_options
@click.option("--json", "as_json", is_flag=True, help='Print {"chain": ..., "jobs": {stage: job_id}, "memory": [...]}.')
@click.option("--force", is_flag=True,
              help="Submit even a stage the memory planner predicts not to fit (the record says so).")
def submit(recipe, nodes, profile, name, config_files, hostfile, include, exclude, overrides, as_json, force):
    """Render, check and submit every stage as a dependent Slurm job.

    Stage N+1 waits for its upstream stages with --dependency=afterok. Input
    files, the partition's size and every setting are checked before the first
    sbatch; if a submission fails partway, the jobs already submitted are
    cancelled. A training stage predicted not to fit in GPU (or host) memory
    is refused with its breakdown and setups that would fit (`hpcjobs plan`);
    --force submits it anyway.
    """
    composed, plan = _plan(recipe, nodes, profile, name, config_files, hostfile, include, exclude, overrides)
    _submit_plan(composed, plan, as_json, force=force)


def _dry_run_or_submit(composed, plan, dry_run: bool, as_json: bool) -> None:
    """What `run` and `commcheck` do with their one-stage chain: print it, or submit it."""
    if dry_run:
        from . import preflight
        from . import render as rendering

        preflight.check_inputs(plan, composed)
        _print_rendered(rendering.render(plan))
        return
    _submit_plan(composed, plan, as_json)


def _submit_plan(composed, plan, as_json: bool, force: bool = False) -> None:
    from . import preflight
    from .memplan import report
    from . import render as rendering
    from . import submit as submitting
    from .slurm import Slurm

    preflight.check_inputs(plan, composed)
    report.check_memory(plan, force=force, warn=_echo_err)
    slurm = Slurm(plan.chain.profile.slurm_conf)
    preflight.check_cluster(plan, composed, slurm)
    record = submitting.submit(rendering.render(plan), slurm)
    jobs = {s.name: s.current.job_id for s in record.stages}
    if as_json:
        click.echo(json.dumps({"chain": record.chain_id, "jobs": jobs, "run_dir": record.run_dir,
                               "memory": _memory_json(plan)}))
        return
    _print_memory(plan)
    click.echo(f"submitted chain {record.chain_id} ({len(jobs)} jobs)")
    width = max(len(n) for n in jobs)
    for st in record.stages:
        after = f"  after {', '.join(st.after)}" if st.after else ""
        click.echo(f"  {st.name:<{width}}  job {st.current.job_id}{after}")
    click.echo(f"run directory: {record.run_dir}")
    click.echo(f"follow it:     hpcjobs status {record.chain_id}")


@cli.command("run", epilog="""\b
Examples:
  hpcjobs run train.py --nodes 2 -- --epochs 3 --out results/
  hpcjobs run train.py --nodes 2 --launcher deepspeed --hf-trainer \\
      -- --deepspeed ds_config.json --per_device_train_batch_size 4
  hpcjobs run grpo.py --launcher accelerate --accelerate-config ds_zero3.yaml --hf-trainer
  hpcjobs run pkg.train -m --launcher srun --nodes 2 --dry-run
Everything after -- reaches the script unchanged, one argument each.
""")
@click.argument("script")
@click.option("--nodes", "-N", type=int, default=None, help="Nodes (default 1, or the hosts a --hostfile/--include names).")
@click.option("--gpus-per-node", "-G", type=int, default=None,
              help="Ranks per node (default: the profile's training GPUs per node).")
@click.option("--launcher", "-l", default="torchrun", show_default=True,
              type=click.Choice(["deepspeed", "torchrun", "accelerate", "srun"]),
              help="How the ranks are started; srun starts one task per rank with RANK, WORLD_SIZE, ... set.")
@click.option("--module", "-m", "as_module", is_flag=True, help="SCRIPT is a module name, run as python -m SCRIPT.")
@click.option("--deepspeed", "ds", default=None, metavar="FILE|zero1|zero2|zero3",
              help="A DeepSpeed JSON (or preset); the job gets a copy with the batch numbers settled.")
@click.option("--accelerate-config", default=None, type=click.Path(dir_okay=False),
              help="Your accelerate YAML (--launcher accelerate).")
@click.option("--hf-trainer", is_flag=True,
              help="An HF Trainer/TRL script: takes --local_rank; 'auto' DeepSpeed values are left to it.")
@click.option("--env", "env_items", multiple=True, metavar="VAR=VALUE", help="Environment for every rank; repeatable.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Any other setting, e.g. --set train.batch.micro_batch_size=4 --set train.time=02:00:00.")
@click.option("--profile", "-p", default="local", envvar="HPCJOBS_PROFILE", show_default=True, show_envvar=True,
              help="Cluster profile name or YAML path.")
@click.option("--name", default=None, help="Chain name (default: the script's name).")
@click.option("--config", "config_files", multiple=True, type=click.Path(dir_okay=False),
              help="YAML file layered over the one-stage recipe; repeatable.")
@click.option("--hostfile", default=None, type=click.Path(dir_okay=False), help="DeepSpeed hostfile (HOST slots=N).")
@click.option("--include", default=None, help="DeepSpeed include spec (whole nodes unless --launcher deepspeed).")
@click.option("--exclude", default=None, help="DeepSpeed exclude spec (whole nodes unless --launcher deepspeed).")
@click.option("--dry-run", is_flag=True, help="Print what `render` prints; submit nothing.")
@click.option("--json", "as_json", is_flag=True, help='Print {"chain", "jobs", "run_dir"}.')
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def run_script(script, nodes, gpus_per_node, launcher, as_module, ds, accelerate_config, hf_trainer, env_items,
               overrides, profile, name, config_files, hostfile, include, exclude, dry_run, as_json, args):
    """Run your own training script on N nodes as a one-stage chain.

    SCRIPT (a .py file, or a module with -m) is started by the launcher you
    already use, once per node, with the rendezvous, hostfile, DeepSpeed and
    accelerate configs settled before submission. The chain is like any other:
    `status`, `watch`, `logs`, `cancel` and `rerun` work on it, and the stage
    is named `train` (settings: train.*, see `hpcjobs render script --help`).
    """
    from . import config

    stage = "train"
    extra: Dict[str, Any] = {f"{stage}.launcher": launcher, f"{stage}.args": list(args),
                             f"{stage}.hf_trainer": bool(hf_trainer)}
    extra[f"{stage}.module" if as_module else f"{stage}.script"] = script
    text = [f"run {script}", f"--launcher {launcher}"]
    if gpus_per_node is not None:
        extra[f"{stage}.gpus_per_node"] = gpus_per_node
    if ds:
        extra[f"{stage}.deepspeed"] = ds
    if accelerate_config:
        extra[f"{stage}.accelerate_config"] = accelerate_config
    env: Dict[str, str] = {}
    for item in env_items:
        var, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--env {item!r} is not VAR=VALUE")
        env[var] = value
    if env:
        extra[f"{stage}.env"] = env
    if name is None:
        base = Path(script).stem if not as_module else script.rsplit(".", 1)[-1]
        name = config.NAME_RE.match(base) and base or "run"
    composed, plan = _plan("script", nodes, profile, name, config_files, hostfile, include, exclude,
                           list(overrides), extra=extra, extra_text=text)
    _dry_run_or_submit(composed, plan, dry_run, as_json)


@cli.command("commcheck", epilog="""\b
Examples:
  hpcjobs commcheck --nodes 4 --profile a800
  hpcjobs commcheck --nodes 8 --profile a800 --pairs --expect 20
  hpcjobs commcheck --nodes 2 --set commcheck.sizes=[64M,1G] --set commcheck.iters=50
""")
@click.option("--nodes", "-N", type=int, default=None, help="Nodes to test (default 1: the GPUs of one node).")
@click.option("--profile", "-p", default="local", envvar="HPCJOBS_PROFILE", show_default=True, show_envvar=True,
              help="Cluster profile name or YAML path.")
@click.option("--pairs", is_flag=True, help="Also test every pair of nodes on its own and name the slow one.")
@click.option("--expect", type=float, default=None, metavar="GBPS",
              help="Fail below this bus bandwidth in GB/s (default: the profile's expected_busbw).")
@click.option("--name", default=None, help="Chain name (default: commcheck).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Any other setting, e.g. --set commcheck.sizes=[1M,256M] --set commcheck.time=00:10:00.")
@click.option("--dry-run", is_flag=True, help="Print what `render` prints; submit nothing.")
@click.option("--json", "as_json", is_flag=True, help='Print {"chain", "jobs", "run_dir"}.')
def commcheck(nodes, profile, pairs, expect, name, overrides, dry_run, as_json):
    """Test the interconnect: an all-reduce bandwidth check across N nodes.

    Submits a one-stage chain (recipe `commcheck`): NCCL on GPU profiles, gloo
    on CPU. The log and commcheck.json in the attempt directory hold the bus
    bandwidth per message size; the stage fails, naming the slow node(s), when
    the peak is below the expectation. Follow it with `status` and `logs`.
    """
    stage = "commcheck"
    extra: Dict[str, Any] = {}
    text = ["commcheck"]
    if pairs:
        extra[f"{stage}.pairs"] = True
        text.append("--pairs")
    if expect is not None:
        extra[f"{stage}.expected_busbw"] = expect
        text.append(f"--expect {expect:g}")
    composed, plan = _plan("commcheck", nodes, profile, name, (), None, None, None,
                           list(overrides), extra=extra, extra_text=text)
    _dry_run_or_submit(composed, plan, dry_run, as_json)


# ---------------------------------------------------------------- watching

@cli.command()
@click.argument("chain", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(chain, as_json):
    """Each stage's job, state, elapsed time, nodes, exit code and reason.

    CHAIN is a chain id, a chain name (its latest chain), a unique id prefix or
    a run directory; default: the most recent chain. A failed stage shows the
    end of its log. A training stage shows its progress and its memory,
    predicted (memory_plan.json) against measured per rank (memory_measured.json).
    """
    from . import records, status as st

    rec = records.find(chain) if chain else _latest()
    cs = st.collect([rec])[0]
    if as_json:
        click.echo(json.dumps(cs.to_json(), indent=2))
        return
    from . import display

    display.chain_status(cs)


def _latest():
    from . import records

    recs, damaged = records.load_all()
    _warn_damaged(damaged)
    if not recs:
        raise HpcjobsError("no chains yet", hint="submit one with `hpcjobs submit RECIPE`")
    return recs[-1]


def _warn_damaged(damaged) -> None:
    """One stderr line per chain record that could not be used (it is skipped)."""
    for e in damaged:
        _echo_err(f"warning: {e}")


MIN_INTERVAL = 0.5  # seconds; every refresh runs squeue and sacct, which load slurmctld and slurmdbd


def _interval(ctx, param, value: float) -> float:
    if not math.isfinite(value) or value < MIN_INTERVAL or value > 86400:
        raise click.BadParameter(f"must be between {MIN_INTERVAL} and 86400 seconds, got {value} "
                                 "(each refresh runs squeue and sacct on the cluster's controller)")
    return value


@cli.command()
@click.argument("chain", required=False)
@click.option("--interval", "-n", type=float, default=5.0, show_default=True, callback=_interval,
              help=f"Seconds between refreshes (at least {MIN_INTERVAL}).")
def watch(chain, interval):
    """Follow a chain live until it ends: states, elapsed times, training progress.

    The finetune stage shows step/total, loss, learning rate, throughput and ETA
    from its trainer log. Each refresh is one squeue and one sacct call. At the
    end it writes the chain's HTML report (`hpcjobs report`) and prints its
    path. Exits 0 when the chain completed, 1 when it failed or was cancelled.
    """
    from . import display, records

    rec = records.find(chain) if chain else _latest()
    final = display.watch(rec, interval)
    _write_report(records.find(rec.run_dir))   # re-read: a rerun may have changed the record
    sys.exit(0 if final == "COMPLETED" else 1)


def _write_report(rec) -> None:
    """The chain's HTML report, at its end; a failure to write it warns and changes no exit status."""
    from . import report

    try:
        click.echo(f"report: {report.write(rec)}")
    except Exception as e:   # the chain's outcome, not the report, decides watch's exit status
        if _debug():
            traceback.print_exc()
        _echo_err(f"warning: no report written: {type(e).__name__}: {e}")


@cli.command()
@click.argument("chain")
@click.argument("stage", required=False)
@click.option("--attempt", "-a", type=click.IntRange(min=1), default=None,
              help="Attempt number (default: the latest).")
@click.option("--follow", "-f", is_flag=True, help="Keep printing as the log grows, until the job ends.")
@click.option("--lines", "-l", type=click.IntRange(min=1), default=None, help="Only the last N lines (N >= 1).")
def logs(chain, stage, attempt, follow, lines):
    """Print a stage's Slurm log (default stage: the failed one, else the running one, else the last)."""
    from . import display, records, status as st

    rec = records.find(chain)
    if stage is None:
        cs = st.collect([rec])[0]
        pick = (next((s for s in cs.stages if s.failed), None)
                or next((s for s in cs.stages if s.state == "RUNNING"), None)
                or next((s for s in reversed(cs.stages) if s.job_id), None))
        if pick is None:
            raise HpcjobsError(f"chain {rec.chain_id} has no submitted stage yet")
        stage = pick.name
    display.logs(rec, stage, attempt, follow=follow, lines=lines)


@cli.command()
@click.argument("chain")
@click.option("--out", "-o", type=click.Path(), default=None,
              help="Write the report here (a file, or a directory for report.html). "
                   "Default: <run dir>/report.html.")
def report(chain, out):
    """Write one self-contained HTML report of a chain, running or finished; prints its path.

    \b
    Timeline of every stage and attempt (queue wait, runs, requeues, reruns),
    training curves against the global step (loss, eval loss, learning rate,
    grad norm, throughput, reward), resources from accounting (elapsed,
    nodes x GPUs, GPU-hours, CPU time, peak host memory, peak GPU memory
    predicted vs measured), the evaluation's metrics and samples, what changed
    between attempts, the resolved configuration, and links to each attempt's
    log and scripts. The file loads nothing from the network: open it anywhere.
    """
    from . import records, report as reports

    rec = records.find(chain)
    click.echo(str(reports.write(rec, Path(out) if out else None)))


EPILOG_RERUN = """\b
Overrides are KEY=VALUE pairs merged over the layers the chain was submitted
with (<run dir>/layers.yaml), so values linked with ${...} follow them
(model.source=... reaches convert.input). They are checked exactly as
`submit` checks them, and a later rerun keeps them.
"""


@cli.command(epilog=EPILOG_RERUN)
@click.argument("chain")
@click.option("--from", "from_stage", default=None,
              help="Rerun this stage and everything after it (default: the first failed stage).")
@click.option("--fresh", is_flag=True,
              help="Finetune starts over instead of resuming from its latest checkpoint "
                   "(the old checkpoints are moved aside, not deleted).")
@click.option("--dry-run", is_flag=True, help="Check and show what would change and run; submit nothing.")
@click.option("--force", is_flag=True,
              help="Rerun even a stage the memory planner predicts not to fit (the record says so).")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"chain", "jobs": {stage: job_id}, "stages", "changes"}.')
@click.argument("overrides", nargs=-1)
def rerun(chain, from_stage, fresh, dry_run, force, as_json, overrides):
    """Resubmit the failed stage (or --from STAGE) and every stage after it.

    Completed stages are not run again. Each rerun stage gets a new attempt
    with its own directory, log and overrides, e.g. a smaller micro batch after
    an out-of-memory failure:

    \b
      hpcjobs rerun CHAIN finetune.micro_batch_size=8 finetune.grad_accum=2

    The rerun is re-planned and checked like a submission (settings, input
    files, the partition's size), and prints which resolved values change.
    Changing a setting of a completed stage that is not rerun is refused.
    Rerunning finetune resumes from its latest checkpoint unless --fresh.
    A stage predicted not to fit in memory is refused as `submit` refuses it.
    Downstream jobs still waiting on the failed one are cancelled and replaced.
    """
    from . import records
    from . import rerun as reruns

    rec = records.find(chain)
    rp = reruns.rerun(rec, from_stage=from_stage, overrides=overrides, fresh=fresh, dry_run=dry_run,
                      force=force)
    changes = [{"key": k, "old": o, "new": n} for k, o, n in rp.changes]
    if as_json:
        click.echo(json.dumps({"chain": rec.chain_id, "jobs": rp.job_ids, "stages": rp.stages,
                               "changes": changes, "dry_run": dry_run}, default=str))
        return
    verb = "would rerun" if dry_run else "rerunning"
    click.echo(f"{verb} {', '.join(rp.stages)} of {rec.chain_id}")
    for k, o, n in rp.changes:
        click.echo(f"  changed  {k}: {o!r} -> {n!r}")
    if not rp.changes:
        click.echo("  no setting changed")
    if rp.cancel:
        click.echo(f"  {'would cancel' if dry_run else 'cancelled'} queued job(s) {', '.join(rp.cancel)}")
    for name in rp.stages:
        job = rp.job_ids.get(name, "-")
        click.echo(f"  {name:<10} job {job}  attempt {rp.attempts[name]}")
    if dry_run:
        click.echo("nothing was submitted (--dry-run)")


def _since(ctx, param, value: Optional[str]) -> Optional[str]:
    """``--since``: ``Nd``/``Nh`` ago, or a date ``YYYY-MM-DD[THH:MM[:SS]]`` (UTC) -> a UTC time."""
    import datetime as dt

    if value is None:
        return None
    text = value.strip()
    now = dt.datetime.now(dt.timezone.utc)
    m = re.fullmatch(r"(\d+)\s*([dh])", text)
    if m:
        delta = dt.timedelta(days=int(m[1])) if m[2] == "d" else dt.timedelta(hours=int(m[1]))
        return (now - delta).strftime("%Y-%m-%dT%H:%M:%SZ")
    for fmt in ("%Y-%m-%d", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%SZ"):
        try:
            return dt.datetime.strptime(text, fmt).strftime("%Y-%m-%dT%H:%M:%SZ")
        except ValueError:
            continue
    raise click.BadParameter(f"{value!r} is not Nd, Nh or a date YYYY-MM-DD[THH:MM[:SS]] (UTC)")


@cli.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@click.option("--scan", type=click.Path(file_okay=False, exists=True), default=None,
              help="Re-index the run directories under this runs root first.")
@click.option("--all", "show_all", is_flag=True, help="Every chain, however old (default: the last 7 days).")
@click.option("--since", default=None, callback=_since, metavar="Nd|Nh|DATE",
              help="Chains created since then (e.g. 30d, 12h, 2026-11-01; UTC); unfinished ones always show.")
def list_chains(as_json, scan, show_all, since):
    """Recent chains with their state, and every unfinished one.

    Finished chains come from a cache in the state directory (rebuilt from the
    run directories when missing); only unfinished ones are asked of Slurm,
    with one squeue and one sacct call whose window starts at the oldest of them.
    """
    from . import records, status as st

    scanned_damaged: list = []
    if scan:
        records.scan(Path(scan), damaged=scanned_damaged)
    hist = st.history(since=since, show_all=show_all)
    damaged = hist.damaged
    seen = {e.path for e in damaged}
    _warn_damaged(damaged + [e for e in scanned_damaged if e.path not in seen])
    statuses = hist.statuses
    if as_json:
        click.echo(json.dumps([cs.to_json() for cs in statuses], indent=2))
        return
    from . import display

    display.chain_list(statuses)
    if hist.hidden:
        click.echo(f"{hist.hidden} older finished chain(s) not shown (--all, or --since 30d)")


@cli.command()
@click.argument("chain")
def cancel(chain):
    """Cancel every job of a chain that has not finished."""
    from . import records, status as st
    from .slurm import LIVE_STATES, Slurm

    rec = records.find(chain)
    cs = st.collect([rec])[0]
    live = [s.job_id for s in cs.stages if s.job_id and s.state in LIVE_STATES | {"UNKNOWN"}]
    live += [j for s in cs.stages for j in s.orphans]
    Slurm(rec.slurm_conf).cancel(live)
    rec.submission = "cancelled"
    rec.save()
    click.echo(f"cancelled {len(live)} job(s) of {rec.chain_id}" + (f": {', '.join(live)}" if live else ""))


# ---------------------------------------------------------------- catalog

@cli.command()
def profiles():
    """List cluster profiles (shipped, and yours in ~/.config/hpcjobs/profiles)."""
    from . import catalog

    for name, entries in sorted(catalog.profiles().items()):
        origin = "+".join(e.origin for e in entries)
        desc = next((e.description for e in reversed(entries) if e.description), "")
        click.echo(f"{name:<10} {origin:<13} {desc}")


@cli.command()
def kinds():
    """List stage kinds (what a recipe's pipeline entries can be) and what each runs."""
    from . import stages

    for name in stages.names():
        kind = stages.get(name)
        flags = [f for f, on in (("multi-node", kind.multi_node), ("resumes", kind.can_resume)) if on]
        click.echo(f"{name:<10} {kind.summary}" + (f"  [{', '.join(flags)}]" if flags else ""))


@cli.command()
def recipes():
    """List recipes (shipped, and yours in ~/.config/hpcjobs/recipes)."""
    from . import catalog

    found = sorted(catalog.recipes().items())
    width = max([14] + [len(name) for name, _ in found])
    for name, e in found:
        click.echo(f"{name:<{width}} {e.origin:<8} {e.description}")


# ---------------------------------------------------------------- devcluster

@cli.group()
def devcluster():
    """A private two-node Slurm cluster on this machine (profile `local`).

    slurmctld, slurmd for node1 and node2 (4 fake GPUs each), slurmdbd with
    MariaDB, and munge, all under one directory: $HPCJOBS_DEVCLUSTER (`make`
    sets it to the checkout's .devcluster) if set, else the one the last `up`
    started, else ~/.local/state/hpcjobs/devcluster. Needs Debian's slurm and
    mariadb packages: scripts/install-system-deps.sh installs them.
    """


@devcluster.command("up")
def devcluster_up():
    """Start the cluster (a no-op if it is already up)."""
    from .devcluster import DevCluster

    dc = DevCluster()
    dc.up()
    click.echo(f"devcluster up: {dc.slurm_conf}")
    click.echo(f"use it with --profile local, or: export SLURM_CONF={dc.slurm_conf}")


@devcluster.command("down")
def devcluster_down():
    """Stop exactly the daemons `up` started."""
    from .devcluster import DevCluster

    DevCluster().down()
    click.echo("devcluster down")


@devcluster.command("status")
@click.option("--json", "as_json", is_flag=True)
def devcluster_status(as_json):
    """Daemons and nodes of the devcluster."""
    from .devcluster import DevCluster

    info = DevCluster().status()
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    click.echo(f"root:  {info.get('root')}")
    click.echo(f"ready: {info.get('ready')}")
    for name, d in (info.get("daemons") or {}).items():
        click.echo(f"  {name:<14} {'running' if d.get('running') else 'stopped':<8} pid {d.get('pid') or '-'}")


# ---------------------------------------------------------------- demo

@cli.command("demo-assets")
@click.argument("outdir", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True)
@click.option("--recipe", default="llama2-lora", show_default=True,
              help="whose assets: llama2-lora (a tiny Meta Llama-2 checkpoint, dialogue parquet, prompts) or "
                   "sft-lora (a tiny Hugging Face Bloom, prompt/response JSON lines); qwen2-grpo: a tiny "
                   "Qwen2 and TL;DR-style prompts; llm-pretrain: a small repetitive corpus (JSON lines) and tiny "
                   "size settings; seq-classification: a tiny BERT and sentence pairs with labels; seq2seq: a "
                   "tiny T5 and dialogues with summaries")
@click.option("--arch", type=click.Choice(["bloom", "qwen2"]), default=None,
              help="sft-lora only: the tiny model's architecture (default bloom; qwen2 can use "
                   "finetune.packing, bloom cannot)")
def demo_assets(outdir, seed, recipe, arch):
    """Write a tiny model, a small learnable data set and OUTDIR/demo.yaml for RECIPE's demo.

    Needs the train extra. Nothing is downloaded. Pass demo.yaml with --config:
    hpcjobs submit llama2-lora --nodes 2 --profile local --config OUTDIR/demo.yaml
    """
    from .train import demo_assets as assets

    if recipe not in assets.DEMO_RECIPES:
        raise click.BadParameter(f"no demo assets for {recipe!r} (known: {', '.join(assets.DEMO_RECIPES)})",
                                 param_hint="--recipe")
    if arch is not None and recipe != "sft-lora":
        raise click.BadParameter(f"chooses sft-lora's tiny model; {recipe}'s model is fixed", param_hint="--arch")
    out = Path(outdir).absolute()
    made = assets.make_for_recipe(recipe, out, seed=seed, arch=arch)
    for k, v in made.items():
        click.echo(f"{k:<11} {v}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="hpcjobs", standalone_mode=False)
    except click.exceptions.Abort:
        _echo_err("aborted")
        sys.exit(130)
    except click.UsageError as e:  # a bad option or argument: one line, like every other refusal
        cmd = e.ctx.command_path if e.ctx is not None else "hpcjobs"
        _echo_err(f"error: {e.format_message()}")
        _echo_err(f"  see: {cmd} --help")
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except ConfigError as e:
        _echo_err(f"error: {e}")
        _echo_err("nothing was submitted")
        sys.exit(2)
    except HpcjobsError as e:
        _echo_err(f"error: {e}")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:  # the reader went away (`hpcjobs logs CHAIN | head`): nothing to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the flush at exit does not fail again
        sys.exit(1)
    except OSError as e:  # a file or directory the user named or pointed us at; never a traceback
        if _debug():
            traceback.print_exc()
        _echo_err(f"error: {_os_error_text(e)}")
        sys.exit(2)
    except Exception as e:  # a bug in hpcjobs: one line, the traceback on request
        if _debug():
            raise
        _echo_err(f"error: internal error: {type(e).__name__}: {e}")
        _echo_err("  this is a bug in hpcjobs; please report it with the command and the output of the "
                  "same command run with HPCJOBS_DEBUG=1 (which shows the traceback)")
        sys.exit(INTERNAL_ERROR)


INTERNAL_ERROR = 70  # sysexits.h EX_SOFTWARE: distinct from 1 (a failure) and 2 (bad input)


def _debug() -> bool:
    return os.environ.get("HPCJOBS_DEBUG", "") not in ("", "0")


def _os_error_text(e: OSError) -> str:
    names = [str(n) for n in (e.filename, e.filename2) if n is not None]
    reason = e.strerror or str(e)
    return f"{' -> '.join(names)}: {reason}" if names else reason


if __name__ == "__main__":
    main()
