"""`mergelang compress` and `delta("x")`: a task vector stored compactly and applied later.

Every figure is checked against a closed form computed here on small tensors: the top-k
kept exactly (a stable descending sort of |τ|, ties included), BitDelta's per-matrix
scale mean |τ| with the sign bit 1 where τ >= 0 (the reference code's BinaryDiff), the
sizes and the relative errors. Bad inputs are located diagnostics, exit 2, nothing written.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mergelang.io.delta import (
    BIND_CHECK_BYTES,
    DIGEST_CHARS,
    open_delta,
    tensor_digest,
    unpack_bits,
)
from mergelang.io.read import open_model
from tests.helpers import (
    assert_error,
    assert_nothing_written,
    at,
    layered_state,
    mergelang,
    quantised_state,
    ref_trim,
    run,
    write,
    write_model,
)

APPLY = 'base = model("base")\noutput base + delta("task.delta")\n'


def models(tmp_path: Path, base: dict, ft: dict) -> tuple[Path, Path]:
    return write_model(tmp_path / "base", base), write_model(tmp_path / "ft", ft)


def fine_tune(base: dict, seed: int = 7, zeros: bool = True) -> dict:
    """base + small noise on every float tensor; with `zeros`, some entries unchanged."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in base.items():
        d = torch.randint(-4, 5, t.shape, generator=g).float() / 8  # ties in |τ|
        if zeros:
            d.view(-1)[1::5] = 0
        out[name] = t + d
    return out


def compress(capsys, tmp_path: Path, *flags: object, out: str = "task.delta"):
    return mergelang(capsys, "compress", tmp_path / "ft", "--base", tmp_path / "base",
                     "-o", tmp_path / out, "--json", *flags)


def apply(capsys, tmp_path: Path, *flags: str) -> dict[str, torch.Tensor]:
    script = write(tmp_path, APPLY)
    out = tmp_path / "merged"
    result = run(capsys, script, out, *flags)
    assert result.code == 0, result.text
    return load_file(str(out / "model.safetensors"))


