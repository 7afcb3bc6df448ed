"""`dist-train verify-tokens`: every shard against the format, the manifest and the vocabulary."""

from __future__ import annotations

from pathlib import Path

from dist_train.data.tokens.shards import MANIFEST, SCAN_CHUNK, TokensError, open_shard, read_header, read_manifest


def verify(directory: Path) -> str:
    """Every shard checked against the format and the manifest, ids against the vocabulary;
    returns a one-line summary, raises TokensError at the first problem."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    listed = {s["file"] for split in ("train", "val") for s in manifest["shards"][split]}
    stray = sorted(p.name for p in directory.glob("*.bin") if p.name not in listed)
    if stray:
        raise TokensError(f"{directory}: shard {stray[0]} is not in {MANIFEST}")
    totals = {}
    for split in ("train", "val"):
        totals[split] = 0
        for entry in manifest["shards"][split]:
            path = directory / entry["file"]
            if not path.is_file():
                raise TokensError(f"{path}: listed in {MANIFEST} but missing")
            tokens = open_shard(path)  # checks header and file size
            header = read_header(path)
            if header.vocab_size != manifest["vocab_size"]:
                raise TokensError(f"{path}: vocabulary {header.vocab_size}, the manifest says {manifest['vocab_size']}")
            if header.count != entry["tokens"]:
                raise TokensError(f"{path}: {header.count} tokens, the manifest says {entry['tokens']}")
            for start in range(0, len(tokens), SCAN_CHUNK):
                top = int(tokens[start : start + SCAN_CHUNK].max())
                if top >= header.vocab_size:
                    raise TokensError(f"{path}: token id {top} is outside the vocabulary of {header.vocab_size}")
            totals[split] += header.count
        listed_total = manifest.get(f"{split}_tokens", totals[split])
        if totals[split] != listed_total:
            raise TokensError(
                f"{directory}: {split} shards hold {totals[split]} tokens, the manifest says {listed_total}"
            )
    n_train, n_val = len(manifest["shards"]["train"]), len(manifest["shards"]["val"])
    return (
        f"{directory}: OK: {n_train} train shard(s) with {totals['train']:,} tokens, {n_val} val shard(s) with "
        f"{totals['val']:,} tokens, vocabulary {manifest['vocab_size']:,} ({manifest.get('dtype', '?')})"
    )
