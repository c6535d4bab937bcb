"""Named recipes (chexnet_hvd.recipes) and ImageNet initialisation from a cache filled on a
node with internet (chexnet_hvd.weights), ending in `train --recipe chexnet` on the 121 real
NIH images with a weights file fetched from a local HTTP server and no network at train time."""

import hashlib
import json
import shutil

import numpy as np
import pytest
from conftest import SHARED, assert_one_line_error, module

from chexnet_hvd import cli, config, recipes
from chexnet_hvd.evaluate import EvalConfig
from chexnet_hvd.records.writer import RecordsConfig
from chexnet_hvd.runlog import read_runlog

NEEDED = ["--data", "d", "--run-dir", "r"]


# A recipe's settings, pinned: change one, and bump its version (then update its digest here).
DIGESTS = {"chexnet": (3, "53053d0134a9"), "resnet59_large": (2, "82a52115e832"),
           "dell_baseline": (2, "69536ea3e59f"), "nas_candidate": (1, "adafbcb39bcb"),
           "chexpert": (2, "191bfc7b27bb")}


def digest(recipe) -> str:
    settings = {"train": recipe.train, "records": recipe.records, "evaluate": recipe.evaluate}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def test_a_recipe_changes_only_with_its_version():
    assert {n: (r.version, digest(r)) for n, r in recipes.RECIPES.items()} == DIGESTS


@pytest.mark.parametrize("name", recipes.names())
def test_every_recipe_is_valid_flags_of_its_commands(name):
    recipe = recipes.get(name)
    cfg = config.parse(["--recipe", name, *NEEDED])
    assert {k: getattr(cfg, k) for k in recipe.train} == recipe.train and cfg.recipe == name
    config.check_config(cfg)  # no combination the trainer refuses
    assert config.parse(config.argv_of(cfg)) == cfg
    records = cli.parse_config(RecordsConfig, "", ["--csv", "c", "--images", "i", "--out", "o",
                                                   *recipes.flags(recipe.records)])
    assert {k: getattr(records, k) for k in recipe.records} == recipe.records
    evaluate = cli.parse_config(EvalConfig, "", ["--checkpoint", "c", "--data", "d",
                                                 *recipes.flags(recipe.evaluate)])
    assert {k: getattr(evaluate, k) for k in recipe.evaluate} == recipe.evaluate


def test_flags_given_override_the_recipe_and_the_command_line_keeps_them():
    cfg = config.parse(["--recipe", "chexnet", *NEEDED, "--lr", "0.01", "--schedule", "constant",
                       "--no-augment", "--model", "small_cnn"])
    assert (cfg.lr, cfg.schedule, cfg.augment, cfg.model) == (0.01, "constant", False, "small_cnn")
    assert (cfg.class_weights, cfg.plateau_patience, cfg.weights) == ("manifest", 1, "imagenet")
    argv = config.argv_of(cfg)
    assert argv[argv.index("--schedule") + 1] == "constant"  # TrainConfig's default, not the recipe's
    assert config.parse(argv) == cfg


def test_reference_batch_0_keeps_the_lr_at_every_world_size():
    cfg = config.parse(["--recipe", "dell_baseline", *NEEDED])
    manifest = {"splits": {"train": {"count": 100_000}}}
    assert {config.derive(cfg, manifest, w).scaled_lr for w in (1, 4, 16)} == {1e-3}
    scaled = config.parse([*NEEDED, "--lr", "1e-3"])
    assert config.derive(scaled, manifest, 4).scaled_lr == pytest.approx(4e-3)


def test_the_last_recipe_flag_wins_abbreviated_too():
    cfg = config.parse(["--recipe", "chexnet", "--recipe", "dell_baseline", *NEEDED])
    assert (cfg.recipe, cfg.image_size, cfg.batch_size) == ("dell_baseline", 256, 64)
    cfg = config.parse(["--recip", "chexnet", *NEEDED])
    assert (cfg.recipe, cfg.schedule) == ("chexnet", "plateau")