def stored(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118


# --- top-k: the entries trim keeps, exactly ---------------------------------------------


@pytest.mark.parametrize("density", [0.3, 0.05, 0.01, 1.0])
def test_topk_round_trip_keeps_the_top_entries_exactly(tmp_path, capsys, density):
    base = quantised_state(0)
    ft = fine_tune(base)
    models(tmp_path, base, ft)
    result = compress(capsys, tmp_path, "--density", density)
    assert result.code == 0, result.text
    report = json.loads(result.text[:result.text.rindex("}") + 1])
    parts = stored(tmp_path / "task.delta")
    total_sq = total_err = 0.0
    for row in report["tensors"]:
        name = row["tensor"]
        tau = (ft[name] - base[name]).flatten()
        k = max(1, int(density * tau.numel()))
        order = torch.argsort(tau.abs(), descending=True, stable=True)[:k]
        positions = order.sort().values
        mask_bytes, index_bytes = (tau.numel() + 7) // 8, 4 * k  # the smaller is stored
        assert row["form"] == ("mask" if mask_bytes < index_bytes else "topk")
        if row["form"] == "mask":
            found = unpack_bits(parts[f"{name}/mask"])[:tau.numel()].nonzero().squeeze(1)
        else:
            found = parts[f"{name}/indices"].long()
        assert torch.equal(found, positions), name
        assert torch.equal(parts[f"{name}/values"], tau[positions]), name
        kept = ref_trim(ft[name] - base[name], density)
        err = float((ft[name] - base[name] - kept).norm() / tau.norm())
        assert row["relative_error"] == pytest.approx(err, rel=1e-5, abs=1e-7)
        assert row["stored_bytes"] == min(mask_bytes, index_bytes) + 4 * k
        assert row["dense_bytes"] == tau.numel() * 4
        total_sq += float(tau.norm()) ** 2
        total_err += float((tau - kept.flatten()).norm()) ** 2
    assert report["overall"]["relative_error"] == pytest.approx(math.sqrt(total_err / total_sq),
                                                                rel=1e-5)
    merged = apply(capsys, tmp_path)
    for name in base:
        assert torch.equal(merged[name], base[name] + ref_trim(ft[name] - base[name], density))


def test_blocks_of_rows_give_the_same_file_and_the_same_merge(tmp_path, capsys):
    base = quantised_state(0)
    ft = fine_tune(base)
    models(tmp_path, base, ft)
    for flags in (("--density", "0.3"), ("--density", "0.01"), ("--bits", "1")):
        assert compress(capsys, tmp_path, *flags).code == 0
        assert compress(capsys, tmp_path, *flags, "--max-memory", "1", out="rows.delta").code == 0
        whole = (tmp_path / "task.delta").read_bytes()
        assert (tmp_path / "rows.delta").read_bytes() == whole
        one = apply(capsys, tmp_path)
        (tmp_path / "merged").rename(tmp_path / f"merged-{'-'.join(flags)}")
        rows = apply(capsys, tmp_path, "--max-memory", "1")
        for name in one:
            assert torch.equal(one[name], rows[name])
        for leftover in ("task.delta", "rows.delta", "merged"):
            path = tmp_path / leftover
            if path.is_dir():
                for f in path.iterdir():
                    f.unlink()
                path.rmdir()
            else:
                path.unlink()


def test_a_delta_reads_back_in_any_block_of_rows(tmp_path, capsys):
    base = quantised_state(0)
    models(tmp_path, base, fine_tune(base))
    for flags in (("--density", "0.2"), ("--density", "0.01"), ("--bits", "1")):
        assert compress(capsys, tmp_path, *flags, "--force").code == 0
        delta = open_delta(tmp_path / "task.delta")
        try:
            for name, info in delta.tensors.items():
                whole = delta.load(name)
                assert whole.dtype == torch.float32 and tuple(whole.shape) == info.shape
                if not info.shape:
                    continue
                for a, b in ((0, 1), (1, 4), (3, info.shape[0])):
                    assert torch.equal(delta.load(name, (a, b)), whole[a:b]), (name, a, b)
        finally:
            delta.close()


def bf16_models(tmp_path: Path) -> tuple[dict, dict]:
    """bfloat16 models whose τ is often not a bfloat16 number (base and fine-tune
    entries far apart in magnitude)."""
    g = torch.Generator().manual_seed(5)
    base = {k: v.bfloat16() for k, v in quantised_state(0).items()}
    ft = {k: (v.float() + torch.randn(v.shape, generator=g) * 0.3).bfloat16()
          for k, v in base.items()}
    models(tmp_path, base, ft)
    return base, ft


def test_float32_values_make_base_plus_delta_the_trim_bit_for_bit(tmp_path, capsys):
    bf16_models(tmp_path)
    assert compress(capsys, tmp_path, "--density", "0.3", "--values", "float32").code == 0
    merged = apply(capsys, tmp_path)
    script = write(tmp_path, 'base = model("base")\n'
                             'output base + trim(model("ft") - base, 0.3)\n', "trim.merge")
    assert run(capsys, script, tmp_path / "trimmed").code == 0
    trimmed = load_file(str(tmp_path / "trimmed" / "model.safetensors"))
    assert merged.keys() == trimmed.keys()
    for name in merged:
        assert merged[name].dtype == torch.bfloat16
        assert torch.equal(merged[name], trimmed[name]), name


def test_a_delta_alone_is_the_whole_task_vector_layers_included(tmp_path, capsys):
    """A script with no plain model has no donor; the layer count comes from the delta."""
    base = layered_state(0)
    ft = fine_tune(base)
    models(tmp_path, base, ft)
    assert compress(capsys, tmp_path, "--density", "1").code == 0
    script = write(tmp_path, 'output delta("task.delta")\n', "alone.merge")
    assert run(capsys, script, tmp_path / "alone").code == 0
    alone = load_file(str(tmp_path / "alone" / "model.safetensors"))
    assert any(".layers.1." in name for name in base)
    assert alone.keys() == {n for n, t in base.items() if t.is_floating_point()}
    for name, tensor in alone.items():
        assert torch.equal(tensor, ft[name] - base[name]), name


def test_values_in_the_fine_tunes_dtype_count_their_rounding_in_the_error(tmp_path, capsys):
    base, ft = bf16_models(tmp_path)
    result = compress(capsys, tmp_path, "--density", "0.3")
    assert result.code == 0, result.text
    report = json.loads(result.text[:result.text.rindex("}") + 1])
    parts = stored(tmp_path / "task.delta")
    rounded = 0
    for row in report["tensors"]:
        name = row["tensor"]
        tau = ft[name].float() - base[name].float()
        kept = ref_trim(tau, 0.3).flatten()
        at = kept.nonzero().squeeze(1)
        assert parts[f"{name}/values"].dtype == torch.bfloat16
        assert torch.equal(parts[f"{name}/values"], tau.flatten()[at].bfloat16())
        approx = torch.zeros_like(kept)
        approx[at] = kept[at].bfloat16().float()
        rounded += int((approx[at] != kept[at]).sum())
        err = float((tau.flatten() - approx).norm() / tau.norm())
        assert row["relative_error"] == pytest.approx(err, rel=1e-5)
    assert rounded > 0  # the case this test is about does occur


# --- 1 bit: BitDelta's signs and per-matrix scale ---------------------------------------


def test_bitdelta_round_trip_is_the_reference_closed_form(tmp_path, capsys):
    base = quantised_state(1)
    ft = fine_tune(base, seed=3)
    models(tmp_path, base, ft)
    result = compress(capsys, tmp_path, "--bits", "1")
    assert result.code == 0, result.text
    report = {r["tensor"]: r for r in json.loads(result.text[:result.text.rindex("}") + 1])
              ["tensors"]}
    parts = stored(tmp_path / "task.delta")
    merged = apply(capsys, tmp_path)
    for name in base:
        tau = ft[name] - base[name]
        if tau.dim() < 2:  # vectors and scalars are stored whole
            assert report[name]["form"] == "dense"
            assert torch.equal(parts[f"{name}/dense"], tau)
            assert torch.equal(merged[name], base[name] + tau)
            continue
        scale = tau.abs().double().mean().float()  # BinaryDiff: diff.abs().mean()
        assert torch.equal(parts[f"{name}/scale"], scale)
        bits = unpack_bits(parts[f"{name}/signs"])[:tau.numel()]
        assert torch.equal(bits, (tau >= 0).flatten())  # 1 where τ >= 0, zeros included
        approx = torch.where(tau >= 0, scale, -scale)
        assert torch.equal(merged[name], base[name] + approx)
        err = float((tau - approx).norm() / tau.norm())
        assert report[name]["relative_error"] == pytest.approx(err, rel=1e-5)
        assert report[name]["stored_bytes"] == (tau.numel() + 7) // 8 + 4


def test_transformers_loads_base_plus_delta(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "base")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tmp_path / "ft")
    ft = model.state_dict()
    assert compress(capsys, tmp_path, "--density", "0.25").code == 0
    apply(capsys, tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, base[name] + ref_trim(ft[name] - base[name], 0.25)), name


