"""Tests of the CPU-pretrained image encoder (chapter 02c, medvqa.models.pretraining): NT-Xent, views, the train-or-load cache, the probe."""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medvqa.data.readers import VQARecord
from medvqa.models.pretraining import PretrainSettings, encoder_cache_file, encoder_key, linear_probe, nt_xent_loss, simclr_cnn_for_dataset, simclr_cnn_from_images, probe_labels, probeable, read_encoder_file, ssl_views
from medvqa.models.towers import SmallCNN
from medvqa.models.zoo import build_image_encoder, load_image_encoder
from medvqa.models.registry import model_spec

TINY = PretrainSettings(width=4, epochs=1, batch_size=4, projection_dim=8)


def nt_xent_by_hand(a, b, tau):
    """SimCLR Eq. 1 written term by term over the 2N views."""
    z = [F.normalize(v, dim=0) for v in torch.cat([a, b])]
    n = len(a)
    losses = []
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        den = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(2 * n) if k != i)
        losses.append(-math.log(math.exp(float(z[i] @ z[j]) / tau) / den))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("n, d, tau", [(2, 3, 0.5), (5, 8, 0.2), (7, 4, 1.0)])
def test_nt_xent_matches_the_equation(n, d, tau):
    g = torch.Generator().manual_seed(n * d)
    a, b = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    assert nt_xent_loss(a, b, tau).item() == pytest.approx(nt_xent_by_hand(a, b, tau), rel=1e-5)


def test_nt_xent_prefers_matching_views_and_rejects_bad_shapes():
    eye = torch.eye(4)
    assert nt_xent_loss(eye, eye, 0.1) < 0.01
    assert nt_xent_loss(eye, eye[[1, 2, 3, 0]], 0.1) > 5  # every positive is the least similar view
    a = torch.randn(3, 4, requires_grad=True)
    nt_xent_loss(a, torch.randn(3, 4)).backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="at least 2"):
        nt_xent_loss(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match="same shape"):
        nt_xent_loss(torch.randn(3, 4), torch.randn(3, 5))


def test_views_are_seeded_and_the_identity_without_distortion():
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    v1 = ssl_views(images, generator=torch.Generator().manual_seed(4))
    v2 = ssl_views(images, generator=torch.Generator().manual_seed(4))
    assert torch.equal(v1, v2) and not torch.allclose(v1, images)
    still = ssl_views(images, min_crop=1.0, max_rotation=0.0, jitter=0.0, noise=0.0)
    assert torch.allclose(still, images, atol=1e-5)
    # no flip: an image bright on its left half stays brighter on the left in every view
    left = torch.full((8, 3, 32, 32), -1.0)
    left[..., :16] = 1.0
    views = ssl_views(left, generator=torch.Generator().manual_seed(0))
    assert (views[..., :12].mean((1, 2, 3)) > views[..., 20:].mean((1, 2, 3))).all()


@pytest.fixture
def temp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVQA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def toy_images(n=8, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"img{i}": torch.rand(3, size, size, generator=g) * 2 - 1 for i in range(n)}


def test_cache_trains_once_then_loads_the_same_weights(temp_cache):
    images = toy_images()
    key = encoder_key("toy", 16, list(images), TINY)
    first, info1 = simclr_cnn_from_images(images, key, TINY, progress=False)
    second, info2 = simclr_cnn_from_images(images, key, TINY, progress=False)
    assert (info1["status"], info2["status"]) == ("trained", "loaded")
    assert info1["path"] == info2["path"] == str(encoder_cache_file(key))
    assert str(temp_cache) in info1["path"]
    for (name, p), q in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(p, q), name
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(first(x).embedding, second(x).embedding)
    weights, saved = read_encoder_file(info1["path"])
    assert saved == key and set(weights) == set(first.state_dict())
    assert not (temp_cache / "encoders" / "small-cnn-ssl-toy-16px-seed0.run").exists()  # the resumable run is cleaned up


def test_cache_is_deterministic_and_learns(temp_cache):
    images = toy_images(12)
    settings = PretrainSettings(width=4, epochs=3, batch_size=6, projection_dim=8)
    key = encoder_key("toy", 16, list(images), settings)
    a, info = simclr_cnn_from_images(images, key, settings, progress=False)
    b, _ = simclr_cnn_from_images(images, key, settings, retrain=True, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))  # same seed, same weights
    random = SmallCNN(16, 4)
    assert not torch.equal(random.body[0][0].weight, a.body[0][0].weight)
    assert len([r for r in info["history"] if "loss" in r]) == 3 * 2  # 12 images, batches of 6, 3 epochs