@pytest.mark.slow
def test_recipe_list_show_and_unknown_names():
    listed = module("train", "--recipe", "list", check=True).stdout
    assert [line.split(" ")[0] for line in listed.splitlines()] == list(recipes.RECIPES)
    shown = module("train", "--recipe", "show", "chexnet", check=True).stdout
    assert "arXiv:1711.05225" in shown and 'schedule = "plateau"' in shown
    assert "# with: python -m chexnet_hvd.evaluate --tta tencrop" in shown
    assert_one_line_error(module("train", "--recipe", "chexnt", *NEEDED), "unknown recipe 'chexnt'")
    assert_one_line_error(module("train", "--recipe", "show", "x"), "unknown recipe 'x'")


@pytest.mark.slow
def test_a_shown_recipe_is_a_settings_file_that_gives_the_recipe(tmp_path):
    """`--recipe show NAME > FILE` is a file to copy and edit: `--config FILE` gives the same
    settings as `--recipe NAME`, and flags still override it."""
    for name in recipes.RECIPES:
        (tmp_path / f"{name}.toml").write_text(module("train", "--recipe", "show", name, check=True).stdout)
        from_file = config.parse(["--config", str(tmp_path / f"{name}.toml"), *NEEDED])
        assert from_file == config.parse(["--recipe", name, *NEEDED]), name
    edited = config.parse(["--config", str(tmp_path / "chexnet.toml"), *NEEDED, "--epochs", "2"])
    assert (edited.epochs, edited.schedule) == (2, "plateau")


@pytest.mark.slow
def test_imagenet_weights_missing_from_the_cache_name_the_fetch_command(records_dir, tmp_path):
    env = {"CHEXNET_WEIGHTS_DIR": str(tmp_path / "empty")}
    proc = module("train", "--data", records_dir, "--run-dir", tmp_path / "run", "--model", "resnet50",
                  "--weights", "imagenet", env=env)
    assert_one_line_error(proc, "not in the weights cache", "python -m chexnet_hvd.weights fetch --model resnet50")
    proc = module("train", "--data", records_dir, "--run-dir", tmp_path / "run", "--model", "resnet59",
                  "--weights", "imagenet", env=env)  # ResNet-59 starts from ResNet-50's file
    assert_one_line_error(proc, "python -m chexnet_hvd.weights fetch --model resnet50")
    assert_one_line_error(module("train", "--data", records_dir, "--run-dir", tmp_path / "run",
                                 "--model", "small_cnn", "--weights", "imagenet", env=env),
                          "no published ImageNet weights for small_cnn")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- fetch, then train offline ---
REAL_IMAGES = SHARED / "data" / "real" / "images" / "nih"
REAL_NIH = SHARED / "data" / "real" / "nih"


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory):
    """A DenseNet-121 no-top weights file in Keras' published layout (random values: the
    real file is never downloaded in tests)."""
    import tensorflow as tf

    from chexnet_hvd.weights import PUBLISHED

    path = tmp_path_factory.mktemp("published") / PUBLISHED["densenet121"][0]
    tf.keras.applications.DenseNet121(include_top=False, weights=None, pooling="avg").save_weights(path)
    tf.keras.backend.clear_session()
    return path


