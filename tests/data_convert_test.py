"""rflow_jax.data.convert and the arrayrecord source: round trips, restart after a crash, bad inputs, training."""

import io
import json
import os
import struct
import tarfile
import zlib

import grain
import numpy as np
import pytest
from PIL import Image

import cli_util
from configs import debug
from rflow_jax.data import arrayrecord, convert, ingest, records, registry, shapes


def _png(array, mode=None) -> bytes:
  out = io.BytesIO()
  Image.fromarray(array, mode).save(out, format="PNG")
  return out.getvalue()


def _jpeg(array) -> bytes:
  out = io.BytesIO()
  Image.fromarray(array).save(out, format="JPEG", quality=90)
  return out.getvalue()


def _png_rgb16(array) -> bytes:
  """A 16-bit-per-channel RGB PNG (Pillow cannot write one), written from the PNG specification."""
  height, width, _ = array.shape
  raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _write(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


def _read_all(out):
  """Every record of a converted dataset, in global index order."""
  manifest = records.load_manifest(out)
  paths = [os.path.join(out, s["file"]) for s in manifest["shards"] if s["num_records"]]
  source = grain.sources.ArrayRecordDataSource(paths)
  return manifest, [records.decode_record(source[i]) for i in range(len(source))]


_RNG = np.random.default_rng(0)
_RGB = [_RNG.integers(0, 256, (12 + i, 16, 3), dtype=np.uint8) for i in range(4)]
_GRAY16 = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)
_RGB16 = _RNG.integers(0, 65536, (8, 8, 3), dtype=np.uint16)
_RGBA = np.zeros((16, 16, 4), np.uint8)
_RGBA[:8] = (10, 20, 30, 255)  # Top half opaque; the bottom half transparent, so white after conversion.


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """An imagefolder: metadata.jsonl captions, a .txt caption in a subfolder, grayscale, 16-bit, RGBA, JPEG."""
  root = str(tmp_path_factory.mktemp("folder"))
  _write(f"{root}/a.png", _png(_RGB[0]))
  _write(f"{root}/b.png", _png(_RGB[1]))
  _write(f"{root}/c.jpg", _jpeg(_RGB[2]))
  _write(f"{root}/gray16.png", _png(_GRAY16))
  _write(f"{root}/gray.png", _png(_RGB[3][..., 0]))
  _write(f"{root}/rgba.png", _png(_RGBA))
  _write(f"{root}/rgb16.png", _png_rgb16(_RGB16))
  _write(f"{root}/sub/d.png", _png(_RGB[3]))
  _write(f"{root}/sub/d.txt", " a caption from a text file \n".encode())
  lines = [
      {"file_name": n, "text": f"caption of {n} ünïcode"}
      for n in ("a.png", "b.png", "c.jpg", "gray16.png", "gray.png", "rgb16.png", "rgba.png")
  ]
  _write(f"{root}/metadata.jsonl", "".join(json.dumps(line) + "\n" for line in lines).encode())
  return root


