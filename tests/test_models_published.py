"""Published checkpoints: fetched over HTTP (loopback) or copied, hash-checked, schema-checked, atomic."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest
import torch

from pretrain_det3d.models.backbone import build_resenc_unet
from pretrain_det3d.models.checkpoint import read_pretraining_checkpoint, save_pretraining_checkpoint
from pretrain_det3d.models.published import (
    MULTITALENT_CT_STEM,
    NATIVE_MULTITALENT_DEFAULT_STEM,
    PublishedCheckpointError,
    fetch_entry,
    fetch_published_checkpoint,
    native_release_target_key,
    published_init_stem,
)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A directory with a real nnssl checkpoint and a non-checkpoint file, served on 127.0.0.1."""
    root = tmp_path_factory.mktemp("served")
    network = build_resenc_unet("resenc_demo", 1, 1)
    save_pretraining_checkpoint(root / "checkpoint_final.pth", network, "resenc_demo", 1, [32, 32, 32], "mae")
    torch.save({"state_dict": network.state_dict()}, root / "not_nnssl.pth")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_with_matching_hash(served, tmp_path):
    root, url = served
    out = tmp_path / "mae_published" / "checkpoint_final.pth"
    entry = {"url": f"{url}/checkpoint_final.pth", "sha256": sha256(root / "checkpoint_final.pth")}
    fetch_published_checkpoint(entry, out)
    assert out.read_bytes() == (root / "checkpoint_final.pth").read_bytes()
    weights, plan = read_pretraining_checkpoint(out)
    assert plan["key_to_encoder"] == "encoder.stages"
    record = json.loads((out.parent / "checkpoint_final.sha256.json").read_text())
    assert record == {"sha256": entry["sha256"], "verified": True, "source": entry["url"]}


def test_unpinned_hash_is_recorded(served, tmp_path):
    root, url = served
    out = tmp_path / "checkpoint_final.pth"
    fetch_published_checkpoint({"url": f"{url}/checkpoint_final.pth", "sha256": None}, out)
    record = json.loads((tmp_path / "checkpoint_final.sha256.json").read_text())
    assert record["sha256"] == sha256(root / "checkpoint_final.pth") and record["verified"] is False


def test_hash_mismatch_leaves_nothing(served, tmp_path):
    _, url = served
    out = tmp_path / "checkpoint_final.pth"
    with pytest.raises(Exception, match="(?i)sha256|checksum"):
        fetch_published_checkpoint({"url": f"{url}/checkpoint_final.pth", "sha256": "0" * 64}, out)
    assert not out.exists()


def test_file_without_nnssl_schema_is_refused(served, tmp_path):
    root, _ = served
    out = tmp_path / "checkpoint_final.pth"
    with pytest.raises(PublishedCheckpointError, match="not_nnssl.pth.*nnssl"):
        fetch_published_checkpoint({"path": str(root / "not_nnssl.pth")}, out)
    assert not out.exists()


def test_local_copy_with_wrong_hash(served, tmp_path):
    root, _ = served
    with pytest.raises(PublishedCheckpointError, match="sha256"):
        fetch_published_checkpoint({"path": str(root / "checkpoint_final.pth"), "sha256": "ab" * 32},
                                   tmp_path / "c.pth", where="pretraining.published.x")
    assert list(tmp_path.iterdir()) == []


def test_entry_needs_exactly_one_location(tmp_path):
    with pytest.raises(PublishedCheckpointError, match="exactly one"):
        fetch_published_checkpoint({"url": "http://127.0.0.1:9/x", "path": "/x"}, tmp_path / "c.pth")


class Payload:
    """An arbitrary class: a weights-only load must refuse to unpickle it."""


