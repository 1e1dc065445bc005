"""Input pipeline: data sources, preprocessing, augmentation, per-process iterators.

Import the submodules directly (they load TensorFlow):

* `inputs`: config -> input, the trainers' entry points (num_train_examples,
  create_pretrain_iterator, create_train_iterator, create_eval_iterator, ...).
* `input_pipeline`: tfds -> tf.data -> per-process batches
  (create_pretrain_iterator, create_eval_iterator, num_examples, dataset_info),
  built from `records` (reading records in pieces, per-epoch order) and
  `corrupt` (surviving undecodable images).
* `synthetic`: in-memory sources for tests, benchmarks and runlocal.
* `preprocess` (decode, crop, resize, normalise), `augment` (RandAugment,
  random erasing, mixup / CutMix, label smoothing), `sources` (config.dataset
  and the TFDS builder) and `prepare` (the prepare command).

This package itself loads no TensorFlow: it holds ImageNet's statistics and
`image_shape`, which the train steps read.
"""

# ImageNet's per-channel statistics in [0, 1] pixel units: the reference's normalisation, and what
# weights whose metadata names no data set are shown with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_shape(config) -> tuple[int, int, int]:
  """(height, width, channels) of the model's input: dataset.image_size is a side or (height, width)."""
  size = config.dataset.image_size
  height, width = (size, size) if isinstance(size, int) else tuple(size)
  return int(height), int(width), int(config.dataset.channels)
