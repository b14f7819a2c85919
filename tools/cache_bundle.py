"""Move a crop cache to another machine in one compact file (lossy: crops JPEG-encoded).

    python tools/cache_bundle.py pack CACHE_DIR bundle.npz [--quality 95] [--max-mib 60]
    python tools/cache_bundle.py unpack bundle.npz [bundle.part01.npz …] CACHE_DIR

Used to carry the development crop cache to a lent GPU (a 64 MiB transfer limit) for training
the shipped classifier; the model card says the crops were JPEG-re-encoded at this quality.
No pickles: the bundle holds byte arrays and offsets only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import cv2
import numpy as np

from pneumoscan.training.cache import shard_done, shard_paths


def pack(cache: Path, bundle: Path, quality: int, max_mib: float = 60.0) -> list[Path]:
    """Write the cache as one bundle, or as ``NAME.partKK.npz`` files of at most ``max_mib`` each
    (whole shards per part) when it does not fit: the device tool carries 64 MiB a call."""
    config = json.loads((cache / "config.json").read_text())
    config["transport"] = f"crops JPEG-encoded at quality {quality} for transfer"
    parts, blobs, shard_csvs, first, size = [], [], [], 0, 0
    for k in range(config["shards"]):
        rows = min(config["shard_size"], config["rows"] - k * config["shard_size"])
        if not shard_done(cache, k, rows):
            raise SystemExit(f"shard {k} of {cache} is incomplete; finish `pneumoscan prepare` first")
        npy, csv, _ = shard_paths(cache, k)
        encoded = []
        for crop in np.load(npy):
            ok, data = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, quality])
            assert ok
            encoded.append(data.tobytes())
        shard_bytes = sum(map(len, encoded))
        if shard_csvs and size + shard_bytes > max_mib * 2**20:
            parts.append((first, blobs, shard_csvs))
            blobs, shard_csvs, first, size = [], [], k, 0
        blobs += encoded
        shard_csvs.append(csv.read_text())
        size += shard_bytes
    parts.append((first, blobs, shard_csvs))
    names = [bundle] if len(parts) == 1 else [bundle.with_name(f"{bundle.stem}.part{n:02d}.npz")
                                               for n in range(len(parts))]
    for name, (first, blobs, shard_csvs) in zip(names, parts):
        offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
        np.savez(name, data=np.frombuffer(b"".join(blobs), np.uint8), offsets=offsets,
                 config=np.frombuffer(json.dumps(config).encode(), np.uint8),
                 manifest=np.frombuffer((cache / "manifest.csv").read_bytes(), np.uint8),
                 shards=np.frombuffer(json.dumps(shard_csvs).encode(), np.uint8), first_shard=np.int64(first))
        print(f"{len(blobs)} crops → {name} ({name.stat().st_size / 2**20:.1f} MiB)")
    return names


def unpack(bundles: list[Path], cache: Path) -> None:
    """Rebuild the cache from one bundle or from all parts of one (in any order)."""
    total = 0
    for bundle in bundles:
        z = np.load(bundle)
        config = json.loads(z["config"].tobytes())
        data, offsets = z["data"], z["offsets"]
        shard_csvs = json.loads(z["shards"].tobytes())
        first = int(z["first_shard"]) if "first_shard" in z else 0
        (cache / "shards").mkdir(parents=True, exist_ok=True)
        (cache / "manifest.csv").write_bytes(z["manifest"].tobytes())
        i = 0
        for k, text in enumerate(shard_csvs, start=first):
            rows = min(config["shard_size"], config["rows"] - k * config["shard_size"])
            crops = np.stack([cv2.imdecode(data[offsets[j]:offsets[j + 1]], cv2.IMREAD_GRAYSCALE)
                              for j in range(i, i + rows)])
            i += rows
            npy, csv, mark = shard_paths(cache, k)
            np.save(npy, crops)
            csv.write_text(text)
            mark.write_text(json.dumps({"rows": rows, "sha256": hashlib.sha256(npy.read_bytes()).hexdigest()}))
        total += i
        (cache / "config.json").write_text(json.dumps(config, indent=2))
    print(f"{total} crops → {cache}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("cache", type=Path)
    p.add_argument("bundle", type=Path)
    p.add_argument("--quality", type=int, default=95)
    p.add_argument("--max-mib", type=float, default=60.0, help="split into parts of at most this size")
    u = sub.add_parser("unpack")
    u.add_argument("bundle", type=Path, nargs="+", help="the bundle, or every part of it")
    u.add_argument("cache", type=Path)
    args = parser.parse_args()
    if args.cmd == "pack":
        pack(args.cache, args.bundle, args.quality, args.max_mib)
    else:
        unpack(args.bundle, args.cache)


if __name__ == "__main__":
    main()