def test_other_settings_or_data_are_named_and_retrained(temp_cache):
    images = toy_images()
    key = encoder_key("toy", 16, list(images), TINY)
    simclr_cnn_from_images(images, key, TINY, progress=False)
    other = PretrainSettings(width=4, epochs=2, batch_size=4, projection_dim=8)
    with pytest.warns(UserWarning, match=r"other settings \(epochs: 1 -> 2\)"):
        _, info = simclr_cnn_from_images(images, encoder_key("toy", 16, list(images), other), other, progress=False)
    assert info["status"] == "trained"
    fewer = dict(list(images.items())[:6])  # other training images, same file name
    with pytest.warns(UserWarning, match="image_ids_sha1"):
        _, info = simclr_cnn_from_images(fewer, encoder_key("toy", 16, list(fewer), other), other, progress=False)
    assert info["status"] == "trained"
    _, saved = read_encoder_file(info["path"])
    assert saved["images"] == 6


def test_corrupt_cache_file_is_an_error_naming_it(temp_cache):
    images = toy_images()
    key = encoder_key("toy", 16, list(images), TINY)
    path = encoder_cache_file(key)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00garbage")
    with pytest.raises(RuntimeError, match=str(path).replace(".", r"\.")):
        simclr_cnn_from_images(images, key, TINY, progress=False)
    _, info = simclr_cnn_from_images(images, key, TINY, retrain=True, progress=False)  # the way out it names
    assert info["status"] == "trained"


def test_registry_builds_and_loads_the_pretrained_encoder(temp_cache):
    assert model_spec("small-cnn-ssl").source == "trained-here"
    assert isinstance(build_image_encoder("small-cnn-ssl", 32), SmallCNN)
    with pytest.raises(ValueError, match="pass dataset="):
        load_image_encoder("small-cnn-ssl", image_size=32)
    encoder, info = simclr_cnn_for_dataset("synthetic", 32, seed=3, synthetic_images=120,
                                       settings=PretrainSettings(width=4, epochs=1, batch_size=16, projection_dim=8, seed=3),
                                       progress=False)
    assert info["status"] == "trained" and info["key"]["data"] == "synthetic-n120-seed3"
    from medvqa.data.readers import load_split
    train_ids = {r.image_id for r in load_split("synthetic", "train", synthetic_images=120, seed=3)}
    assert info["key"]["images"] == len(train_ids)  # training images only, never validation or test images
    assert encoder.name == "small-cnn-ssl" and encoder(torch.rand(1, 3, 32, 32)).patches.shape == (1, 4, 4, 16)
    with pytest.warns(UserWarning, match="other settings"):  # the registry path: the chapters' default width, retrained
        loaded = load_image_encoder("small-cnn-ssl", image_size=32, dataset="synthetic", seed=3, synthetic_images=120,
                                    encoder_epochs=1)
    again = load_image_encoder("small-cnn-ssl", image_size=32, dataset="synthetic", seed=3, synthetic_images=120,
                               encoder_epochs=1)
    assert loaded.patch_dim == 128 and torch.equal(loaded.body[0][0].weight, again.body[0][0].weight)


def test_probe_labels_from_records():
    records = [VQARecord("x", "train", "1", "a", None, "Is this image abnormal?", "Yes", "closed", organ="Chest", modality="CT"),
               VQARecord("x", "train", "2", "b", None, "Does the picture look normal?", "yes", "closed", organ="Brain", modality="MRI"),
               VQARecord("x", "train", "3", "c", None, "Is the lung healthy?", "no", "closed", organ="Chest", modality="CT"),
               VQARecord("x", "train", "4", "c", None, "Is this a normal image?", "no", "closed", organ="Chest", modality="CT")]
    labels = probe_labels(records)
    assert labels["abnormal"] == {"a": "abnormal", "b": "normal", "c": "abnormal"}  # an organ's health says nothing of the image
    assert labels["organ"] == {"a": "Chest", "b": "Brain", "c": "Chest"}
    single = probe_labels(records[:1] + records[2:3])
    assert "modality" not in single  # one class only: nothing to probe
    usable, too_small = probeable(labels, 2)  # one class of two images beside one of a single image: not probed
    assert usable == {} and too_small == {"modality": {"CT": 2, "MRI": 1}, "organ": {"Chest": 2, "Brain": 1},
                                          "abnormal": {"abnormal": 2, "normal": 1}}
    assert probeable(labels, 1) == (labels, {})


def test_linear_probe_separates_what_is_separable():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.2, (30, 4)), rng.normal(2, 0.2, (30, 4))])
    y = ["a"] * 30 + ["b"] * 30
    assert linear_probe(x, y)["accuracy"] == 1.0
    noise = linear_probe(rng.normal(0, 1, (60, 4)), y)
    assert noise["accuracy"] < 0.8 and noise["majority"] == 0.5
    with pytest.raises(ValueError, match="two classes"):
        linear_probe(x[:5], ["a"] * 4 + ["b"])
    with pytest.raises(ValueError, match="feature rows"):
        linear_probe(x, y[:10])


def test_training_images_come_from_the_training_split_only(temp_cache):
    from medvqa.data.readers import load_split
    from medvqa.models.pretraining import training_images
    images, data = training_images("synthetic", 16, seed=3, synthetic_images=40)
    ids = lambda split: {r.image_id for r in load_split("synthetic", split, synthetic_images=40, seed=3)}
    test_only = (ids("test") | ids("validation")) - ids("train")
    assert set(images) == ids("train") and test_only and not set(images) & test_only
    assert data == "synthetic-n40-seed3" and images[next(iter(images))].shape == (3, 16, 16)


