#!/usr/bin/env bash
# The workflow's outputs as a manifest, to show that a change keeps CLI output and stored formats
# byte-identical: run it before and after the change, then diff the two manifests.
#
#     bash benchmarks/scripts/output_manifest.sh /tmp/before      # ... change ...
#     bash benchmarks/scripts/output_manifest.sh /tmp/after && diff /tmp/{before,after}/manifest.txt
#
# It runs pool create/info/validate, train, score (twice, and one shard), select (three strategies),
# loop and report on a 96-image synthetic pool (~40 s on 2 cores) in one fixed folder, then moves
# the results to $1 and writes $1/manifest.txt: path, sha256 prefix and size of every file except
# model.pt (torch.save is not byte-stable), PNG and HTML; in JSON, CLI output and metrics.csv, time
# stamps, durations and the model's sha256 are masked (absolute paths match: the folder is fixed).
set -euo pipefail
OUT=$1; W=${TMPDIR:-/tmp}/xal-output-manifest; rm -rf "$OUT" "$W"; mkdir -p "$W"; cd "$W"
export OMP_NUM_THREADS=1 XAL_NO_PROGRESS=1
x() { echo "\$ xal-engine $*" >> cli.log; xal-engine "$@" >> cli.log 2>&1; echo "rc=$?" >> cli.log; }
x pool create --synthetic --n 96 --size 32 --classes 3 --seed 0 --out p.zarr
x pool info p.zarr --json
x pool validate p.zarr
x train --pool p.zarr --arch resnet18 --epochs 1 --out model.pt --num-workers 0
x score --pool p.zarr --model model.pt --run r1 --num-workers 0 --json
x score --pool p.zarr --model model.pt --run r1 --num-workers 0
x score --pool p.zarr --model model.pt --run r2 --num-workers 0 --shard-id 0 --num-shards 2
x select --pool p.zarr --run r1 --strategy dual --budget 10 --out batch.csv --json
x select --pool p.zarr --run r1 --strategy entropy --budget 7 --missing-roi last --out batch2.csv
x select --pool p.zarr --run r1 --strategy random --budget 5 --out batch3.csv
x loop --pool p.zarr --arch resnet18 --strategy random --strategy dual --initial 20 --per-round 10 --rounds 1 --seeds 1 --epochs 1 --num-workers 0 --out runs --json
x report runs
python - <<'PY'
import hashlib, json, os, re
rows = []
for root, _, files in os.walk("."):
    for f in sorted(files):
        p = os.path.join(root, f)
        if p.endswith("manifest.txt") or p.endswith(".png") or p.endswith(".html") or p.endswith("model.pt"):
            continue
        data = open(p, "rb").read()
        if f.endswith(".json") or f == "cli.log" or f.endswith(".md"):
            t = data.decode()
            t = re.sub(r'"(created|date|model_sha256|seconds|images_per_s|started|finished|elapsed_s|train_seconds|score_seconds|seconds_total)": *[^,}\n]+', r'"\1": X', t)
            t = re.sub(r'\d+\.\d+ s\b|[\d.]+ img/s|\d{4}-\d\d-\d\dT[\d:]+Z?', 'T', t)
            data = t.encode()
        if f.endswith(".csv") and b"train_seconds" in data:
            lines = data.decode().splitlines()
            data = "\n".join(",".join(l.split(",")[:-2]) for l in lines).encode()
        rows.append(f"{p} {hashlib.sha256(data).hexdigest()[:16]} {len(data)}")
open("manifest.txt", "w").write("\n".join(sorted(rows)) + "\n")
PY
mv "$W" "$OUT"
