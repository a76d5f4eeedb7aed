"""End to end: a tiny "official release" in the official formats → `convert all` → `generate` → an mp4."""

import os

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from landiff_jax import pipeline
from landiff_jax.cli import main
from landiff_jax.config import load_config
from landiff_jax.convert import ConversionError
from landiff_jax.convert.release import convert_release
from landiff_jax.data.video import read_fps, read_video

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')
transformers = pytest.importorskip('transformers')

from test_dit import TorchSemanticCond, make_reference, to_sat  # noqa: E402  (tests dir is on sys.path)
from test_lm import official_state_dict as lm_state_dict  # noqa: E402
from test_theia import to_4x_names  # noqa: E402
from test_tokenizer import official_state_dict as tokenizer_state_dict  # noqa: E402
from test_vae import diffusers_to_sat_name  # noqa: E402

PROMPT = 'a red circle moving right'


def write_t5(directory, c, seed):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  torch.manual_seed(seed)
  config = transformers.T5Config(
      vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, d_ff=c.d_ff, num_layers=c.num_layers,
      num_heads=c.num_heads, relative_attention_num_buckets=c.relative_attention_num_buckets,
      relative_attention_max_distance=c.relative_attention_max_distance, feed_forward_proj='gated-gelu',
      dropout_rate=0.0, is_encoder_decoder=False, tie_word_embeddings=False)
  transformers.T5EncoderModel(config).save_pretrained(directory, safe_serialization=True)
  tok = Tokenizer(models.Unigram())
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  trainer = trainers.UnigramTrainer(vocab_size=40, special_tokens=['<pad>', '</s>', '<unk>'], unk_token='<unk>')
  tok.train_from_iterator([PROMPT, 'a blue square moving up', 'a green star staying still'] * 10, trainer)
  transformers.T5TokenizerFast(tokenizer_object=tok, eos_token='</s>', pad_token='<pad>', unk_token='<unk>',
                               extra_ids=0).save_pretrained(directory)


@pytest.fixture(scope='module', autouse=True)
def compilation_cache_in_a_temporary_folder(tmp_path_factory):
  """`main([...])` sets up the persistent compilation cache (once per process): here, never the user's folder."""
  from landiff_jax import runtime
  os.environ.setdefault(runtime.CACHE_ENV, str(tmp_path_factory.getbasetemp() / 'xla-cache'))


@pytest.fixture(scope='module')
def release(tmp_path_factory):
  """Every file of the release layout (reference §1), random weights at the tiny config's widths."""
  cfg = load_config('configs/tiny.py')
  root = tmp_path_factory.mktemp('release')
  cog = root / 'LanDiff' / 'CogVideoX-2b-sat'
  for folder in ('llm', 'tokenizer', 'diffusion/1'):
    (root / 'LanDiff' / folder).mkdir(parents=True)
  (cog / 'transformer' / '1000').mkdir(parents=True)
  (cog / 'vae').mkdir(parents=True)
  save_file(lm_state_dict(cfg.lm), str(root / 'LanDiff' / 'llm' / 'model.safetensors'))
  tokenizer_file = tokenizer_state_dict(cfg.tokenizer)
  torch.manual_seed(5)
  vit = transformers.ViTModel(transformers.ViTConfig(
      hidden_size=cfg.theia.hidden_size, num_hidden_layers=cfg.theia.num_layers, num_attention_heads=cfg.theia.num_heads,
      intermediate_size=cfg.theia.mlp_dim, image_size=cfg.theia.patch_size * cfg.theia.pretrained_grid,
      patch_size=cfg.theia.patch_size, layer_norm_eps=cfg.theia.layer_norm_eps), add_pooling_layer=False)
  for name, value in to_4x_names({k: v.numpy() for k, v in vit.state_dict().items()}).items():
    tokenizer_file[f'feature_extractor.model.backbone.model.{name}'] = value  # as the release's VideoVQ holds it
  save_file(tokenizer_file, str(root / 'LanDiff' / 'tokenizer' / 'model.safetensors'))
  backbone = make_reference(cfg, cfg.dit.num_layers, seed=0)
  torch.save({'module': to_sat(backbone, 'model.diffusion_model.')},
             cog / 'transformer' / '1000' / 'mp_rank_00_model_states.pt')
  control = make_reference(cfg, cfg.control.num_layers, seed=1)
  engine = to_sat(control, 'model.control_model.diffusion_model.')
  engine = {k: v for k, v in engine.items() if 'final_layer' not in k}
  for l in range(cfg.control.num_layers):
    engine[f'model.control_model.diffusion_model.mixins.adaln_layer.zero_linears.{l}.weight'] = torch.randn(
        cfg.dit.hidden_size, cfg.dit.hidden_size) * 0.05
  for name, value in TorchSemanticCond(cfg.upsampler).state_dict().items():
    engine[f'model.control_model.diffusion_model.semantic_conditioner.{name}'] = value
  torch.save({'module': engine}, root / 'LanDiff' / 'diffusion' / '1' / 'mp_rank_00_model_states.pt')
  v = cfg.vae
  vae = diffusers.AutoencoderKLCogVideoX(latent_channels=v.latent_channels, layers_per_block=v.num_res_blocks,
                                         block_out_channels=tuple(v.channels * m for m in v.channel_mult),
                                         norm_num_groups=v.num_groups)
  torch.save({'state_dict': {diffusers_to_sat_name(k, len(v.channel_mult)): t for k, t in vae.state_dict().items()}},
             cog / 'vae' / '3d-vae.pt')
  write_t5(cog / 't5-v1_1-xxl', cfg.t5_dit, seed=2)
  write_t5(root / 'flan-t5-xxl', cfg.t5_lm, seed=3)
  return root


