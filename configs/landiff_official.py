"""The released LanDiff system (5B): every number the code reads, in one place.

Source of every value: `shared/reference/landiff-official.md` (section numbers in the comments) and
`shared/reference/cogvideox-theia-t5.md`. Model code reads these fields; it never hard-codes them.
`configs/tiny.py` has exactly the same structure at toy sizes (a test enforces that).

Select a variant with `--config=configs/landiff_official.py` and override any field on the command line:
`--config.lm.num_layers=2`.
"""

import ml_collections

ConfigDict = ml_collections.ConfigDict


def parallel_config():
  """Mesh and logical-axis rules shared by every stage (DESIGN.md, Sharding)."""
  return ConfigDict(
      dict(
          # Mesh axis sizes; -1 means "all remaining devices". Product must equal the device count.
          mesh=dict(data=-1, fsdp=1, tensor=1),
          # Ordered (logical name, mesh axis or axes or None). First matching unused mesh axis wins.
          logical_axis_rules=[
              # activations
              ('batch', ('data', 'fsdp')),
              ('length', None),
              ('act_embed', None),
              ('act_heads', 'tensor'),
              ('act_mlp', 'tensor'),
              ('act_vocab', 'tensor'),
              ('act_height', 'tensor'),  # the VAE's feature-map rows (context parallelism)
              # parameters
              ('layers', None),
              ('embed', 'fsdp'),
              ('heads', 'tensor'),
              ('kv', None),
              ('mlp', 'tensor'),
              ('vocab', 'tensor'),
              ('conv_in', None),
              ('conv_out', 'tensor'),
              ('vae_conv_out', None),  # the VAE's kernels stay whole: its maps split by rows ('act_height')
              ('kernel', None),
              ('norm', None),
              ('codebook', None),
          ],
          # `jax.distributed.initialize` is called only when this is True (multi-host launches).
          distributed=False,
          coordinator_address='',
          num_processes=1,
          process_id=0,
      ))


def theia_config():
  """Theia / DeiT-Base/16 feature extractor (reference §3.2, cogvideox-theia-t5.md §4)."""
  return ConfigDict(
      dict(
          patch_size=16,
          hidden_size=768,
          num_layers=12,
          num_heads=12,
          mlp_dim=3072,
          layer_norm_eps=1e-12,
          pretrained_grid=14,  # 224 / 16: the position table is interpolated from this grid
          pixel_offset=127.5,  # pixels -> (x - 127.5) / 127.5
          pixel_scale=127.5,
          pad_value=127,  # frames are padded at the bottom to a square with this grey value
          output_grid=(30, 45),
      ))


def tokenizer_config():
  """TiTok-style video tokenizer (reference §3)."""
  return ConfigDict(
      dict(
          feature_dim=768,  # Theia feature width (input and output of the tokenizer)
          frames_per_group=13,
          feature_grid=(30, 45),  # tokens per frame = 30 * 45 = 1350
          num_iframe_tokens=330,
          num_pframe_tokens=74,
          width=768,
          num_layers=12,
          num_heads=12,
          mlp_ratio=4,
          layer_norm_eps=1e-5,
          qkv_bias=False,
          token_size=768,
          decoder_ffn_dim=1536,
          rope=dict(theta=10000.0, multiple=16),  # 3D RoPE band split for head dim 64: t 16, h 24, w 24
          attention_block_size=128,
          quantizer=dict(
              codebook_size=2048,
              codebook_dim=16,
              distance='euclidean',
              ema_decay=0.8,
              dead_code_threshold=2,
              kmeans_init=True,
              commitment_weight=1.0,
              reconstruction_weight=1.0,
          ),
      ))


