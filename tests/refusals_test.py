"""Bad input refused before any work, in one line naming the value: numeric config fields (finite, in range), config
files that cannot be loaded, sampling settings that cannot give an image, prompt words the tokenizer cannot read."""

import pytest

from configs import debug
from rflow_jax import config_lib
from rflow_jax.model import text_encoders

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("field, value, message", [
    ("optim.learning_rate", -1e-4, "optim.learning_rate=-0.0001 must be positive and finite"),
    ("optim.learning_rate", NAN, "optim.learning_rate=nan must be positive and finite"),
    ("optim.learning_rate", INF, "optim.learning_rate=inf must be positive and finite"),
    ("optim.b1", 1.0, "optim.b1=1.0 must be in [0, 1)"),
    ("optim.b2", -0.1, "optim.b2=-0.1 must be in [0, 1)"),
    ("optim.eps", 0.0, "optim.eps=0.0 must be positive and finite"),
    ("optim.weight_decay", -0.1, "optim.weight_decay=-0.1 must be >= 0 and finite"),
    ("optim.grad_clip_norm", NAN, "optim.grad_clip_norm=nan must be >= 0 and finite"),
    ("optim.ema_decay", 1.0, "optim.ema_decay=1.0 must be in [0, 1)"),
    ("data.image_size", 0, "data.image_size=0 must be positive"),
    ("data.num_records", 0, "data.num_records=0 must be positive"),
    ("model.hidden_size", 0, "model.hidden_size=0 must be positive"),
    ("model.depth", 0, "model.depth=0 must be positive"),
    ("model.num_heads", -2, "model.num_heads=-2 must be positive"),
    ("model.patch_size", 0, "model.patch_size=0 must be positive"),
    ("model.mlp_ratio", NAN, "model.mlp_ratio=nan must be positive and finite"),
    ("text.width", 0, "text.width=0 must be positive"),
    ("text.depth", 0, "text.depth=0 must be positive"),
    ("text.num_heads", 0, "text.num_heads=0 must be positive"),
    ("text.max_length", 2, "text.max_length=2 must be >= 3"),
    ("flow.shift", 0.0, "flow.shift=0.0 must be positive and finite"),
    ("sample.cfg_scale", NAN, "sample.cfg_scale=nan must be >= 0 and finite"),
    ("sample.cfg_scale", INF, "sample.cfg_scale=inf must be >= 0 and finite"),
    ("sample.shift", INF, "sample.shift=inf must be positive and finite"),
    ("sample.num_steps", -3, "sample.num_steps=-3 must be positive"),
    ("train.peak_tflops_per_device", -1.0, "train.peak_tflops_per_device=-1.0 must be >= 0 and finite"),
])
def test_numeric_fields_out_of_range_are_refused_naming_the_value(field, value, message):
  config = debug.get_config()
  section, leaf = field.split(".")
  config[section][leaf] = value
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  assert message in str(e.value)
  if section == "sample":  # The sampling CLIs' overrides go through the same check.
    with pytest.raises(config_lib.ConfigError, match=field.replace(".", r"\.")):
      config_lib.validate_sampling(config.sample)


@pytest.mark.parametrize("text, message", [
    ("def get_config(:\n", "has a syntax error at line 1"),
    ("X = 1\n", "defines no get_config() function"),
    (None, "no such file"),
])
def test_config_files_that_cannot_load_are_one_line(tmp_path, text, message):
  path = tmp_path / "c.py"
  if text is not None:
    path.write_text(text)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.check_config_file(["main", f"--config={path}:arg", "--workdir=w"])
  assert f"--config='{path}'" in str(e.value) and message in str(e.value)
  config_lib.check_config_file(["main", "--config=configs/debug.py"])  # A good file passes.


def test_prompt_words_the_tokenizer_cannot_represent_are_named():
  tokenizer = text_encoders.WordTokenizer(max_length=6)
  assert tokenizer.problems("a red circle") == []
  assert tokenizer.problems("a purple hexagon") == [
      "words not in the vocabulary, read as <unk>: purple, hexagon"]
  assert tokenizer.problems("a red circle left of a blue square") == [
      "cut at text.max_length=6 (4 words): 'of a blue square' is dropped"]