def test_integer_tensors_are_copied_and_base_plus_delta_keeps_them(tmp_path, capsys):
    base = dict(quantised_state(0), ids=torch.arange(12), flags=torch.tensor([True, False]))
    ft = dict(fine_tune(quantised_state(0)), ids=torch.arange(12),
              flags=torch.tensor([True, False]))
    models(tmp_path, base, ft)
    for flags in (("--density", "0.2"), ("--bits", "1")):
        result = compress(capsys, tmp_path, *flags, "--force")
        assert result.code == 0, result.text
        report = {r["tensor"]: r for r in json.loads(result.text[:result.text.rindex("}") + 1])
                  ["tensors"]}
        assert report["ids"]["form"] == report["flags"]["form"] == "copy"
        assert report["ids"]["stored_bytes"] == report["ids"]["dense_bytes"] == 12 * 8
        merged = apply(capsys, tmp_path)
        assert merged["ids"].dtype == torch.int64 and torch.equal(merged["ids"], base["ids"])
        assert torch.equal(merged["flags"], base["flags"])
        for path in (tmp_path / "merged").iterdir():
            path.unlink()
        (tmp_path / "merged").rmdir()


def test_check_reads_the_delta_header_and_the_base_header(tmp_path, capsys):
    base = quantised_state(0)
    models(tmp_path, base, fine_tune(base))
    assert compress(capsys, tmp_path, "--density", "1").code == 0
    result = mergelang(capsys, "check", write(tmp_path, APPLY))
    assert result.code == 0 and "ok:" in result.text, result.text