def lm_config():
  """Semantic language model (reference §4)."""
  return ConfigDict(
      dict(
          num_layers=24,
          hidden_size=2048,
          num_heads=16,
          head_dim=128,
          mlp_dim=11008,
          norm_eps=1e-5,
          final_norm_eps=1e-5,
          rope_theta=10000.0,
          max_len=32768,
          codebook_size=2048,
          vocab_size=2055,  # codebook + 7 specials
          special_ids=dict(eos=2048, bos=2049, soi=2050, eoi=2051, sop=2052, eop=2053, pad=2054),
          text_feature_dim=4096,  # Flan-T5-XXL output width
          text_mlp_dims=(4096, 2048, 2048),
          micro_conditions=('frames', 'motion_score'),  # sorted key order, one prefix token each
          micro_freq_dim=256,
          micro_hidden=512,
          text_max_length=512,
          # training: condition dropout (text → the null-text vector, micro-conditions → a zero token)
          text_dropout=0.1,
          motion_dropout=0.5,
          frames_dropout=0.5,
          sampling=dict(
              cfg_scale=7.5,
              temperature=1.0,
              top_k=0,  # 0 = off
              top_p=1.0,  # 1.0 = off
              motion_score=0.1,
              num_frames=13,
              seed=42,
          ),
      ))


def t5_config(max_length, use_attention_mask):
  """T5 v1.1 / Flan-T5 XXL encoder (cogvideox-theia-t5.md §5)."""
  return ConfigDict(
      dict(
          vocab_size=32128,
          d_model=4096,
          num_layers=24,
          num_heads=64,
          d_kv=64,
          d_ff=10240,
          relative_attention_num_buckets=32,
          relative_attention_max_distance=128,
          layer_norm_eps=1e-6,
          max_length=max_length,
          use_attention_mask=use_attention_mask,
      ))


def dit_config():
  """CogVideoX-2B MMDiT backbone as LanDiff runs it (reference §5.3, §5.11)."""
  return ConfigDict(
      dict(
          num_layers=30,
          hidden_size=1920,
          num_heads=30,
          head_dim=64,
          mlp_dim=7680,
          time_embed_dim=512,
          time_freq_dim=1920,
          patch_size=2,
          in_channels=16,
          out_channels=16,
          text_length=226,
          text_dim=4096,
          latent_frames=13,
          latent_height=60,
          latent_width=90,
          spatial_interpolation=1.875,
          temporal_interpolation=1.0,
          layer_norm_eps=1e-5,
          qk_norm_eps=1e-6,
          final_norm_eps=1e-6,
          num_modulations=12,
      ))


def control_config():
  """The ControlNet branch (reference §5.4)."""
  return ConfigDict(dict(num_layers=15, zero_linear_bias=False))


def upsampler_config():
  """Semantic feature upsampler (reference §5.5)."""
  return ConfigDict(
      dict(
          in_channels=768,
          channels=512,
          channel_mult=(0.25, 1.0),
          num_res_blocks=4,
          out_channels=64,
          target_channels=16,
          num_groups=32,
          norm_eps=1e-6,
          upsample='pixelshuffle',
      ))


def vae_config():
  """CogVideoX 3D causal VAE (reference §6, cogvideox-theia-t5.md §3)."""
  return ConfigDict(
      dict(
          in_channels=3,
          latent_channels=16,
          channels=128,
          channel_mult=(1, 2, 2, 4),
          num_res_blocks=3,
          num_groups=32,
          norm_eps=1e-6,
          scaling_factor=1.15258426,
          temporal_compression=4,
          spatial_compression=8,
          # The release decodes in chunks of 2 latent frames and encodes in chunks of 8 video frames, the remainder
          # folded into the first chunk (13 latents → [0:3], [3:5], ..., [11:13]; reference §6.3). GroupNorm
          # statistics are per chunk, so these are part of the numerics.
          decode_chunk_frames=2,
          encode_chunk_frames=8,
          # False for decoder-only model directories (`landiff-jax convert vae --decoder-only`): enough to generate.
          with_encoder=True,
          # `landiff-jax train vae` only (small VAEs from scratch, e.g. the demo): weight of the posterior's KL term.
          kl_weight=1e-4,
          # ... and of the squared error beside the L1 term: it weighs large errors (small saturated objects on a
          # plain background) more than the many small ones of background texture
          l2_weight=0.0,
      ))