@pytest.mark.slow
@pytest.mark.skipif(not REAL_IMAGES.is_dir(), reason="no real NIH images")
def test_fetch_verifies_caches_and_recipe_chexnet_trains_from_the_cache_offline(server, imagenet_file, tmp_path):
    import pandas as pd
    import tensorflow as tf

    root, url, httpd = server
    shutil.copy(imagenet_file, root / imagenet_file.name)
    md5 = hashlib.md5(imagenet_file.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    env = {"CHEXNET_WEIGHTS_DIR": str(cache)}
    fetch = ["fetch", "--model", "densenet121", "--url", f"{url}/{imagenet_file.name}", "--no-progress"]

    # not Keras' published file: its md5 is refused, nothing under the final name
    assert_one_line_error(module("weights", *fetch, env=env), "md5 mismatch")
    assert not (cache / imagenet_file.name).exists()
    # a mirror's file with its own md5: downloaded, then found in the cache without a request
    assert module("weights", *fetch, "--md5", md5, env=env, check=True).stdout.strip().endswith(": downloaded")
    requests = len(httpd.log)
    assert module("weights", *fetch, "--md5", md5, env=env, check=True).stdout.strip().endswith(": present")
    assert len(httpd.log) == requests
    assert_one_line_error(module("weights", *fetch, env=env), "md5 mismatch", "in the cache: delete it")
    assert hashlib.md5((cache / imagenet_file.name).read_bytes()).hexdigest() == md5
    assert module("weights", "path", "--model", "densenet121", env=env, check=True).stdout.strip() == \
        str(cache / imagenet_file.name)

    # the 121 real NIH images as the recipe says records are written (256 px, uint8)
    rows = pd.read_csv(REAL_NIH / "Data_Entry_2017.csv", index_col=False, dtype=str)
    rows[rows["Image Index"].isin([p.name for p in REAL_IMAGES.glob("*.png")])].to_csv(
        tmp_path / "Data_Entry_2017.csv", index=False)
    show = recipes.get("chexnet").records
    module("records", "--csv", tmp_path / "Data_Entry_2017.csv", "--images", REAL_IMAGES, "--out",
           tmp_path / "records", *recipes.flags(show), "--workers", 2, "--no-progress", check=True)

    # compute nodes have no network: any download attempt would fail through this proxy
    offline = env | {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
                     "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    run_dir = tmp_path / "run"
    scaled_down = ["--epochs", 1, "--image-size", 64, "--steps-per-epoch", 2]  # CPU time
    module("train", "--recipe", "chexnet", "--data", tmp_path / "records", "--run-dir", run_dir,
           *scaled_down, "--audit", "--verbose", 0, env=offline, check=True, timeout=900)
    log = read_runlog(run_dir)
    start = log[0]
    assert (start["recipe"], start["recipe_version"]) == ("chexnet", recipes.get("chexnet").version)
    config = start["config"]
    kept = {k: v for k, v in recipes.get("chexnet").train.items() if k not in ("epochs", "image_size")}
    assert {k: config[k] for k in kept} == kept and (config["epochs"], config["image_size"]) == (1, 64)
    assert log[-1]["status"] == "completed"
    assert json.loads((run_dir / "config.json").read_text())["recipe"] == "chexnet"
    # the backbone starts from the cached file: the first convolution's kernel is the file's
    published = tf.keras.applications.DenseNet121(include_top=False, weights=str(imagenet_file), pooling="avg")
    initial = np.load(run_dir / "audit" / "rank0-initial.npz")
    np.testing.assert_array_equal(initial["arr_0"], published.get_weights()[0])


@pytest.mark.slow
def test_resnet59_starts_from_resnet50_where_the_shapes_match(tmp_path):
    """Keras' ResNet-50 no-top file (random values, with biases and batch-norm statistics)
    initialises ResNet-59's stem and stages 1-4: each conv + batch norm computes what
    ResNet-50's did; the added fifth stage does not come from it."""
    import tensorflow as tf

    from chexnet_hvd import models, weights

    source = tf.keras.applications.ResNet50(include_top=False, weights=None)
    rng = np.random.default_rng(0)
    source.set_weights([rng.normal(0.5, 0.1, w.shape).astype("float32") for w in source.get_weights()])
    path = tmp_path / weights.PUBLISHED["resnet50"][0]
    source.save_weights(path)
    tf.keras.utils.set_random_seed(1)
    model = models.resnet59(64, 14, str(path))
    tf.keras.utils.set_random_seed(1)
    fresh = models.resnet59(64, 14, None)
    x = tf.constant(rng.normal(size=(2, 8, 8, 256)), tf.float32)  # both layers take 256 channels
    for theirs, ours in [("conv2_block2_1", "stage1_block2_conv1"), ("conv4_block6_3", "stage3_block6_conv3")]:
        expected = source.get_layer(f"{theirs}_bn")(source.get_layer(f"{theirs}_conv")(x), training=False)
        got = model.get_layer(ours.replace("conv", "bn"))(model.get_layer(ours)(x), training=False)
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(model.get_layer("stem_conv").get_weights()[0],
                                  source.get_layer("conv1_conv").get_weights()[0])
    for layer, copied in [("stage4_block3_conv3", True), ("stage5_block1_conv1", False), ("logits", False)]:
        same = np.array_equal(model.get_layer(layer).get_weights()[0], fresh.get_layer(layer).get_weights()[0])
        assert same is not copied, layer
