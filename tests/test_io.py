"""The I/O layer against real files: round trips, every refusal, and the atomic output folder."""

from __future__ import annotations

import json
import os
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergelang.io import (
    DONOR_FILES,
    ModelFileError,
    OutputFolder,
    OutputTensor,
    ShardedWriter,
    check_target,
    open_model,
    parse_size,
    write_donor_files,
    write_model_card,
)


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "layers.0.attn.weight": torch.randn(8, 8, generator=g).to(torch.float16),
        "layers.0.norm.weight": torch.randn(8, generator=g),
        "layers.0.positions": torch.arange(12, dtype=torch.int64).reshape(3, 4),
        "layers.0.mask": torch.rand(5, 3, generator=g) > 0.5,
        "layers.1.attn.weight": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "layers.1.scale": torch.tensor(1.5),
        "layers.1.empty": torch.zeros(0, 4, dtype=torch.float16),
        "lm_head.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
    }


def declare(tensors: dict[str, torch.Tensor]) -> list[OutputTensor]:
    return [OutputTensor(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]


def write_all(
    folder: Path,
    tensors: dict[str, torch.Tensor],
    shard_size: int,
    metadata: dict[str, str] | None = None,
) -> ShardedWriter:
    writer = ShardedWriter(folder, declare(tensors), shard_size, metadata or {})
    order = list(tensors)
    random.Random(1).shuffle(order)
    for name in order:
        writer.write(name, tensors[name])
    writer.close()
    return writer


def header_length(path: Path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def raw_safetensors(path: Path, header: object, data: bytes = b"") -> None:
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


def sharded_model(folder: Path) -> dict[str, torch.Tensor]:
    tensors = sample_tensors()
    write_all(folder, tensors, shard_size=300)
    return tensors


# Writing and reading back


def test_round_trip_several_shards(tmp_path: Path) -> None:
    tensors = sample_tensors()
    writer = write_all(tmp_path, tensors, shard_size=300, metadata={"merge": "a + b"})
    assert len(writer.paths) > 2
    count = len(writer.paths)
    assert [p.name for p in writer.paths] == [
        f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)
    ]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())

    loaded: dict[str, torch.Tensor] = {}
    for path in writer.paths:
        assert header_length(path) % 8 == 0
        loaded.update(load_file(path))
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata() == {"format": "pt", "merge": "a + b"}
        assert all(index["weight_map"][n] == path.name for n in load_file(path))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)

    model = open_model(tmp_path)
    assert model.folder == tmp_path and model.path == tmp_path
    assert list(model.tensors) == list(tensors)
    for name, tensor in tensors.items():
        info = model.tensors[name]
        assert (info.shape, info.dtype, info.nbytes) == (
            tuple(tensor.shape),
            tensor.dtype,
            tensor.nbytes,
        )
        assert torch.equal(model.load(name), tensor)
    model.close()


def test_single_shard_is_model_safetensors_without_index(tmp_path: Path) -> None:
    tensors = sample_tensors()
    writer = write_all(tmp_path, tensors, shard_size=parse_size("5GB"), metadata={"k": "v"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert writer.paths == [tmp_path / "model.safetensors"]
    assert header_length(writer.paths[0]) % 8 == 0
    with safe_open(str(writer.paths[0]), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}
    model = open_model(tmp_path / "model.safetensors")
    assert model.folder is None and model.config is None
    for name, tensor in tensors.items():
        assert torch.equal(model.load(name), tensor)


def test_shards_fill_in_order_and_big_tensors_stand_alone(tmp_path: Path) -> None:
    tensors = {
        "a": torch.zeros(10),
        "b": torch.zeros(10),
        "big": torch.zeros(100),
        "c": torch.zeros(5),
        "d": torch.zeros(10),
    }
    writer = write_all(tmp_path, tensors, shard_size=80)
    groups: dict[str, list[str]] = {}
    for name, shard in writer.weight_map.items():
        groups.setdefault(shard, []).append(name)
    assert list(groups.values()) == [["a", "b"], ["big"], ["c", "d"]]


def test_tensor_info_offsets_point_at_the_data(tmp_path: Path) -> None:
    tensors = sharded_model(tmp_path)
    model = open_model(tmp_path)
    infos = list(model.tensors.values())
    assert infos == sorted(infos, key=lambda i: (i.file.name, i.offset))
    for info in infos:
        with open(info.file, "rb") as f:
            f.seek(info.offset)
            raw = f.read(info.nbytes)
        expected = tensors[info.name].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        assert raw == expected


def test_writer_accepts_non_contiguous_tensors(tmp_path: Path) -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    writer = ShardedWriter(tmp_path, [OutputTensor("t", (4, 3), torch.float32)], 1000, {})
    writer.write("t", t)
    writer.close()
    assert torch.equal(load_file(tmp_path / "model.safetensors")["t"], t)


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="no float8 in this torch")
def test_float8_round_trip(tmp_path: Path) -> None:
    tensors = {
        "e4m3": torch.randn(4, 4).to(torch.float8_e4m3fn),
        "e5m2": torch.randn(4, 4).to(torch.float8_e5m2),
    }
    write_all(tmp_path, tensors, shard_size=1000)
    model = open_model(tmp_path)
    for name, tensor in tensors.items():
        assert model.load(name).view(torch.uint8).equal(tensor.view(torch.uint8))


def test_loaded_tensor_does_not_alias_the_file(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(1024)}, path)
    model = open_model(path)
    loaded = model.load("w")
    model.close()
    info = model.tensors["w"]
    with open(path, "r+b") as f:
        f.seek(info.offset)
        f.write(bytes(info.nbytes))
    assert torch.equal(loaded, torch.ones(1024))


