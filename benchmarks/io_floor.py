"""The I/O floor of a merge: read every input tensor, write an output of the same size.

    python benchmarks/io_floor.py --out DIR [--out-dtype bfloat16] [--shard-mb 5000]
                                  MODEL_DIR [MODEL_DIR ...]

For every tensor name of the first model, in the order of its shards, every input
model's tensor is read with ``safetensors`` (``safe_open`` + ``get_tensor``, then
every byte is read once, since get_tensor may only map the file), then one tensor of
the same shape in the output dtype (the first model's, converted) is written to the
output with plain file writes: each output shard's safetensors header is laid out
first and the tensors follow as they come, so nothing is buffered. No arithmetic
is done. The process prints one JSON line: {"io_s": ..., "read_bytes": ...,
"written_bytes": ...}; the benchmark times the whole process, like a merge.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32",
             torch.float64: "F64"}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
          "float64": torch.float64}


def weight_map(model: Path) -> dict[str, str]:
    index = model / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    files = sorted(model.glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            out.update({k: f.name for k in h.keys()})
    return out


def ordered_names(model: Path, wmap: dict[str, str]) -> list[str]:
    """Tensor names shard by shard, each shard in its data-offset order."""
    names: list[str] = []
    for fname in sorted(set(wmap.values())):
        with open(model / fname, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        names += sorted(header, key=lambda k: header[k]["data_offsets"][0])
    return names


def touch(t: torch.Tensor) -> int:
    """Read every byte of `t` (get_tensor may map the file without reading it)."""
    b = t.reshape(-1).view(torch.uint8)
    return int(b.max()) if b.numel() else 0


def run(inputs: list[Path], out: Path, out_dtype: torch.dtype, shard_bytes: int) -> dict:
    t0 = time.perf_counter()
    maps = [weight_map(m) for m in inputs]
    names = ordered_names(inputs[0], maps[0])
    handles: dict[Path, object] = {}

    def get(model: Path, wmap: dict[str, str], name: str) -> torch.Tensor:
        path = model / wmap[name]
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")
        return handles[path].get_tensor(name)

    # Shapes from the first model's headers, to lay out the output shards up front.
    shapes = {}
    for name in names:
        with safe_open(str(inputs[0] / maps[0][name]), framework="pt") as h:
            shapes[name] = h.get_slice(name).get_shape()
    itemsize = torch.empty((), dtype=out_dtype).element_size()
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        n = itemsize
        for d in shapes[name]:
            n *= d
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n

    out.mkdir(parents=True, exist_ok=True)
    read_bytes = written = 0
    for k, shard in enumerate(shards, start=1):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in shard:
            n = itemsize
            for d in shapes[name]:
                n *= d
            header[name] = {"dtype": ST_DTYPES[out_dtype], "shape": list(shapes[name]),
                            "data_offsets": [offset, offset + n]}
            offset += n
        hbytes = json.dumps(header, separators=(",", ":")).encode()
        hbytes += b" " * (-len(hbytes) % 8)
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        with open(out / fname, "wb") as f:
            f.write(struct.pack("<Q", len(hbytes)) + hbytes)
            for name in shard:
                first = None
                for model, wmap in zip(inputs, maps, strict=True):
                    t = get(model, wmap, name)
                    touch(t)
                    read_bytes += t.numel() * t.element_size()
                    if first is None:
                        first = t
                    del t
                o = first.to(out_dtype).contiguous()
                f.write(o.reshape(-1).view(torch.uint8).numpy().data)
                written += o.numel() * o.element_size()
                del first, o
    handles.clear()
    return {"io_s": time.perf_counter() - t0, "read_bytes": read_bytes,
            "written_bytes": written, "out_shards": len(shards)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--out-dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--shard-mb", type=int, default=5000)
    a = p.parse_args(argv)
    res = run(a.inputs, a.out, DTYPES[a.out_dtype], a.shard_mb * 1_000_000)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