def test_a_base_tensor_is_hashed_the_same_whole_or_in_blocks_of_rows(tmp_path):
    state = quantised_state(0)
    with open_model(write_model(tmp_path / "m", state)) as model:
        for name, t in state.items():
            expected = hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy())
            expected = expected.hexdigest()[:DIGEST_CHARS]
            assert tensor_digest(model, name) == expected
            assert tensor_digest(model, name, block=7) == expected  # a row at a time


# --- bad inputs: located, exit 2, nothing written -----------------------------------------


def test_a_delta_on_another_architecture_is_refused_at_bind_time(tmp_path, capsys):
    base = quantised_state(0)
    models(tmp_path, base, fine_tune(base))
    assert compress(capsys, tmp_path, "--density", "0.3").code == 0
    other = dict(base, **{"layers.0.w": torch.zeros(33, 6)})
    write_model(tmp_path / "other", other)
    script = write(tmp_path, 'base = model("other")\noutput base + delta("task.delta")\n')
    out = tmp_path / "merged"
    result = run(capsys, script, out)
    assert_error(result, at(script, 2, 21), '"task.delta"', "another base", "layers.0.w",
                 "[33, 5]", "[33, 6]")
    assert_nothing_written(out)


def test_a_base_with_other_bytes_is_refused_at_the_delta_call(tmp_path, capsys):
    base = quantised_state(0)
    models(tmp_path, base, fine_tune(base))
    assert compress(capsys, tmp_path, "--bits", "1").code == 0
    write_model(tmp_path / "other", quantised_state(2))  # the same header, other values
    script = write(tmp_path, 'base = model("other")\noutput base + delta("task.delta")\n')
    out = tmp_path / "merged"
    result = run(capsys, script, out)
    assert_error(result, at(script, 2, 21), '"task.delta"', "bytes differ",
                 hint="add the delta to the model it was made from")
    assert_nothing_written(out)


def test_a_base_whose_large_tensor_alone_differs_stops_the_run(tmp_path, capsys):
    """The bytes of tensors past BIND_CHECK_BYTES (the smallest first) are checked as
    they are loaded: the run stops, exit 2, and nothing is written."""
    g = torch.Generator().manual_seed(0)
    base = {"norm": torch.randn(16, generator=g), "big": torch.randn(600, 500, generator=g)}
    assert base["big"].numel() * 4 > BIND_CHECK_BYTES
    models(tmp_path, base, fine_tune(base))
    assert compress(capsys, tmp_path, "--density", "0.5").code == 0
    write_model(tmp_path / "other", dict(base, big=base["big"] + 1))
    script = write(tmp_path, 'base = model("other")\noutput base + delta("task.delta")\n')
    out = tmp_path / "merged"
    assert run(capsys, write(tmp_path, APPLY, "ok.merge"), tmp_path / "ok").code == 0
    result = run(capsys, script, out)
    assert_error(result, None, None, "'big'", "bytes differ", "task.delta",
                 hint="add the delta to the model it was made from")
    assert_nothing_written(out)


