"""How `t5gemma launch tpu run` gets the code onto the workers and installs it.

Three sources, one per run: this checkout's files (a tarball of `git ls-files`, uncommitted
edits included), a built wheel (`pip wheel --no-deps .`, the way from an installed package,
which has no checkout to ship), or a git ref the workers clone. Each becomes shell steps of the
workers' prepare script; the install step pins jax[tpu] to the version this package pins.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shlex
import subprocess
import tarfile
from typing import NamedTuple, Optional

# The checkout this package runs from, when it does (a wheel install has none to ship).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Source(NamedTuple):
  """Where the workers' code comes from: one of `wheel`, `git_ref` (+ `repo_url`), or neither
  (the checkout's tarball)."""
  wheel: Optional[str] = None
  git_ref: Optional[str] = None
  repo_url: Optional[str] = None

  def check(self) -> None:
    """Raises ValueError naming the flag at fault when the source cannot be shipped."""
    if bool(self.git_ref) != bool(self.repo_url):
      raise ValueError("--git_ref and --repo_url go together (or neither: ship this checkout)")
    if self.wheel and self.git_ref:
      raise ValueError("--wheel or --git_ref: one way to ship the code")
    if self.wheel and not (self.wheel.endswith(".whl") and os.path.isfile(self.wheel)):
      raise ValueError(f"--wheel {self.wheel!r}: not a .whl file (build one: "
                       "pip wheel --no-deps .)")
    if not (self.wheel or self.git_ref or is_checkout()):
      raise ValueError("t5gemma_jax is installed here, not run from a git checkout, so there "
                       "are no files to ship: pass --wheel=PATH.whl, or --git_ref with "
                       "--repo_url")


def pinned_jax(default: str = "0.10.2") -> str:
  """The jax version t5gemma-jax pins (its installed metadata), so workers get the tested
  stack."""
  try:
    requires = importlib.metadata.requires("t5gemma-jax") or []
  except importlib.metadata.PackageNotFoundError:
    return default
  found = [m.group(1) for r in requires if (m := re.fullmatch(r"jax\s*==\s*([^\s;]+)", r))]
  return found[0] if found else default


def is_checkout(root: str = REPO_ROOT) -> bool:
  """True when the package runs from a git checkout (whose files can be shipped)."""
  return (os.path.exists(os.path.join(root, "setup.py"))
          and os.path.exists(os.path.join(root, ".git")))


def wheel_upload(code_dir: str, wheel: str) -> str:
  """Where a wheel lands on the workers: beside the code folder, under its own file name (pip
  reads the version and tags from the name)."""
  return os.path.join(os.path.dirname(code_dir.rstrip("/")), os.path.basename(wheel))


def fetch_steps(source: Source, code: str, upload: str) -> list[str]:
  """Shell steps that leave the code in `code` on a worker.

  Args:
    source: what to ship.
    code: the code folder on the worker, shell-ready.
    upload: the uploaded tarball or wheel on the worker, shell-ready (unused for git).
  """
  if source.git_ref:
    ref, url = shlex.quote(source.git_ref), shlex.quote(source.repo_url)
    return [f"if [ ! -d {code}/.git ]; then rm -rf {code}; git clone -q {url} {code}; fi",
            f"git -C {code} fetch -q --tags origin",
            # FETCH_HEAD covers branches, tags and full hashes; short hashes need the checkout.
            f"git -C {code} fetch -q origin {ref} && git -C {code} checkout -q --force "
            f"FETCH_HEAD || git -C {code} checkout -q --force {ref}"]
  if source.wheel:
    return [f"rm -rf {code}", f"mkdir -p {code}", f"mv {upload} {code}/"]
  return [f"rm -rf {code}", f"mkdir -p {code}", f"tar -xzf {upload} -C {code}",
          f"rm -f {upload}"]


def install_step(source: Source, venv: str, jax_version: str) -> str:
  """The pip command run inside the code folder: the package and jax[tpu]==jax_version."""
  jax = shlex.quote(f"jax[tpu]=={jax_version}")
  if source.wheel:
    wheel = shlex.quote(f"./{os.path.basename(source.wheel)}")
    # The same version number on every build: reinstall the package itself, then its deps.
    return (f"{venv}/bin/pip install -q --force-reinstall --no-deps {wheel} && "
            f"{venv}/bin/pip install -q {wheel} {jax}")
  return f"{venv}/bin/pip install -q -e . {jax}"


def pack(output: str, root: str = REPO_ROOT) -> list[str]:
  """Writes a .tar.gz of the files git knows in `root` (tracked or new, not ignored).

  Returns:
    The archived paths. Working-tree contents go in, so uncommitted edits travel too.
  """
  listed = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others",
                           "--exclude-standard"], check=True, capture_output=True).stdout
  names = sorted({n for n in listed.decode().split("\0")
                  if n and os.path.lexists(os.path.join(root, n))})  # skips deleted files
  with tarfile.open(output, "w:gz") as tar:
    for n in names:
      tar.add(os.path.join(root, n), arcname=n, recursive=False)
  return names
