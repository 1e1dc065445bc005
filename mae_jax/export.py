"""Command line of weight export and conversion; the library is `mae_jax.weights`.

  python -m mae_jax.export --workdir=DIR [--step=N] --format=hf --out=PATH [--full]
  python -m mae_jax.export --import_from=FILE [--model=NAME] --format=orbax --out=PATH

--workdir exports a training run's params (its newest checkpoint, or --step);
--import_from converts an export, a reference .pth, a safetensors file or a
Hugging Face folder into another format. Formats: orbax, safetensors (reference
/ timm names), hf (a transformers ViTMAE folder); see `mae_jax.weights.files`.
"""

import os

from absl import app, flags

from mae_jax import checkpoint, console, fileio
from mae_jax.models import from_config
from mae_jax.weights import FORMATS, export_weights, layout, metadata_path, read_metadata, reference
from mae_jax.weights.files import check_out, load_weights, parse_overrides


def model_from_config(run_config: dict) -> tuple[str, dict]:
  """(model name, overrides) of the config dict a run saved, as the trainers build the model."""
  if not (run_config.get('model') or {}).get('name'):
    raise ValueError('the checkpoint config has no model.name: pass --model= with --import_from instead')
  return from_config.model_name(run_config), from_config.model_overrides(run_config, strict=False)


def export_from_workdir(workdir: str, fmt: str, out: str, *, step: int | None = None,
                        full: bool = False, overwrite: bool = False) -> str:
  """Restores a run's params (mae_jax.checkpoint.load_params) and exports them."""
  check_out(out, fmt, overwrite)  # Before a restore that may take minutes.
  params, run_config = checkpoint.load_params(workdir, step=step)
  if step is None:
    step = checkpoint.latest_step(workdir)
  tree = layout.plain(params)
  tree = tree.get('params', tree)
  if 'encoder' not in tree:
    source = run_config.get('pretrained_workdir') or run_config.get('pretrained_path')
    raise ValueError(f'--workdir={workdir}: its checkpoint holds no encoder (params {sorted(tree)}): '
                     'a linear probe trains its head on a frozen encoder and saves the head alone; export the '
                     'encoder it probed' + (f' ({source})' if source else ''))
  name, overrides = model_from_config(run_config)
  metadata = {'step': step, 'config': run_config, 'workdir': os.fspath(fileio.path(workdir)),
              'mask_ratio': run_config.get('mask_ratio', 0.75)}
  return export_weights(params, name, fmt, out, encoder_only=not full, metadata=metadata,
                        model_overrides=overrides, overwrite=overwrite)


def convert(source: str, fmt: str, out: str, *, model_name: str | None = None, full: bool = False,
            overwrite: bool = False, **model_overrides) -> str:
  """Imports a .pth / safetensors / hf / orbax export and writes it in another format."""
  check_out(out, fmt, overwrite)
  params, model_name, model_overrides = load_weights(source, model_name, **model_overrides)
  if 'encoder' in params:  # (An --override=image_size= asked for another grid than the file's fixed table.)
    params = {**params, 'encoder': reference.without_fixed_table(params['encoder'])}
  meta = read_metadata(source) or {}
  if full and 'decoder' not in params and 'head' not in params:
    raise ValueError(f'--full: {source} has no decoder; drop --full to export the encoder')
  extra = {'converted_from': source if fileio.is_remote(source) else os.path.abspath(source),
           'step': meta.get('step'), 'config': meta.get('config')}
  return export_weights(params, model_name, fmt, out, encoder_only=not full, metadata=extra,
                        model_overrides=model_overrides, overwrite=overwrite)


def _define_flags():
  console.define_flags()  # --verbose.
  flags.adopt_module_key_flags(console)  # Listed by --help.
  flags.DEFINE_string('workdir', None, 'Training workdir whose Orbax checkpoint is exported.')
  flags.DEFINE_integer('step', None, 'Checkpoint step; default: the latest.')
  flags.DEFINE_string('import_from', None, 'Instead of --workdir: a .pth / .safetensors / hf / orbax path.')
  flags.DEFINE_string('model', None, 'Model name for --import_from (default: from its metadata).')
  flags.DEFINE_multi_string('override', [], 'With --import_from: a model field KEY=VALUE (repeatable), e.g. '
                            'image_size=448, in_channels=4; default: the metadata\'s, else what the file shows.')
  flags.DEFINE_enum('format', None, list(FORMATS), 'Output format.')
  flags.DEFINE_string('out', None, 'Output folder (orbax, hf) or .safetensors file.')
  flags.DEFINE_bool('full', False, 'Export the decoder too (default: encoder only).')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing --out.')
  flags.mark_flags_as_required(['format', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  flag_values = flags.FLAGS
  console.setup('export', flag_values.workdir, reads_only=True)  # Orbax's INFO lines to a log file (--verbose: here).
  console.start_backends()  # A stray libtpu's probe errors to the log file.
  if bool(flag_values.workdir) == bool(flag_values.import_from):
    raise app.UsageError('pass exactly one of --workdir and --import_from')
  if flag_values.workdir and flag_values.override:
    raise app.UsageError('--override goes with --import_from: a --workdir run\'s model is in its config')
  try:
    if flag_values.workdir:
      out = export_from_workdir(flag_values.workdir, flag_values.format, flag_values.out,
                                step=flag_values.step, full=flag_values.full, overwrite=flag_values.overwrite)
    else:
      out = convert(flag_values.import_from, flag_values.format, flag_values.out, model_name=flag_values.model,
                    full=flag_values.full, overwrite=flag_values.overwrite,
                    **parse_overrides(flag_values.override))
  except (ValueError, TypeError, FileExistsError, FileNotFoundError, ImportError, fileio.StorageError,
          checkpoint.CheckpointReadError) as e:
    console.exit_on_error(e, 'mae_jax.export')  # A user error: one line; the traceback in the log.
  print(f'wrote {out} (metadata: {metadata_path(out)})')


def run():
  _define_flags()
  app.run(main)


if __name__ == '__main__':
  run()
