"""The `script` stage kind and `hpcjobs run`: a user's own training script on the devcluster's
two nodes under each launcher, the batch arithmetic settled before submission, and the
refusals that keep bad launches out of the queue."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import wait_chain

SCRIPTS = Path(__file__).resolve().parent / "fixtures" / "scripts"


def _queued(devcluster, prefix):
    out = subprocess.run(["squeue", "--noheader", "--format=%i %j"], env={**os.environ, **devcluster.env()},
                         capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.split()[1].startswith(prefix)]


def _run_json(hpcjobs, *args):
    """`hpcjobs run ... --json -- SCRIPT_ARGS` (``--json`` must come before ``--``)."""
    i = args.index("--") if "--" in args else len(args)
    return json.loads(hpcjobs("run", *args[:i], "--json", *args[i:]).stdout)


def _refused(hpcjobs, devcluster, name, *args):
    proc = hpcjobs("run", *args[:1], "--name", name, *args[1:], check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "nothing was submitted" in proc.stderr
    assert _queued(devcluster, name) == []
    return proc.stderr


# ---------------------------------------------------------------- rendering (no Slurm)

def test_run_dry_run_shows_the_launch(hpcjobs, tmp_path):
    proc = hpcjobs("run", SCRIPTS / "allreduce.py", "--nodes", "2", "--dry-run", "--", "--out", tmp_path / "r.json")
    out = proc.stdout
    assert "hpcjobs.launch run --spec" in out and "code/allreduce.py" in out
    spec = json.loads(out.split("launch.json <==\n", 1)[1].split("\n==>", 1)[0])
    assert spec["launcher"] == "torchrun" and spec["nnodes"] == 2 and spec["world_size"] == 2
    assert spec["args"] == ["--out", str(tmp_path / "r.json")]
    assert spec["program"][0].endswith("/code/allreduce.py")
    # the Trainer's TensorBoard curves land in the chain's tree, as finetune's do (unless the environment says)
    assert 'export HPCJOBS_TENSORBOARD_DIR="$HPCJOBS_RUN_DIR/tensorboard/$HPCJOBS_STAGE/attempt-$HPCJOBS_ATTEMPT"' in out
    assert 'export TENSORBOARD_LOGGING_DIR="${TENSORBOARD_LOGGING_DIR:-$HPCJOBS_TENSORBOARD_DIR}"' in out


def test_deepspeed_json_is_resolved_and_the_arg_points_at_it(hpcjobs, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                              "zero_optimization": {"stage": 2}}))
    proc = hpcjobs("run", SCRIPTS / "hf_trainer.py", "--nodes", "2", "--launcher", "deepspeed", "--hf-trainer",
                   "--dry-run", "--", "--deepspeed", ds, "--per_device_train_batch_size", "4",
                   "--gradient_accumulation_steps", "2")
    resolved = json.loads(proc.stdout.split("ds_config.json <==\n", 1)[1].split("\n==>", 1)[0])
    assert (resolved["train_batch_size"], resolved["train_micro_batch_size_per_gpu"],
            resolved["gradient_accumulation_steps"]) == (16, 4, 2)
    assert resolved["gradient_clipping"] == "auto"            # left for the HF Trainer
    spec = json.loads(proc.stdout.split("launch.json <==\n", 1)[1].split("\n==>", 1)[0])
    i = spec["args"].index("--deepspeed")
    assert spec["args"][i + 1].endswith("/ds_config.json")      # the resolved copy, not the user's file
    assert spec["no_local_rank"] is False
    assert "train_batch_size 16 = micro 4 x accumulation 2 x world 2" in proc.stdout


# ---------------------------------------------------------------- refusals (nothing queued)

@pytest.mark.cluster
def test_bad_launches_are_refused_before_submission(devcluster, hpcjobs, tmp_path):
    ds = tmp_path / "ds32.json"
    ds.write_text(json.dumps({"train_batch_size": 32, "zero_optimization": {"stage": 2}}))
    err = _refused(hpcjobs, devcluster, "bad-batch", SCRIPTS / "hf_trainer.py", "--nodes", "2", "--launcher",
                   "deepspeed", "--hf-trainer", "--", "--deepspeed", ds, "--per_device_train_batch_size", "4",
                   "--gradient_accumulation_steps", "2")
    assert "32" in err and "16" in err, err                    # the seed's mismatch, with the numbers
    clip = tmp_path / "clip.json"
    clip.write_text(json.dumps({"train_batch_size": "auto", "gradient_clipping": 1.0,
                                "zero_optimization": {"stage": 2}}))
    err = _refused(hpcjobs, devcluster, "bad-clip", SCRIPTS / "hf_trainer.py", "--launcher", "deepspeed",
                   "--hf-trainer", "--", "--deepspeed", clip, "--max_grad_norm", "0.5")
    assert "gradient_clipping" in err and "0.5" in err, err
    err = _refused(hpcjobs, devcluster, "bad-script", tmp_path / "nope.py")
    assert "train.script" in err and "nope.py" in err, err
    err = _refused(hpcjobs, devcluster, "bad-partial", SCRIPTS / "allreduce.py", "--include", "node1:0@node2:0")
    assert "only the deepspeed launcher" in err, err
    accel = tmp_path / "accel.yaml"
    accel.write_text("num_processes: 3\nnum_machines: 2\n")
    err = _refused(hpcjobs, devcluster, "bad-accel", SCRIPTS / "accelerate_train.py", "--nodes", "2",
                   "--launcher", "accelerate", "--accelerate-config", accel)
    assert "num_processes" in err, err
    proc = hpcjobs("run", SCRIPTS / "allreduce.py", "--launcher", "mpirun", check=False)
    assert proc.returncode == 2 and "mpirun" in proc.stderr and "Traceback" not in proc.stderr
    err = _refused(hpcjobs, devcluster, "bad-nodes", SCRIPTS / "allreduce.py", "--nodes", "3")
    assert "asks for 3 nodes but partition debug has 2" in err, err


# ---------------------------------------------------------------- real launches on two nodes

@pytest.mark.cluster
@pytest.mark.train
def test_torchrun_on_two_nodes_then_status_logs_and_rerun(devcluster, hpcjobs, tmp_path):
    out = tmp_path / "allreduce.json"
    # First a failure the script itself reports (plain argparse refuses the unknown flag).
    sub = _run_json(hpcjobs, SCRIPTS / "allreduce.py", "--nodes", "2", "--name", "torchrun2", "--",
                       "--out", out, "--bogus")
    final = wait_chain(hpcjobs, sub["chain"], timeout=240)
    assert final["state"] == "FAILED", final
    logs = hpcjobs("logs", sub["chain"]).stdout
    assert "unrecognized arguments: --bogus" in logs
    assert not out.exists()
    rr = hpcjobs.json("rerun", sub["chain"], f'train.args=[--out, "{out}"]')
    assert list(rr["jobs"]) == ["train"]
    assert any(c["key"] == "train.args.2" or c["key"].startswith("train.args") for c in rr["changes"])
    final = wait_chain(hpcjobs, sub["chain"], timeout=240)
    assert final["state"] == "COMPLETED" and final["stages"][0]["attempt"] == 2, final
    result = json.loads(out.read_text())
    world = result["world_size"]
    assert world == 2 and result["sum"] == world * (world - 1) / 2
    assert sorted(result["hosts"]) == ["node1", "node2"]       # one rank on each node, in allocation order
    assert [r["host"] for r in sorted(result["ranks"], key=lambda r: r["rank"])] == ["node1", "node2"]
    status = hpcjobs("status", sub["chain"]).stdout
    assert "COMPLETED" in status and "node[1-2]" in status


@pytest.mark.cluster
@pytest.mark.train
def test_srun_launcher_sets_the_rank_environment(devcluster, hpcjobs, tmp_path):
    out = tmp_path / "srun.json"
    sub = _run_json(hpcjobs, SCRIPTS / "srun_env.py", "--nodes", "2", "--launcher", "srun", "--name", "srun2",
                       "--", "--out", out)
    final = wait_chain(hpcjobs, sub["chain"], timeout=240)
    assert final["state"] == "COMPLETED", final
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["sum"] == 1.0
    by_rank = {r["rank"]: r for r in result["ranks"]}
    assert by_rank[0]["host"] == "node1" and by_rank[1]["host"] == "node2"
    assert by_rank[1]["node_rank"] == 1 and by_rank[1]["local_rank"] == 0
    assert by_rank[0]["master"] == by_rank[1]["master"] and by_rank[0]["master"].startswith("node1:")
    port = int(by_rank[0]["master"].split(":")[1])
    assert 10000 <= port < 30000                                  # outside the ephemeral range


@pytest.mark.cluster
@pytest.mark.train
@pytest.mark.slow
def test_hf_trainer_under_the_deepspeed_launcher(devcluster, hpcjobs, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                              "bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 2}}))
    out = tmp_path / "hf.json"
    sub = _run_json(hpcjobs, SCRIPTS / "hf_trainer.py", "--nodes", "2", "--launcher", "deepspeed",
                       "--hf-trainer", "--name", "dstrainer", "--", "--deepspeed", ds, "--output_dir",
                       tmp_path / "hf-out", "--out", out, "--per_device_train_batch_size", "4",
                       "--gradient_accumulation_steps", "2", "--max_steps", "8", "--learning_rate", "0.01",
                       "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no")
    final = wait_chain(hpcjobs, sub["chain"], timeout=600)
    assert final["state"] == "COMPLETED", (final, hpcjobs("logs", sub["chain"]).stdout[-3000:])
    result = json.loads(out.read_text())
    assert result["world_size"] == 2
    assert result["deepspeed"] == {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4,
                                   "gradient_accumulation_steps": 2}
    losses = result["losses"]
    assert len(losses) >= 4 and losses[-1] < losses[0], losses    # it trained


@pytest.mark.cluster
@pytest.mark.train
@pytest.mark.slow
def test_accelerate_with_gradient_accumulation_auto(devcluster, hpcjobs, tmp_path):
    accel = tmp_path / "accelerate.yaml"
    accel.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
                     "deepspeed_config:\n  gradient_accumulation_steps: auto\n  zero_stage: 2\n")
    out = tmp_path / "accel.json"
    sub = _run_json(hpcjobs, SCRIPTS / "accelerate_train.py", "--nodes", "2", "--launcher", "accelerate",
                       "--accelerate-config", accel, "--name", "accel2",
                       "--set", "train.batch.micro_batch_size=4", "--set", "train.batch.grad_accum=2",
                       "--", "--out", out, "--batch_size", "4", "--steps", "6")
    run_dir = Path(sub["run_dir"])
    made = (run_dir / "stages/train/attempt-1/accelerate.yaml").read_text()
    assert "gradient_accumulation_steps" not in made and "num_processes: 2" in made
    final = wait_chain(hpcjobs, sub["chain"], timeout=600)
    assert final["state"] == "COMPLETED", (final, hpcjobs("logs", sub["chain"]).stdout[-3000:])
    result = json.loads(out.read_text())
    assert result["num_processes"] == 2 and result["gradient_accumulation_steps"] == 2
    assert result["deepspeed"] == {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4,
                                   "gradient_accumulation_steps": 2}
    assert result["losses"][-1] < result["losses"][0], result["losses"]


@pytest.mark.cluster
@pytest.mark.train
def test_user_recipe_mixes_command_and_script_stages(devcluster, hpcjobs, tmp_path):
    recipe = tmp_path / "my-pipeline.yaml"
    recipe.write_text(f"""\