def test_a_damaged_delta_file_is_refused_at_the_delta_call(tmp_path, capsys):
    base = quantised_state(0)
    models(tmp_path, base, fine_tune(base))
    assert compress(capsys, tmp_path, "--density", "0.3").code == 0
    path = tmp_path / "task.delta"
    good = path.read_bytes()
    script = write(tmp_path, APPLY)
    out = tmp_path / "merged"
    flipped = bytearray(good)
    flipped[-3] ^= 0x40  # a value's byte: the header still reads
    path.write_bytes(bytes(flipped))
    assert_error(run(capsys, script, out), at(script, 2, 21), '"task.delta"', "damaged",
                 "do not match")
    assert_nothing_written(out)
    path.write_bytes(good[:-10])
    assert_error(run(capsys, script, out), at(script, 2, 21), '"task.delta"', "truncated")
    assert_nothing_written(out)
    path.write_bytes(good.replace(b'"form\\":\\"mask', b'"form\\":\\"mazk', 1))
    assert_error(run(capsys, script, out), at(script, 2, 21), '"task.delta"',
                 "damaged delta metadata", "mazk")
    assert_nothing_written(out)
    write_model(tmp_path / "plain", base)
    plain = write(tmp_path, 'base = model("base")\noutput base + delta("plain")\n', "p.merge")
    assert_error(run(capsys, plain, out), at(plain, 2, 21), '"plain"', "not a delta file")
    assert_nothing_written(out)
    single = write(tmp_path, 'base = model("base")\n'
                             'output base + delta("base/model.safetensors")\n', "s.merge")
    assert_error(run(capsys, single, out), at(single, 2, 21), '"base/model.safetensors"',
                 "not a delta file", "no delta metadata")
    assert_nothing_written(out)
    path.write_bytes(good.replace(b'"embed.weight/values"', b'"embed.weight/valuez"', 1))
    assert_error(run(capsys, script, out), at(script, 2, 21), '"task.delta"', "damaged",
                 "'embed.weight/values'", "missing")
    assert_nothing_written(out)


def forge(path: Path, tensor: str, part: str, change) -> None:
    """Rewrite one stored part of a delta file with change(bytes) and recompute the
    tensor's recorded hash, as a hand-made file would."""
    data = bytearray(path.read_bytes())
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    entry = json.loads(header["__metadata__"]["tensors"])[tensor]
    parts = [n for n in header if n.startswith(f"{tensor}/")]
    parts.sort(key=lambda n: header[n]["data_offsets"])
    spans = {n: [8 + length + o for o in header[n]["data_offsets"]] for n in parts}
    a, b = spans[f"{tensor}/{part}"]
    data[a:b] = change(bytes(data[a:b]))
    hashes = [hashlib.sha256(bytes(data[lo:hi])).digest() for lo, hi in spans.values()]
    forged = hashlib.sha256(b"".join(hashes)).hexdigest()[:DIGEST_CHARS]
    path.write_bytes(bytes(data).replace(entry["data"].encode(), forged.encode(), 1))


def test_hand_made_files_with_matching_hashes_are_still_checked(tmp_path, capsys):
    """Positions out of order, a mask marking more entries than there are values."""
    base = quantised_state(0)
    models(tmp_path, base, fine_tune(base))
    script = write(tmp_path, APPLY)

    def reverse(raw: bytes) -> bytes:
        return torch.frombuffer(bytearray(raw), dtype=torch.int32).flip(0).numpy().tobytes()

    def one_more(raw: bytes) -> bytes:
        return bytes([raw[0] ^ next(1 << i for i in range(8) if not raw[0] >> i & 1)]) + raw[1:]

    for density, part, change, words in (("0.01", "indices", reverse, "not ascending"),
                                         ("0.3", "mask", one_more, "marks")):
        assert compress(capsys, tmp_path, "--density", density, "--force").code == 0
        forge(tmp_path / "task.delta", "embed.weight", part, change)
        assert_error(run(capsys, script, tmp_path / "merged"), at(script, 2, 21),
                     '"task.delta"', "damaged", words)
        assert_nothing_written(tmp_path / "merged")


