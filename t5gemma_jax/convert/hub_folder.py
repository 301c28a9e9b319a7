"""Which folder of a checkpoint to read: a plain one, or a huggingface_hub cache entry.

`huggingface_hub.snapshot_download` (and `from_pretrained`) keep a model as

    models--org--name/
      refs/main                      the commit the "main" branch pointed at when downloaded
      snapshots/<commit>/config.json, model.safetensors, ...   symlinks into ../../blobs
      blobs/<sha256 or git sha>      the files' bytes

`resolve` accepts that repository folder (the snapshot `refs/main` names; else the only
snapshot), a `snapshots/<commit>` folder, or any plain folder holding config.json, and says
which hub repository and revision it is when the layout tells. Reading then goes through
the snapshot's symlinks as through plain files. Errors name the folder at fault.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

from t5gemma_jax.convert.hf_config import CONFIG_NAME

REPO_PREFIX = "models--"  # huggingface_hub's folder name for a model repository
SNAPSHOTS = "snapshots"
REFS = "refs"
MAIN = "main"


@dataclasses.dataclass(frozen=True)
class CheckpointFolder:
  """A folder that holds config.json (and the safetensors files).

  Attributes:
    path: that folder (a hub snapshot folder, or the folder given).
    given: the path the caller gave.
    repo_id: "org/name" when the folder is in a huggingface_hub cache, else None.
    revision: the snapshot's commit hash in a hub cache, else None.
  """

  path: str
  given: str
  repo_id: Optional[str] = None
  revision: Optional[str] = None

  def record(self) -> dict:
    """JSON-ready description (what a run directory's `source.json` keeps)."""
    return dataclasses.asdict(self)


def repo_id_of(repo_dir: str) -> Optional[str]:
  """"org/name" for a folder named `models--org--name` (`models--name`: "name"), else None."""
  name = os.path.basename(os.path.normpath(repo_dir))
  if not name.startswith(REPO_PREFIX) or len(name) == len(REPO_PREFIX):
    return None
  return name[len(REPO_PREFIX):].replace("--", "/")


def resolve(path: str, what: str = "checkpoint folder") -> CheckpointFolder:
  """The folder to read for `path` (see the module docstring).

  Args:
    path: a folder with config.json, a hub cache repository folder (`models--org--name`) or
      one of its `snapshots/<commit>` folders.
    what: how error messages call the folder (e.g. "decoder-only checkpoint folder").

  Returns:
    The folder holding config.json, with its hub repository and revision when known.

  Raises:
    FileNotFoundError: `path` is missing, holds no config.json, names a snapshot that is not
      there, or a hub file's symlink points at a blob that is missing (an interrupted
      download).
    ValueError: a hub repository folder with several snapshots and no refs/main.
  """
  given = path
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{what} not found: {path}")
  repo_id = revision = None
  if not os.path.exists(os.path.join(path, CONFIG_NAME)) and os.path.isdir(
      os.path.join(path, SNAPSHOTS)):
    repo_id, revision = repo_id_of(path), _snapshot_of(path)
    path = os.path.join(path, SNAPSHOTS, revision)
  elif os.path.basename(os.path.dirname(os.path.normpath(path))) == SNAPSHOTS:
    repo_dir = os.path.dirname(os.path.dirname(os.path.normpath(path)))
    if repo_id_of(repo_dir) is not None:
      repo_id, revision = repo_id_of(repo_dir), os.path.basename(os.path.normpath(path))
  _check_links(path)
  if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
    raise FileNotFoundError(f"no {CONFIG_NAME} in {path}{_hint(path)}")
  return CheckpointFolder(path=path, given=given, repo_id=repo_id, revision=revision)


def _snapshot_of(repo_dir: str) -> str:
  """The commit of the snapshot to read in a hub repository folder."""
  snapshots_dir = os.path.join(repo_dir, SNAPSHOTS)
  snapshots = sorted(n for n in os.listdir(snapshots_dir)
                     if os.path.isdir(os.path.join(snapshots_dir, n)))
  ref = os.path.join(repo_dir, REFS, MAIN)
  if os.path.isfile(ref):
    with open(ref) as f:
      commit = f.read().strip()
    if commit not in snapshots:
      raise FileNotFoundError(f"{ref} names snapshot {commit!r}, which is not in "
                              f"{snapshots_dir} (have {snapshots or 'none'}): download it "
                              "again, or pass one of the snapshot folders")
    return commit
  if len(snapshots) == 1:
    return snapshots[0]
  if not snapshots:
    raise FileNotFoundError(f"no snapshot in {snapshots_dir}: the download never completed")
  raise ValueError(f"{repo_dir} holds {len(snapshots)} snapshots ({', '.join(snapshots)}) and "
                   f"no {REFS}/{MAIN} saying which is current: pass "
                   f"{os.path.join(snapshots_dir, '<commit>')} for the one to read")


def _check_links(folder: str) -> None:
  """Names the files of `folder` whose symlinks point nowhere (a blob not downloaded)."""
  broken = sorted(n for n in os.listdir(folder)
                  if os.path.islink(os.path.join(folder, n))
                  and not os.path.exists(os.path.join(folder, n)))
  if broken:
    raise FileNotFoundError(
        f"{folder}: {', '.join(broken)} {'is a symlink' if len(broken) == 1 else 'are symlinks'}"
        f" to missing files ({os.readlink(os.path.join(folder, broken[0]))}, ...): an "
        "interrupted or pruned download; download the model again")


def _hint(folder: str) -> str:
  """What `folder` looks like when it is a hub cache's root rather than a checkpoint."""
  repos = sorted(n for n in os.listdir(folder) if repo_id_of(n) is not None
                 and os.path.isdir(os.path.join(folder, n)))
  if repos:
    shown = ", ".join(repos[:5]) + (", ..." if len(repos) > 5 else "")
    return f" (a Hugging Face cache folder: pass one of its model folders, e.g. {shown})"
  return ""