recipe:
  description: prepare -> train (my script, 2 nodes) -> check
pipeline:
  prepare: {{kind: command}}
  train: {{kind: script, after: [prepare]}}
  check: {{kind: command, after: [train]}}
prepare:
  command: echo prepared > "$HPCJOBS_RUN_DIR/prepared.txt"
train:
  script: {SCRIPTS / 'allreduce.py'}
  launcher: torchrun
  args: [--out, "${{train.output}}/result.json"]
check:
  command: |
    grep -q prepared "$HPCJOBS_RUN_DIR/prepared.txt"
    python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); assert r["sum"] == 1.0, r' "$HPCJOBS_RUN_DIR/output/result.json"
""")
    sub = hpcjobs.json("submit", recipe, "--nodes", "2", "--name", "mixed")
    final = wait_chain(hpcjobs, sub["chain"], timeout=300)
    assert final["state"] == "COMPLETED", final
    assert [s["state"] for s in final["stages"]] == ["COMPLETED"] * 3
    assert json.loads((Path(sub["run_dir"]) / "output/result.json").read_text())["sum"] == 1.0


@pytest.mark.cluster
def test_time_limit_warning_checkpoints_requeues_and_resumes(devcluster, hpcjobs, tmp_path):
    """Slurm's SIGUSR2 warning (sent here by hand, as Slurm does before the limit) reaches every
    rank; the script saves and exits 75; the job requeues itself and continues from its step."""
    sub = _run_json(hpcjobs, SCRIPTS / "preemptible.py", "--nodes", "2", "--launcher", "srun", "--name", "preempt",
                    "--", "--steps", "30", "--step-seconds", "0.5")
    out = Path(sub["run_dir"]) / "output"
    job = sub["jobs"]["train"]
    from conftest import wait_for
    wait_for(lambda: (out / "step").exists() and int((out / "step").read_text() or 0) >= 4, timeout=120,
             what="the script to pass step 4")
    subprocess.run(["scancel", "--signal=USR2", "--batch", job], env={**os.environ, **devcluster.env()}, check=True)
    final = wait_chain(hpcjobs, sub["chain"], timeout=240)
    assert final["state"] == "COMPLETED", final
    events = (out / "events").read_text().split()
    starts = [int(events[i + 1]) for i in range(0, len(events), 2) if events[i] == "start"]
    assert starts[0] == 0 and len(starts) == 2 and 4 <= starts[1] < 30, events   # resumed, not restarted
    assert events[-2:] == ["end", "30"]
    log = hpcjobs("logs", sub["chain"]).stdout
    assert "requeueing (restart 1 of" in log and "exiting 75" in log
    assert final["stages"][0]["job_id"] == job and final["stages"][0]["restarts"] == 1


@pytest.mark.cluster
@pytest.mark.train
@pytest.mark.slow
def test_user_recipe_convert_own_lora_script_merge_evaluate(devcluster, hpcjobs, demo_assets, tmp_path):
    """Bringing an existing workflow over: the built-in convert, the user's own LoRA script on two
    nodes (torchrun), then the built-in merge and evaluate on what the script saved."""
    recipe = tmp_path / "my-lora.yaml"
    recipe.write_text(f"""\
