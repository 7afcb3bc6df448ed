"""Read an offline W&B run file (`offline-run-*/run-<id>.wandb`) without the W&B service.

wandb 0.31 ships no Python reader for this file, so the tests parse it here. The format is the
LevelDB log format with a 7-byte file header:

  header   b":W&B" | magic 0xBEE1 (uint16 LE) | version (uint8)
  blocks   32 KiB each, counted from file offset 0 (the header fills the first 7 bytes of
           block 0); a block tail shorter than a record header is zero padding.
  record   crc32 (uint32 LE) | length (uint16 LE) | type (uint8) | `length` payload bytes
           type 1 = a whole record, 2/3/4 = first/middle/last fragment of one split across blocks;
           crc32 is zlib's CRC-32 of the type byte followed by the payload.

Each reassembled payload is a serialized `wandb.proto.wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

MAGIC = b":W&B"
FILE_HEADER_LEN = 7
BLOCK_LEN = 32 * 1024
RECORD_HEADER_LEN = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbFileError(ValueError):
    pass


def _payloads(data: bytes) -> list[bytes]:
    """Reassembled record payloads, in file order; a torn record at the very end is dropped."""
    if data[:4] != MAGIC or len(data) < FILE_HEADER_LEN:
        raise WandbFileError(f"not a W&B run file (header {data[:FILE_HEADER_LEN]!r})")
    payloads: list[bytes] = []
    pending: list[bytes] | None = None  # fragments of a record split across blocks
    pos = FILE_HEADER_LEN
    while pos < len(data):
        left_in_block = BLOCK_LEN - pos % BLOCK_LEN
        if left_in_block < RECORD_HEADER_LEN:
            pos += left_in_block  # zero padding up to the next block
            continue
        if pos + RECORD_HEADER_LEN > len(data):
            break  # torn header at the end of a file still being written
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        start, end = pos + RECORD_HEADER_LEN, pos + RECORD_HEADER_LEN + length
        if end > len(data):
            break  # torn payload at the end
        if length > left_in_block - RECORD_HEADER_LEN:
            raise WandbFileError(f"record at offset {pos} runs past its block")
        payload = data[start:end]
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise WandbFileError(f"checksum mismatch in the record at offset {pos}")
        if kind == FULL:
            if pending is not None:
                raise WandbFileError(f"whole record at offset {pos} inside a split record")
            payloads.append(payload)
        elif kind == FIRST:
            if pending is not None:
                raise WandbFileError(f"split record at offset {pos} starts inside another")
            pending = [payload]
        elif kind in (MIDDLE, LAST):
            if pending is None:
                raise WandbFileError(f"record fragment at offset {pos} without a first fragment")
            pending.append(payload)
            if kind == LAST:
                payloads.append(b"".join(pending))
                pending = None
        else:
            raise WandbFileError(f"unknown record type {kind} at offset {pos}")
        pos = end
    return payloads


def read_records(path: str | Path) -> list[wandb_internal_pb2.Record]:
    """Every record of the run file, in the order written."""
    records = []
    for payload in _payloads(Path(path).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def _item_name(item: Any) -> str:
    # Newer wandb fills nested_key (["loss"]); older versions fill key ("loss").
    return item.key or ".".join(item.nested_key)


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """One dict per history record: metric name -> decoded value (with `_step`, `_runtime`, ...)."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {_item_name(item): json.loads(item.value_json) for item in record.history.item}
        if "_step" not in row and record.history.HasField("step"):
            row["_step"] = record.history.step.num
        rows.append(row)
    return rows


def run_id(path: str | Path) -> str:
    """The run id from the file's run record."""
    for record in read_records(path):
        if record.WhichOneof("record_type") == "run":
            return record.run.run_id
    raise WandbFileError(f"{path} has no run record")
