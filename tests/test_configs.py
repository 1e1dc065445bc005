"""Tests for configs/: the recipes against REFERENCE.md, runlocal, argument and override checks."""

import glob
import importlib.util
import json
import math
import os
import subprocess
import sys

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from configs import common, finetune, linprobe, mae_pretrain
from launch import sweep as sweep_lib
from mae_jax import config_tools, metrics, models, optim, parallel

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ('B/16', 'L/16', 'H/14')
MODEL_NAMES = {'B/16': 'mae_vit_base_patch16', 'L/16': 'mae_vit_large_patch16',
               'H/14': 'mae_vit_huge_patch14'}
IMAGENET_TRAIN = 1_281_167
# The recipes, whose `runlocal` argument keeps what the recipe means (default.py and demo.py take it too).
RECIPE_FILES = ('configs/mae_pretrain.py', 'configs/finetune.py', 'configs/linprobe.py', 'configs/test.py')


@pytest.fixture(scope='module')
def jit_cache(tmp_path_factory):
  """Shares compilations between the runlocal runs of this module (they differ little)."""
  with sweep_lib.compilation_cache(str(tmp_path_factory.getbasetemp() / 'jit_cache')):
    yield


def lookup(config, key):
  """config[a][b] for 'a.b', or None when it has no such key."""
  node = config
  for part in key.split('.'):
    if part not in node:
      return None
    node = node[part]
  return node


def config_files():
  return sorted(p for p in glob.glob(os.path.join(REPO_ROOT, 'configs', '*.py'))
                if os.path.basename(p) not in ('__init__.py', 'common.py'))


def peak_lr(config):
  return optim.scaled_lr(config.optim.base_lr, config.batch_size)


def lr_schedule(config, steps_per_epoch):
  total = int(config.num_epochs * steps_per_epoch)
  return optim.create_learning_rate_fn(config.optim, global_batch=config.batch_size,
                                       steps_per_epoch=steps_per_epoch, total_steps=total), total


# ----------------------------------------------------------------------------
# Pretraining recipes.

