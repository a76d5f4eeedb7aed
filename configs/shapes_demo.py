"""The built-in demo: LanDiff's architecture at 64×64, 49 frames (13 latent frames), trained on `data/shapes.py`.

Every part is the official one shrunk (built by overriding `landiff_official.py`, like `tiny.py`): a CogVideoX-style
VAE (8× space, 4× time, 16 latent channels), a Theia-architecture ViT (the semantic feature extractor: trained to
see which coloured shape covers each part of a frame, `train/tasks/theia.py`, then frozen), the I/P-frame query
tokenizer (32 ids per 13-frame group, 64 codes), the LLaMA-like LM with a small
T5 encoder (random, frozen) over a word-level tokenizer of the captions' words, and the MMDiT renderer with its
control branch. `launch/train_demo.sh` trains it from nothing; `models/shapes-demo` is the result.

`STAGES` holds each training stage's settings (`configs/train.py:STAGE,demo` applies them).
"""

import importlib.util
import os


def _official():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'landiff_official.py')
  spec = importlib.util.spec_from_file_location('_landiff_official', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# The word-level vocabulary of the captions (data/shapes.py) plus T5's specials: the size of both T5 embeddings.
TEXT_VOCAB_SIZE = 48
TEXT_LENGTH = 16  # tokens: the longest two-shape caption has 15 words
LATENT_CHANNELS = 16  # the VAE's, as the release's (8 lost more of the shapes: 5 of 24 reconstructions against 7)
CODEBOOK_SIZE = 64  # the tokenizer's codes, which are the LM's first CODEBOOK_SIZE ids; its 7 specials follow

# stage → training settings (each applied over `train_config()`) and any other overrides ('a.b': value).
STAGES = {
    # The VAE learns in two phases: single frames first (about 10× more learning per CPU second; the causal VAE
    # codes a video's first frame on its own), then 9-frame clips from those weights, which trains its time
    # compression (it is causal and convolutional, so 49-frame videos encode the same way as 9-frame clips).
    'vae_frames': dict(train=dict(num_steps=5000, batch_size=8, learning_rate=2e-3, warmup_steps=100),
                       overrides={'video.num_frames': 1}),
    'vae': dict(train=dict(num_steps=1500, batch_size=2, learning_rate=1e-3, warmup_steps=50),
                overrides={'video.num_frames': 9}),
    # the semantic ViT learns from single frames and their semantic maps (about a minute)
    'theia': dict(train=dict(num_steps=1500, batch_size=64, learning_rate=1e-3, warmup_steps=100, weight_decay=0.01)),
    'tokenizer': dict(train=dict(num_steps=800, batch_size=16, learning_rate=1e-3, warmup_steps=50)),
    'lm': dict(train=dict(num_steps=1500, batch_size=32, learning_rate=1e-3, warmup_steps=100, weight_decay=0.01)),
    'backbone': dict(train=dict(num_steps=3000, batch_size=16, learning_rate=1e-3, warmup_steps=100)),
    # the control branch: colour / shape / direction on held-out prompts 76 / 27 / 19 % after 1,000 steps (37 prompts),
    # 80 / 35 / 95 % after 9,000 (the shipped demo)
    'diffusion': dict(train=dict(num_steps=9000, batch_size=16, learning_rate=1e-3, warmup_steps=50)),
}


def get_config():
  config = _official()
  config.name = 'shapes_demo'
  config.compute_dtype = 'float32'
  config.storage_dtype = 'float32'
  config.remat_policy = 'none'

  config.video.update(dict(height=64, width=64, num_frames=49, fps=8))

  config.vae.update(dict(latent_channels=LATENT_CHANNELS, channels=8, channel_mult=(1, 2, 2, 4), num_res_blocks=1,
                         num_groups=4, scaling_factor=1.0, l2_weight=1.0))

  # 64×64 frames, padded to a 64×64 square: a 4×4 grid of 16-pixel patches
  config.theia.update(dict(hidden_size=64, num_layers=2, num_heads=4, mlp_dim=128, pretrained_grid=4,
                           output_grid=(4, 4)))

  config.tokenizer.update(dict(feature_dim=64, frames_per_group=13, feature_grid=(4, 4), num_iframe_tokens=8,
                               num_pframe_tokens=2, width=96, num_layers=2, num_heads=3, token_size=32,
                               decoder_ffn_dim=192, attention_block_size=16))
  config.tokenizer.quantizer.update(dict(codebook_size=CODEBOOK_SIZE, codebook_dim=8))

  config.lm.update(dict(num_layers=3, hidden_size=128, num_heads=4, head_dim=32, mlp_dim=384, max_len=128,
                        codebook_size=CODEBOOK_SIZE, vocab_size=CODEBOOK_SIZE + 7, text_feature_dim=64,
                        text_mlp_dims=(64, 128, 128),
                        micro_freq_dim=32, micro_hidden=64, text_max_length=TEXT_LENGTH,
                        # the captions already say how fast things move: no motion-score micro-condition
                        micro_conditions=('frames',)))
  config.lm.special_ids.update({name: CODEBOOK_SIZE + i for i, name in enumerate(
      ('eos', 'bos', 'soi', 'eoi', 'sop', 'eop', 'pad'))})
  # The release's guidance of 7.5 ruins this small LM's ids: on held-out prompts a colour probe of their decoded
  # features is right 0/20 times at 7.5, 2/20 at 4, 7/20 at 2, 14/20 at 1.5 and 12/20 at 1 (no guidance).
  config.lm.sampling.cfg_scale = 1.5

  for t5 in (config.t5_lm, config.t5_dit):
    t5.update(dict(vocab_size=TEXT_VOCAB_SIZE, d_model=64, num_layers=2, num_heads=4, d_kv=16, d_ff=128,
                   relative_attention_num_buckets=16, relative_attention_max_distance=32, max_length=TEXT_LENGTH))

  config.dit.update(dict(num_layers=3, hidden_size=96, num_heads=3, head_dim=32, mlp_dim=256, time_embed_dim=64,
                         time_freq_dim=128, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                         text_length=TEXT_LENGTH, text_dim=64, latent_frames=13, latent_height=8, latent_width=8,
                         spatial_interpolation=1.0))
  config.control.num_layers = 2
  config.upsampler.update(dict(in_channels=64, channels=64, num_res_blocks=1, out_channels=32,
                               target_channels=LATENT_CHANNELS, num_groups=8))

  config.diffusion.update(dict(num_steps=20))
  config.train.update(dict(log_every=100, checkpoint_every=1000, keep_checkpoints=1))
  return config
