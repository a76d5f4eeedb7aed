"""Toy-width LanDiff for tests: the structure of `landiff_official.py`, every size shrunk.

Built by overriding the official config, so the two cannot drift apart in structure
(`tests/test_config.py` checks that every key exists in both).
"""

import importlib.util
import os


def _official():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'landiff_official.py')
  spec = importlib.util.spec_from_file_location('_landiff_official', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# training phases beyond one per task (`configs/train.py:STAGE,tiny`): the demo recipe's single-frame VAE phase, and
# its clip phase at the demo's batch of 2 (9-frame clips at batch 8 took 88 s of the tiny recipe's 341)
STAGES = {'vae_frames': dict(overrides={'video.num_frames': 1}),
          'vae': dict(train=dict(batch_size=2))}


def get_config():
  config = _official()
  config.name = 'tiny'
  config.compute_dtype = 'float32'
  config.storage_dtype = 'float32'
  config.remat_policy = 'none'

  config.theia.update(dict(patch_size=16, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64,
                           pretrained_grid=4, output_grid=(2, 3)))

  config.tokenizer.update(dict(feature_dim=32, frames_per_group=3, feature_grid=(2, 3), num_iframe_tokens=3,
                               num_pframe_tokens=2, width=32, num_layers=2, num_heads=2, token_size=32,
                               decoder_ffn_dim=48, attention_block_size=8))
  config.tokenizer.quantizer.update(dict(codebook_size=16, codebook_dim=4))

  config.lm.update(dict(num_layers=2, hidden_size=32, num_heads=2, head_dim=16, mlp_dim=64, max_len=256,
                        codebook_size=16, vocab_size=23, text_feature_dim=24, text_mlp_dims=(24, 32, 32),
                        micro_freq_dim=16, micro_hidden=16, text_max_length=16))
  config.lm.special_ids.update(dict(eos=16, bos=17, soi=18, eoi=19, sop=20, eop=21, pad=22))
  config.lm.sampling.num_frames = 3

  for t5 in (config.t5_lm, config.t5_dit):
    t5.update(dict(vocab_size=64, d_model=24, num_layers=2, num_heads=2, d_kv=8, d_ff=48,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16))
  config.t5_lm.max_length = 16
  config.t5_dit.max_length = 8

  config.dit.update(dict(num_layers=3, hidden_size=32, num_heads=2, head_dim=16, mlp_dim=128, time_embed_dim=16,
                         time_freq_dim=32, in_channels=4, out_channels=4, text_length=8, text_dim=24,
                         latent_frames=3, latent_height=4, latent_width=6))
  config.control.num_layers = 2

  config.upsampler.update(dict(in_channels=32, channels=32, num_res_blocks=1, out_channels=8, target_channels=4,
                               num_groups=4))

  config.vae.update(dict(latent_channels=4, channels=8, channel_mult=(1, 2, 2, 2), num_res_blocks=1, num_groups=4))

  config.diffusion.num_steps = 4
  config.diffusion.stream_overlap = 1
  config.video.update(dict(height=32, width=48, num_frames=9))

  config.train.update(dict(num_steps=20, batch_size=8, learning_rate=1e-2, warmup_steps=2, checkpoint_every=10,
                           log_every=1, progress=False))
  return config