@pytest.fixture(scope='module')
def converted(release, tmp_path_factory):
  dst = tmp_path_factory.mktemp('pipe') / 'landiff'
  code = main(['convert', 'all', '--config=configs/tiny.py', '--src', str(release / 'LanDiff'), '--flan-t5',
               str(release / 'flan-t5-xxl'), '--dst', str(dst)])
  assert code == 0
  return str(dst)


@pytest.fixture(scope='module')
def pipe(converted):
  return pipeline.load(converted)


def test_generate_writes_an_mp4_of_the_configured_size(converted, tmp_path):
  out = tmp_path / 'video.mp4'
  assert main(['generate', '--ckpt', converted, '--prompt', PROMPT, '--out', str(out), '--steps', '2',
               '--save-ids', '--save-frames']) == 0
  video = read_video(str(out))
  cfg = load_config('configs/tiny.py')
  assert video.shape == (cfg.video.num_frames, cfg.video.height, cfg.video.width, 3)
  assert read_fps(str(out)) == cfg.video.fps
  ids = np.load(tmp_path / 'video.ids.npy')
  assert ids.shape == (pipeline.lm_sampling.Layout.from_config(cfg).tokens_per_group,)
  assert (tmp_path / 'video.frames.png').exists() and not list(tmp_path.glob('*partial*'))
  assert main(['generate', '--ckpt', converted, '--prompt', PROMPT, '--out', str(out), '--steps', '2']) == 1


def test_a_prompt_file_makes_a_folder_of_videos_and_one_contact_sheet(converted, tmp_path):
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text(f'{PROMPT}\na second prompt\n')
  folder = tmp_path / 'videos'
  assert main(['generate', '--ckpt', converted, '--prompts', str(prompts), '--out', str(folder), '--steps', '2',
               '--save-frames']) == 0
  cfg = load_config('configs/tiny.py')
  assert sorted(p.name for p in folder.iterdir()) == ['000.frames.png', '000.mp4', '001.frames.png', '001.mp4',
                                                      'frames.png']
  from PIL import Image
  assert Image.open(folder / 'frames.png').size == (7 * cfg.video.width, 2 * cfg.video.height)
  # the sheet is the two videos' own sheets, one above the other
  rows = [np.asarray(Image.open(folder / f'{i:03d}.frames.png')) for i in range(2)]
  np.testing.assert_array_equal(np.asarray(Image.open(folder / 'frames.png')), np.concatenate(rows, axis=0))


