"""Training config: `python -m model.train --config=configs/train_tiny.py [--config.x=y]`.

Default: a tiny-family model trained from scratch on model/data/train_corpus.txt. It widens
the `tiny` preset (which stays as it is for tests) so the loss has room to fall well below
the unigram baseline in a few minutes on a 2-core CPU.

Variant `gemma_last_layers` (`--config=configs/train_tiny.py:gemma_last_layers`): a short
fine-tune of Gemma 3 270M's last blocks on the same text; the embedding and earlier blocks
stay frozen. See docs/research.md for what fits in CPU memory.
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = "tiny"  # preset (model/config.py) for training from scratch
  # Changes to the preset; the SentencePiece tokenizer is trained with vocab_size pieces.
  # ~0.85M params: 4 blocks alternating local (window 64) and global attention.
  c.model_overrides = ml_collections.ConfigDict(dict(
      vocab_size=512, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
      ffn_dim=384, sliding_window=64, global_every=2, query_pre_attn_scalar=32.0,
      max_context=512))
  c.init_checkpoint = ""  # "" = from scratch; a checkpoint dir, or "gemma3_270m" (default cache)
  c.train_last_layers = 0  # 0 = train everything; N = only the last N blocks + final norm
  c.dtype = "float32"  # activations

  c.data = ""  # text file; "" = model/data/train_corpus.txt
  c.eval_fraction = 0.05  # tail of the token stream held out for eval_loss
  c.seq_len = 128
  c.batch_size = 16

  # ~2.5 min on 2 CPU cores; eval loss ~0.6x the unigram baseline. Longer runs overfit
  # the 240 KB corpus (train loss keeps falling, eval loss rises again).
  c.num_steps = 400
  c.learning_rate = 3e-3
  c.warmup_steps = 50
  c.end_lr_ratio = 0.1  # cosine decays to learning_rate * end_lr_ratio at num_steps
  c.weight_decay = 0.05
  c.b1 = 0.9
  c.b2 = 0.98
  c.grad_clip = 1.0  # global-norm clipping
  c.seed = 0  # init and batch order

  c.workdir = "/tmp/flaxstream_train_tiny"  # orbax checkpoints, tokenizer, metrics.jsonl
  c.save_every = 100
  c.keep_checkpoints = 2
  c.log_every = 50
  c.eval_every = 100
  c.eval_batches = 4
  c.export_dir = ""  # "" = <workdir>/export

  if variant == "gemma_last_layers":
    c.model = "gemma3_270m"
    c.model_overrides = ml_collections.ConfigDict()
    c.init_checkpoint = "gemma3_270m"
    c.train_last_layers = 2
    c.seq_len = 128
    c.batch_size = 2
    c.num_steps = 30
    c.learning_rate = 3e-5
    c.warmup_steps = 5
    c.weight_decay = 0.0
    c.workdir = "/tmp/flaxstream_train_gemma"
    c.save_every = 10
    c.log_every = 5
    c.eval_every = 10
    c.eval_batches = 2
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; use '' or 'gemma_last_layers'")
  return c