@pytest.mark.parametrize('variant', VARIANTS)
@pytest.mark.parametrize('epochs', (800, 1600))
def test_pretrain_recipe_matches_reference(variant, epochs):
  config = mae_pretrain.get_config(f'variant={variant},epochs={epochs}')
  assert config.model.name == MODEL_NAMES[variant]
  assert config.num_epochs == epochs and config.num_train_steps <= 0
  assert config.batch_size == 4096 and config.grad_accum_steps == 1
  assert config.mask_ratio == 0.75 and config.norm_pix_loss is True
  assert (config.optim.name, config.optim.b1, config.optim.b2) == ('adamw', 0.9, 0.95)
  assert config.optim.weight_decay == 0.05 and config.optim.grad_clip_norm == 0
  assert config.optim.base_lr == 1.5e-4 and math.isclose(peak_lr(config), 2.4e-3)
  assert config.optim.warmup_epochs == 40 and config.optim.warmup_steps <= 0
  assert config.optim.min_lr == 0
  assert tuple(config.optim.no_decay_names) == ()  # cls and mask tokens are decayed.
  assert config.model.dtype == 'bfloat16' and config.model.encoder_mask_tokens is False

  data = config.dataset
  assert (data.name, data.image_size, data.channels) == ('imagenet2012', 224, 3)
  assert tuple(data.mean) == (0.485, 0.456, 0.406) and tuple(data.std) == (0.229, 0.224, 0.225)
  assert tuple(data.crop_scale) == (0.2, 1.0)
  assert data.crop_ratio == pytest.approx((3 / 4, 4 / 3))

  # The model the trainer builds: the reference encoder and an 8 x 512 decoder.
  kwargs = models.model_kwargs(config.model.name, **{k: v for k, v in config.model.items() if k != 'name'})
  reference = {'B/16': (16, 768, 12, 12), 'L/16': (16, 1024, 24, 16), 'H/14': (14, 1280, 32, 16)}
  assert (kwargs['patch_size'], kwargs['embed_dim'], kwargs['depth'], kwargs['num_heads']) == reference[variant]
  assert (kwargs['decoder_embed_dim'], kwargs['decoder_depth'], kwargs['decoder_num_heads']) == (512, 8, 16)
  assert models.num_visible((224 // kwargs['patch_size']) ** 2, config.mask_ratio) == (
      49 if variant != 'H/14' else 64)

  # Per-step schedule: linear warmup over 40 epochs from 0, cosine to 0.
  steps_per_epoch = IMAGENET_TRAIN // config.batch_size
  lr_fn, total = lr_schedule(config, steps_per_epoch)
  warmup = 40 * steps_per_epoch
  assert float(lr_fn(0)) == 0
  assert float(lr_fn(warmup // 2)) == pytest.approx(1.2e-3, rel=1e-5)
  assert float(lr_fn(warmup)) == pytest.approx(2.4e-3, rel=1e-5)
  assert float(lr_fn((warmup + total) // 2)) == pytest.approx(1.2e-3, rel=1e-3)
  assert float(lr_fn(total)) == pytest.approx(0, abs=1e-9)


def test_pretrain_layouts_fit_pod_slices():
  for variant in VARIANTS:
    config = mae_pretrain.get_config(f'variant={variant}')
    for devices in (4, 8, 64, 256):  # v4-8 ... v4-512 / v5e-256 chips.
      shape = parallel.resolve_mesh_shape(config.mesh, devices)
      assert shape['data'] * shape['fsdp'] * shape['tensor'] == devices
      assert config.batch_size % (shape['data'] * shape['fsdp']) == 0
  assert mae_pretrain.get_config('variant=B/16').mesh.fsdp == 1
  assert mae_pretrain.get_config('variant=L/16').mesh.fsdp == -1
  huge = mae_pretrain.get_config('variant=H/14')
  assert not huge.model.scan_layers and huge.model.remat_policy == 'dots'
  assert huge.mesh.fsdp == -1  # FSDP: 11.4 GiB per v4 chip at batch 4096 (data-parallel: 24 GiB)


def test_pretrain_arguments_are_checked():
  with pytest.raises(ValueError, match=r"variant='L/14'.*close matches: L/16"):
    mae_pretrain.get_config('variant=L/14')
  with pytest.raises(ValueError, match=r"unknown argument 'epoch'; close matches: epochs"):
    mae_pretrain.get_config('epoch=800')
  with pytest.raises(ValueError, match='epochs=0: must be positive'):
    mae_pretrain.get_config('epochs=0')
  assert mae_pretrain.get_config().model.name == 'mae_vit_large_patch16'  # Default variant.


def test_the_base_config_refuses_an_argument_it_would_ignore():
  # A launcher example once passed configs/default.py:variant=L/16 and got the tiny Fashion-MNIST model.
  with pytest.raises(ValueError, match=r"configs/default.py: .*unknown argument 'variant'; known: runlocal.*"
                                       r'--config=configs/mae_pretrain.py:variant=L/16'):
    common.load_config('configs/default.py:variant=L/16')
  assert common.load_config('configs/default.py').model.name == 'mae_vit_tiny_patch4'
  assert common.load_config('configs/default.py:runlocal=True').model.name == common.RUNLOCAL_MODEL
  # The demo's config reads its arguments the same way: a typo is named, not ignored.
  with pytest.raises(ValueError, match=r"unknown argument 'step'; close matches: steps"):
    common.load_config('configs/demo.py:step=100')
  assert common.load_config('configs/demo.py:steps=100,data_dir=/d').num_train_steps == 100


# ----------------------------------------------------------------------------
# Fine-tuning and linear-probe recipes.

@pytest.mark.parametrize('variant,epochs,base_lr,layer_decay,drop_path', [
    ('B/16', 100, 5e-4, 0.65, 0.1), ('L/16', 50, 1e-3, 0.75, 0.2), ('H/14', 50, 1e-3, 0.75, 0.3)])
def test_finetune_recipe_matches_reference(variant, epochs, base_lr, layer_decay, drop_path):
  config = finetune.get_config(f'variant={variant}')
  assert config.downstream == 'finetune' and config.model.name == MODEL_NAMES[variant]
  assert config.num_epochs == epochs and config.batch_size == 1024
  assert config.optim.base_lr == base_lr and config.optim.layer_decay == layer_decay
  assert config.drop_path_rate == drop_path
  assert (config.optim.name, config.optim.b1, config.optim.b2) == ('adamw', 0.9, 0.999)
  assert config.optim.weight_decay == 0.05 and config.optim.min_lr == 1e-6
  assert config.optim.warmup_epochs == 5
  assert tuple(config.optim.no_decay_names) == optim.NO_DECAY_NAMES
  assert (config.randaug.num_layers, config.randaug.magnitude, config.randaug.magnitude_std) == (2, 9, 0.5)
  assert config.label_smoothing == 0.1 and config.reprob == 0.25
  assert (config.mixup, config.cutmix, config.mixup_switch_prob, config.mixup_prob) == (0.8, 1.0, 0.5, 1.0)
  assert config.global_pool is True and config.head_init_std == 2e-5 and not config.head_batchnorm
  assert config.freeze_encoder is False and config.num_classes == 1000
  assert (config.dataset.image_size, config.dataset.eval_resize) == (224, 256)
  assert config.pretrained_workdir == '' and config.pretrained_path == ''
  for key in common.PRETRAIN_ONLY_KEYS:
    assert key not in common.config_keys(config)
  # Its encoder is the pretrained one, with drop path.
  encoder = models.encoder_kwargs(config.model.name, drop_path_rate=config.drop_path_rate)
  assert encoder['drop_path_rate'] == drop_path
  # Warmup 5 epochs to base_lr * 4, cosine to 1e-6.
  lr_fn, total = lr_schedule(config, IMAGENET_TRAIN // config.batch_size)
  assert float(lr_fn(5 * (IMAGENET_TRAIN // 1024))) == pytest.approx(base_lr * 4, rel=1e-5)
  assert float(lr_fn(total)) == pytest.approx(1e-6, rel=1e-3)


@pytest.mark.parametrize('variant', VARIANTS)
def test_linprobe_recipe_matches_reference(variant):
  config = linprobe.get_config(f'variant={variant}')
  assert config.downstream == 'linprobe' and config.model.name == MODEL_NAMES[variant]
  assert config.freeze_encoder is True and config.global_pool is False
  assert config.head_batchnorm is True and config.head_batchnorm_eps == 1e-6
  assert config.head_init_std == 0.01
  assert (config.optim.name, config.optim.momentum, config.optim.trust_coefficient) == ('lars', 0.9, 0.001)
  assert config.optim.base_lr == 0.1 and math.isclose(peak_lr(config), 6.4)
  assert config.optim.weight_decay == 0 and config.optim.warmup_epochs == 10
  assert config.batch_size == 16384 and config.num_epochs == 90
  assert config.drop_path_rate == 0 and config.optim.layer_decay == 1.0
  assert config.mixup == 0 and config.cutmix == 0 and config.randaug.num_layers == 0
  assert config.label_smoothing == 0 and config.reprob == 0
  assert 'b2' not in config.optim  # Adam settings would mean nothing to LARS.
  assert config.knn.train_examples == -1  # downstream=knn: DINO's protocol, the whole train split as the bank.


# ----------------------------------------------------------------------------
# Every config file, argument strings, overrides.

@pytest.mark.parametrize('path', config_files(), ids=os.path.basename)
def test_every_config_file_builds(path):
  spec = importlib.util.spec_from_file_location('config_under_test', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for config in (module.get_config(), module.get_config('runlocal=True')):
    assert isinstance(config, ml_collections.ConfigDict)
    json.loads(config.to_json_best_effort())  # What the trainer writes as config.json.


@pytest.mark.parametrize('path', RECIPE_FILES)
@pytest.mark.parametrize('variant', VARIANTS)
def test_runlocal_shrinks_only_the_size(path, variant):
  arg = '' if path.endswith('test.py') else f'variant={variant},'
  full = common.load_config(f'{path}:{arg}runlocal=False')
  small = common.load_config(f'{path}:{arg}runlocal=True')
  assert small.model.name == common.RUNLOCAL_MODEL and small.dataset.name == 'synthetic'
  assert small.batch_size <= 16 and 0 < small.num_train_steps <= 5
  assert (small.mesh.data, small.mesh.fsdp, small.mesh.tensor) == (-1, 1, 1)
  assert small.model.dtype == 'float32'
  # The recipe's meaning stays.
  for key in ('optim.name', 'optim.base_lr', 'optim.weight_decay', 'optim.b2', 'optim.layer_decay',
              'optim.no_decay_names', 'mask_ratio', 'norm_pix_loss', 'mixup', 'drop_path_rate',
              'downstream', 'model.scan_layers', 'model.remat_policy'):
    assert lookup(small, key) == lookup(full, key), key
  # Building a runlocal config leaves later full builds alone (no shared state edited).
  assert common.load_config(f'{path}:{arg}').to_dict() == full.to_dict()


def test_parse_arg_types_and_errors():
  arg = common.parse_arg('variant=H/14,epochs=1600,runlocal,scale=0.5,tag=x',
                         variant='L/16', epochs=800, runlocal=False, scale=1.0, tag='')
  assert (arg.variant, arg.epochs, arg.runlocal, arg.scale, arg.tag) == ('H/14', 1600, True, 0.5, 'x')
  assert common.parse_arg('runlocal=false', runlocal=True).runlocal is False
  assert common.parse_arg(None, a=1).a == 1 and common.parse_arg('', a=1).a == 1
  assert common.parse_arg('x=3', x=None).x == 3  # Untyped defaults infer the type.
  with pytest.raises(ValueError, match='runlocal=.maybe.: expected a bool'):
    common.parse_arg('runlocal=maybe', runlocal=False)
  with pytest.raises(ValueError, match='epochs=.8e2x.: expected an integer'):
    common.parse_arg('epochs=8e2x', epochs=800)
  with pytest.raises(ValueError, match="unknown argument 'varient'; close matches: variant"):
    common.parse_arg('varient=B/16', variant='L/16')
  with pytest.raises(ValueError, match="config argument 'steps' is given twice in 'steps=1,steps=2'"):
    common.parse_arg('steps=1,steps=2', steps=3)
  with pytest.raises(ValueError, match='config argument steps=0: must be >= 1'):
    common.load_config('configs/test.py:steps=0')  # Not num_train_steps=0: "train by epochs" (10 epochs).


def test_model_sizes_are_declared_and_none_leaves_the_names():
  """--config.model.embed_dim=48 (as the warm-start hints say) works; None keeps the model name's size."""
  from mae_jax.models import from_config  # pylint: disable=g-import-not-at-top
  config = common.load_config('configs/default.py')
  assert 'embed_dim' not in from_config.model_overrides(config) and config.model.embed_dim is None
  common.set_overrides(config, ['model.embed_dim=48', 'model.mlp_ratio=2', 'model.depth=3'])
  overrides = from_config.model_overrides(config)
  assert (overrides['embed_dim'], overrides['mlp_ratio'], overrides['depth']) == (48, 2.0, 3)
  assert from_config.build_mae(config).embed_dim == 48


def test_set_overrides_types_and_close_matches():
  config = common.load_config('configs/test.py')
  common.set_overrides(config, ['optim.base_lr=1e-3', 'model.decoder_depth=2', 'norm_pix_loss=false',
                                'dataset.crop_scale=(0.5, 1.0)', 'config.model.name=mae_vit_test'])
  assert config.optim.base_lr == 1e-3 and config.model.decoder_depth == 2
  assert config.norm_pix_loss is False and tuple(config.dataset.crop_scale) == (0.5, 1.0)
  common.set_overrides(config, {'mask_ratio': 0.6, 'optim.warmup_epochs': 2})
  assert config.mask_ratio == 0.6 and config.optim.warmup_epochs == 2.0
  with pytest.raises(ValueError, match=r"unknown config key 'optim.baselr'; close matches: optim.base_lr"):
    common.set_overrides(config, ['optim.baselr=1'])
  with pytest.raises(ValueError, match=r"'model.decoder_dept'; close matches: model.decoder_depth"):
    common.set_overrides(config, {'model.decoder_dept': 4})
  with pytest.raises(ValueError, match=r"unknown config key 'zzz'; known: .*batch_size"):
    common.check_keys(config, ['zzz'])
  with pytest.raises(ValueError, match='expected KEY=VALUE'):
    common.set_overrides(config, ['mask_ratio'])


def test_check_config_flags_names_close_matches(capsys, tmp_path):
  argv = ['main', '--config=configs/mae_pretrain.py:variant=B/16,runlocal=True', '--workdir=/tmp/x',
          '--config.batch_size=8', '--config.optim.baselr=1e-3', '--config.mask_ration=0.5']
  with pytest.raises(ValueError) as error:
    common.check_config_flags(argv)
  message = str(error.value)
  assert 'optim.base_lr' in message and "'mask_ration'; close matches: mask_ratio" in message
  common.check_config_flags(argv[:4])  # Known keys pass.
  common.check_config_flags(['main', '--config', 'configs/test.py', '--config.seed=1'])
  with pytest.raises(SystemExit):
    config_tools.parse_flags(argv)  # The one flag parser: every unknown key with its close matches, one line.
  err = capsys.readouterr().err
  assert err.startswith('error: --config=configs/mae_pretrain.py:variant=B/16,runlocal=True: unknown config key')
  broken = tmp_path / 'broken.py'
  broken.write_text('def get_config(arg=None):\n  return {}["model"]\n')  # A config file that fails otherwise.
  with pytest.raises(SystemExit) as stopped:
    config_tools.parse_flags(['main', f'--config={broken}', '--workdir=/tmp/x'])
  assert stopped.value.code == 2
  assert capsys.readouterr().err == f"error: --config={broken}: the config file failed: KeyError: 'model'\n"
  assert "'mask_ration'; close matches: mask_ratio" in err



def _entry_point_flags(argv, monkeypatch):
  """The --config and --workdir flags of mae_jax.main, in a FlagValues of their own (as absl's FLAGS here)."""
  flag_values = flags.FlagValues()
  monkeypatch.setattr(flags, 'FLAGS', flag_values)
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.', flag_values=flag_values,
                                  lock_config=True, sys_argv=list(argv))  # (Else --config.KEY from sys.argv.)
  flags.DEFINE_string('workdir', None, 'Work directory.', flag_values=flag_values)
  flags.mark_flags_as_required(['config', 'workdir'], flag_values=flag_values)
  return flag_values


def _parse_error(argv, capsys, monkeypatch):
  """parse_flags(argv)'s exit status and stderr."""
  _entry_point_flags(argv, monkeypatch)
  with pytest.raises(SystemExit) as stopped:
    config_tools.parse_flags(argv)
  return stopped.value.code, capsys.readouterr().err


@pytest.mark.parametrize('overrides', [(), ('--config.batch_size=8',)], ids=('plain', 'with_override'))
def test_missing_config_file_is_one_line_naming_where_it_looked(overrides, capsys, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  code, err = _parse_error(['main', '--config=configs/nope.py', '--workdir=/tmp/x', *overrides], capsys, monkeypatch)
  looked = f"{tmp_path / 'configs/nope.py'} and {os.path.join(REPO_ROOT, 'configs/nope.py')}"
  assert code == 2 and err == (f"error: --config: config file 'configs/nope.py' not found "
                               f"(looked for {looked})\n")


def test_missing_flag_file_is_one_line(capsys, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  argv = ['main', '--flagfile=nope.txt', '--workdir=/tmp/x']
  _entry_point_flags(argv[:1], monkeypatch)
  with pytest.raises(SystemExit) as stopped:
    config_tools.parse_flags(argv)
  code, err = stopped.value.code, capsys.readouterr().err
  assert code == 2
  assert err == "error: --flagfile: Unable to open flagfile: [Errno 2] No such file or directory: 'nope.txt'\n"
  monkeypatch.setattr(sys, 'argv', argv)  # ml_collections reads flag files in sys.argv when it defines --config.
  monkeypatch.setattr(flags, 'FLAGS', flags.FlagValues())
  with pytest.raises(SystemExit) as stopped:
    config_tools.define_config_flag('Experiment config file.', lock_config=True)
  assert stopped.value.code == 2 and capsys.readouterr().err == err


def test_missing_config_file_from_the_command_line(tmp_path):
  """`python -m mae_jax.main` with a config file that does not exist and an override: one line, exit 2."""
  command = [sys.executable, '-m', 'mae_jax.main', '--config=configs/nope.py', f'--workdir={tmp_path}/w',
             '--config.batch_size=8']
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO_ROOT)
  done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 2, done.stderr[-2000:]
  assert done.stderr.strip().splitlines() == [
      "error: --config: config file 'configs/nope.py' not found "
      f"(looked for {os.path.join(REPO_ROOT, 'configs/nope.py')})"]


def test_config_flag_looks_in_the_repository_root_as_load_module_does(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # Not the repository root: configs/test.py is not under the cwd.
  spec = 'configs/test.py'
  assert common.load_config(spec) is not None  # What the launchers' checks accept ...
  (tmp_path / 'flags.txt').write_text(f'--config={spec}\n--config.seed=5\n')
  for argv in (['main', f'--config={spec}', '--workdir=/tmp/x', '--config.seed=5'],  # ... the trainer's flag
               ['main', '--config', spec, '--workdir=/tmp/x', '--config.seed=5'],  # accepts too, both spellings,
               ['main', '--flagfile=flags.txt', '--workdir=/tmp/x']):  # and in a flag file.
    flag_values = _entry_point_flags(argv, monkeypatch)
    config_tools.parse_flags(argv)
    assert flag_values.config.seed == 5 and flag_values.config.model.name == 'mae_vit_test'
  (tmp_path / 'configs').mkdir()  # A file under the cwd comes first.
  (tmp_path / 'configs/test.py').write_text(
      'import ml_collections\ndef get_config():\n  return ml_collections.ConfigDict({"seed": 7})\n')
  argv = ['main', f'--config={spec}', '--workdir=/tmp/x']
  flag_values = _entry_point_flags(argv, monkeypatch)
  config_tools.parse_flags(argv)
  assert flag_values.config.seed == 7 and common.load_config(spec).seed == 7


@pytest.mark.parametrize('args,message', [
    (('--config.optim.base_lr=abc', '--config.seed=3'),
     "flag --config.optim.base_lr=abc: could not convert string to float: 'abc'"),
    (('--config.seed=3', '--config.model.scan_layers=maybe'),
     'flag --config.model.scan_layers=maybe: Non-boolean argument to boolean flag: maybe'),
    (('--config.seed=3', '--config.mesh.data'), 'Missing value for flag --config.mesh.data'),
], ids=('float', 'bool', 'missing_value'))
def test_bad_override_value_names_that_flag_only(args, message, capsys, monkeypatch):
  code, err = _parse_error(['main', '--config=configs/test.py', '--workdir=/tmp/x', *args], capsys, monkeypatch)
  assert code == 2 and err == f'error: {message}\n'


def test_missing_required_flags_are_named(capsys, monkeypatch):
  assert _parse_error(['main', '--config=configs/test.py'], capsys, monkeypatch) == (
      2, 'error: --workdir is required\n')
  assert _parse_error(['main'], capsys, monkeypatch) == (2, 'error: --config and --workdir are required\n')

# ----------------------------------------------------------------------------
# runlocal runs.

@pytest.mark.parametrize('variant', VARIANTS)
def test_pretrain_runlocal_trains(variant, tmp_path, jit_cache):
  del jit_cache
  from mae_jax import train  # pylint: disable=g-import-not-at-top
  config = mae_pretrain.get_config(f'variant={variant},runlocal=True')
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result['status'] == 'done' and result['step'] == common.RUNLOCAL_STEPS
  assert math.isfinite(result['train/loss'])
  steps = [r['step'] for r in metrics.read_metrics(str(tmp_path))]
  assert steps == list(range(1, common.RUNLOCAL_STEPS + 1))


@pytest.mark.parametrize('recipe', (finetune, linprobe), ids=('finetune', 'linprobe'))
def test_downstream_runlocal_trains(recipe, tmp_path, jit_cache):
  del jit_cache
  from mae_jax import downstream  # pylint: disable=g-import-not-at-top
  config = recipe.get_config('variant=B/16,runlocal=True')
  result = downstream.train_and_evaluate(config, str(tmp_path))
  assert result['status'] == 'done' and result['step'] == common.RUNLOCAL_STEPS


@pytest.mark.parametrize('steps', [1, 4, 600])
def test_demo_schedule_fits_any_step_count(steps):
  from configs import demo  # pylint: disable=g-import-not-at-top
  from mae_jax import optim  # pylint: disable=g-import-not-at-top
  config = demo.get_config(f'steps={steps}')
  assert 1 <= config.optim.warmup_steps <= steps and 1 <= config.log_every_steps <= steps
  optim.create_optimizer(config.optim, global_batch=config.batch_size, steps_per_epoch=234, total_steps=steps)
  if steps == 600:
    assert config.optim.warmup_steps == 50 and config.log_every_steps == 50  # the README demo's schedule


@pytest.mark.parametrize('load', [lambda: mae_pretrain.get_config('variant=B/16'),
                                  lambda: finetune.get_config('variant=B/16'),
                                  lambda: linprobe.get_config('variant=B/16,runlocal=True')])
def test_a_config_file_that_sets_an_undeclared_key_fails_naming_it(load):
  """A config file building on a recipe with a typo (`config.optim.lr` for base_lr) trained with the key ignored:
  the recipes lock their keys, so setting an undeclared one fails where it is set; declared ones still change."""
  config = load()
  config.optim.base_lr = 1e-3
  config.model.name = config.model.name
  with pytest.raises(AttributeError, match='Key "lr" does not exist'):
    config.optim.lr = 1e-3
  with pytest.raises(AttributeError, match='Key "mask_ratoi" does not exist'):
    config.mask_ratoi = 0.5


def test_a_config_file_with_an_undeclared_key_is_one_line_naming_it(tmp_path):
  path = tmp_path / 'typo.py'
  path.write_text('from configs import test\n\n\ndef get_config(arg=None):\n  config = test.get_config(arg)\n'
                  '  config.optim.base_lrr = 1e-3\n  return config\n')
  with pytest.raises(ValueError, match=r"--config=.*typo.py: the config file sets a key its base config does not "
                                       r"declare: unknown key 'base_lrr'; close matches: base_lr"):
    config_tools.check_config_flags(['main', f'--config={path}'])
