"""specquant.io: save/load of the packed format (safetensors + JSON header, no pickle)."""
from specquant.io.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    SQFormatError,
    load,
    payload_digest,
    read_header,
    save,
    storage_breakdown,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SQFormatError",
    "load",
    "payload_digest",
    "read_header",
    "save",
    "storage_breakdown",
]