def test_same_seed_same_video_and_the_stages_compose(pipe):
  first = pipe.generate(PROMPT, seed=3, dit_steps=2)
  again = pipe.generate(PROMPT, seed=3, dit_steps=2)
  other = pipe.generate(PROMPT, seed=4, dit_steps=2)
  np.testing.assert_array_equal(first.video, again.video)
  assert not np.array_equal(first.video, other.video)
  _, render_key = jax.random.split(jax.random.key(3))
  np.testing.assert_array_equal(pipe.render_ids(first.ids, PROMPT, render_key, 2), first.video)
  assert set(first.seconds) >= {'semantic tokens (LM)', 'frames (VAE)', 'total'}


def test_parameters_sharded_over_a_mesh_give_the_same_video(converted, pipe):
  """fsdp x tensor placement (parameters split over up to 4 devices) renders the video of the replicated
  pipeline, up to uint8 rounding of float reassociation."""
  from jax.sharding import Mesh
  sharded = pipeline.load(converted, mesh=Mesh(np.array(jax.devices()).reshape(2, 2, 2), ('data', 'fsdp', 'tensor')))
  dit_params = jax.tree.leaves(sharded.parts['dit'][1])
  assert any(not p.sharding.is_fully_replicated for p in dit_params)
  assert all(p.sharding.is_fully_replicated for p in jax.tree.leaves(pipe.parts['dit'][1]))
  ids = pipe.generate(PROMPT, seed=3, dit_steps=2).ids
  key = jax.random.key(7)
  want = pipe.render_ids(ids, PROMPT, key, 2).astype(int)
  got = sharded.render_ids(ids, PROMPT, key, 2).astype(int)
  assert np.abs(got - want).max() <= 2 and np.abs(got - want).mean() < 0.05


def test_two_groups_stream_into_a_longer_video(pipe):
  result = pipe.generate(PROMPT, seed=1, dit_steps=2, num_groups=2)
  cfg = pipe.config
  from landiff_jax.models.vae import decoded_frames
  assert result.video.shape[0] == decoded_frames(2 * cfg.dit.latent_frames)  # the VAE's frame rule for T latents
  assert result.ids.shape[0] == 2 * pipe.layout.tokens_per_group


def test_rerunning_convert_all_skips_unchanged_parts(release, converted):
  report = convert_release(str(release / 'LanDiff'), converted, load_config('configs/tiny.py'),
                           flan_t5=str(release / 'flan-t5-xxl'), log=lambda message: None)
  assert set(report.values()) == {'unchanged'}


