"""The demo's config and its closing words (the whole demo is minutes: run `python -m mae_jax.demo`)."""

from configs import demo as demo_config
from mae_jax import demo


def test_demo_config_trains_on_plain_pixels_with_the_knn_monitor_on():
  config = demo_config.get_config('steps=40,data_dir=/data')
  assert config.norm_pix_loss is False  # Plain pixel targets: a recognisable reconstruction picture.
  assert config.num_train_steps == 40 and config.eval_every_steps == 10  # Four kNN evaluations, the last at the end.
  assert config.knn.pool == 'mean' and config.dataset.data_dir == '/data'
  for steps in (40, 650, 7):  # Four evaluations at most, at a period's end or the last step, spread out.
    every = demo_config.get_config(f'steps={steps}').eval_every_steps
    evaluated = sorted({s for s in range(1, steps + 1) if s % every == 0} | {steps})
    assert len(evaluated) <= 4 and min(b - a for a, b in zip(evaluated, evaluated[1:])) >= every // 2, evaluated


def test_summary_says_how_the_features_compare_with_raw_pixels_and_where_to_look(tmp_path):
  config = demo_config.get_config('steps=600')
  result = {'step': 600, 'status': 'done', 'train/loss': 0.2345}
  history = [(150, 0.702), (600, 0.781)]
  lines = demo.summary(config, str(tmp_path), result, history, 0.809, str(tmp_path / 'reconstructions.png'))
  text = '\n'.join(lines)
  assert lines[0] == 'Done: 600 steps of 256 images.'
  assert '0.234 (mean squared' in text
  assert 'bank: 10,000 training images, queries: 5,000 test images' in text
  assert '78.1% at step 600 (from 70.2% at step 150)' in text
  assert '80.9%  -> the features are below raw pixels' in text
  assert f'tensorboard --logdir {tmp_path}' in text and str(tmp_path / 'reconstructions.png') in text
  above = '\n'.join(demo.summary(config, str(tmp_path), result, history, 0.75, 'p.png'))
  assert 'the features are above raw pixels' in above and 'BENCHMARKS' not in above
  assert len(lines) < 12  # The demo's whole terminal output stays under 40 lines.


def test_summary_of_a_run_that_trained_nothing_names_no_accuracy(tmp_path):
  config = demo_config.get_config('steps=600')
  lines = demo.summary(config, str(tmp_path), {'step': 600, 'status': 'done'}, [], 0.8, 'p.png')
  assert not any('accuracy' in line for line in lines)
  assert lines[0] == ('The finished run (600 steps of 256 images) is shown again. For a new run: '
                      '--workdir=ANOTHER_FOLDER; to train further: --steps=MORE.')
  stopped = demo.summary(config, str(tmp_path), {'step': 200, 'status': 'preempted'}, [], 0.8, 'p.png')
  assert stopped[0] == 'Stopped at step 200 of 600 (preempted): run the same command again to resume.'


def test_the_tensorboard_command_works_without_an_activated_venv(tmp_path, monkeypatch):
  venv_bin = tmp_path / 'venv' / 'bin'
  venv_bin.mkdir(parents=True)
  (venv_bin / 'tensorboard').write_text('#!/bin/sh\n')
  (venv_bin / 'tensorboard').chmod(0o755)
  monkeypatch.setattr(demo.sys, 'executable', str(venv_bin / 'python'))
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(demo.shutil, 'which', lambda name: None)  # The venv is not on PATH.
  assert demo.tensorboard_command() == 'venv/bin/tensorboard'
  monkeypatch.setattr(demo.shutil, 'which', lambda name: '/usr/bin/' + name)  # It is.
  assert demo.tensorboard_command() == "tensorboard"
