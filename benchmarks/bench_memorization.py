"""Benchmark the App. H pixel-space nearest-neighbour search at CelebA size: time and added memory.

evaluate.memorization compares every generated sample with every training image in pixel space
(evaluate.nearest_neighbours on evaluate.image_vectors, scale 1/255). The training set stays uint8;
the search converts it to float64 one block of --ref-chunk rows at a time into one reused buffer,
so the memory it adds is about ref_chunk * D * 8 bytes (D = S * S * 3) plus the samples in float64,
whatever the number of training images. A float64 copy of 60k 64x64 faces would be 5.9 GB.

What is measured, on random uint8 images (the search's cost does not depend on the pixels):
- seconds for --queries samples against --refs training images;
- MB added: the peak of the memory Python's allocators report (tracemalloc, which numpy feeds)
  during the call, above what was allocated before it (the uint8 images themselves);
- the same result as one direct float64 pass on a subset (a correctness check, not a timing).

Run (from the repository root; ~15 s on one thread at the default, --quick ~1 s):
    OMP_NUM_THREADS=1 python benchmarks/bench_memorization.py [--quick] [--json memo.json]

One run here (one thread, CPU shared with a training run): 60,000 refs x 256 queries at 64x64x3
in 9.5 s, 490 MB added (the 384 MB float64 block of 4096 rows, the samples, the products),
against 5625 MiB for a float64 copy of the faces.
"""
import os
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate  # noqa: E402
import plumbing  # noqa: E402


def parse_args(argv=None):
    p = plumbing.OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--refs", type=int, default=60000, help="training images (CelebA kept faces: about 60k)")
    p.add_argument("--queries", type=int, default=256, help="generated samples")
    p.add_argument("--size", type=int, default=64, help="image side S (images are S x S x 3)")
    p.add_argument("--ref-chunk", type=int, default=4096, help="training images converted to float64 at a time")
    p.add_argument("--quick", action="store_true", help="6000 refs x 64 queries")
    p.add_argument("--json", default="", help="also write the figures to this JSON file (default: none, the figures "
                                              "are printed only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = p.parse_args(argv)
    if args.quick:
        args.refs, args.queries = 6000, 64
    for flag in ("refs", "queries", "size", "ref_chunk"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    plumbing.check_json_path(p, args.json, args.overwrite)  # before the search, not after it
    return args


def main(argv=None):
    args = parse_args(argv)
    rng = np.random.default_rng(0)
    refs = rng.integers(0, 256, size=(args.refs, args.size, args.size, 3), dtype=np.uint8)
    queries = rng.integers(0, 256, size=(args.queries, args.size, args.size, 3), dtype=np.uint8)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    nn = evaluate.nearest_neighbours(evaluate.image_vectors(queries), evaluate.image_vectors(refs),
                                     ref_chunk=args.ref_chunk, scale=1.0 / 255.0)
    seconds = time.perf_counter() - start
    added_mb = (tracemalloc.get_traced_memory()[1] - before) / 2 ** 20
    tracemalloc.stop()
    # correctness on a subset: one direct float64 distance matrix
    q = queries[:8].reshape(min(8, len(queries)), -1).astype(np.float64) / 255.0  # fewer with --queries < 8
    r = refs[:2000].reshape(min(2000, len(refs)), -1).astype(np.float64) / 255.0
    sub = evaluate.nearest_neighbours(evaluate.image_vectors(queries[:8]), evaluate.image_vectors(refs[:2000]),
                                      ref_chunk=args.ref_chunk, scale=1.0 / 255.0)
    direct = ((q[:, None, :] - r[None, :, :]) ** 2).sum(axis=2).argmin(axis=1)
    record = dict(refs=args.refs, queries=args.queries, size=args.size, ref_chunk=args.ref_chunk,
                  seconds=round(seconds, 2), added_mb=round(added_mb, 1),
                  float64_copy_mb=round(args.refs * args.size ** 2 * 3 * 8 / 2 ** 20, 1),
                  matches_direct=bool(np.array_equal(sub["index"], direct)),
                  median_distance=float(np.median(nn["distance"])))
    print(f"{args.refs} refs x {args.queries} queries at {args.size}x{args.size}x3, ref chunk {args.ref_chunk}: "
          f"{seconds:.1f} s, {added_mb:.0f} MB added (a float64 copy of the refs: {record['float64_copy_mb']:.0f} MB); "
          f"subset matches a direct float64 pass: {record['matches_direct']}")
    if args.json:
        plumbing.write_json(record, args.json)  # atomic: a reader never sees half a file
        print(f"wrote {args.json}")
    return 0 if record["matches_direct"] else 1


if __name__ == "__main__":
    sys.exit(main())