def test_bad_inputs(release, converted, tmp_path, capsys):
  with pytest.raises(ConversionError, match='pass --flan-t5'):
    convert_release(str(release / 'LanDiff'), str(tmp_path / 'x'), load_config('configs/tiny.py'))
  os.rename(release / 'LanDiff' / 'llm' / 'model.safetensors', release / 'LanDiff' / 'llm' / 'moved')
  try:
    with pytest.raises(ConversionError, match='llm/model.safetensors'):
      convert_release(str(release / 'LanDiff'), str(tmp_path / 'x'), load_config('configs/tiny.py'),
                      flan_t5=str(release / 'flan-t5-xxl'))
  finally:
    os.rename(release / 'LanDiff' / 'llm' / 'moved', release / 'LanDiff' / 'llm' / 'model.safetensors')
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('a red circle\n\na blue square\n')
  assert main(['generate', '--ckpt', converted, '--prompts', str(prompts), '--out', str(tmp_path / 'videos')]) == 1
  assert 'line(s) [2]' in capsys.readouterr().err
  assert main(['generate', '--ckpt', converted, '--prompt', PROMPT, '--out', str(tmp_path / 'no' / 'v.mp4')]) == 1
  assert 'does not exist' in capsys.readouterr().err
  assert main(['generate', '--ckpt', str(tmp_path), '--prompt', PROMPT, '--out', str(tmp_path / 'v.mp4')]) == 1
  assert 'convert all' in capsys.readouterr().err
  truncated = tmp_path / 'broken.safetensors'
  data = (release / 'LanDiff' / 'llm' / 'model.safetensors').read_bytes()
  truncated.write_bytes(data[:len(data) // 2])
  assert main(['convert', 'lm', '--config=configs/tiny.py', '--src', str(truncated), '--dst', str(tmp_path / 'lm')]) == 1
  assert not (tmp_path / 'lm').exists()


def test_bench_generate_loads_from_disk_and_a_second_process_reuses_the_compiled_programs(tmp_path):
  """The benchmark writes a random pipeline in the storage dtype, then generates in fresh processes sharing one
  compilation cache: the second spends at most a fifth of the first one's compile time; 'stage' offload gives the
  same video as 'none'."""
  import json
  out = tmp_path / 'bench.json'
  assert main(['bench', 'generate', '--config=configs/tiny.py', '--out', str(out)]) == 0
  result = json.loads(out.read_text())
  assert result['video_shape'] == [9, 32, 48, 3] and result['storage_dtype'] == 'float32'
  none, stage = result['modes']['none'], result['modes']['stage']
  assert set(none['seconds']) >= {'semantic tokens (LM)', 'frames (VAE)', 'total'}
  first, cached = none['first_process_compile'], none['cached_process_compile']
  assert first['cache_misses'] > 10 and cached['cache_misses'] == 0 and cached['cache_hits'] >= first['cache_misses']
  assert cached['compile_s'] <= first['compile_s'] / 5
  assert len({*none['video_sha256'].values(), *stage['video_sha256'].values()}) == 1


def test_stage_offload_keeps_one_stage_on_the_device_and_gives_the_same_video(converted, pipe):
  offloaded = pipeline.load(converted, offload='stage')
  assert offloaded._resident == set()  # pylint: disable=protected-access
  want = pipe.generate(PROMPT, seed=5, dit_steps=2)
  got = offloaded.generate(PROMPT, seed=5, dit_steps=2)
  np.testing.assert_array_equal(got.video, want.video)
  np.testing.assert_array_equal(got.ids, want.ids)
  assert offloaded._resident == {'vae'}  # pylint: disable=protected-access
  assert all(isinstance(p, np.ndarray) for p in jax.tree.leaves(offloaded.parts['dit'][1].params))


def test_prompts_of_different_lengths_compile_the_lm_text_encoder_once(pipe):
  from landiff_jax.models import t5 as t5_model
  short, longer = 'a red', 'a red circle'
  limit = int(pipe.config.t5_lm.max_length)
  lengths = [int(t5_model.tokenize(pipe.text_tokenizers['t5_lm'], [p], limit, False)[1].sum()) for p in (short, longer)]
  assert lengths[0] < lengths[1] < limit
  first = pipe.lm_text(short)
  compiled = t5_model._encode._cache_size()  # pylint: disable=protected-access
  second = pipe.lm_text(longer)
  assert t5_model._encode._cache_size() == compiled  # pylint: disable=protected-access
  assert first.shape[0] == lengths[0] and second.shape[0] == lengths[1]
  model, params = pipe.parts['t5_lm']
  ids, mask = t5_model.tokenize(pipe.text_tokenizers['t5_lm'], [longer], limit, False)  # unpadded
  np.testing.assert_allclose(second, np.asarray(t5_model.encode(model, params, ids, mask))[0], atol=1e-5)


def test_a_truncated_model_directory_is_one_line_naming_it(converted, tmp_path, capsys):
  import shutil
  broken = tmp_path / 'pipe'
  shutil.copytree(converted, broken)
  data = max((p for p in (broken / 'lm' / 'params').rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
  data.write_bytes(data.read_bytes()[:data.stat().st_size // 3])
  out = tmp_path / 'v.mp4'
  assert main(['generate', '--ckpt', str(broken), '--prompt', PROMPT, '--out', str(out), '--steps', '1']) == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and str(broken / 'lm' / 'params') in err and 'again' in err, err
  assert not out.exists() and sorted(os.listdir(tmp_path)) == ['pipe']


def test_loading_casts_parameters_to_the_storage_dtype(converted):
  cfg = pipeline.load_config(converted)
  cfg.storage_dtype = 'bfloat16'
  pipe16 = pipeline.load(converted, config=cfg)
  leaves = jax.tree.leaves(pipe16.parts['dit'][1])
  bf16, f32 = np.dtype(jax.numpy.bfloat16), np.dtype(np.float32)
  assert {p.dtype for p in leaves if jax.numpy.issubdtype(p.dtype, jax.numpy.floating)} == {bf16}
  assert pipe16.parts['dit'][0].dtype == f32  # compute stays config.compute_dtype
  explicit = pipeline.load(converted, config=cfg, dtype='float32')  # an explicit dtype overrides
  assert {p.dtype for p in jax.tree.leaves(explicit.parts['dit'][1])} == {f32}


def test_encode_and_reconstruct_a_video_file(converted, tmp_path, capsys):
  import json
  from landiff_jax.data import shapes
  from landiff_jax.data.video import write_video
  cfg = load_config('configs/tiny.py')
  clip = shapes.render(shapes.sample_spec(0, 1), 9, cfg.video.height, cfg.video.width)
  write_video(str(tmp_path / 'clip.mp4'), clip, fps=8)
  out = tmp_path / 'ids.npy'
  assert main(['encode', '--video', str(tmp_path / 'clip.mp4'), '--ckpt', converted, '--out', str(out)]) == 0
  ids = np.load(out)
  assert ids.shape == (pipeline.lm_sampling.Layout.from_config(cfg).tokens_per_group,)
  capsys.readouterr()
  assert main(['reconstruct', '--video', str(tmp_path / 'clip.mp4'), '--ckpt', converted]) == 0
  report = json.loads(capsys.readouterr().out)
  assert report['ids'] == ids.shape[0] and report['feature_mse'] > 0


def test_eval_shapes_scores_generated_and_random_id_videos(pipe):
  """The scoring loop on the tiny pipeline (its videos are noise, so only the mechanics are checked here; the
  demo's figures come from `landiff-jax eval shapes` on the trained checkpoint)."""
  from landiff_jax.eval import shapes as shapes_eval
  from landiff_jax.data import shapes
  prompts = ['a red circle moving right', 'a blue star staying still']
  targets = [shapes_eval.parse_prompt(p) for p in prompts]
  result = shapes_eval.evaluate(pipe, prompts, dit_steps=2)
  # each score is the detector's reading of the video that prompt (seed 0 + its index) generates
  found = [shapes.detect(pipe.generate(p, seed=i, dit_steps=2).video) for i, p in enumerate(prompts)]
  assert [v['detected'] for v in result['videos']] == found
  assert result['accuracy'] == shapes_eval.accuracy(targets, found)
  assert result['detector_accuracy_on_ground_truth'] == {'color': 1.0, 'shape': 1.0, 'direction': 1.0}
  ablation = shapes_eval.evaluate(pipe, prompts, dit_steps=2, random_ids=True)
  random_ids = np.random.default_rng([0, 0]).integers(0, pipe.layout.codebook_size, pipe.layout.tokens_per_group)
  video = pipe.render_ids(random_ids.astype(np.int32), prompts[0], jax.random.key(0), 2)
  assert ablation['videos'][0]['detected'] == shapes.detect(video)


def test_rendering_without_the_caption_ignores_the_prompt(pipe):
  """The `--no-dit-caption` ablation: the renderer sees a dropped caption (zeros), so only the ids decide."""
  from landiff_jax.data import shapes
  from landiff_jax.eval import shapes as shapes_eval
  ids = pipe.generate(PROMPT, seed=0, dit_steps=2).ids
  key = jax.random.key(3)
  bare = pipe.render_ids(ids, 'a red circle moving right', key, 2, dit_caption=False)
  np.testing.assert_array_equal(pipe.render_ids(ids, 'a blue star staying still', key, 2, dit_caption=False), bare)
  assert not np.array_equal(pipe.render_ids(ids, 'a red circle moving right', key, 2), bare)
  result = shapes_eval.evaluate(pipe, ['a red circle moving right'], dit_steps=2, dit_caption=False)
  assert result['settings']['dit_caption'] is False
  generated = pipe.generate('a red circle moving right', seed=0, dit_steps=2, dit_caption=False)
  assert result['videos'][0]['detected'] == shapes.detect(generated.video)