def test_unsafe_pickle_is_refused_naming_the_source_without_unsafe_advice(tmp_path):
    source = tmp_path / "downloads" / "release.pth"
    source.parent.mkdir()
    torch.save({"network_weights": {}, "nnssl_adaptation_plan": {}, "payload": Payload()}, source)
    out = tmp_path / "pretrain" / "released" / "checkpoint_final.pth"
    with pytest.raises(PublishedCheckpointError) as info:
        fetch_published_checkpoint({"path": str(source)}, out, where="pretraining.published.released")
    message = str(info.value)
    assert message.startswith(f"{source} (pretraining.published.released): not a safe nnssl checkpoint: it holds "
                              "Python objects (")
    assert "expected a torch.save'd dict {'network_weights'" in message
    assert "weights_only=False" not in message and "weights_only` set to `False" not in message
    assert ".tmp" not in message  # the hidden temporary it was read from is gone; it must not be named
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_native_release_layout_maps_the_chosen_stem_level0_shift_and_ufpn_names() -> None:
    # nnDetection's names (DetSegModel_TL.py, fpn.py) -> NativeRetinaUNet's, worked by hand
    cases = {
        "stem.351_0.0.weight": "encoder.levels.0.component.0.conv.weight",
        "stem.351_0.1.weight": "encoder.levels.0.component.0.norm.weight",
        "backbone.levels.0.component.0.norm.bias": "encoder.levels.0.component.1.norm.bias",
        "backbone.levels.3.component.1.conv.weight": "encoder.levels.3.component.1.conv.weight",
        "decoder.lateral.P4.0.conv.bias": "decoder.lateral.4.bias",
        "decoder.out.P0.0.conv.weight": "decoder.out.0.weight",
        "decoder.up.P1.conv.weight": "decoder.up.0.weight",
    }
    for key, target in cases.items():
        assert native_release_target_key(key, "stem.351_0") == target, key
    # not loaded: another dataset's stem, a stem part beyond conv/norm, MultiTalent's segmentation layers,
    # a second lateral conv, an upsampling into level 0
    for key in ("stem.004.0.weight", "stem.351_0.2.weight", "seg_layers.351_0.weight",
                "decoder.lateral.P1.1.conv.weight", "decoder.up.P0.conv.weight"):
        assert native_release_target_key(key, "stem.351_0") is None, key
    # a chosen stem that is a prefix of another stem's name does not take that stem's weights
    assert native_release_target_key("stem.3510.0.weight", "stem.351") is None


# ---------------------------------------------------------------- stem choice of MultiTalent entries
def test_stem_setting_defaults_to_the_releases_ct_stem() -> None:
    from pretrain_det3d.settings.study import PublishedCheckpointEntry

    assert PublishedCheckpointEntry.default("stem") == MULTITALENT_CT_STEM == "351_0"  # docs/finetuning.md 3.4
    assert NATIVE_MULTITALENT_DEFAULT_STEM == "stem.351_0"


def test_stem_per_dataset_wins_over_stem_which_wins_over_the_default() -> None:
    where = "pretraining.published.mt"
    entry = {"url": "https://host/c.pth", "stem": "010", "stem_per_dataset": {"duke_breast": "004"}}
    assert published_init_stem(entry, "duke_breast", where) == ("004", f"{where}.stem_per_dataset.duke_breast")
    assert published_init_stem(entry, "luna16", where) == ("010", f"{where}.stem")
    assert published_init_stem({"url": "https://host/c.pth"}, "luna16", where) == ("351_0", f"{where}.stem")
    # the fetch sees the file's keys only, so another stem does not fetch the checkpoint again
    assert fetch_entry(entry) == {"url": "https://host/c.pth"}


def test_entry_with_a_stem_choice_is_fetched(served, tmp_path):
    root, _ = served
    out = tmp_path / "checkpoint_final.pth"
    fetch_published_checkpoint({"path": str(root / "checkpoint_final.pth"), "stem": "004",
                                "stem_per_dataset": {"d": "010"}}, out)
    assert out.read_bytes() == (root / "checkpoint_final.pth").read_bytes()


def _study_config(published: dict) -> dict:
    return {"seed": 0, "backbone": "resenc_demo",
            "study": {"datasets": ["d"], "detectors": ["retina_unet"], "initialisations": ["scratch"],
                      "folds": [0], "num_folds": 2},
            "datasets": {"d": {"source": "synthetic", "synthetic": {"num_cases": 4, "shape": [16, 16, 16],
                                                                    "spacing": [1, 1, 1]}}},
            "detectors": {"retina_unet": {"patch_size": [16, 16, 16]}},
            "pretraining": {"corpus": {"name": "c", "source": "synthetic",
                                       "synthetic": {"num_cases": 2, "shape": [16, 16, 16], "spacing": [1, 1, 1]}},
                            "methods": {},
                            "published": published}}


def test_study_config_checks_stem_settings() -> None:
    from pretrain_det3d.settings.base import ConfigError
    from pretrain_det3d.settings.study import validate_study_config

    good = _study_config({"mt": {"url": "https://host/c.pth", "stem_per_dataset": {"d": "004"}}})
    validate_study_config(good)
    assert good["pretraining"]["published"]["mt"]["stem_per_dataset"] == {"d": "004"}
    with pytest.raises(ConfigError, match=r"stem_per_dataset: \['duke'\] are not datasets"):
        validate_study_config(_study_config({"mt": {"url": "https://host/c.pth", "stem_per_dataset": {"duke": "4"}}}))
    with pytest.raises(ConfigError, match="pretraining.published.mt.stem"):
        validate_study_config(_study_config({"mt": {"url": "https://host/c.pth", "stem": "a b"}}))
