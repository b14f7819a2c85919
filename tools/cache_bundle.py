"""Move a crop cache to another machine in one compact file (lossy: crops JPEG-encoded).

    python tools/cache_bundle.py pack CACHE_DIR bundle.npz [--quality 95]
    python tools/cache_bundle.py unpack bundle.npz CACHE_DIR

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

from pneumoscan.cache import shard_done, shard_paths


def pack(cache: Path, bundle: Path, quality: int) -> None:
    config = json.loads((cache / "config.json").read_text())
    blobs, shard_csvs = [], []
    for k in range(config["shards"]):
        rows = min(config["shard_size"], config["rows"] - k * config["shard_size"])
        if not shard_done(cache, k, rows):
            raise SystemExit(f"shard {k} of {cache} is incomplete; finish `pneumoscan prepare` first")
        npy, csv, _ = shard_paths(cache, k)
        for crop in np.load(npy):
            ok, data = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, quality])
            assert ok
            blobs.append(data.tobytes())
        shard_csvs.append(csv.read_text())
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    config["transport"] = f"crops JPEG-encoded at quality {quality} for transfer"
    np.savez(bundle, data=np.frombuffer(b"".join(blobs), np.uint8), offsets=offsets,
             config=np.frombuffer(json.dumps(config).encode(), np.uint8),
             manifest=np.frombuffer((cache / "manifest.csv").read_bytes(), np.uint8),
             shards=np.frombuffer(json.dumps(shard_csvs).encode(), np.uint8))
    print(f"{len(blobs)} crops → {bundle} ({bundle.stat().st_size / 2**20:.1f} MiB)")


def unpack(bundle: Path, cache: Path) -> None:
    z = np.load(bundle)
    config = json.loads(z["config"].tobytes())
    data, offsets = z["data"], z["offsets"]
    shard_csvs = json.loads(z["shards"].tobytes())
    (cache / "shards").mkdir(parents=True, exist_ok=True)
    (cache / "manifest.csv").write_bytes(z["manifest"].tobytes())
    i = 0
    for k, text in enumerate(shard_csvs):
        rows = min(config["shard_size"], config["rows"] - k * config["shard_size"])
        crops = np.stack([cv2.imdecode(data[offsets[j]:offsets[j + 1]], cv2.IMREAD_GRAYSCALE)
                          for j in range(i, i + rows)])
        i += rows
        npy, csv, mark = shard_paths(cache, k)
        np.save(npy, crops)
        csv.write_text(text)
        mark.write_text(json.dumps({"rows": rows, "sha256": hashlib.sha256(npy.read_bytes()).hexdigest()}))
    (cache / "config.json").write_text(json.dumps(config, indent=2))
    print(f"{i} crops → {cache}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("cache", type=Path)
    p.add_argument("bundle", type=Path)
    p.add_argument("--quality", type=int, default=95)
    u = sub.add_parser("unpack")
    u.add_argument("bundle", type=Path)
    u.add_argument("cache", type=Path)
    args = parser.parse_args()
    pack(args.cache, args.bundle, args.quality) if args.cmd == "pack" else unpack(args.bundle, args.cache)


if __name__ == "__main__":
    main()
