"""Checkpoint save/load: exact round trips, dtype casting on restore, and one error type for
every broken checkpoint (tiny random trees keep those fast)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import checkpoint as ckpt
from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.config import PRESETS
from model.gguf_import import expected_shapes
from model.tokenizer import train_tiny_tokenizer

_CORPUS = "\n".join(["the quick brown fox jumps over the lazy dog", "pack my box with five dozen",
                     "liquor jugs and café naïve 中文"] * 20)


@pytest.fixture(scope="module")
def tiny():
  config = PRESETS["tiny"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s).astype(np.float32),
                        expected_shapes(config), is_leaf=lambda x: isinstance(x, tuple))
  proto = train_tiny_tokenizer(_CORPUS, vocab_size=300).model_proto
  return config, params, proto


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory) -> Path:
  return save_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", *tiny)


@pytest.fixture
def broken(saved, tmp_path) -> Path:
  """A private copy of the saved checkpoint that a test may damage."""
  return Path(shutil.copytree(saved, tmp_path / "ckpt"))


def _data_files(root: Path) -> list[Path]:
  return sorted((p for p in (root / "params").rglob("*") if p.is_file() and p.parent.name == "d"),
                key=lambda p: p.stat().st_size)


def _assert_documented_error(excinfo, path: Path, *fragments):
  message = str(excinfo.value)
  assert str(path.resolve()) in message
  assert f"python -m model.checkpoint --convert --out {path.resolve()}" in message
  for fragment in fragments:
    assert fragment in message


def test_round_trip_is_bit_identical(tiny, saved):
  config, params, proto = tiny
  config2, params2, tok = load_checkpoint(saved)
  assert config2 == config and tok.model_proto == proto
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(b), a), params, params2)
  assert all(isinstance(x, jax.Array) and x.dtype == jnp.float32 for x in jax.tree.leaves(params2))


def test_restore_casts_to_bfloat16(tiny, saved):
  config, params, _ = tiny
  config2, params2, _ = load_checkpoint(saved, dtype="bfloat16")
  assert config2 == config.replace(param_dtype="bfloat16")
  assert {x.dtype for x in jax.tree.leaves(params2)} == {jnp.dtype(jnp.bfloat16)}
  np.testing.assert_array_equal(params2["layer_0"]["attn"]["q"],
                                params["layer_0"]["attn"]["q"].astype(jnp.bfloat16))


def test_restore_with_explicit_shardings(tiny, saved):
  device = jax.devices()[-1]
  shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), tiny[1])
  _, params2, _ = load_checkpoint(saved, shardings=shardings)
  assert all(x.devices() == {device} for x in jax.tree.leaves(params2))


def test_missing_directory(tmp_path):
  with pytest.raises(CheckpointError) as excinfo:
    load_checkpoint(tmp_path / "nope")
  _assert_documented_error(excinfo, tmp_path / "nope", "does not exist")


def test_truncated_data_file(broken):
  path = _data_files(broken)[-1]
  os.truncate(path, path.stat().st_size // 2)
  with pytest.raises(CheckpointError) as excinfo:
    load_checkpoint(broken)
  _assert_documented_error(excinfo, broken, "corrupted")


def test_overwritten_data_file(broken):
  # Same size, different bytes: orbax alone restores this silently with wrong values.
  path = _data_files(broken)[-1]
  with open(path, "r+b") as f:
    f.seek(path.stat().st_size // 2)
    f.write(b"\x00" * 16)
  with pytest.raises(CheckpointError) as excinfo:
    load_checkpoint(broken)
  _assert_documented_error(excinfo, broken, "corrupted")


def test_deleted_data_file(broken):
  _data_files(broken)[-1].unlink()
  with pytest.raises(CheckpointError) as excinfo:
    load_checkpoint(broken)
  _assert_documented_error(excinfo, broken, "missing params file")


def test_config_that_does_not_match_params(broken):
  (broken / "config.json").write_text(PRESETS["tiny"].replace(d_model=32).to_json())
  with pytest.raises(CheckpointError) as excinfo:
    load_checkpoint(broken)
  _assert_documented_error(excinfo, broken, "does not match the stored params", "embedding")


def test_unexpected_config(saved):
  with pytest.raises(CheckpointError) as excinfo:
    load_checkpoint(saved, expected_config=PRESETS["gemma3_270m"])
  vocab = PRESETS["tiny"].vocab_size
  _assert_documented_error(excinfo, saved, f"vocab_size={vocab} (expected 262144)")


@pytest.mark.parametrize("name, content", [("config.json", None), ("config.json", "{not json"),
                                           ("tokenizer.model", None), ("tokenizer.model", "junk")])
def test_missing_or_garbled_small_files(broken, name, content):
  if content is None:
    (broken / name).unlink()
  else:
    (broken / name).write_text(content)
  with pytest.raises(CheckpointError) as excinfo:
    load_checkpoint(broken)
  _assert_documented_error(excinfo, broken, name)
  assert excinfo.value.__cause__ is not None


def test_save_refuses_mismatched_tree(tiny, tmp_path):
  config, params, proto = tiny
  with pytest.raises(ValueError, match="params do not match config"):
    save_checkpoint(tmp_path / "x", config.replace(ffn_dim=64), params, proto)
  assert not (tmp_path / "x").exists()


def test_ensure_checkpoint_converts_once(tiny, tmp_path, monkeypatch):
  import model.gguf_import
  calls = []

  def fake_load_gguf(path=None, *, progress=True):
    calls.append(path)
    return tiny
  monkeypatch.setattr(model.gguf_import, "load_gguf", fake_load_gguf)
  monkeypatch.setenv("FLAXSTREAM_HOME", str(tmp_path))
  first = ckpt.ensure_checkpoint(progress=False)
  assert first == tmp_path / "checkpoints" / "gemma3_270m-v2" and len(calls) == 1
  assert ckpt.ensure_checkpoint(progress=False) == first and len(calls) == 1
  assert load_checkpoint(first)[0] == tiny[0]


@pytest.mark.slow
def test_real_model_round_trip(gemma_gguf, gemma_checkpoint_dir):
  config, params, proto = gemma_gguf
  config2, params2, tok = load_checkpoint(gemma_checkpoint_dir, expected_config=PRESETS["gemma3_270m"])
  assert config2 == config and tok.model_proto == proto
  identical = jax.tree.map(lambda a, b: np.array_equal(a, np.asarray(b)), params, params2)
  assert all(jax.tree.leaves(identical))


@pytest.mark.slow
def test_real_model_restores_as_bfloat16(gemma_gguf, gemma_checkpoint_dir):
  _, params, _ = gemma_gguf
  config, params_bf16, _ = load_checkpoint(gemma_checkpoint_dir, dtype="bfloat16")
  assert config.param_dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(params_bf16)} == {jnp.dtype(jnp.bfloat16)}
  np.testing.assert_array_equal(params_bf16["embedder"]["embedding"][:1000],
                                params["embedder"]["embedding"][:1000].astype(jnp.bfloat16))