recipe:
  description: convert -> my own LoRA script (2 nodes) -> merge -> evaluate
pipeline:
  convert: {{kind: convert}}
  train: {{kind: script, after: [convert]}}
  merge: {{kind: merge, after: [train]}}
  evaluate: {{kind: evaluate, after: [merge]}}
model:
  source: {demo_assets / 'llama-2-tiny'}
data:
  path: {demo_assets / 'dialogues.parquet'}
  columns: [Description, Patient, Doctor]
  template: "Patient: {{Patient}} Doctor: {{Doctor}}"
train:
  script: {SCRIPTS / 'lora_sft.py'}
  launcher: torchrun
  hf_trainer: true
  args: [--model, "${{convert.output}}", --data, "${{data.path}}", --template, "${{data.template}}",
         --output_dir, "${{train.output}}", --max_steps, "16", --per_device_train_batch_size, "4",
         --learning_rate, "5e-3", --logging_steps, "2", --report_to, none, --save_strategy, "no",
         --use_cpu, "true"]
merge:
  base: ${{convert.output}}
  adapter: ${{train.output}}
evaluate:
  base: ${{convert.output}}
  merged: ${{merge.output}}
  prompts: {demo_assets / 'prompts.txt'}
  max_new_tokens: 8
  max_seq_length: 96
""")
    sub = hpcjobs.json("submit", recipe, "--nodes", "2", "--name", "mylora")
    final = wait_chain(hpcjobs, sub["chain"], timeout=900)
    assert final["state"] == "COMPLETED", (final, hpcjobs("logs", sub["chain"]).stdout[-3000:])
    run = Path(sub["run_dir"])
    trained = json.loads((run / "output" / "losses.json").read_text())
    assert trained["world_size"] == 2
    losses = trained["losses"]
    assert losses[-1] < losses[0], losses                           # the user's script trained
    assert (run / "output" / "adapter_config.json").is_file()
    assert (run / "merged" / "config.json").is_file()              # merge took the script's adapter
    assert (run / "eval" / "report.json").is_file()