def test_linear_probe_per_image_hits_pair_encoders_on_the_same_images():
    rng = np.random.default_rng(1)
    y = ["a"] * 30 + ["b"] * 30 + ["rare"] * 2  # the rare class is left out of every fold
    signal = np.r_[np.zeros(30), np.ones(30), [0.5, 0.5]][:, None]
    good = linear_probe(np.hstack([signal, rng.normal(0, 0.05, (62, 2))]), y)
    noise = linear_probe(rng.normal(0, 1, (62, 3)), y)
    assert good["kept"].tolist() == noise["kept"].tolist() == [True] * 60 + [False] * 2
    assert len(good["correct"]) == 60 and good["correct"].mean() == 1.0
    # the per-image hits average to the fold accuracies (equal folds of 12 images)
    assert abs(noise["correct"].mean() - noise["accuracy"]) < 1e-9
    assert set(np.unique(noise["correct"])) <= {0.0, 1.0}


def test_adapted_imagenet_tower_trains_only_its_last_stages_and_is_cached(temp_cache):
    """effnet-lite0-ssl: SimCLR continued from the ImageNet weights. The stem and the first four stages keep ImageNet's
    weights, every batch-norm layer its statistics; the key names the base file's hash; a second call loads the file."""
    from medvqa.models.pretraining import ADAPTED_NAME, AdaptSettings, adapted_tower_for_dataset
    from medvqa.models.effnet import EFFNET_LITE0_SHA256, EfficientNetLite0Encoder
    settings = AdaptSettings(epochs=1, batch_size=8, lr=1e-3, train_size=64, seed=2)
    tower, info = adapted_tower_for_dataset("synthetic", seed=2, synthetic_images=40, settings=settings, progress=False)
    assert info["status"] == "trained" and info["key"]["encoder"] == ADAPTED_NAME
    assert info["key"]["base_sha256"] == EFFNET_LITE0_SHA256 and info["key"]["image_size"] == 64
    imagenet = EfficientNetLite0Encoder().state_dict()
    moved = {k for k, v in tower.state_dict().items() if not torch.equal(v, imagenet[k])}
    assert any(k.startswith("net.blocks.6.") for k in moved) and any(k.startswith("net.blocks.4.") for k in moved)
    assert not any(k.startswith(("net.conv_stem", "net.bn1", "net.blocks.0.", "net.blocks.1.", "net.blocks.2.",
                                 "net.blocks.3.")) for k in moved)
    assert not any("running_" in k or "num_batches" in k for k in moved)
    assert tower.image_size == 224 and not any(p.requires_grad for p in tower.parameters())
    assert tower(torch.rand(1, 3, 224, 224)).patches.shape == (1, 14, 14, 432)
    again, second = adapted_tower_for_dataset("synthetic", seed=2, synthetic_images=40, settings=settings, progress=False)
    assert second["status"] == "loaded" and again.name == ADAPTED_NAME
    assert torch.equal(again.state_dict()["net.blocks.5.0.conv_pw.weight"], tower.state_dict()["net.blocks.5.0.conv_pw.weight"])
    with pytest.raises(ValueError, match="train_size is 64"):
        from medvqa.models.pretraining import train_adapted_tower
        train_adapted_tower([torch.rand(3, 32, 32)] * 2, settings)


def test_few_shot_probe_is_a_per_image_hit_rate_that_tells_features_apart():
    from medvqa.models.pretraining import few_shot_probe
    rng = np.random.default_rng(0)
    labels = ["a"] * 30 + ["b"] * 30 + ["c"] * 4  # class c has too few images for 5 shots: never tested
    informative = np.vstack([rng.normal(0, 1, (30, 8)) + 3, rng.normal(0, 1, (30, 8)) - 3, rng.normal(0, 1, (4, 8))])
    noise = rng.normal(0, 1, (64, 8))
    good = few_shot_probe(informative, labels, shots=5, draws=20, seed=1)
    bad = few_shot_probe(noise, labels, shots=5, draws=20, seed=1)
    assert good["kept"].sum() == 60 and not good["kept"][60:].any() and good["classes"] == 2
    assert good["accuracy"] > 0.95 and 0.3 < bad["accuracy"] < 0.7  # chance is 0.5 between two classes
    assert np.array_equal(good["kept"], bad["kept"])  # the same images for every feature set: they pair
    assert ((good["hit_rate"] >= 0) & (good["hit_rate"] <= 1)).all()
    again = few_shot_probe(noise, labels, shots=5, draws=20, seed=1)
    assert np.array_equal(again["hit_rate"], bad["hit_rate"])  # seeded draws repeat
    with pytest.raises(ValueError, match="more than 40 images"):
        few_shot_probe(noise, labels, shots=40)
