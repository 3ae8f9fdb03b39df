"""A deliberately naive Gemma 3 forward pass in numpy: no cache, dense masks, float64.

It shares nothing with model/ but the parameter tree, so agreement is evidence, not tautology.
"""

import numpy as np


def _rms(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1.0 + scale)


def _rope(x, pos, base):
  h = x.shape[-1]
  freq = base ** (-np.arange(0, h, 2) / h)
  ang = pos[:, None] * freq[None, :]  # [T, H/2]
  sin, cos = np.sin(ang)[:, None, :], np.cos(ang)[:, None, :]
  x1, x2 = x[..., : h // 2], x[..., h // 2:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def forward(config, params, tokens):
  """Logits [T, V] for a 1-D token sequence."""
  p = {k: v for k, v in params.items()}
  f = lambda a: np.asarray(a, np.float64)
  emb = f(p["embedder"]["embedding"])
  t = len(tokens)
  x = emb[np.asarray(tokens)] * np.sqrt(config.d_model)
  pos = np.arange(t, dtype=np.float64)
  for i, is_global in enumerate(config.is_global):
    lp = p[f"layer_{i}"]
    a = lp["attn"]
    h = _rms(x, f(lp["pre_attn_norm"]["scale"]), config.rms_eps)
    q = np.einsum("td,nhd->tnh", h, f(a["q"]))
    k = np.einsum("td,khd->tkh", h, f(a["k"]))
    v = np.einsum("td,khd->tkh", h, f(a["v"]))
    q = _rms(q, f(a["q_norm"]["scale"]), config.rms_eps)
    k = _rms(k, f(a["k_norm"]["scale"]), config.rms_eps)
    base = config.rope_base_global if is_global else config.rope_base_local
    q = _rope(q, pos, base) * config.query_pre_attn_scalar ** -0.5
    k = _rope(k, pos, base)
    g = config.num_heads // config.num_kv_heads
    k = np.repeat(k, g, axis=1)
    v = np.repeat(v, g, axis=1)
    s = np.einsum("tnh,snh->nts", q, k)
    qi, ki = np.arange(t)[:, None], np.arange(t)[None, :]
    mask = ki <= qi
    if not is_global:
      mask &= qi - ki < config.sliding_window
    s = np.where(mask[None], s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum("nts,snh->tnh", w, v)
    o = np.einsum("tnh,dnh->td", o, f(a["o"]))
    x = x + _rms(o, f(lp["post_attn_norm"]["scale"]), config.rms_eps)
    m = lp["mlp"]
    h = _rms(x, f(lp["pre_ffw_norm"]["scale"]), config.rms_eps)
    h = _gelu_tanh(h @ f(m["gate"]).T) * (h @ f(m["up"]).T)
    x = x + _rms(h @ f(m["down"]).T, f(lp["post_ffw_norm"]["scale"]), config.rms_eps)
  x = _rms(x, f(p["final_norm"]["scale"]), config.rms_eps)
  return x @ emb.T
