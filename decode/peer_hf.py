"""Peer baseline: Hugging Face transformers (PyTorch, CPU) on the same weights.

Used by `python -m decode.benchmark --peer` when torch and transformers are installed
(`pip install torch==2.13.0 transformers`). It builds a Gemma3ForCausalLM from our float32
param tree, checks that its greedy tokens match ours for the benchmark prompt, and times
greedy generation at batch 1 and batch 16.
"""

from __future__ import annotations

import time

import numpy as np


def _state_dict(params, config):
  import torch
  t = lambda x: torch.from_numpy(np.asarray(x, np.float32).copy())
  d, n, k, h = config.d_model, config.num_heads, config.num_kv_heads, config.head_dim
  sd = {"model.embed_tokens.weight": t(params["embedder"]["embedding"]),
        "model.norm.weight": t(params["final_norm"]["scale"])}
  for i in range(config.num_layers):
    p, pre = params[f"layer_{i}"], f"model.layers.{i}."
    a = p["attn"]
    # Ours are output-major like torch's Linear.weight; only the head axes are flattened.
    sd[pre + "self_attn.q_proj.weight"] = t(np.asarray(a["q"]).reshape(n * h, d))
    sd[pre + "self_attn.k_proj.weight"] = t(np.asarray(a["k"]).reshape(k * h, d))
    sd[pre + "self_attn.v_proj.weight"] = t(np.asarray(a["v"]).reshape(k * h, d))
    sd[pre + "self_attn.o_proj.weight"] = t(np.asarray(a["o"]).reshape(d, n * h))
    sd[pre + "self_attn.q_norm.weight"] = t(a["q_norm"]["scale"])
    sd[pre + "self_attn.k_norm.weight"] = t(a["k_norm"]["scale"])
    for ours, theirs in [("pre_attn_norm", "input_layernorm"), ("post_attn_norm", "post_attention_layernorm"),
                         ("pre_ffw_norm", "pre_feedforward_layernorm"), ("post_ffw_norm", "post_feedforward_layernorm")]:
      sd[pre + theirs + ".weight"] = t(p[ours]["scale"])
    for ours, theirs in [("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")]:
      sd[pre + f"mlp.{theirs}.weight"] = t(p["mlp"][ours])
  return sd


def build(params, config):
  import torch
  from transformers import Gemma3ForCausalLM, Gemma3TextConfig
  hf_config = Gemma3TextConfig(
      vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.ffn_dim,
      num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
      num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
      sliding_window=config.sliding_window, query_pre_attn_scalar=int(config.query_pre_attn_scalar),
      max_position_embeddings=config.max_context, rms_norm_eps=config.rms_eps,
      rope_theta=config.rope_base_global, rope_local_base_freq=config.rope_base_local,
      layer_types=["full_attention" if g else "sliding_attention" for g in config.is_global],
      hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
      final_logit_softcapping=None, attn_logit_softcapping=None, torch_dtype="float32")
  model = Gemma3ForCausalLM(hf_config).eval()
  missing, unexpected = model.load_state_dict(_state_dict(params, config), strict=False)
  missing = [m for m in missing if m != "lm_head.weight"]  # tied to the embedding
  if missing or unexpected:
    raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
  model.tie_weights()
  torch.set_num_threads(torch.get_num_threads())
  return model


def measure(params, config, tok, new_tokens: int, prompt_ids) -> dict:
  """Greedy tokens (batch 1) and tokens/s at batch 1 and 16."""
  import torch
  model = build(params, config)
  out = {}
  for batch in (1, 16):
    ids = torch.tensor([list(prompt_ids)] * batch)
    with torch.no_grad():
      model.generate(ids, max_new_tokens=2, do_sample=False)
      t = time.perf_counter()
      gen = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False)
      elapsed = time.perf_counter() - t
    out[f"hf_tokens_per_s_batch{batch}"] = batch * new_tokens / elapsed
    if batch == 1:
      out["hf_greedy_ids"] = gen[0, len(prompt_ids):].tolist()
  out["hf_tpot_batch1_s"] = 1.0 / out["hf_tokens_per_s_batch1"]
  return out
