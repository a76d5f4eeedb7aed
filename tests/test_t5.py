"""T5 encoder: HF safetensors (single and sharded) converted and compared with transformers' T5EncoderModel, with
and without an attention mask; relative buckets; the offline tokenizer; bad inputs."""

import jax
import numpy as np
import pytest

from landiff_jax import checkpoints
from landiff_jax.cli import main
from landiff_jax.config import load_config
from landiff_jax.convert import ConversionError, io
from landiff_jax.convert.t5 import convert_t5
from landiff_jax.models import t5 as t5_model
from landiff_jax.parallel import strip_partitioning

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')


@pytest.fixture(scope='module')
def cfg():
  return load_config('configs/tiny.py').t5_lm


@pytest.fixture(scope='module')
def reference(cfg):
  """Tiny random T5 encoder; weights at scale 0.1 keep the unscaled attention logits moderate, so fp32 round-off
  stays far below the 1e-5 tolerance."""
  torch.manual_seed(0)
  config = transformers.T5Config(
      vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff, num_layers=cfg.num_layers,
      num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.relative_attention_num_buckets,
      relative_attention_max_distance=cfg.relative_attention_max_distance, feed_forward_proj='gated-gelu',
      dropout_rate=0.0, layer_norm_epsilon=cfg.layer_norm_eps, is_encoder_decoder=False, tie_word_embeddings=False)
  model = transformers.T5EncoderModel(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.1 + (1.0 if 'layer_norm' in name else 0.0))
  return model


@pytest.fixture(scope='module')
def saved(reference, tmp_path_factory):
  single = tmp_path_factory.mktemp('t5')
  reference.save_pretrained(single, safe_serialization=True)
  sharded = tmp_path_factory.mktemp('t5_sharded')
  reference.save_pretrained(sharded, safe_serialization=True, max_shard_size='20KB')
  assert (sharded / 'model.safetensors.index.json').exists()
  return str(single), str(sharded)


@pytest.fixture(scope='module')
def params(saved, cfg):
  return convert_t5(io.load_state_dict(saved[0]), cfg)


def test_buckets_equal_transformers():
  from transformers.models.t5.modeling_t5 import T5Attention
  relative = torch.arange(150)[None, :] - torch.arange(150)[:, None]
  want = T5Attention._relative_position_bucket(relative, bidirectional=True, num_buckets=32, max_distance=128)
  np.testing.assert_array_equal(t5_model.relative_buckets(150, 32, 128), want.numpy())


def test_hidden_states_match_transformers_with_and_without_mask(reference, params, cfg):
  model = t5_model.build_t5(cfg)
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 40))
  mask = np.ones((2, 40), np.int64)
  mask[1, 23:] = 0
  with torch.no_grad():
    want_masked = reference(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    want = reference(torch.from_numpy(ids)).last_hidden_state.numpy()
  np.testing.assert_allclose(np.asarray(t5_model.encode(model, params, ids, mask)), want_masked, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(t5_model.encode(model, params, ids)), want, atol=1e-5, rtol=0)


def test_sharded_checkpoint_and_full_t5_convert_to_the_same_params(saved, params, cfg, reference):
  jax.tree.map(np.testing.assert_array_equal, convert_t5(io.load_state_dict(saved[1]), cfg), params)
  full = {k: v.numpy() for k, v in reference.state_dict().items()}
  full['decoder.block.0.layer.0.SelfAttention.q.weight'] = np.zeros((2, 2), np.float32)
  full['lm_head.weight'] = np.zeros((2, 2), np.float32)
  del full['shared.weight']  # the tied encoder copy stands in
  jax.tree.map(np.testing.assert_array_equal, convert_t5(full, cfg), params)
  init = strip_partitioning(jax.eval_shape(t5_model.build_t5(cfg).init_params, jax.random.key(0)))
  assert jax.tree.structure(init) == jax.tree.structure(params)


def test_bad_keys_and_inputs(reference, params, cfg):
  sd = {k: v.numpy() for k, v in reference.state_dict().items()}
  del sd['encoder.final_layer_norm.weight']
  sd['encoder.block.1.layer.1.DenseReluDense.wo.weight'] = np.zeros((3, 3), np.float32)
  sd['encoder.extra'] = np.zeros(1, np.float32)
  with pytest.raises(ConversionError) as error:
    convert_t5(sd, cfg)
  message = str(error.value)
  assert 'final_layer_norm' in message and 'encoder.extra' in message and 'DenseReluDense.wo' in message
  model = t5_model.build_t5(cfg)
  with pytest.raises(ValueError, match='must be in'):
    t5_model.encode(model, params, np.full((1, 3), cfg.vocab_size))
  with pytest.raises(ValueError, match=r'\[batch, length\]'):
    t5_model.encode(model, params, np.zeros(3, np.int32))
  with pytest.raises(ValueError, match='must match the ids'):
    t5_model.encode(model, params, np.zeros((1, 3), np.int32), np.ones((1, 4)))


def test_tokenizer_from_a_local_directory(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  tok = Tokenizer(models.Unigram())
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  trainer = trainers.UnigramTrainer(vocab_size=40, special_tokens=['<pad>', '</s>', '<unk>'], unk_token='<unk>')
  tok.train_from_iterator(['a red circle moving right', 'a blue square staying still'] * 20, trainer)
  transformers.T5TokenizerFast(tokenizer_object=tok, eos_token='</s>', pad_token='<pad>', unk_token='<unk>',
                               extra_ids=0).save_pretrained(tmp_path / 'tok')
  tokenizer = t5_model.load_tokenizer(str(tmp_path / 'tok'))
  ids, mask = t5_model.tokenize(tokenizer, ['a red circle', 'a blue square staying still'], 48, pad_to_max=True)
  assert ids.shape == mask.shape == (2, 48) and ids.dtype == np.int32
  assert mask[0].sum() < mask[1].sum() and np.all(ids[0][mask[0] == 0] == tokenizer.pad_token_id)
  ids, mask = t5_model.tokenize(tokenizer, ['a red circle'], 48, pad_to_max=False)
  assert mask.all() and ids.shape[1] < 48
  with pytest.raises(FileNotFoundError, match='T5 tokenizer directory'):
    t5_model.load_tokenizer(str(tmp_path / 'missing'))


def test_cli_converts_an_hf_directory(saved, params, tmp_path):
  dst = tmp_path / 't5'
  assert main(['convert', 't5_lm', '--config=configs/tiny.py', '--src', saved[1], '--dst', str(dst)]) == 0
  model, loaded = checkpoints.load(str(dst))
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  assert isinstance(model, t5_model.T5Encoder)