def test_load_errors(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(4)}, path)
    model = open_model(path)
    with pytest.raises(KeyError, match="nope"):
        model.load("nope")
    save_file({"w": torch.ones(2, 2)}, path)
    with pytest.raises(ModelFileError, match="changed") as err:
        model.load("w")
    assert str(path) in err.value.message
    model.close()
    save_file({"w": torch.ones(4)}, path)
    model = open_model(path)
    path.unlink()
    with pytest.raises(ModelFileError, match="w.safetensors") as err:
        model.load("w")
    assert err.value.hint
    model.close()
    with pytest.raises(ValueError, match="closed"):
        model.load("w")


# Writer misuse


def test_writer_rejects_mismatches_and_reports_missing(tmp_path: Path) -> None:
    declared = [
        OutputTensor("a", (2, 3), torch.float32),
        OutputTensor("b", (4,), torch.bfloat16),
        OutputTensor("c", (1,), torch.int64),
    ]
    writer = ShardedWriter(tmp_path, declared, 1000, {})
    with pytest.raises(ValueError, match="'x' was not declared"):
        writer.write("x", torch.zeros(1))
    with pytest.raises(ValueError, match=r"'a' is \(3, 2\)"):
        writer.write("a", torch.zeros(3, 2))
    with pytest.raises(ValueError, match="bfloat16"):
        writer.write("b", torch.zeros(4))
    writer.write("a", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="twice"):
        writer.write("a", torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"2 declared tensors were never written: 'b', 'c'"):
        writer.close()
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_writer_rejects_bad_declarations(tmp_path: Path) -> None:
    one = OutputTensor("a", (1,), torch.float32)
    with pytest.raises(ValueError, match="declared twice"):
        ShardedWriter(tmp_path, [one, one], 100, {})
    with pytest.raises(ValueError, match="complex64"):
        ShardedWriter(tmp_path, [OutputTensor("z", (1,), torch.complex64)], 100, {})
    with pytest.raises(ValueError, match="strings"):
        ShardedWriter(tmp_path, [one], 100, {"n": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="positive"):
        ShardedWriter(tmp_path, [one], 0, {})


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("2GiB", 2 * 2**30),
        ("123", 123),
        ("1.5gb", 1_500_000_000),
        (" 64 KiB ", 64 * 1024),
        ("10kb", 10_000),
        ("3TB", 3 * 10**12),
        ("7B", 7),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "5 parsecs", "-1GB", "1e9", "5GBB", "1,5GB"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


# Opening models: the layouts that work


def test_open_diffusers_style_single_file_and_config(tmp_path: Path) -> None:
    save_file({"unet.conv.weight": torch.ones(2, 2)}, tmp_path / "diffusion_model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    model = open_model(str(tmp_path))
    assert model.folder == tmp_path
    assert model.config == {"model_type": "llama"}
    assert list(model.tensors) == ["unet.conv.weight"]


def test_open_index_file_directly(tmp_path: Path) -> None:
    tensors = sharded_model(tmp_path)
    model = open_model(tmp_path / "model.safetensors.index.json")
    assert model.folder == tmp_path
    assert set(model.tensors) == set(tensors)


def test_open_transformers_sharded_checkpoint(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(config)
    hf_model.save_pretrained(tmp_path / "src", max_shard_size="20KB", safe_serialization=True)
    assert (tmp_path / "src" / "model.safetensors.index.json").exists()
    model = open_model(tmp_path / "src")
    assert model.config is not None and model.config["hidden_size"] == 16
    state = hf_model.state_dict()
    for name in model.tensors:
        assert torch.equal(model.load(name), state[name])

    out = tmp_path / "out"
    writer = ShardedWriter(
        out,
        [OutputTensor(n, i.shape, i.dtype) for n, i in model.tensors.items()],
        parse_size("30KB"),
        {},
    )
    for name in reversed(list(model.tensors)):
        writer.write(name, model.load(name) * 2)
    writer.close()
    write_donor_files(out, model.folder, {})
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out)
    for name, tensor in reloaded.state_dict().items():
        if name in model.tensors:
            assert torch.equal(tensor, model.load(name) * 2)


# Opening models: every refusal names what is wrong


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="does not exist") as err:
        open_model(tmp_path / "nowhere")
    assert "nowhere" in err.value.message and err.value.hint


@pytest.mark.parametrize("name", ["pytorch_model.bin", "weights.pt", "model.ckpt"])
def test_pickled_checkpoints_refused(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"\x80\x02pickle")
    for target in (tmp_path, tmp_path / name):
        with pytest.raises(ModelFileError, match="can run code") as err:
            open_model(target)
        assert name in err.value.message
        assert "safe_serialization=True" in (err.value.hint or "")


def test_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelFileError, match="no model weights") as err:
        open_model(tmp_path)
    assert str(tmp_path) in err.value.message