def diffusion_config():
  """Schedule and sampler (reference §5.6–5.8)."""
  return ConfigDict(
      dict(
          num_train_timesteps=1000,
          beta_start=0.00085,
          beta_end=0.012,
          snr_shift_scale=3.0,
          prediction='v',
          num_steps=50,
          cfg_scale=6.0,
          cfg_exponent=5.0,
          dynamic_cfg=True,
          uncond_text='zeros',
          text_dropout=0.1,  # training: share of examples whose text features are zeroed (CFG)
          prefix_frames=0,  # clean latent frames held fixed (the release's fixed_frames); 0 = off
          # long videos: windows of 13 latent frames overlapping by this many clean frames (the release's commented
          # `fixed_frames: 7`); see landiff_jax/sampling/streaming.py
          stream_overlap=7,
      ))


def video_config():
  return ConfigDict(dict(height=480, width=720, num_frames=49, fps=8))


def train_config():
  """Generic training-loop settings; each stage's config overrides what it needs."""
  return ConfigDict(
      dict(
          workdir='',  # where checkpoints and metrics go; required by `landiff-jax train`
          seed=0,  # parameter initialisation and the per-step rng (folded with the step number)
          num_steps=1000,
          # stop early (with a checkpoint) at the first logging step after this many seconds of training; 0 = off.
          # For job time limits: the run resumes from that checkpoint when started again.
          max_seconds=0.0,
          batch_size=8,  # global batch, split over the mesh's data axes
          learning_rate=1e-4,
          warmup_steps=100,
          end_learning_rate_ratio=0.1,  # cosine decays to learning_rate * this
          b1=0.9,
          b2=0.999,
          eps=1e-8,
          weight_decay=0.0,
          grad_clip_norm=1.0,  # 0 disables clipping
          ema_decay=0.0,  # 0 disables the EMA copy of the parameters
          frozen=[],  # regexes on '/'-joined parameter paths; matches get no gradient and no optimizer state
          init_from='',  # model directory (e.g. from `landiff-jax convert`) whose parameters replace the init
          data_dir='',  # the stage's training examples
          checkpoint_every=500,
          keep_checkpoints=3,
          log_every=10,
          data_seed=0,
          shuffle=True,
          progress=True,
          # mixed precision: gradients are reduced across devices in this dtype
          grad_reduce_dtype='float32',
          # a non-finite loss or gradient: 'stop' (name the step and batch, keep the last good checkpoint) or 'skip'
          nonfinite='stop',
      ))


def get_config():
  config = ConfigDict()
  config.name = 'landiff_official'
  config.seed = 42
  # The dtype policy, in one place (DESIGN.md, Precision). Training keeps master parameters and optimizer state in
  # `param_dtype`; inference stores (`convert --dtype`) and loads parameters in `storage_dtype` (loading casts either
  # way); matmuls run in `compute_dtype`, while norms, softmax, the residual stream and the sampler stay fp32 where
  # the release keeps them fp32 under autocast.
  config.param_dtype = 'float32'
  config.storage_dtype = 'bfloat16'
  config.compute_dtype = 'bfloat16'
  config.attention_backend = 'auto'
  # an explicitly chosen backend that would hold more than this many GiB of attention scores at once is refused
  config.attention_max_scores_gib = 4.0
  config.remat_policy = 'nothing_saveable'
  config.runtime = ConfigDict(
      dict(
          # 'none': every part resident; 'stage': only the running stage's parameters on the device
          offload='none',
          # persistent XLA compilation cache, so a second process does not compile again
          compilation_cache=True,
          compilation_cache_dir='',  # '' = a per-user folder ($XDG_CACHE_HOME or ~/.cache)/landiff-jax/xla
      ))
  config.parallel = parallel_config()
  config.theia = theia_config()
  config.tokenizer = tokenizer_config()
  config.lm = lm_config()
  config.t5_lm = t5_config(max_length=512, use_attention_mask=True)  # Flan-T5-XXL for the LM
  config.t5_dit = t5_config(max_length=226, use_attention_mask=False)  # T5-v1.1-XXL for the DiT
  config.dit = dit_config()
  config.control = control_config()
  config.upsampler = upsampler_config()
  config.vae = vae_config()
  config.diffusion = diffusion_config()
  config.video = video_config()
  config.train = train_config()
  return config
