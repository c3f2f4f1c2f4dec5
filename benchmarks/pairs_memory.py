"""Peak memory of reading preference pairs from a Pick-a-Pic-style parquet file: streamed, it stays flat
as the file grows.

    python benchmarks/pairs_memory.py                        # 10k and 100k rows of 32 px images
    python benchmarks/pairs_memory.py --rows 10000 --out benchmarks/results/pairs_memory.json

For each size, a file is written (rows of caption, jpg_0, jpg_1 as JPEG bytes of 32 px noise images,
label_0 with one tie in ten; row groups of 1000 rows, written group by group), then a fresh process
opens it as the pairs source's ParquetPairs and reads every usable pair once, in epochs of 256 pairs,
decoding and resizing both images of each pair (rlfuse.sources.pairs.load_image) as training does
before the VAE. Reported: the file's size, the peak resident memory of that process (ru_maxrss) and its
resident memory after imports, so the difference is what reading the pairs costs. A benchmark, not a
test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS_PER_GROUP = 1000
EPOCH_PAIRS = 256


def write_file(path: Path, rows: int, side: int = 32) -> None:
    """rows of random 32 px JPEG pairs, written one row group at a time (the writer never holds the file)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)

    def jpeg() -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
        return buffer.getvalue()

    schema = pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                        ("label_0", pa.float64())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, ROWS_PER_GROUP):
            count = min(ROWS_PER_GROUP, rows - start)
            labels = [0.5 if (start + i) % 10 == 9 else float((start + i) % 2) for i in range(count)]
            writer.write_table(pa.table({"caption": [f"caption {start + i}" for i in range(count)],
                                         "jpg_0": [jpeg() for _ in range(count)], "jpg_1": [jpeg() for _ in range(count)],
                                         "label_0": labels}, schema=schema))


def read_all(path: str) -> dict:
    """In this process: read every usable pair once through ParquetPairs; memory and time."""
    from rlfuse.sources.pairs import ParquetPairs, load_image

    after_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    pool = ParquetPairs([Path(path)])
    images = 0
    for first in range(0, len(pool), EPOCH_PAIRS):
        for item in pool.read(list(range(first, min(first + EPOCH_PAIRS, len(pool))))):
            for image in item.images:
                load_image(image, 32, "benchmark")
                images += 1
    return {"usable_pairs": len(pool), "ties": pool.ties, "images_decoded": images,
            "seconds": round(time.perf_counter() - start, 1), "rss_after_imports_mb": round(after_imports / 1024, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pairs_memory.json"))
    parser.add_argument("--read", help=argparse.SUPPRESS)   # the child process: read this file, print JSON
    args = parser.parse_args()
    if args.read:
        print(json.dumps(read_all(args.read)))
        return
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for rows in args.rows:
            path = Path(folder) / f"pairs_{rows}.parquet"
            write_file(path, rows)
            child = subprocess.run([sys.executable, __file__, "--read", str(path)], capture_output=True, text=True,
                                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            result = {"rows": rows, "file_mb": round(path.stat().st_size / 1e6, 1), **json.loads(child.stdout)}
            print(result, flush=True)
            results.append(result)
            path.unlink()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "pairs_memory", "machine": platform.processor() or platform.machine(),
                                    "epoch_pairs": EPOCH_PAIRS, "rows_per_group": ROWS_PER_GROUP,
                                    "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