def test_folder_without_weights_suggests_subfolder(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    save_file({"x": torch.ones(1)}, tmp_path / "unet" / "diffusion.safetensors")
    with pytest.raises(ModelFileError, match="no model weights") as err:
        open_model(tmp_path)
    assert "unet" in (err.value.hint or "")


def test_several_files_without_index(tmp_path: Path) -> None:
    save_file({"a": torch.ones(1)}, tmp_path / "part1.safetensors")
    save_file({"b": torch.ones(1)}, tmp_path / "part2.safetensors")
    with pytest.raises(ModelFileError, match="no model.safetensors.index.json") as err:
        open_model(tmp_path)
    assert str(tmp_path) in err.value.message and "part1.safetensors" in err.value.message


def test_several_indexes(tmp_path: Path) -> None:
    for prefix in ("unet", "vae"):
        save_file({"w": torch.ones(1)}, tmp_path / f"{prefix}-1.safetensors")
        index = {"weight_map": {"w": f"{prefix}-1.safetensors"}}
        (tmp_path / f"{prefix}.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFileError, match="several indexes") as err:
        open_model(tmp_path)
    assert "unet.safetensors.index.json" in err.value.message
    assert list(open_model(tmp_path / "vae.safetensors.index.json").tensors) == ["w"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads unreadable files")
def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(1)}, path)
    path.chmod(0)
    try:
        with pytest.raises(ModelFileError, match="cannot read") as err:
            open_model(tmp_path)
        assert str(path) in err.value.message
    finally:
        path.chmod(0o644)


def test_index_not_json(tmp_path: Path) -> None:
    sharded_model(tmp_path)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": ')
    with pytest.raises(ModelFileError, match="not valid JSON") as err:
        open_model(tmp_path)
    assert str(index) in err.value.message


def test_index_without_weight_map(tmp_path: Path) -> None:
    sharded_model(tmp_path)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 1}}))
    with pytest.raises(ModelFileError, match="weight_map") as err:
        open_model(tmp_path)
    assert str(index) in err.value.message


def test_index_names_missing_shard(tmp_path: Path) -> None:
    sharded_model(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["lm_head.weight"]
    (tmp_path / shard).unlink()
    with pytest.raises(ModelFileError, match="is missing") as err:
        open_model(tmp_path)
    assert shard in err.value.message and "'lm_head.weight'" in err.value.message


def test_tensor_in_index_absent_from_shard(tmp_path: Path) -> None:
    sharded_model(tmp_path)
    path = tmp_path / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    shard = index["weight_map"]["embed.weight"]
    index["weight_map"]["ghost.weight"] = shard
    path.write_text(json.dumps(index))
    with pytest.raises(ModelFileError, match="does not contain it") as err:
        open_model(tmp_path)
    assert "'ghost.weight'" in err.value.message and shard in err.value.message


def test_header_length_beyond_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(4)}, path)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ModelFileError, match="truncated") as err:
        open_model(tmp_path)
    assert str(path) in err.value.message and err.value.hint


