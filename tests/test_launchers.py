"""hpcjobs.launchers and the job side of the script stage (``hpcjobs.launch run|task``).

Unmarked tests are pure logic (no torch/deepspeed/accelerate imported). Tests marked
``train`` check the generated command lines against the launchers' own argument
parsers and run every launcher for real on this machine, without Slurm: one node
(``localhost``), two CPU processes over gloo, through ``python -m hpcjobs.launch run``
(or ``task``) with the Slurm variables a job step would have. They check the numbers
the ranks report (the all-reduce sum, the loss going down, the batch numbers the
DeepSpeed engine really used), not only exit codes.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hpcjobs import launchers
from hpcjobs.errors import HpcjobsError
from hpcjobs.launchers import LaunchSpec, accelerate_yaml, master_port, node_command, task_environment

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "fixtures" / "scripts"
PY = "/venv/bin/python"


def spec(**kw) -> LaunchSpec:
    base = dict(launcher="torchrun", program=["/abs/train.py"], args=["--lr", "1e-3"], nnodes=2,
                nproc_per_node=4, world_size=8, allocation="/run/allocation")
    base.update(kw)
    return LaunchSpec(**base)


def error(fn, *args, **kwargs) -> str:
    with pytest.raises(HpcjobsError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_modules_import_without_torch():
    code = ("import sys, hpcjobs.launchers, hpcjobs.scriptbatch, hpcjobs.launch; "
            "bad = [m for m in ('torch', 'deepspeed', 'transformers', 'accelerate') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# --------------------------------------------------------------------------- master port


class TestMasterPort:
    def test_formula_and_range(self):
        assert master_port(0) == 10000
        assert master_port(12345) == 22345
        assert master_port(19999) == 29999
        assert master_port(20000) == 10000
        for job_id in [1, 7, 4242, 99_999, 1_234_567, 2**31 - 1] + random.Random(0).sample(range(10**8), 200):
            port = master_port(job_id)
            assert port == master_port(job_id)  # every node computes the same one
            assert 10000 <= port < 30000
            assert not 32768 <= port <= 60999  # never in the Linux ephemeral range

    def test_the_old_formula_overlapped_the_ephemeral_range(self):
        # 20000 + jobid % 20000 reaches 39999: job 15000 got 35000, an ephemeral port
        assert 32768 <= 20000 + 15000 % 20000 <= 60999
        assert master_port(15000) == 25000

    def test_refuses_a_range_overlapping_the_ephemeral_ports(self):
        assert "ephemeral" in error(master_port, 1, base=20000, span=20000)
        assert "ephemeral" in error(spec, port_base=30000)
        with pytest.raises(ValueError):
            master_port(-1)


# --------------------------------------------------------------------------- the spec


class TestLaunchSpec:
    def test_json_round_trip(self):
        s = spec(launcher="deepspeed", program=["-m", "pkg.train"], hostfile="/run/hostfile",
                 ds_filter=("exclude", "node2:3"), world_size=7, deepspeed_config="/run/ds.json",
                 no_local_rank=False, env={"NCCL_DEBUG": "INFO"})
        back = LaunchSpec.from_json(s.to_json())
        assert back == s
        assert back.ds_filter == ("exclude", "node2:3")
        assert json.loads(s.to_json())["ds_filter"] == ["exclude", "node2:3"]

    def test_read_and_write(self, tmp_path):
        s = spec()
        s.write(tmp_path / "launch.json")
        assert LaunchSpec.read(tmp_path / "launch.json") == s

    @pytest.mark.parametrize("kw, words", [
        (dict(launcher="mpirun"), "launcher: must be one of deepspeed, torchrun, accelerate, srun"),
        (dict(program=["-m"]), "program"),
        (dict(program=["--x"]), "program"),
        (dict(program=["a.py", "b.py"]), "program"),
        (dict(args=["--n", 3]), "args: must be a list of strings"),
        (dict(world_size=6), "world_size: 6 but nnodes (2) × nproc_per_node (4) = 8"),
        (dict(nnodes=0), "nnodes: must be a positive integer"),
        (dict(launcher="deepspeed"), "hostfile: the deepspeed launcher needs a hostfile"),
        (dict(launcher="accelerate"), "accelerate_config"),
        (dict(ds_filter=("include", "node1")), "ds_filter: an include/exclude filter needs the deepspeed launcher"),
        (dict(launcher="deepspeed", hostfile="h", ds_filter=("only", "x")), "ds_filter"),
        (dict(env={"A=B": "x"}), "env"),
    ])
    def test_invalid(self, kw, words):
        assert words in error(spec, **kw)

    def test_from_json_errors_name_the_file(self):
        assert "launch.json:1: invalid JSON" in error(LaunchSpec.from_json, "{", "launch.json")
        text = json.dumps({"launcher": "torchrun", "program": ["t.py"], "nproc": 2})
        assert "unknown key(s) nproc" in error(LaunchSpec.from_json, text, "launch.json")
        assert "missing key(s) program" in error(LaunchSpec.from_json, '{"launcher": "srun"}', "x.json")
        text = json.dumps({"launcher": "torchrun", "program": ["t.py"], "nnodes": 2, "world_size": 3})
        assert "x.json: world_size: 3 but" in error(LaunchSpec.from_json, text, "x.json")

    def test_deepspeed_filter_may_use_fewer_ranks(self):
        s = spec(launcher="deepspeed", hostfile="h", ds_filter=("include", "node1:0,1@node2"), world_size=6)
        assert s.world_size == 6
        assert "more than" in error(spec, launcher="deepspeed", hostfile="h", ds_filter=("include", "n"),
                                    world_size=9)


# --------------------------------------------------------------------------- command lines


class TestNodeCommand:
    def test_deepspeed(self):
        s = spec(launcher="deepspeed", hostfile="/run/hostfile", no_local_rank=True)
        assert node_command(s, 1, "node1", 22345, PY) == [
            PY, "-u", "-m", "deepspeed.launcher.runner", "--no_ssh", "--node_rank=1", "--hostfile=/run/hostfile",
            "--master_addr=node1", "--master_port=22345", "--no_local_rank", "/abs/train.py", "--lr", "1e-3"]

    def test_deepspeed_module_filter_and_local_rank(self):
        s = spec(launcher="deepspeed", program=["-m", "pkg.train"], hostfile="/h", no_local_rank=False,
                 ds_filter=("include", "node1:0,1@node2"), world_size=6)
        cmd = node_command(s, 0, "node1", 10001, PY)
        assert cmd[4:] == ["--no_ssh", "--node_rank=0", "--hostfile=/h", "--master_addr=node1",
                           "--master_port=10001", "--include=node1:0,1@node2", "--module", "pkg.train",
                           "--lr", "1e-3"]
        assert "--no_local_rank" not in cmd

    def test_torchrun(self):
        assert node_command(spec(), 1, "node1", 22345, PY) == [
            PY, "-u", "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=4", "--node-rank=1",
            "--rdzv-backend=static", "--master-addr=node1", "--master-port=22345", "/abs/train.py", "--lr", "1e-3"]
        cmd = node_command(spec(program=["-m", "pkg.train"]), 0, "node1", 22345, PY)
        assert cmd[-4:] == ["--module", "pkg.train", "--lr", "1e-3"]

    def test_accelerate(self):
        s = spec(launcher="accelerate", accelerate_config="/run/accelerate.yaml")
        assert node_command(s, 1, "node1", 22345, PY) == [
            PY, "-u", "-m", "accelerate.commands.launch", "--config_file=/run/accelerate.yaml", "--num_machines=2",
            "--num_processes=8", "--machine_rank=1", "--main_process_ip=node1", "--main_process_port=22345",
            "/abs/train.py", "--lr", "1e-3"]

    def test_script_arguments_are_passed_verbatim(self):
        args = ["--config", "a b.yaml", "--", "--weird=1", "$HOME", "'quoted'"]
        assert node_command(spec(args=args), 0, "n", 10000, PY)[-6:] == args

    def test_refusals(self):
        assert "task_command" in error(node_command, spec(launcher="srun"), 0, "n", 10000, PY)
        assert "node rank 2 is not in 0..1" in error(node_command, spec(), 2, "n", 10000, PY)

    def test_task(self):
        s = spec(launcher="srun", program=["-m", "pkg.train"])
        assert launchers.task_command(s, PY) == [PY, "-u", "-m", "pkg.train", "--lr", "1e-3"]
        env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_NODEID": "1",
               "SLURM_NTASKS_PER_NODE": "4"}
        assert task_environment(s, env, "node1", 22345) == {
            "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "NODE_RANK": "1",
            "GROUP_RANK": "1", "MASTER_ADDR": "node1", "MASTER_PORT": "22345"}
        assert "SLURM_NTASKS" in error(task_environment, s, {**env, "SLURM_NTASKS": "6"}, "n", 1)
        assert "world size 8" in error(task_environment, s, {**env, "SLURM_NTASKS": "6"}, "n", 1)
        assert "SLURM_NTASKS_PER_NODE" in error(task_environment, s, {**env, "SLURM_NTASKS_PER_NODE": "2"}, "n", 1)
        no_procid = {k: v for k, v in env.items() if k != "SLURM_PROCID"}
        assert "SLURM_PROCID is not set" in error(task_environment, s, no_procid, "n", 1)


# --------------------------------------------------------------------------- accelerate YAML


class TestAccelerateYaml:
    def test_plain_multi_gpu(self):
        cfg, notes = accelerate_yaml(None, num_machines=2, num_processes=16, deepspeed_config=None,
                                     mixed_precision="bf16")
        assert cfg == {"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU", "num_machines": 2,
                       "num_processes": 16, "rdzv_backend": "static", "same_network": True,
                       "main_training_function": "main", "mixed_precision": "bf16"}
        assert notes.ds_updates == {}

    def test_seed_gradient_accumulation_auto_never_reaches_accelerate(self):
        user = {"distributed_type": "DEEPSPEED", "mixed_precision": "bf16", "num_processes": 2,
                "machine_rank": 0, "main_process_ip": "10.0.0.1", "main_process_port": 29500,
                "deepspeed_config": {"gradient_accumulation_steps": "auto", "zero_stage": 2,
                                     "offload_optimizer_device": "cpu", "gradient_clipping": 1.0,
                                     "zero3_init_flag": False, "deepspeed_multinode_launcher": "pdsh",
                                     "deepspeed_hostfile": "/etc/hosts.ds"}}
        cfg, notes = accelerate_yaml(user, num_machines=1, num_processes=2, deepspeed_config="/run/ds.json",
                                     mixed_precision=None)
        assert cfg["distributed_type"] == "DEEPSPEED"
        assert cfg["deepspeed_config"] == {"deepspeed_config_file": "/run/ds.json", "zero3_init_flag": False,
                                           "deepspeed_multinode_launcher": "standard"}
        assert "mixed_precision" not in cfg
        for key in ("machine_rank", "main_process_ip", "main_process_port"):
            assert key not in cfg
        assert (cfg["num_machines"], cfg["num_processes"]) == (1, 2)
        # everything accelerate refuses next to deepspeed_config_file moved to the JSON; "auto" dropped
        assert notes.ds_updates == {"gradient_clipping": 1.0, "bf16": {"enabled": True}, "fp16": {"enabled": False},
                                    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
        assert "deepspeed_config.gradient_accumulation_steps" in notes.dropped
        assert "gradient_accumulation_steps" not in json.dumps(cfg)
        assert any("gradient_accumulation_steps: 'auto' removed" in m for m in notes.messages)

    def test_concrete_gradient_accumulation_moves_to_the_json(self):
        user = {"distributed_type": "DEEPSPEED", "deepspeed_config": {"gradient_accumulation_steps": 4,
                                                                      "deepspeed_config_file": "mine.json"}}
        cfg, notes = accelerate_yaml(user, num_machines=2, num_processes=4, deepspeed_config="/run/ds.json",
                                     mixed_precision="bf16")
        assert notes.ds_updates == {"gradient_accumulation_steps": 4, "bf16": {"enabled": True},
                                    "fp16": {"enabled": False}}
        assert ("deepspeed_config.gradient_accumulation_steps", "gradient_accumulation_steps", 4) in notes.moved
        assert launchers.accelerate_uses_deepspeed(user) == (True, "mine.json")

    def test_inline_deepspeed_yaml_keeps_accelerates_default_stage(self):
        user = {"distributed_type": "DEEPSPEED", "deepspeed_config": {"offload_param_device": "none"}}
        _, notes = accelerate_yaml(user, num_machines=1, num_processes=2, deepspeed_config="/run/ds.json",
                                   mixed_precision=None)
        assert notes.ds_updates["zero_optimization"] == {"stage": 2, "offload_param": {"device": "none"}}

    @pytest.mark.parametrize("user, words", [
        ({"num_processes": 8}, "num_processes: is 8 but the stage runs 16 processes (2 node(s) × 8)"),
        ({"num_machines": 1}, "num_machines: is 1 but the stage runs on 2 node(s)"),
        ({"num_machines": 2, "num_processes": 15}, "num_processes: 15 is not a multiple of num_machines (2)"),
        ({"num_processes": "many"}, "num_processes: must be a positive integer"),
        ({"mixed_precision": "fp16"}, "mixed_precision: is fp16 but the stage's precision is bf16"),
        ({"compute_environment": "AMAZON_SAGEMAKER"}, "compute_environment"),
        ({"distributed_type": "DEEPSPEED"}, "distributed_type: is DEEPSPEED but the stage has no DeepSpeed config"),
    ])
    def test_refused(self, user, words):
        msg = error(accelerate_yaml, user, num_machines=2, num_processes=16, deepspeed_config=None,
                    mixed_precision="bf16", source="acc.yaml")
        assert words in msg and msg.startswith("acc.yaml: ")

    def test_refused_with_deepspeed(self):
        assert "distributed_type: is FSDP but the stage uses a DeepSpeed config" in error(
            accelerate_yaml, {"distributed_type": "FSDP"}, num_machines=1, num_processes=2,
            deepspeed_config="/ds.json", mixed_precision=None)
        assert "zero_stage: must be 0, 1, 2 or 3" in error(
            accelerate_yaml, {"deepspeed_config": {"zero_stage": 5}}, num_machines=1, num_processes=2,
            deepspeed_config="/ds.json", mixed_precision=None)
        assert "cannot be split evenly" in error(accelerate_yaml, None, num_machines=2, num_processes=3,
                                                 deepspeed_config=None, mixed_precision=None)

    def test_unquoted_no_and_old_fp16_key(self):
        cfg, _ = accelerate_yaml({"mixed_precision": False}, num_machines=1, num_processes=1,
                                 deepspeed_config=None, mixed_precision=None)
        assert cfg["mixed_precision"] == "no" and cfg["distributed_type"] == "NO"
        cfg, _ = accelerate_yaml({"fp16": True}, num_machines=1, num_processes=2, deepspeed_config=None,
                                 mixed_precision=None)
        assert cfg["mixed_precision"] == "fp16" and "fp16" not in cfg

    def test_zero_optimization_required_by_accelerate(self):
        assert "zero_optimization" in error(launchers.check_ds_json_for_accelerate, {"train_batch_size": 8})
        launchers.check_ds_json_for_accelerate({"zero_optimization": {"stage": 0}})


# --------------------------------------------------------------------------- launchers' own parsers (train)


@pytest.mark.train
def test_commands_parse_with_the_launchers_own_parsers():
    """DeepSpeed's runner, torchrun and accelerate read our argv the way we mean it."""
    code = r"""
import json, sys
from hpcjobs.launchers import LaunchSpec, node_command
out = {}
ds = LaunchSpec(launcher="deepspeed", program=["-m", "pkg.train"], args=["--out", "r.json", "--x=1"], nnodes=2,
                nproc_per_node=2, world_size=3, allocation="a", hostfile="/h", ds_filter=("exclude", "n2:1"))
from deepspeed.launcher.runner import parse_args
a = parse_args(node_command(ds, 1, "n1", 12345, "py")[4:])
out["ds"] = [a.no_ssh, a.node_rank, a.hostfile, a.master_addr, a.master_port, a.exclude, a.include,
             a.no_local_rank, a.module, a.user_script, a.user_args]
from torch.distributed.run import get_args_parser
tr = LaunchSpec(launcher="torchrun", program=["/t.py"], args=["--nnodes", "9"], nnodes=2, nproc_per_node=2,
                world_size=4, allocation="a")
a = get_args_parser().parse_args(node_command(tr, 1, "n1", 12345, "py")[4:])
out["tr"] = [a.nnodes, a.nproc_per_node, a.node_rank, a.rdzv_backend, a.master_addr, a.master_port, a.module,
             a.training_script, a.training_script_args]
from accelerate.commands.launch import launch_command_parser
ac = LaunchSpec(launcher="accelerate", program=["-m", "pkg.train"], args=["--lr", "1"], nnodes=2,
                nproc_per_node=2, world_size=4, allocation="a", accelerate_config="/acc.yaml")
a = launch_command_parser().parse_args(node_command(ac, 1, "n1", 12345, "py")[4:])
out["ac"] = [a.config_file, a.num_machines, a.num_processes, a.machine_rank, a.main_process_ip,
             a.main_process_port, a.module, a.training_script, a.training_script_args]
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ds"] == [True, 1, "/h", "n1", 12345, "n2:1", "", True, True, "pkg.train", ["--out", "r.json", "--x=1"]]
    assert out["tr"] == ["2", "2", 1, "static", "n1", 12345, False, "/t.py", ["--nnodes", "9"]]
    assert out["ac"] == ["/acc.yaml", 2, 4, 1, "n1", 12345, True, "pkg.train", ["--lr", "1"]]


# --------------------------------------------------------------------------- the job side, for real


def free_job_id() -> int:
    """A job id whose master port is free here."""
    rng = random.Random()
    for _ in range(200):
        job_id = rng.randrange(1, 10**6)
        with socket.socket() as s:
            try:
                s.bind(("", master_port(job_id)))
            except OSError:
                continue
        return job_id
    raise AssertionError("no free port found")


def job_env(job_id: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "OMPI_"))}
    env.update(SLURM_JOB_ID=str(job_id), SLURM_NODEID="0", SLURM_JOB_NODELIST="localhost",
               SLURMD_NODENAME="localhost", SLURM_JOB_NUM_NODES="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.update(extra)
    return env


def launch(cmd: str, spec_path: Path, env: dict, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "hpcjobs.launch", cmd, "--spec", str(spec_path)], env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return proc


def one_node(tmp_path: Path, **kw) -> Path:
    (tmp_path / "allocation").write_text("localhost\n")
    s = LaunchSpec(nnodes=1, nproc_per_node=2, world_size=2, allocation=str(tmp_path / "allocation"), **kw)
    s.write(tmp_path / "launch.json")
    return tmp_path / "launch.json"


def test_run_refuses_a_busy_master_port(tmp_path):
    spec_path = one_node(tmp_path, launcher="torchrun", program=[str(SCRIPTS / "allreduce.py")])
    job_id = free_job_id()
    with socket.socket() as busy:
        busy.bind(("", master_port(job_id)))
        busy.listen()
        proc = launch("run", spec_path, job_env(job_id), tmp_path)
    assert proc.returncode == 2
    assert f"hpcjobs: error: cannot use master port {master_port(job_id)} on this node" in proc.stderr
    assert "already in use" in proc.stderr


def test_run_checks_the_node_against_the_allocation(tmp_path):
    spec_path = one_node(tmp_path, launcher="torchrun", program=[str(SCRIPTS / "allreduce.py")])
    proc = launch("run", spec_path, job_env(free_job_id(), SLURMD_NODENAME="node7"), tmp_path)
    assert proc.returncode == 2
    assert "hpcjobs: error: node node7 has SLURM_NODEID 0, but line 1 of" in proc.stderr
    env = job_env(1)
    del env["SLURM_NODEID"]
    assert "SLURM_NODEID is not set" in launch("run", spec_path, env, tmp_path).stderr
    (tmp_path / "allocation").write_text("localhost\nnode2\n")
    assert "the allocation has 2 node(s) (localhost, node2) but the job was planned for 1" in \
        launch("run", spec_path, job_env(1), tmp_path).stderr
    (tmp_path / "srun").mkdir()
    srun_spec = one_node(tmp_path / "srun", launcher="srun", program=["x.py"])
    assert "once per rank" in launch("run", srun_spec, job_env(1), tmp_path).stderr


@pytest.mark.train
def test_torchrun_allreduce(tmp_path):
    out = tmp_path / "result.json"
    spec_path = one_node(tmp_path, launcher="torchrun", program=[str(SCRIPTS / "allreduce.py")],
                         args=["--out", str(out)])
    job_id = free_job_id()
    proc = launch("run", spec_path, job_env(job_id), tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"master localhost:{master_port(job_id)}" in proc.stdout
    assert "torch.distributed.run --nnodes=1 --nproc-per-node=2 --node-rank=0 --rdzv-backend=static" in proc.stdout
    result = json.loads(out.read_text())
    world = result["world_size"]
    assert world == 2
    assert result["sum"] == world * (world - 1) / 2
    assert [r["rank"] for r in result["ranks"]] == [0, 1]
    assert [r["local_rank"] for r in result["ranks"]] == [0, 1]


@pytest.mark.train
def test_srun_tasks_allreduce(tmp_path):
    out = tmp_path / "result.json"
    spec_path = one_node(tmp_path, launcher="srun", program=[str(SCRIPTS / "srun_env.py")],
                         args=["--out", str(out)])
    job_id = free_job_id()
    procs = [subprocess.Popen([sys.executable, "-m", "hpcjobs.launch", "task", "--spec", str(spec_path)],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=job_env(job_id, SLURM_PROCID=str(r), SLURM_LOCALID=str(r), SLURM_NTASKS="2",
                                          SLURM_NTASKS_PER_NODE="2"))
             for r in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    result = json.loads(out.read_text())
    world = result["world_size"]
    assert world == 2 and result["sum"] == world * (world - 1) / 2
    port = master_port(job_id)
    assert result["ranks"] == [
        {"rank": r, "local_rank": r, "local_world_size": 2, "node_rank": 0, "host": socket.gethostname(),
         "master": f"localhost:{port}"} for r in range(2)]


@pytest.mark.train
def test_deepspeed_hf_trainer(tmp_path):
    """DeepSpeed's runner (no ssh) with an HF Trainer script; the JSON has "auto" batch keys,
    resolved by hpcjobs from the script's flags to 16 = 4 × 2 × 2, which the engine uses."""
    from hpcjobs import scriptbatch

    args = ["--deepspeed", str(tmp_path / "ds.json"), "--output_dir", str(tmp_path / "out"),
            "--out", str(tmp_path / "result.json"), "--per_device_train_batch_size", "4",
            "--gradient_accumulation_steps", "2", "--max_steps", "8", "--learning_rate", "5e-3",
            "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"]
    user_ds = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
               "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
               "bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 2}}
    res = scriptbatch.resolve_batch(declared=None, from_args=scriptbatch.read_script_args(args), ds_json=user_ds,
                                    world_size=2, hf_script=True)
    assert tuple(res.numbers) == (16, 4, 2, 2)
    (tmp_path / "ds.json").write_text(json.dumps(res.ds_json))
    (tmp_path / "hostfile").write_text("localhost slots=2\n")
    spec_path = one_node(tmp_path, launcher="deepspeed", program=[str(SCRIPTS / "hf_trainer.py")],
                         args=args + res.script_args, hostfile=str(tmp_path / "hostfile"),
                         deepspeed_config=str(tmp_path / "ds.json"), no_local_rank=False)
    proc = launch("run", spec_path, job_env(free_job_id(), DS_ACCELERATOR="cpu"), tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "deepspeed.launcher.runner --no_ssh --node_rank=0" in proc.stdout
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2
    assert result["deepspeed"] == {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4,
                                   "gradient_accumulation_steps": 2}
    losses = result["losses"]
    assert len(losses) == 8 and result["global_step"] == 8
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.train
def test_accelerate_deepspeed_from_the_yaml(tmp_path):
    """accelerate + DeepSpeed: the user's YAML says gradient_accumulation_steps: auto; the YAML
    the job gets has none, the DeepSpeed JSON has the concrete number, and the ranks use it."""
    from hpcjobs import scriptbatch

    user = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "DEEPSPEED", "mixed_precision": "no",
            "num_processes": 2, "machine_rank": 0,
            "deepspeed_config": {"gradient_accumulation_steps": "auto", "zero_stage": 2,
                                 "offload_optimizer_device": "none"}}
    ds_path = tmp_path / "ds.json"
    cfg, notes = accelerate_yaml(user, num_machines=1, num_processes=2, deepspeed_config=str(ds_path),
                                 mixed_precision=None)
    assert "gradient_accumulation_steps" not in json.dumps(cfg)
    ds = scriptbatch.merge_ds_updates({"train_batch_size": "auto", "gradient_accumulation_steps": "auto"},
                                      notes.ds_updates)
    res = scriptbatch.resolve_batch(declared={"micro_batch_size": 4, "grad_accum": 2, "global_batch_size": None},
                                    from_args={}, ds_json=ds, world_size=2, hf_script=False)
    assert res.ds_json["gradient_accumulation_steps"] == 2 and res.ds_json["train_batch_size"] == 16
    launchers.check_ds_json_for_accelerate(res.ds_json)
    ds_path.write_text(json.dumps(res.ds_json))
    (tmp_path / "accelerate.yaml").write_text(launchers.dump_yaml(cfg))
    out = tmp_path / "result.json"
    spec_path = one_node(tmp_path, launcher="accelerate", program=[str(SCRIPTS / "accelerate_train.py")],
                         args=["--out", str(out), "--batch_size", "4", "--steps", "8"],
                         accelerate_config=str(tmp_path / "accelerate.yaml"), deepspeed_config=str(ds_path))
    proc = launch("run", spec_path, job_env(free_job_id(), DS_ACCELERATOR="cpu"), tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["num_processes"] == 2
    assert result["distributed_type"].endswith("DEEPSPEED")
    assert result["gradient_accumulation_steps"] == 2
    assert result["deepspeed"] == {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4,
                                   "gradient_accumulation_steps": 2}
    losses = result["losses"]
    assert len(losses) == 8
    assert sum(losses[4:]) / 4 < 0.75 * sum(losses[:4]) / 4, losses
