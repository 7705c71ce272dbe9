"""Model artifacts: safetensors + JSON spec round trip; damaged artifacts are clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import forge_json
from varstudent.artifacts import load_model, save_model
from varstudent.errors import ArtifactError
from varstudent.nn.architectures import build_model, build_spec


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    net = build_model(build_spec("lenet5", (1, 28, 28), 10, width=0.2, variational=True)).eval()
    # a fresh net has every log_sigma2 at its initial value, so a lost log_sigma2 would load back unnoticed:
    # random ones mask some weights and keep others
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.endswith("log_sigma2"):
                param.copy_(torch.rand(param.shape, generator=gen) * 20 - 10)
    save_model(net, tmp_path, "m", meta={"note": "x"})
    return tmp_path, net


def test_round_trip_gives_the_same_function(saved) -> None:
    folder, net = saved
    masks = [m.keep_mask() for m in net.modules() if hasattr(m, "keep_mask")]
    assert masks and all(bool(k.any()) and not bool(k.all()) for k in masks)  # some weights masked in each layer
    loaded = load_model(folder, "m")
    want, got = net.state_dict(), loaded.state_dict()
    assert list(got) == list(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(loaded(x), net(x))
    doc = json.loads((folder / "m.json").read_text())
    assert doc["meta"] == {"note": "x"} and doc["spec"]["variational"] is True
    assert torch.equal(load_model(str(folder), "m")(x), net(x))  # the README's load_model(folder, name): a str too


def test_no_pickle_anywhere(saved) -> None:
    folder, _ = saved
    assert sorted(p.name for p in folder.iterdir()) == ["m.json", "m.safetensors"]
    blob = (folder / "m.safetensors").read_bytes()
    assert not blob.startswith(b"\x80")  # a pickle stream starts so
    assert not blob.startswith(b"PK\x03\x04")  # torch.save's zip archive (pickle inside) starts so
    # the safetensors layout: an 8-byte little-endian header length, a JSON object, then the raw tensor bytes
    header_len = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + header_len])
    assert isinstance(header, dict) and header
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    assert max(v["data_offsets"][1] for v in tensors.values()) == len(blob) - 8 - header_len
    from safetensors import safe_open

    with safe_open(folder / "m.safetensors", framework="pt") as f:
        assert sorted(f.keys()) == sorted(tensors)


def test_files_get_ordinary_permissions(saved) -> None:
    # temp-file-then-rename must not leave the 0600 mode of mkstemp: other users and containers read these
    import os

    folder, _ = saved
    mask = os.umask(0o022)
    os.umask(mask)
    for path in folder.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path


def test_truncated_weights(saved) -> None:
    folder, _ = saved
    data = (folder / "m.safetensors").read_bytes()
    (folder / "m.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="checksum does not match"):
        load_model(folder, "m")


def test_spec_that_does_not_match_the_weights(saved) -> None:
    folder, _ = saved
    forge_json(folder / "m.json", lambda doc: doc["spec"]["layers"][-1].update(out=7))  # digests re-signed
    with pytest.raises(ArtifactError, match="has shape"):
        load_model(folder, "m")


def test_a_spec_asking_for_huge_layers_allocates_nothing(saved) -> None:
    import resource

    folder, _ = saved
    def huge(doc: dict) -> None:
        doc["spec"]["layers"][0].update({"out": 10**6})  # 4 GB of float32 for this one layer if it were built
        doc["spec"]["layers"][1].update({"in": 10**6})

    forge_json(folder / "m.json", huge)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ArtifactError, match="has shape"):
        load_model(folder, "m")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # kB: nothing near 4 GB


@pytest.mark.parametrize("edit", [
    lambda doc: doc["spec"]["layers"][0].update(relu=False),  # loads, runs, and predicts something else
    lambda doc: doc["meta"].update(teacher_sha256="0" * 64),  # a lineage the next stage would trust
])
def test_a_hand_edited_spec_is_refused_by_the_digest_in_the_weights_file(saved, edit) -> None:
    folder, _ = saved
    doc = json.loads((folder / "m.json").read_text())
    edit(doc)
    (folder / "m.json").write_text(json.dumps(doc, indent=2))
    with pytest.raises(ArtifactError, match=r"m.json: changed after it was written \(its digest in "
                                            r"m.safetensors does not match\)"):
        load_model(folder, "m")


def test_missing_tensor(saved, tmp_path: Path) -> None:
    folder, net = saved
    from safetensors.torch import save

    tensors = {k: v for k, v in net.state_dict().items() if k != "blocks.0.op.bias"}
    blob = save(tensors)
    (folder / "m.safetensors").write_bytes(blob)
    doc = json.loads((folder / "m.json").read_text())
    import hashlib

    doc["sha256"] = hashlib.sha256(blob).hexdigest()
    (folder / "m.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="missing: \\['blocks.0.op.bias'\\]"):
        load_model(folder, "m")


@pytest.mark.parametrize("damage,message", [
    (lambda f: (f / "m.json").unlink(), "model spec not found"),
    (lambda f: (f / "m.safetensors").unlink(), "model weights not found"),
    (lambda f: (f / "m.json").write_text("{not json"), "not valid JSON"),
    (lambda f: (f / "m.json").write_text('{"format_version": 99}'), "not a varstudent model spec"),
])
def test_missing_or_foreign_files(saved, damage, message: str) -> None:
    folder, _ = saved
    damage(folder)
    with pytest.raises(ArtifactError, match=message):
        load_model(folder, "m")