def test_file_shorter_than_length_prefix(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(ModelFileError, match="only 2 bytes") as err:
        open_model(path)
    assert str(path) in err.value.message


def test_data_truncated_is_caught_from_header(tmp_path: Path) -> None:
    tensors = sharded_model(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = tmp_path / index["weight_map"]["lm_head.weight"]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ModelFileError, match="is truncated") as err:
        open_model(tmp_path)
    assert str(shard) in err.value.message and "'lm_head.weight'" in err.value.message
    assert "lm_head.weight" in tensors


def test_header_not_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    body = b"{not json}      "
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(ModelFileError, match="not valid JSON") as err:
        open_model(path)
    assert str(path) in err.value.message


def test_unknown_dtype(tmp_path: Path) -> None:
    path = tmp_path / "odd.safetensors"
    raw_safetensors(path, {"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8))
    with pytest.raises(ModelFileError, match="'C64'") as err:
        open_model(path)
    assert "'w'" in err.value.message and str(path) in err.value.message
    assert "BF16" in (err.value.hint or "")


def test_offsets_disagreeing_with_shape(tmp_path: Path) -> None:
    path = tmp_path / "odd.safetensors"
    raw_safetensors(path, {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8))
    with pytest.raises(ModelFileError, match="need 12") as err:
        open_model(path)
    assert "'w'" in err.value.message


def test_trailing_bytes(tmp_path: Path) -> None:
    path = tmp_path / "odd.safetensors"
    raw_safetensors(path, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(12))
    with pytest.raises(ModelFileError, match="4 unexpected bytes") as err:
        open_model(path)
    assert str(path) in err.value.message


def test_config_not_json(tmp_path: Path) -> None:
    save_file({"w": torch.ones(1)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ModelFileError, match="config.json is not valid JSON"):
        open_model(tmp_path)


# The Hugging Face folder


def test_write_donor_files(tmp_path: Path) -> None:
    donor = tmp_path / "donor"
    donor.mkdir()
    (donor / "config.json").write_text(
        json.dumps({"model_type": "llama", "torch_dtype": "float32", "dtype": "float32"})
    )
    (donor / "tokenizer.json").write_text('{"t": 1}')
    (donor / "chat_template.jinja").write_text("{{ messages }}")
    (donor / "pytorch_model.bin").write_bytes(b"not copied")
    out = tmp_path / "out"
    out.mkdir()
    write_donor_files(out, donor, {"torch_dtype": "bfloat16"})
    config = json.loads((out / "config.json").read_text())
    assert config == {"model_type": "llama", "torch_dtype": "bfloat16", "dtype": "bfloat16"}
    assert (out / "tokenizer.json").read_text() == '{"t": 1}'
    assert (out / "chat_template.jinja").exists()
    assert sorted(p.name for p in out.iterdir()) == [
        "chat_template.jinja",
        "config.json",
        "tokenizer.json",
    ]
    assert "config.json" not in DONOR_FILES

    (donor / "config.json").write_text(json.dumps({"torch_dtype": "float32"}))
    write_donor_files(out, donor, {"torch_dtype": "float16"})
    assert json.loads((out / "config.json").read_text()) == {"torch_dtype": "float16"}

    write_donor_files(tmp_path / "missing", None, {"torch_dtype": "float16"})
    (donor / "config.json").write_text("[1, 2")
    with pytest.raises(ModelFileError, match="config.json"):
        write_donor_files(out, donor, {})


def test_model_card(tmp_path: Path) -> None:
    script = 'base = model("a")\noutput base * 1.0'
    write_model_card(tmp_path, script, "scripts/linear.merge")
    card = (tmp_path / "README.md").read_text()
    front = card.split("---\n")[1]
    assert "- merge\n" in front and "- mergelang\n" in front
    assert "library_name: transformers" in front
    assert f"```merge\n{script}\n```\n" in card
    assert "linear.merge" in card

    write_model_card(tmp_path, "# has a fence\n```\n", "x.merge")
    card = (tmp_path / "README.md").read_text()
    assert "````merge\n# has a fence\n```\n````\n" in card


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_output_folder_moves_into_place(tmp_path: Path) -> None:
    target = tmp_path / "merged"
    with OutputFolder(target) as work:
        assert work.parent == tmp_path and work.name.startswith(".merged.tmp-")
        assert not target.exists()
        (work / "model.safetensors").write_bytes(b"x")
    assert (target / "model.safetensors").read_bytes() == b"x"
    assert leftovers(tmp_path) == []
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask


def test_output_folder_failure_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "merged"
    with pytest.raises(RuntimeError, match="boom"):
        with OutputFolder(target) as work:
            (work / "model.safetensors").write_bytes(b"x")
            raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_output_folder_refuses_existing_target(tmp_path: Path) -> None:
    target = tmp_path / "merged"
    target.mkdir()
    (target / "old.txt").write_text("keep")
    with pytest.raises(ModelFileError, match="already exists") as err:
        check_target(target, force=False)
    assert str(target) in err.value.message and err.value.hint == "pass --force to replace it"
    with pytest.raises(ModelFileError, match="already exists"):
        with OutputFolder(target):
            pass
    assert (target / "old.txt").read_text() == "keep"
    assert leftovers(tmp_path) == []


def previous_output(folder: Path) -> Path:
    """A folder as a mergelang run leaves it: a shard carrying its script, a model card."""
    folder.mkdir(parents=True)
    save_file({"w": torch.ones(2)}, str(folder / "model.safetensors"),
              metadata={"mergelang_script": "output a\n"})
    write_model_card(folder, "output a\n", "old.merge")
    (folder / "config.json").write_text("{}\n")
    return folder


def test_output_folder_force_replaces_a_previous_output(tmp_path: Path) -> None:
    target = previous_output(tmp_path / "merged")
    check_target(target, force=True)
    with OutputFolder(target, force=True) as work:
        (work / "new.txt").write_text("new")
        assert (target / "model.safetensors").exists()
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert leftovers(tmp_path) == []


def test_output_folder_failure_with_force_keeps_old(tmp_path: Path) -> None:
    target = previous_output(tmp_path / "merged")
    with pytest.raises(KeyError):
        with OutputFolder(target, force=True) as work:
            (work / "new.txt").write_text("new")
            raise KeyError("x")
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "config.json",
                                                       "model.safetensors"]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(("extra", "words"), [
    pytest.param("notes.txt", "holds files mergelang did not write: notes.txt", id="notes"),
    pytest.param("sub/", "holds files mergelang did not write: sub/", id="subfolder"),
    pytest.param("no-card", "not written by mergelang", id="card-missing"),
    pytest.param("no-script", "not written by mergelang", id="shard-without-script"),
])
def test_force_refuses_a_folder_that_is_not_a_previous_output(tmp_path: Path, extra: str,
                                                              words: str) -> None:
    target = previous_output(tmp_path / "merged")
    if extra == "notes.txt":
        (target / "notes.txt").write_text("mine")
    elif extra == "sub/":
        (target / "sub").mkdir()
    elif extra == "no-card":
        (target / "README.md").write_text("# my model\n")
    else:
        save_file({"w": torch.ones(2)}, str(target / "model.safetensors"))
    before = sorted(p.name for p in target.rglob("*"))
    with pytest.raises(ModelFileError, match=words) as err:
        check_target(target, force=True)
    assert "--force replaces only a previous mergelang output" in err.value.message
    assert "choose another output folder" in err.value.hint
    with pytest.raises(ModelFileError, match=words):
        with OutputFolder(target, force=True):
            pass
    assert sorted(p.name for p in target.rglob("*")) == before
    assert leftovers(tmp_path) == []


def test_force_replaces_an_empty_folder(tmp_path: Path) -> None:
    target = tmp_path / "merged"
    target.mkdir()
    with OutputFolder(target, force=True) as work:
        (work / "model.safetensors").write_bytes(b"x")
    assert [p.name for p in target.iterdir()] == ["model.safetensors"]


@pytest.mark.parametrize("where", ["cwd", "dot", "empty", "parent", "root"])
def test_output_that_is_or_holds_the_current_folder_is_refused(tmp_path: Path, monkeypatch,
                                                               where: str) -> None:
    here = tmp_path / "work" / "here"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    target = {"cwd": here, "dot": Path("."), "empty": "", "parent": Path(".."),
              "root": Path("/")}[where]
    for force in (False, True):
        with pytest.raises(ModelFileError, match="current folder") as err:
            check_target(target, force=force)
        assert "unset" in err.value.hint
        with pytest.raises(ModelFileError, match="current folder"):
            with OutputFolder(Path(target), force=force):
                pass
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["here", "work"]


def test_output_that_is_or_holds_an_input_is_refused(tmp_path: Path) -> None:
    models = tmp_path / "models"
    base = previous_output(models / "base")  # even a previous output, when it is read
    script = tmp_path / "merge.merge"
    script.write_text("output a\n")
    reads = [base, base / "model.safetensors", script]
    for target, what in [(base, "is"), (models, "contains"), (tmp_path, "contains")]:
        with pytest.raises(ModelFileError, match=f"{what} .*which this merge reads") as err:
            check_target(target, force=True, protect=reads)
        assert "outside the input models and the script" in err.value.hint
    link = tmp_path / "link"
    link.symlink_to(base)
    with pytest.raises(ModelFileError, match="which this merge reads"):
        check_target(link, force=True, protect=reads)
    with pytest.raises(ModelFileError, match="which this merge reads"):
        with OutputFolder(base, force=True, protect=reads):
            pass
    check_target(models / "new", force=True, protect=reads)
    assert (base / "model.safetensors").is_file()


def test_over_long_output_name_is_refused(tmp_path: Path) -> None:
    for length in (300, 250):
        target = tmp_path / ("m" * length)
        with pytest.raises(ModelFileError, match="name is too long") as err:
            check_target(target, force=False)
        assert err.value.hint == "choose a shorter name"
    check_target(tmp_path / ("m" * 200), force=False)


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(tmp_path: Path) -> None:
    target = tmp_path / "merged"
    with OutputFolder(target) as work:
        lock = tmp_path / ".merged.lock"
        assert lock.read_text() == f"{os.getpid()}\n"
        with pytest.raises(ModelFileError, match=f"another mergelang run \\(process "
                                                 f"{os.getpid()}\\) is writing"):
            with OutputFolder(target, force=True):
                pass
        (work / "f").write_text("first")
    assert (target / "f").read_text() == "first"
    assert leftovers(tmp_path) == []


def test_a_stale_temporary_folder_is_removed_and_reported(tmp_path: Path) -> None:
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".merged.tmp-{pid}-0123abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    alive = tmp_path / f".merged.tmp-{os.getppid()}-89abcdef"  # a running process's
    alive.mkdir()
    other = tmp_path / f".other.tmp-{pid}-0123abcd"  # another output's
    other.mkdir()
    output = OutputFolder(tmp_path / "merged")
    with output as work:
        (work / "f").write_text("")
    assert not stale.exists() and alive.exists() and other.exists()
    assert output.notes == [f"removed {stale} (1000 bytes), left by an earlier run "
                            f"(process {pid}) that did not finish"]


def test_failed_run_removes_the_parent_folders_it_made(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    target = tmp_path / "a" / "b" / "c" / "merged"
    with pytest.raises(RuntimeError):
        with OutputFolder(target):
            raise RuntimeError("boom")
    assert [p.name for p in tmp_path.rglob("*")] == ["a"]
    with pytest.raises(ModelFileError):  # refused on entry: nothing made either
        with OutputFolder(tmp_path / "a" / "b" / ("m" * 300)):
            pass
    assert [p.name for p in tmp_path.rglob("*")] == ["a"]


def test_output_target_that_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "merged"
    target.write_text("a file")
    with pytest.raises(ModelFileError, match="not a folder"):
        check_target(target, force=True)


def test_output_folder_creates_parents(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "merged"
    with OutputFolder(target) as work:
        (work / "f").write_text("")
    assert (target / "f").exists()


def test_a_view_outlives_its_closed_model(tmp_path: Path) -> None:
    """A view still held when the model is closed (e.g. by a traceback) stays readable:
    closing drops the map rather than unmapping memory the view points at."""
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(4096, dtype=torch.float32)}, path)
    model = open_model(path)
    view = model.load("w", view=True)
    model.close()
    assert float(view.sum()) == float(sum(range(4096)))
    with pytest.raises(ValueError, match="closed"):
        model.load("w")