def test_imagefolder_round_trip_and_pixel_policy(folder, tmp_path):
  manifest = convert.convert(convert.Options("imagefolder", folder, str(tmp_path), records_per_shard=3))
  manifest_again, recs = _read_all(str(tmp_path))
  assert manifest == manifest_again
  assert [r["key"] for r in recs] == [
      "a.png",
      "b.png",
      "c.jpg",
      "gray.png",
      "gray16.png",
      "rgb16.png",
      "rgba.png",
      "sub/d.png",
  ]
  assert manifest["num_records"] == 8 and [s["num_records"] for s in manifest["shards"]] == [3, 3, 2]
  assert [s["first_index"] for s in manifest["shards"]] == [0, 3, 6]
  for s in manifest["shards"]:
    assert records.sha256_file(os.path.join(tmp_path, s["file"])) == s["sha256"]
  assert manifest["caption_field"] == "text" and manifest["num_bad_records"] == 0
  by_key = {r["key"]: r for r in recs}
  # 8-bit RGB files keep their exact bytes; captions are exact (stripped).
  for name in ("a.png", "b.png", "c.jpg", "sub/d.png"):
    with open(os.path.join(folder, name), "rb") as f:
      assert by_key[name]["image"] == f.read()
    assert by_key[name]["source_mode"] == "RGB"
  assert by_key["c.jpg"]["image_format"] == "JPEG"
  assert by_key["a.png"]["caption"] == "caption of a.png ünïcode"
  assert by_key["sub/d.png"]["caption"] == "a caption from a text file"
  assert (by_key["b.png"]["width"], by_key["b.png"]["height"]) == (16, 13)
  np.testing.assert_array_equal(records.decode_image(by_key["a.png"]), _RGB[0])
  # Grayscale: replicated to three channels.
  np.testing.assert_array_equal(records.decode_image(by_key["gray.png"]), np.repeat(_RGB[3][..., :1], 3, axis=-1))
  # 16-bit: scaled x * 255 / 65535 with rounding, not clipped at 255 (x = 257 k maps exactly to k).
  expected = np.repeat((_GRAY16 // 257).astype(np.uint8)[..., None], 3, axis=-1)
  np.testing.assert_array_equal(records.decode_image(by_key["gray16.png"]), expected)
  assert by_key["gray16.png"]["source_mode"] == "I;16" and by_key["gray16.png"]["image_format"] == "PNG"
  # 16-bit RGB: Pillow's decoder keeps the high byte; the record says where it came from.
  np.testing.assert_array_equal(records.decode_image(by_key["rgb16.png"]), (_RGB16 >> 8).astype(np.uint8))
  assert by_key["rgb16.png"]["source_mode"] == "RGB;16"
  # RGBA: composited over white.
  rgba = records.decode_image(by_key["rgba.png"])
  assert (rgba[:8] == (10, 20, 30)).all() and (rgba[8:] == 255).all()


def test_webdataset_round_trip(tmp_path):
  samples = [
      ("00000", "jpg", _jpeg(_RGB[0]), "txt", b"first caption"),
      ("00001", "png", _png(_RGB[1]), "json", json.dumps({"caption": "from json", "url": "x"}).encode()),
      ("00002", "jpg", _jpeg(_RGB[2]), "txt", b"third"),
  ]
  for t, part in enumerate((samples[:2], samples[2:])):
    with tarfile.open(tmp_path / f"{t:05d}.tar", "w") as tar:
      for key, image_ext, image, caption_ext, caption in part:
        for ext, data in ((image_ext, image), (caption_ext, caption)):
          info = tarfile.TarInfo(f"{key}.{ext}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
  manifest = convert.convert(convert.Options("webdataset", str(tmp_path), str(tmp_path / "out")))
  _, recs = _read_all(str(tmp_path / "out"))
  assert [s["num_records"] for s in manifest["shards"]] == [2, 1]  # One shard per input tar.
  assert [r["key"] for r in recs] == ["00000.tar:00000", "00000.tar:00001", "00001.tar:00002"]
  assert [r["image"] for r in recs] == [s[2] for s in samples]
  assert [r["caption"] for r in recs] == ["first caption", "from json", "third"]


@pytest.mark.slow
def test_tfds_class_labels_get_the_caption_template(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  with tfds.testing.mock_data(num_examples=5):
    examples = list(tfds.as_numpy(tfds.builder("mnist").as_dataset(split="train", shuffle_files=False)))
    manifest = convert.convert(
        convert.Options(
            "tfds", "mnist", str(tmp_path), records_per_shard=2, caption_template="a photo of the digit {label}"
        )
    )
  _, recs = _read_all(str(tmp_path))
  assert [s["num_records"] for s in manifest["shards"]] == [2, 2, 1] and manifest["caption_field"] == "label"
  assert manifest["source"]["input"] == "mnist"
  assert [r["key"] for r in recs] == [f"train[{i}]" for i in range(5)]
  assert [r["caption"] for r in recs] == [f"a photo of the digit {int(e['label'])}" for e in examples]
  assert [r["label"] for r in recs] == [int(e["label"]) for e in examples]
  for r, e in zip(recs, examples):  # (28, 28, 1) uint8 -> gray -> RGB, losslessly.
    np.testing.assert_array_equal(records.decode_image(r), np.repeat(e["image"], 3, axis=-1))


def test_crash_then_restart_is_bitwise_identical(folder, tmp_path, monkeypatch):
  # The uninterrupted run uses two worker processes: the result does not depend on the worker count either.
  convert.convert(convert.Options("imagefolder", folder, str(tmp_path / "clean"), records_per_shard=2, workers=2))
  crashed = convert.Options("imagefolder", folder, str(tmp_path / "crashed"), records_per_shard=2)
  read_job, calls, crash = ingest.read_job, [], [True]

  def crash_in_third_shard(job, opts):
    calls.append(job["items"][0]["path"])
    for n, example in enumerate(read_job(job, opts)):
      if crash[0] and len(calls) == 3 and n == 1:
        raise RuntimeError("injected crash")
      yield example

  monkeypatch.setattr(ingest, "read_job", crash_in_third_shard)
  with pytest.raises(RuntimeError, match="injected crash"):
    convert.convert(crashed)
  after_crash = cli_util.dir_bytes(tmp_path / "crashed")
  # Two shards finished (with their notes); nothing of the third, no manifest: no reader can take it as complete.
  assert sorted(after_crash) == [
      "images-00000-of-00004.arrayrecord",
      "images-00000-of-00004.arrayrecord.json",
      "images-00001-of-00004.arrayrecord",
      "images-00001-of-00004.arrayrecord.json",
  ]
  with pytest.raises(records.ManifestError, match="has no manifest.json"):
    arrayrecord.ArrayRecordImageSource(str(tmp_path / "crashed"), 16)
  # What a SIGKILL mid-write leaves: a temporary file; and a finished shard damaged since.
  _write(str(tmp_path / "crashed" / ".images-00002-of-00004.arrayrecord.tmp-12345"), b"half a shard")
  with open(tmp_path / "crashed" / "images-00001-of-00004.arrayrecord", "r+b") as f:
    f.seek(100)
    f.write(b"\xff")
  calls.clear()
  crash[0] = False
  convert.convert(crashed)
  assert calls == ["c.jpg", "gray16.png", "rgba.png"]  # Shard 0 skipped (verified by hash); 1 redone: damaged.
  assert cli_util.dir_bytes(tmp_path / "crashed") == cli_util.dir_bytes(tmp_path / "clean")


def _one_bad(tmp_path, name, data, caption=b"fine"):
  root = tmp_path / "in"
  _write(str(root / "good.png"), _png(_RGB[0]))
  _write(str(root / "good.txt"), b"good")
  _write(str(root / name), data)
  if caption is not None:
    _write(str(root / (os.path.splitext(name)[0] + ".txt")), caption)
  return str(root)


_TRUNCATED = _png(_RGB[1])[:200]
_INT32 = io.BytesIO()
Image.fromarray(np.zeros((16, 16), np.int32), "I").save(_INT32, format="TIFF")


@pytest.mark.parametrize(
    "name,data,caption,message",
    [
        ("bad.png", _TRUNCATED, b"x", "bad record bad.png: cannot decode image: OSError: image file is truncated"),
        ("bad.jpg", b"\xff\xd8 not a jpeg at all", b"x", "bad record bad.jpg: not an image file Pillow can decode"),
        (
            "bad.tif",
            _INT32.getvalue(),
            b"x",
            "bad record bad.tif: unsupported pixel mode I (32-bit values of unknown "
            "range): convert it to 8-bit RGB first",
        ),
        ("bad.png", _png(_RGB[0][:6, :9]), b"x", "bad record bad.png: image is 9x6, below --min_size=8"),
        ("bad.png", _png(_RGB[0]), None, "bad record bad.png: missing caption: no metadata.jsonl entry and no bad.txt"),
        ("bad.png", _png(_RGB[0]), b"ab\xffc", "bad record bad.txt: caption is not UTF-8 (byte 0xff at offset 2)"),
    ],
)
def test_bad_inputs_fail_naming_the_file_or_are_skipped_and_reported(tmp_path, name, data, caption, message):
  root = _one_bad(tmp_path, name, data, caption)
  out = tmp_path / "out"
  with pytest.raises(records.BadRecordError) as e:
    convert.convert(convert.Options("imagefolder", root, str(out), min_size=8))
  assert str(e.value).startswith(message), str(e.value)
  assert "\n" not in str(e.value)
  assert os.listdir(out) == []  # Nothing half-written, nothing that looks complete.
  manifest = convert.convert(convert.Options("imagefolder", root, str(out), min_size=8, on_bad_record="skip"))
  assert manifest["num_records"] == 1 and manifest["num_bad_records"] == 1
  with open(out / "bad_records.jsonl") as f:
    (bad,) = [json.loads(line) for line in f]
  assert f"bad record {bad['key']}: {bad['reason']}".startswith(message)
  assert [r["caption"] for r in _read_all(str(out))[1]] == ["good"]


def test_empty_source_and_bad_metadata(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match=r"holds no imagefolder examples \(empty source\)"):
    convert.convert(convert.Options("imagefolder", str(tmp_path / "empty"), str(tmp_path / "out")))
  _write(str(tmp_path / "all_bad" / "x.png"), b"not a png")
  with pytest.raises(ValueError, match=r"gave no usable records \(1 bad inputs: see .*bad_records.jsonl\)"):
    convert.convert(
        convert.Options("imagefolder", str(tmp_path / "all_bad"), str(tmp_path / "out_bad"), on_bad_record="skip")
    )
  assert not os.path.exists(tmp_path / "out_bad" / "manifest.json")  # Nothing to train on.
  root = _one_bad(tmp_path, "x.png", _png(_RGB[0]))
  _write(os.path.join(root, "metadata.jsonl"), b'{"file_name": "gone.png", "text": "t"}\n\xff\n')
  with pytest.raises(records.BadRecordError) as e:  # The first bad input in source order.
    convert.convert(convert.Options("imagefolder", root, str(tmp_path / "out")))
  assert str(e.value) == "bad record metadata.jsonl:2: line is not UTF-8 (byte 0xff at offset 0)"
  manifest = convert.convert(convert.Options("imagefolder", root, str(tmp_path / "out"), on_bad_record="skip"))
  assert manifest["num_records"] == 2 and manifest["num_bad_records"] == 2
  with open(tmp_path / "out" / "bad_records.jsonl") as f:
    assert [json.loads(line) for line in f] == [
        {"key": "metadata.jsonl:2", "reason": "line is not UTF-8 (byte 0xff at offset 0)"},
        {"key": "gone.png", "reason": "listed in metadata.jsonl but no such image file"},
    ]


def test_cli_exits_2_with_one_line_naming_the_first_bad_file(tmp_path):
  root = _one_bad(tmp_path, "bad.png", _TRUNCATED)
  rc, _, stderr = cli_util.run_module(
      "rflow_jax.data.convert", "--format=imagefolder", f"--input={root}", f"--out={tmp_path / 'out'}", "--workers=2"
  )
  cli_util.assert_one_line_error(rc, stderr, "bad record bad.png: cannot decode image")
  assert not os.path.exists(tmp_path / "out" / "manifest.json")
  rc, stdout, stderr = cli_util.run_module(
      "rflow_jax.data.convert",
      "--format=imagefolder",
      f"--input={root}",
      f"--out={tmp_path / 'out'}",
      "--workers=1",
      "--on_bad_record=skip",
      "--records_per_shard=1",
  )
  assert rc == 0, stderr[-2000:]
  assert json.loads(stdout.splitlines()[-1]) == {
      "out": str(tmp_path / "out"),
      "num_records": 1,
      "num_bad_records": 1,
      "num_shards": 2,
  }


@pytest.fixture(scope="module")
def shapes_dataset(tmp_path_factory):
  """Eight shapes records written as an image folder and converted: (converted dir, the ShapesSource)."""
  root = tmp_path_factory.mktemp("shapes")
  source = shapes.ShapesSource(size=32, seed=0, num_records=8, caption_style="sentence")
  lines = []
  for i in range(len(source)):
    _write(str(root / "in" / f"{i:03d}.png"), _png(source[i]["image"]))
    lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": source[i]["caption"]}) + "\n")
  _write(str(root / "in" / "metadata.jsonl"), "".join(lines).encode())
  convert.convert(convert.Options("imagefolder", str(root / "in"), str(root / "out"), records_per_shard=3))
  return str(root / "out"), source


def test_arrayrecord_source_serves_the_images_and_refuses_a_changed_shard(shapes_dataset, tmp_path):
  out, source = shapes_dataset
  served = arrayrecord.ArrayRecordImageSource(out, 32)
  assert len(served) == 8
  for i in range(8):
    np.testing.assert_array_equal(served[i]["image"], source[i]["image"])
    assert served[i]["caption"] == source[i]["caption"] and served[i]["index"] == i
  small = arrayrecord.ArrayRecordImageSource(out, 16)[0]["image"]
  assert small.shape == (16, 16, 3) and small.dtype == np.uint8
  copy = tmp_path / "copy"
  copy.mkdir()
  for name, data in cli_util.dir_bytes(out).items():
    _write(str(copy / name), data)
  with open(copy / "images-00001-of-00003.arrayrecord", "r+b") as f:
    f.seek(50)
    f.write(b"\x00\x01")
  with pytest.raises(records.ManifestError, match="images-00001-of-00003.arrayrecord fails its hash: sha256 "):
    arrayrecord.ArrayRecordImageSource(str(copy), 32)
  config = debug.get_config().data
  config.name = "arrayrecord"
  with pytest.raises(ValueError, match='data.name="arrayrecord" reads a converted dataset: set data.path'):
    registry.make_source(config)
  config.path = str(copy)
  with pytest.raises(records.ManifestError, match="fails its hash"):
    registry.make_source(config)


@pytest.mark.slow
def test_two_training_steps_on_a_converted_folder(shapes_dataset, tmp_path):
  from rflow_jax.train import trainer  # pylint: disable=g-import-not-at-top

  out, _ = shapes_dataset
  config = debug.get_config()
  config.data.name, config.data.path = "arrayrecord", out
  # The point is the converted records reaching the step; sampling is train_test.py's (no preview compile here).
  config.train.preview_at_end = False
  config.train.num_steps, config.train.log_every, config.train.record_seen_indices = 2, 1, True
  trainer.train_and_evaluate(config, str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    losses = [json.loads(line) for line in f if '"loss"' in line]
  assert [m["step"] for m in losses] == [1, 2] and all(np.isfinite(m["loss"]) for m in losses)
  with open(tmp_path / "seen_indices_p0.json") as f:
    seen = json.load(f)
  assert len(seen) == 8 and sorted(seen) == list(range(8))  # 2 steps x batch 4 = one epoch of the 8 records.
