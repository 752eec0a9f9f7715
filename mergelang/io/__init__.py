"""Model files in and out: safetensors headers and tensors, streamed shards, the HF folder.

Everything here works from headers first, so the compiler knows names, shapes and dtypes
before a single weight is read, and the writer knows the output layout before one is computed.
"""

from .errors import ModelFileError
from .hf import DONOR_FILES, OutputFolder, check_target, write_donor_files, write_model_card
from .read import SafetensorsModel, TensorInfo, open_model
from .write import OutputTensor, ShardedWriter, parse_size

__all__ = [
    "DONOR_FILES",
    "ModelFileError",
    "OutputFolder",
    "OutputTensor",
    "SafetensorsModel",
    "ShardedWriter",
    "TensorInfo",
    "check_target",
    "open_model",
    "parse_size",
    "write_donor_files",
    "write_model_card",
]
