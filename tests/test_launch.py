"""t5gemma launch tpu and t5gemma launch slurm: the commands they would run, checked without a network.

Quoting is checked twice: by parsing the printed commands back with shlex, and by running the
remote scripts with a real bash against stand-in programs that record the argv they receive.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


from t5gemma_jax.launch import shipping, slurm, tpu  # noqa: E402

# Values that break naive quoting: quotes of both kinds, spaces, shell metacharacters, $ and `.
TRICKY = [
    "--gin_file=runs/pretrain.gin",
    "--gin_file=models/b-b.gin",
    '--gin.MIXTURE_OR_TASK_NAME="wmt14_ende"',
    '--gin.TASK_FEATURE_LENGTHS={"inputs": 512, "targets": 512}',
    "--gin.MeshConfig.ici=(2, 2, 2)",
    '--gin.DecodeConfig.prompt="a string  with spaces; & | * ? ! #"',
    "--gin.InferConfig.output='it''s $HOME `whoami` $(id) \\ done'",
]
BASE = ["--zone=us-east5-a"]


def _script(cmd):
  """The --command=... of a gcloud ssh command line."""
  [arg] = [a for a in cmd if a.startswith("--command=")]
  return arg[len("--command="):]


def _train_argv(script):
  """What follows the t5gemma executable in a launch script, up to the log redirection."""
  words = shlex.split(script)
  start = next(i for i, w in enumerate(words) if w.endswith("/bin/t5gemma")) + 1
  return words[start:words.index(">>", start)]


def _run_cmds(*extra, slices=1, train=TRICKY, check=False):
  own = () if check else ("--skip_compile_check",)
  return tpu.plan(["run", "my-tpu", *BASE, f"--num_slices={slices}",
                   "--model_dir=gs://bkt/runs/bb", *own, *extra, "--", *train])


@pytest.mark.parametrize("given,canonical,hosts,version", [
    ("v4-8", "v4-8", 1, "tpu-ubuntu2204-base"),
    ("v4-32", "v4-32", 4, "tpu-ubuntu2204-base"),
    ("v5e-16", "v5litepod-16", 4, "v2-alpha-tpuv5-lite"),
    ("v5litepod-8", "v5litepod-8", 1, "v2-alpha-tpuv5-lite"),
    ("v5p-64", "v5p-64", 8, "v2-alpha-tpuv5"),
    ("v6e-256", "v6e-256", 64, "v2-alpha-tpuv6e"),
])
def test_accelerator_types_per_generation(given, canonical, hosts, version):
  acc = tpu.accelerator(given)
  assert (acc["type"], acc["hosts"], acc["version"]) == (canonical, hosts, version)
  [cmd] = tpu.plan(["create", "t", *BASE, f"--accelerator_type={given}"])
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "t"]
  assert f"--accelerator-type={canonical}" in cmd and f"--version={version}" in cmd
  [cmd] = tpu.plan(["create", "t", *BASE, f"--accelerator_type={given}", "--version=mine"])
  assert "--version=mine" in cmd


@pytest.mark.parametrize("bad", ["v5e-12", "v4-12", "v7-8", "v5p", "tpu"])
def test_unknown_accelerator_types_are_refused(bad):
  with pytest.raises(ValueError):
    tpu.accelerator(bad)


def test_create_tiers():
  for flag in ("--spot", "--preemptible", "--reserved"):
    [cmd] = tpu.plan(["create", "t", *BASE, "--accelerator_type=v4-8", flag, "--project=p"])
    assert flag in cmd and "--project=p" in cmd
  with pytest.raises(SystemExit):  # one tier at a time
    tpu.parse(["create", "t", *BASE, "--accelerator_type=v4-8", "--spot", "--preemptible"])
  [cmd] = tpu.plan(["create", "t", *BASE, "--accelerator_type=v6e-8", "--queued", "--spot"])
  assert cmd[3:6] == ["queued-resources", "create", "t"] and "--node-id=t" in cmd
  assert "--runtime-version=v2-alpha-tpuv6e" in cmd and "--spot" in cmd


def test_multislice_create_is_one_queued_resource():
  [cmd] = tpu.plan(["create", "big", *BASE, "--accelerator_type=v5p-64", "--num_slices=2",
                    "--spot"])
  assert cmd[3:6] == ["queued-resources", "create", "big"]
  assert {"--node-count=2", "--node-prefix=big", "--accelerator-type=v5p-64",
          "--runtime-version=v2-alpha-tpuv5", "--spot"} <= set(cmd)
  assert not any(a.startswith("--node-id") for a in cmd)
  with pytest.raises(ValueError, match="preemptible"):
    tpu.plan(["create", "big", *BASE, "--accelerator_type=v5p-64", "--num_slices=2",
              "--preemptible"])


def test_run_ships_installs_and_starts_the_same_command_on_every_worker():
  cmds = _run_cmds()
  tarball = tpu.local_tarball(tpu.parse(["status", "my-tpu", *BASE])[0])
  assert cmds[0][1:] == ["-m", "t5gemma_jax.launch.tpu", "pack", f"--output={tarball}"]
  stop, scp, prepare, launch = cmds[1:]
  assert scp[3:7] == ["tpu-vm", "scp", tarball, "my-tpu:t5gemma.tar.gz"]
  for cmd in (stop, scp, prepare, launch):
    assert "--worker=all" in cmd and "--zone=us-east5-a" in cmd
  assert stop[3:6] == prepare[3:6] == launch[3:6] == ["tpu-vm", "ssh", "my-tpu"]
  setup = _script(prepare)
  with open(os.path.join(REPO, "setup.py")) as f:
    pin = re.search(r'"jax==([^"]+)"', f.read()).group(1)
  assert f"pip install -q -e . 'jax[tpu]=={pin}'" in setup
  assert "python3.11 -m venv" in setup
  script = _script(launch)
  assert _train_argv(script) == ["train", '--gin.MODEL_DIR="gs://bkt/runs/bb"', *TRICKY]
  words = shlex.split(script)
  at = words.index("nohup")
  assert words[at - 1:at + 4] == ["setsid", "nohup", "env", "-u", "JAX_PLATFORMS"]
  assert words[-7:] == ["<", "/dev/null", "&", "echo", "$!", ">", "$HOME/t5gemma.pid"]
  assert not any("MeshConfig.dcn" in w for w in words)
  assert "pip" not in _script(_run_cmds("--skip_setup")[3])


def test_multislice_run_covers_every_slice_with_a_dcn_mesh():
  cmds = _run_cmds("--env=TFDS_DATA_DIR=gs://bkt/tfds", slices=2)
  assert [(c[4], c[5] if c[4] == "ssh" else c[6]) for c in cmds[1:]] == [
      ("ssh", "my-tpu-0"), ("ssh", "my-tpu-1"),
      ("scp", "my-tpu-0:t5gemma.tar.gz"), ("scp", "my-tpu-1:t5gemma.tar.gz"),
      ("ssh", "my-tpu-0"), ("ssh", "my-tpu-1"), ("ssh", "my-tpu-0"), ("ssh", "my-tpu-1")]
  assert all("--worker=all" in c for c in cmds[1:])
  for first, second in (cmds[1:3], cmds[5:7], cmds[7:9]):  # stop, prepare, launch
    assert _script(first) == _script(second)
  launch = _script(cmds[-1])
  assert _train_argv(launch) == ["train", '--gin.MODEL_DIR="gs://bkt/runs/bb"',
                                 "--gin.MeshConfig.dcn=(2, 1, 1)", *TRICKY]
  assert "TFDS_DATA_DIR=gs://bkt/tfds" in shlex.split(launch)


def test_run_from_a_git_ref():
  cmds = _run_cmds("--git_ref=v1.2", "--repo_url=https://example.com/t5gemma.git")
  assert len(cmds) == 3 and all(c[4] == "ssh" for c in cmds)
  setup = _script(cmds[1])
  assert "git clone -q https://example.com/t5gemma.git" in setup
  assert "fetch -q origin v1.2" in setup and "checkout -q --force v1.2" in setup
  with pytest.raises(ValueError, match="together"):
    _run_cmds("--git_ref=v1.2")


@pytest.mark.parametrize("extra,train,match", [
    ((), ["--gin.MODEL_DIR=\"gs://x\""], "--model_dir"),
    ((), [], "after --"),
    (("--remote_dir=..",), TRICKY, "remote_dir"),
    (("--remote_dir=/",), TRICKY, "remote_dir"),
    (("--env=1X=2",), TRICKY, "NAME=VALUE"),
    ((), [*TRICKY, "--dry_run"], "before --"),
])
def test_run_refuses_bad_options(extra, train, match):
  with pytest.raises(ValueError, match=match):
    _run_cmds(*extra, train=train)


def test_run_compiles_for_the_slice_first_and_stops_when_it_does_not_fit(monkeypatch):
  cmds = _run_cmds("--accelerator_type=v5p-64", slices=2, check=True)
  check = cmds[0]
  assert check[:5] == [sys.executable, "-m", "t5gemma_jax.cli", "compile",
                       "--topology=v5p-64"]
  # The same bindings the workers get (MODEL_DIR, the Multislice mesh, the user's).
  assert check[5:] == ["--num_slices=2", "--no_decode", '--gin.MODEL_DIR="gs://bkt/runs/bb"',
                       "--gin.MeshConfig.dcn=(2, 1, 1)", *TRICKY]
  assert cmds[1:] == _run_cmds(slices=2)
  with pytest.raises(ValueError, match="--accelerator_type"):
    _run_cmds(check=True)
  with pytest.raises(ValueError, match="v5p-12"):
    _run_cmds("--accelerator_type=v5p-12", check=True)
  ran = []

  def fake_call(cmd):  # the compile check says "does not fit" (exit 3)
    ran.append(cmd)
    return 3
  monkeypatch.setattr(tpu.subprocess, "call", fake_call)
  argv = ["run", "my-tpu", *BASE, "--model_dir=gs://b/r", "--accelerator_type=v5p-8", "--",
          *TRICKY]
  assert tpu.main(argv) == 3 and len(ran) == 1 and "compile" in ran[0]


def test_run_needs_a_gs_model_dir():
  with pytest.raises(ValueError, match="gs://"):
    tpu.plan(["run", "t", *BASE, "--model_dir=/tmp/run", "--skip_compile_check", "--",
              *TRICKY])


def test_status_logs_delete():
  one, queued = ["x", *BASE], ["x", *BASE, "--num_slices=2"]
  assert tpu.plan(["status", *one]) == [["gcloud", "compute", "tpus", "tpu-vm", "describe", "x",
                                         "--zone=us-east5-a"]]
  assert tpu.plan(["status", *queued])[0][3:6] == ["queued-resources", "describe", "x"]
  assert tpu.plan(["delete", *one])[0][3:6] == ["tpu-vm", "delete", "x"]
  [cmd] = tpu.plan(["delete", *queued, "--yes"])
  assert cmd[3:6] == ["queued-resources", "delete", "x"] and cmd[-2:] == ["--force", "--quiet"]
  logs = tpu.plan(["logs", *queued])
  assert [c[5] for c in logs] == ["x-0", "x-1"] and all("--worker=all" in c for c in logs)
  assert shlex.split(_script(logs[0])) == ["tail", "-n", "100", "$HOME/t5gemma.log"]
  [follow] = tpu.plan(["logs", *queued, "--follow", "--slice=1", "--worker=0"])
  assert follow[5] == "x-1" and "--worker=0" in follow and "-F" in _script(follow)
  [whole] = tpu.plan(["logs", *one, "--lines=0"])
  assert _script(whole).startswith("cat ")


def test_dry_run_prints_runnable_lines_and_runs_nothing(capsys, monkeypatch):
  def forbidden(*a, **k):
    raise AssertionError("a dry run ran something")
  monkeypatch.setattr(tpu.subprocess, "call", forbidden)
  argv = ["run", "my-tpu", *BASE, "--num_slices=2", "--model_dir=gs://b/r", "--dry_run",
          "--accelerator_type=v5p-64", "--", *TRICKY]
  assert tpu.main(argv) == 0
  lines = capsys.readouterr().out.splitlines()
  assert [shlex.split(line) for line in lines] == tpu.plan(argv)
  assert shlex.split(lines[0])[1:5] == ["-m", "t5gemma_jax.cli", "compile", "--topology=v5p-64"]
  assert tpu.main(["run", "t", *BASE, "--model_dir=/x", "--dry_run", "--skip_compile_check",
                   "--", *TRICKY]) == 2


def test_the_launchers_run_from_the_cli_and_as_modules():
  for argv in (["-m", "t5gemma_jax.cli", "launch", "tpu"], ["-m", "t5gemma_jax.launch.tpu"]):
    out = subprocess.run([sys.executable, *argv, "delete", "x", *BASE, "--dry_run"],
                         capture_output=True, text=True, check=True).stdout
    assert out == "gcloud compute tpus tpu-vm delete x --zone=us-east5-a\n"
  listing = subprocess.run([sys.executable, "-m", "t5gemma_jax.cli", "launch", "--help"],
                           capture_output=True, text=True, check=True).stdout
  assert all(name in listing for name in ("local", "tpu", "slurm", "sweep", "report"))
  bad = subprocess.run([sys.executable, "-m", "t5gemma_jax.cli", "launch", "nope"],
                       capture_output=True, text=True)
  assert bad.returncode == 2 and "unknown launcher 'nope'" in bad.stderr


def test_run_ships_a_wheel(tmp_path):
  """From an installed package there is no checkout to pack: the wheel goes instead."""
  wheel = tmp_path / "t5gemma_jax-0.1.0-py3-none-any.whl"
  wheel.write_bytes(b"PK")
  cmds = _run_cmds(f"--wheel={wheel}")
  stop, scp, prepare, launch = cmds
  assert scp[3:7] == ["tpu-vm", "scp", str(wheel), "my-tpu:" + wheel.name]
  setup = _script(prepare)
  assert f"pip install -q --force-reinstall --no-deps ./{wheel.name}" in setup
  assert "pip install -q -e ." not in setup and "tar -x" not in setup
  assert _train_argv(_script(launch))[0] == "train"
  # Under a real shell: the uploaded wheel ends up alone in the code folder.
  home = tmp_path / "home"
  (home / "t5gemma").mkdir(parents=True)
  (home / "t5gemma" / "old.py").write_text("")
  (home / wheel.name).write_bytes(b"PK")
  no_setup = _script(_run_cmds(f"--wheel={wheel}", "--skip_setup")[2])
  subprocess.run(["bash", "-c", no_setup], env=dict(os.environ, HOME=str(home)), check=True,
                 timeout=30)
  assert os.listdir(home / "t5gemma") == [wheel.name] and not (home / wheel.name).exists()
  with pytest.raises(ValueError, match="not a .whl file"):
    _run_cmds(f"--wheel={tmp_path / 'missing.whl'}")
  with pytest.raises(ValueError, match="one way"):
    _run_cmds(f"--wheel={wheel}", "--git_ref=main", "--repo_url=https://x/y.git")


def test_an_installed_package_without_a_checkout_must_name_what_to_ship(monkeypatch):
  monkeypatch.setattr(shipping, "is_checkout", lambda root="/nonexistent": False)
  with pytest.raises(ValueError, match="--wheel=PATH.whl"):
    _run_cmds()


def _fake_program(path, record):
  """A stand-in executable that writes its argv and part of its environment as JSON."""
  with open(path, "w") as f:
    f.write(f"#!{sys.executable}\nimport json, os, sys\n"
            f"json.dump({{'argv': sys.argv[1:], 'env': {{k: os.environ.get(k) for k in "
            f"('JAX_PLATFORMS', 'JAX_LOCAL_DEVICE_IDS', 'NOTE')}}}}, open({record!r}, 'w'))\n")
  os.chmod(path, 0o755)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="the scripts read /proc")
def test_remote_scripts_under_a_real_shell(tmp_path):
  home = tmp_path / "home"
  (home / "t5gemma-venv" / "bin").mkdir(parents=True)
  record = str(tmp_path / "argv.json")
  _fake_program(str(home / "t5gemma-venv" / "bin" / "t5gemma"), record)
  with tarfile.open(home / "t5gemma.tar.gz", "w:gz") as tar:
    tar.add(__file__, arcname="tests/test_launch.py")
  cmds = _run_cmds("--skip_setup", "--env=NOTE=two  words")
  stop, prepare, launch = (_script(cmds[i]) for i in (1, 3, 4))
  env = dict(os.environ, HOME=str(home), JAX_PLATFORMS="cpu")
  # A previous run (its cmdline names the venv's t5gemma) is stopped; an unrelated pid is not.
  old = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                          str(home / "t5gemma-venv" / "bin" / "t5gemma")])
  other = subprocess.Popen(["sleep", "60"])
  try:
    (home / "t5gemma.pid").write_text(str(other.pid))
    subprocess.run(["bash", "-c", stop], env=env, check=True, timeout=30)
    (home / "t5gemma.pid").write_text(str(old.pid))
    subprocess.run(["bash", "-c", stop], env=env, check=True, timeout=30)
    assert old.wait(timeout=10) == -15 and other.poll() is None
  finally:
    for proc in (old, other):
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  subprocess.run(["bash", "-c", prepare], env=env, check=True, timeout=30)
  assert (home / "t5gemma" / "tests" / "test_launch.py").exists()
  assert not (home / "t5gemma.tar.gz").exists()
  subprocess.run(["bash", "-c", launch], env=env, check=True, timeout=30)
  deadline = time.time() + 20
  while not os.path.exists(record) and time.time() < deadline:
    time.sleep(0.05)
  with open(record) as f:
    seen = json.load(f)
  assert seen["argv"] == ["train", '--gin.MODEL_DIR="gs://bkt/runs/bb"', *TRICKY]
  assert seen["env"]["JAX_PLATFORMS"] is None and seen["env"]["NOTE"] == "two  words"
  assert (home / "t5gemma.log").read_text().startswith("== launch ")
  assert (home / "t5gemma.pid").read_text().strip().isdigit()


def test_pack_takes_git_files_only(tmp_path):
  names = shipping.pack(str(tmp_path / "src.tar.gz"))
  assert "t5gemma_jax/launch/tpu.py" in names and "setup.py" in names
  assert not any(n.startswith((".venv/", ".git/")) or "__pycache__" in n for n in names)
  with tarfile.open(tmp_path / "src.tar.gz") as tar:
    assert sorted(tar.getnames()) == names


def _slurm(*extra, train=TRICKY):
  return slurm.build(["--nodes=2", "--model_dir=/shared/runs/bb", *extra, "--", *train])


def _srun(script):
  [line] = [ln for ln in script.splitlines() if ln.startswith("srun ")]
  return shlex.split(line)


def test_slurm_one_process_per_gpu():
  _, text = _slurm("--gpus_per_node=8", "--partition=a100", "--time=24:00:00", "--account=ml",
                   "--venv=/opt/venv", "--setup=module load cuda/12", "--sbatch=qos=high")
  lines = text.splitlines()
  for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-task=1",
               "#SBATCH --partition=a100", "#SBATCH --time=24:00:00", "#SBATCH --account=ml",
               "#SBATCH --qos=high", "source /opt/venv/bin/activate", "module load cuda/12",
               "export JAX_LOCAL_DEVICE_IDS=0", "unset JAX_PLATFORMS"):
    assert line in lines
  assert lines[0] == "#!/bin/bash" and not any("gpus-per-node" in ln for ln in lines)
  assert _srun(text) == ["srun", "--kill-on-bad-exit=1", "t5gemma", "train",
                         '--gin.MODEL_DIR="/shared/runs/bb"', *TRICKY]


def test_slurm_one_process_per_node():
  _, text = _slurm("--gpus_per_node=4", "--per=node", "--container_image=nvcr.io/x:1",
                   "--workdir=/src")
  lines = text.splitlines()
  for line in ("#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
               "export JAX_LOCAL_DEVICE_IDS=0,1,2,3", "cd /src"):
    assert line in lines
  assert not any("gpus-per-task" in ln for ln in lines)
  assert _srun(text)[:4] == ["srun", "--kill-on-bad-exit=1", "--container-image=nvcr.io/x:1",
                             "--container-workdir=/src"]


def test_slurm_script_under_a_real_shell(tmp_path):
  (tmp_path / "bin").mkdir()
  record = str(tmp_path / "srun.json")
  _fake_program(str(tmp_path / "bin" / "srun"), record)
  _, text = _slurm(f"--workdir={tmp_path}", "--env=NOTE=it's  here")
  (tmp_path / "job.sbatch").write_text(text)
  env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", JAX_PLATFORMS="cpu")
  subprocess.run(["bash", str(tmp_path / "job.sbatch")], env=env, check=True, timeout=30)
  with open(record) as f:
    seen = json.load(f)
  assert seen["argv"] == ["--kill-on-bad-exit=1", "t5gemma", "train",
                          '--gin.MODEL_DIR="/shared/runs/bb"', *TRICKY]
  assert seen["env"] == {"JAX_PLATFORMS": None, "JAX_LOCAL_DEVICE_IDS": "0",
                         "NOTE": "it's  here"}


def test_slurm_submits_unless_dry_run(capsys, monkeypatch, tmp_path):
  calls = []
  def fake_run(cmd, **kw):
    calls.append((cmd, kw))
    return subprocess.CompletedProcess(cmd, 0)
  monkeypatch.setattr(slurm.subprocess, "run", fake_run)
  argv = ["--nodes=1", "--model_dir=/m", "--", "--gin_file=runs/pretrain.gin"]
  assert slurm.main([*argv[:2], "--dry_run", *argv[2:]]) == 0
  printed = capsys.readouterr().out
  assert not calls and printed == slurm.build(argv)[1]
  assert slurm.main(argv) == 0
  assert calls[0][0] == ["sbatch"] and calls[0][1]["input"] == printed
  path = tmp_path / "job.sbatch"
  assert slurm.main([*argv[:2], f"--write={path}", "--dry_run", *argv[2:]]) == 0
  assert path.read_text() == printed


@pytest.mark.parametrize("extra,train,match", [
    (("--time=1 day",), TRICKY, "whitespace"),
    ((), ['--gin.MODEL_DIR="/x"'], "--model_dir"),
    ((), [], "after --"),
    (("--env=NO",), TRICKY, "NAME=VALUE"),
    ((), [*TRICKY, "--dry_run"], "before --"),
])
def test_slurm_refuses_bad_options(extra, train, match):
  with pytest.raises(ValueError, match=match):
    _slurm(*extra, train=train)
