"""Every config key the package reads is declared, once, in the config files of its trainer.

The trainers read `config.key` (never `config.get(key, default)`), so a key
that is not declared fails at once; this test finds every read in the source
and checks it against the configs that reach that code, so a missing
declaration is caught here rather than in a user's run.
"""

import os
import re
import subprocess
import sys
import tokenize

import ml_collections
import pytest

from configs import common
from configs import default as default_config
from configs import finetune as finetune_recipe
from configs import linprobe as linprobe_recipe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    'pretrain': lambda: default_config.get_config(),
    'finetune': lambda: finetune_recipe.get_config('variant=B/16'),
    'linprobe': lambda: linprobe_recipe.get_config('variant=B/16'),
}
# The configs whose runs reach each module's config reads.
MODULE_CONFIGS = {
    'mae_jax/loop.py': ('pretrain', 'finetune', 'linprobe'),
    'mae_jax/train_state.py': ('pretrain', 'finetune', 'linprobe'),
    'mae_jax/train.py': ('pretrain',),
    'mae_jax/pretrain_step.py': ('pretrain',),
    'mae_jax/data/__init__.py': ('pretrain', 'finetune', 'linprobe'),
    'mae_jax/knn.py': ('pretrain', 'finetune', 'linprobe'),
    'mae_jax/supervised.py': ('finetune', 'linprobe'),
    'mae_jax/finetune.py': ('finetune',),
    'mae_jax/linprobe.py': ('linprobe',),
    'mae_jax/models/from_config.py': ('finetune',),
    'mae_jax/weights/pretrained.py': ('finetune', 'linprobe'),
    'mae_jax/data/inputs.py': ('finetune', 'linprobe'),
    'mae_jax/optim.py': ('pretrain', 'finetune'),  # linprobe (LARS) lacks Adam's b1 / b2: test_optim.
    'mae_jax/parallel.py': ('pretrain', 'finetune', 'linprobe'),
    'mae_jax/aot.py': ('pretrain',),
}
# Methods of ConfigDict, not keys.
METHODS = {'get', 'items', 'keys', 'values', 'to_dict', 'to_json', 'to_json_best_effort', 'update', 'lock',
           'unlock', 'copy_and_resolve_references'}
# The names config sections go by in the package, and where they sit in the config.
SECTIONS = {'config': '', 'optim_config': 'optim.', 'mesh_config': 'mesh.'}
READ = re.compile(r'(?<![\w.])(config|optim_config|mesh_config)((?:\.[A-Za-z_][A-Za-z0-9_]*)+)')
ITEM = re.compile(r"(?<![\w.])(config|optim_config|mesh_config)\[['\"]([A-Za-z_][A-Za-z0-9_]*)['\"]\]")


def config_reads(path: str) -> set[str]:
  """The dotted keys `path` reads from a variable named config (config.a.b, config['a'])."""
  with open(os.path.join(REPO, path), encoding='utf-8') as f:
    tokens = list(tokenize.generate_tokens(f.readline))
  # Code only: docstrings, strings and comments may say 'config.json'. Item reads keep their strings.
  source = ' '.join(t.string for i, t in enumerate(tokens)
                    if t.type != tokenize.COMMENT and (t.type != tokenize.STRING or tokens[i - 1].string == '['))
  source = re.sub(r'\s*([.\[\]])\s*', r'\1', source)
  keys = set()
  for match in READ.finditer(source):
    parts = match.group(2).lstrip('.').split('.')
    while parts and parts[-1] in METHODS:
      parts.pop()
    if parts:
      keys.add(SECTIONS[match.group(1)] + '.'.join(parts))
  keys.update(SECTIONS[name] + key for name, key in ITEM.findall(source))
  return keys


def test_the_scan_finds_reads():
  """The scan itself sees attribute and item reads and drops ConfigDict methods."""
  reads = config_reads('mae_jax/finetune.py')
  assert {'mixup_mode', 'dataset.eval_split', 'label_smoothing', 'grad_accum_steps'} <= reads
  assert not any(key.endswith(('.get', '.to_dict')) for key in reads)
  assert {'optim.b1', 'optim.layer_decay', 'optim.no_decay_names'} <= config_reads('mae_jax/optim.py')
  assert {'mesh.dcn_data', 'mesh.rules', 'mesh.num_devices'} <= config_reads('mae_jax/parallel.py')


@pytest.mark.parametrize('path', sorted(MODULE_CONFIGS))
def test_every_key_the_code_reads_is_declared(path):
  reads = config_reads(path)
  assert reads, f'{path}: no config reads found; is it still in the right place?'
  for name in MODULE_CONFIGS[path]:
    known = set(common.config_keys(CONFIGS[name]()))
    missing = sorted(key for key in reads if key not in known)
    assert not missing, f'{path} reads {missing}, which configs for {name} do not declare'


def test_the_package_never_reads_a_config_with_a_default():
  """config.get(key, default) would hide an undeclared key behind a second, silent default."""
  offenders = []
  for root, _, files in os.walk(os.path.join(REPO, 'mae_jax')):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(root, name)
        with open(path, encoding='utf-8') as f:
          for number, line in enumerate(f, 1):
            if re.search(r'\b(config|optim_config|mesh_config)(\.[A-Za-z_]+)*\.get\(', line):
              offenders.append(f'{os.path.relpath(path, REPO)}:{number}: {line.strip()}')
  assert not offenders, '\n'.join(offenders)


def test_downstream_configs_declare_what_the_pretraining_base_lacks():
  for name in ('finetune', 'linprobe'):
    config = CONFIGS[name]()
    assert isinstance(config, ml_collections.ConfigDict)
    for key in ('eval_batch_size', 'probe_cached_features', 'pretrained_workdir', 'head_init_std',
                'global_pool', 'head_batchnorm', 'randaug.num_layers', 'knn.k'):
      assert key in common.config_keys(config), (name, key)
  assert finetune_recipe.get_config().head_init_std == 2e-5
  assert linprobe_recipe.get_config().head_init_std == 0.01


def test_eval_batch_size_is_a_flag_of_the_finetune_config(tmp_path):
  """The command line takes --config.eval_batch_size=8 (the run then stops at a setting checked before compile)."""
  command = [sys.executable, '-m', 'mae_jax.main', '--config=configs/finetune.py:variant=B/16,runlocal=True',
             '--config.eval_batch_size=8', '--config.num_train_steps=0', '--config.num_epochs=0',
             f'--workdir={tmp_path}']
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert 'bad flags' not in done.stderr, done.stderr[-2000:]
  assert 'num_train_steps and num_epochs are both <= 0' in done.stderr, done.stderr[-2000:]
  bad = subprocess.run([a.replace('eval_batch_size', 'eval_bach_size') for a in command], cwd=REPO,
                       capture_output=True, text=True, timeout=300, check=False)
  assert bad.returncode == 2 and "'eval_bach_size'; close matches: eval_batch_size" in bad.stderr, bad.stderr
