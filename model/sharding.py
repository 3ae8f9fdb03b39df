"""Sharding: a (data, model) device mesh, one logical-to-mesh rules table, named presets.

Layers name the axes of every param (embed, vocab, heads, kv_heads, head_dim, mlp, norm; see
model/transformer.py) and the decode state names its own (below). A rules table maps those
logical names to the two mesh axes:

  data   splits the cache slots: each data shard decodes its own requests, no collectives
         inside the layers.
  model  splits the weights (Megatron style): query heads, the MLP width and the vocabulary.
         Each layer then ends in one all-reduce of [B, T, D] activations; no weight ever
         moves between devices.

Decode-state legend (cache layout from model/cache.py):
  k, v     [S, C, K, H] -> (slots, length, kv_heads, head_dim)
  lengths  [S]          -> (slots,)
  every other DecodeState leaf is per slot: [S, ...] -> (slots, None, ...)

A rule is a preference, resolved against each array's shape (`ShardingPlan.spec`): a
dimension is split over a mesh axis only when the axis size divides it, and each mesh axis
splits at most one dimension of an array. Otherwise that dimension is replicated.

Gemma 3 270M (4 query heads, 1 KV head, head_dim 256, vocab 262144) on more model devices
than KV heads -- the choice, and why:
  * kv_heads are replicated over `model`: the K/V projections (256 x 640 each) are computed
    on every model device, and the KV cache is replicated over `model` (still split over
    `data` by slot). With one KV head every query head reads all of it anyway, so a device
    holding 1 of the 4 query heads needs the whole cache: replicating costs cache memory
    x model devices (~40 MB per 4K-token slot in float32) and no communication.
  * head_dim is never split. RoPE pairs element i with i + H/2 (the halves would sit on
    different devices), QK-norm reduces over H, and the scores contract over H: splitting it
    would put collectives inside every attention block, the hot loop of a decode step.
  * heads are split when the model axis divides 4 (model = 2 or 4: 2 or 1 heads per device);
    with 8 model devices they are replicated and only the MLP and the vocabulary are split.
  * vocab is split over `model` for the tied embedding / LM head (168M of the 268M params).
    The lookup becomes a masked local gather plus an all-reduce of [B, T, D]; the LM head
    gives vocab-sharded logits, and sampling reduces over them (activation-sized traffic).
  * embed (D) is never split: splitting it is FSDP, which all-gathers every weight on every
    step -- the opposite of what a memory-bound decode step wants.

Multi-host: the mesh spans every process's devices (`jax.devices()` is global), so the same
rules shard across hosts. `ShardingPlan.put` builds global arrays from a host copy that
every process holds, each device taking only its own shard.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from model.cache import KVCache
from model.config import ModelConfig

MESH_AXES = ("data", "model")
CACHE_AXES = ("slots", "length", "kv_heads", "head_dim")

Rules = tuple[tuple[str, "str | None"], ...]

# Weights split Megatron style over `model`; slots split over `data`.
TENSOR_RULES: Rules = (("vocab", "model"), ("heads", "model"), ("kv_heads", "model"),
                       ("mlp", "model"))
DATA_RULES: Rules = (("slots", "data"),)


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
  """A mesh shape and the rules table that lays the model and decode state out on it.

  Attributes:
    data: devices along the `data` mesh axis; -1 takes every device `model` leaves.
    model: devices along the `model` mesh axis; -1 takes every device `data` leaves.
    rules: (logical axis, mesh axis or None) pairs; names not listed are replicated.
  """
  data: int = 1
  model: int = 1
  rules: Rules = ()

  def replace(self, **changes) -> "ShardingConfig":
    return dataclasses.replace(self, **changes)

  def mesh_shape(self, num_devices: int) -> tuple[int, int]:
    """(data, model) sizes on `num_devices` devices, resolving one -1."""
    data, model = self.data, self.model
    if data == -1 and model == -1:
      raise ValueError("at most one of data and model may be -1")
    if data == -1:
      data = num_devices // model
    if model == -1:
      model = num_devices // data
    if data < 1 or model < 1 or data * model > num_devices:
      raise ValueError(f"mesh data={self.data} x model={self.model} does not fit "
                       f"{num_devices} devices")
    return data, model


PRESETS: dict[str, ShardingConfig] = {
    "single_device": ShardingConfig(data=1, model=1, rules=()),
    "tensor_parallel": ShardingConfig(data=1, model=-1, rules=TENSOR_RULES),
    "data_parallel": ShardingConfig(data=-1, model=1, rules=DATA_RULES),
    # model=2 by default; e.g. get_sharding("tensor_data", model=4) for 4-way weights.
    "tensor_data": ShardingConfig(data=-1, model=2, rules=TENSOR_RULES + DATA_RULES),
}


def get_sharding(name: str, **overrides: Any) -> ShardingConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown sharding preset {name!r}; choose from {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)


def detect_devices() -> list:
  """The devices of the best platform present: TPU, else GPU, else CPU (global, all hosts)."""
  for platform in ("tpu", "gpu"):
    try:
      return jax.devices(platform)
    except RuntimeError:  # no such backend in this process
      continue
  return jax.devices("cpu")


def default_sharding(num_devices: int, num_slots: int) -> ShardingConfig:
  """The layout `default_plan` uses: slots first, the remaining devices on the weights.

  data = gcd(devices, slots), so every data shard gets whole slots and runs its layers with
  no collectives; what is left goes to `model`. E.g. a Colab TPU v2-8 (8 cores) serving 8
  slots is pure data parallel, serving 4 slots is 4 x 2 (tensor_data), serving 1 slot is
  8-way tensor parallel. One device is `single_device`.
  """
  if num_devices == 1:
    return PRESETS["single_device"]
  data = math.gcd(num_devices, num_slots)
  return ShardingConfig(data=data, model=num_devices // data, rules=TENSOR_RULES + DATA_RULES)


def make_mesh(config: ShardingConfig, devices=None) -> Mesh:
  """A (data, model) mesh. Axes are Auto: the compiler propagates shardings from the
  declared inputs and outputs, so the layers need no sharding annotations of their own."""
  devices = detect_devices() if devices is None else list(devices)
  shape = config.mesh_shape(len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 2,
                       devices=devices[:math.prod(shape)])


def default_mesh(num_slots: int = 1) -> Mesh:
  """The mesh of `default_sharding` over the detected devices (TPU, GPU or CPU)."""
  devices = detect_devices()
  return make_mesh(default_sharding(len(devices), num_slots), devices)


def default_plan(num_slots: int = 1) -> "ShardingPlan":
  """`default_mesh` with its rules: what to pass as `Engine(..., plan=...)` on any machine."""
  devices = detect_devices()
  config = default_sharding(len(devices), num_slots)
  return ShardingPlan(make_mesh(config, devices), config.rules)


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
  """A mesh and its rules: turns logical axis names into NamedShardings for given shapes."""
  mesh: Mesh
  rules: Rules

  @classmethod
  def create(cls, config: ShardingConfig, devices=None) -> "ShardingPlan":
    return cls(make_mesh(config, devices), config.rules)

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def spec(self, names, shape) -> P:
    """Mesh PartitionSpec for one array with logical `names` and `shape` (see module doc)."""
    rules, used, out = dict(self.rules), set(), []
    for name, size in zip(names, shape):
      axis = rules.get(name)
      n = self.mesh.shape[axis] if axis is not None else 1
      if n == 1 or axis in used or size % n:
        out.append(None)
      else:
        used.add(axis)
        out.append(axis)
    return P(*out)

  def shardings(self, logical, tree):
    """NamedShardings for `tree` (arrays or ShapeDtypeStructs); `logical` is a matching tree
    of PartitionSpecs holding logical axis names."""
    return jax.tree.map(lambda names, x: NamedSharding(self.mesh, self.spec(names, x.shape)),
                        logical, tree, is_leaf=lambda x: isinstance(x, P))

  def param_shardings(self, config: ModelConfig):
    """Shardings of the model's param tree (from abstract shapes: nothing is allocated)."""
    from model.transformer import init_params, logical_axes
    shapes = jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))
    return self.shardings(logical_axes(config), shapes)

  def state_shardings(self, state):
    """Shardings of a DecodeState (or any tree of per-slot arrays holding a KVCache)."""
    return self.shardings(state_axes(state), state)

  def put(self, tree, shardings):
    """Place a tree onto the mesh. Every process passes the same full values (e.g. params
    it loaded or initialised itself); each device receives only its shard."""
    def place(x, s):
      if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(s, x.ndim):
        return x
      if jax.process_count() == 1:
        return jax.device_put(x, s)
      host = np.asarray(x)
      return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])
    return jax.tree.map(place, tree, shardings)


def cache_axes(cache: KVCache) -> KVCache:
  """The KVCache with each array replaced by its logical PartitionSpec."""
  layers = tuple(layer.replace(k=P(*CACHE_AXES), v=P(*CACHE_AXES)) for layer in cache.layers)
  return cache.replace(layers=layers, lengths=P("slots"))


def state_axes(state):
  """Logical PartitionSpecs of a decode state: its KVCache by `cache_axes`, every other
  leaf per slot (leading axis `slots`, the rest unnamed)."""
  def axes(x):
    if isinstance(x, KVCache):
      return cache_axes(x)
    return P("slots", *[None] * (len(x.shape) - 1))
  return jax.tree.map(axes, state, is_leaf=lambda x: isinstance(x, KVCache))