@pytest.mark.parametrize("flags,points_at,words", [
    (("--density", "0"), "0", ["(0, 1]"]),
    (("--density", "1.5"), "1.5", ["(0, 1]"]),
    (("--density", "-0.1"), "-0.1", ["(0, 1]"]),
    (("--density", "nan"), "nan", ["(0, 1]"]),
    (("--density", "lots"), "lots", ["takes a number"]),
    (("--bits", "2"), "2", ["only 1"]),
    (("--density", "0.1", "--bits", "1"), "1", ["give one"]),
    (("--density", "0.1", "--max-memory", "0"), "0", ["at least 1"]),
])
def test_bad_options_are_located_on_the_command_line(tmp_path, capsys, flags, points_at, words):
    base = quantised_state(0)
    models(tmp_path, base, fine_tune(base))
    result = compress(capsys, tmp_path, *flags)
    assert_error(result, None, points_at, "<command line>:1:", *words)
    assert_nothing_written(tmp_path / "task.delta")


def test_compress_needs_a_compression(tmp_path, capsys):
    base = quantised_state(0)
    models(tmp_path, base, fine_tune(base))
    assert_error(compress(capsys, tmp_path), None, None, "--density", "--bits 1")
    assert_nothing_written(tmp_path / "task.delta")


def test_models_that_are_not_a_fine_tune_of_the_base_are_refused(tmp_path, capsys):
    base = quantised_state(0)
    write_model(tmp_path / "base", base)
    cases = {
        "ft": (dict(fine_tune(base), **{"layers.0.w": torch.zeros(33, 6)}), "ft",
               "[33, 5] in the base but [33, 6]"),
        "ft2": ({k: v for k, v in fine_tune(base).items() if k != "scale"}, "ft2",
                "'scale' of the base is not in the fine-tune"),
        "ft3": (dict(fine_tune(base), extra=torch.zeros(2)), "ft3", "'extra' of the fine-tune"),
    }
    for folder, (state, _, words) in cases.items():
        write_model(tmp_path / folder, state)
        result = mergelang(capsys, "compress", tmp_path / folder, "--base", tmp_path / "base",
                           "--density", "0.5", "-o", tmp_path / "task.delta")
        assert_error(result, None, None, "<command line>:1:", words)
        assert_nothing_written(tmp_path / "task.delta")


def test_an_existing_output_is_replaced_only_with_force(tmp_path, capsys):
    base = quantised_state(0)
    models(tmp_path, base, fine_tune(base))
    (tmp_path / "task.delta").write_text("mine")
    result = compress(capsys, tmp_path, "--density", "0.5")
    assert_error(result, None, str(tmp_path / "task.delta"), "already exists", hint="--force")
    assert (tmp_path / "task.delta").read_text() == "mine"
    assert compress(capsys, tmp_path, "--density", "0.5", "--force").code == 0
    assert open_delta(tmp_path / "task.delta").fields["density"] == "0.5"
    for target, words in ((tmp_path / "ft", "is a folder"),
                          (tmp_path / "no" / "x.delta", "does not exist")):
        result = mergelang(capsys, "compress", tmp_path / "ft", "--base", tmp_path / "base",
                           "--density", "0.5", "-o", target)
        assert_error(result, None, str(target), words)
    assert not (tmp_path / "no").exists()
    inside = mergelang(capsys, "compress", tmp_path / "ft", "--base", tmp_path / "base",
                       "--density", "0.5", "-o", tmp_path / "ft" / "x.delta")
    assert_error(inside, None, None, "which compress reads")
    assert_nothing_written(tmp_path / "ft" / "x.delta")
