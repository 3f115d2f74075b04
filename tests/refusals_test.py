"""Bad input refused before any work, in one line naming the value: numeric config fields (finite, in range), config
files that cannot be loaded, sampling settings that cannot give an image, prompt words the tokenizer cannot read."""

import re

import pytest

from configs import debug
from rflow_jax import config_lib
from rflow_jax.model import text_encoders

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "field, value",
    [("sample.cfg_scale", NAN), ("sample.cfg_scale", INF), ("sample.shift", INF), ("sample.num_steps", -3)],
)
def test_sampling_overrides_that_cannot_give_an_image_are_refused(field, value):
  # The sampling CLIs' --steps/--cfg go through validate_sampling only (the config file's numbers are in
  # configs_test.py::test_bad_values_fail_validation_with_the_value_named).
  config = debug.get_config()
  config.sample[field.split(".")[1]] = value
  with pytest.raises(config_lib.ConfigError, match=field.replace(".", r"\.") + "=" + re.escape(repr(value))):
    config_lib.validate_sampling(config.sample)


@pytest.mark.parametrize(
    "text, message",
    [
        ("def get_config(:\n", "has a syntax error at line 1"),
        ("X = 1\n", "defines no get_config() function"),
        (None, "no such file"),
    ],
)
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
  assert tokenizer.problems("a purple hexagon") == ["words not in the vocabulary, read as <unk>: purple, hexagon"]
  assert tokenizer.problems("a red circle left of a blue square") == [
      "cut at text.max_length=6 (4 words): 'of a blue square' is dropped"
  ]
