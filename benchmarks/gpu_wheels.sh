#!/usr/bin/env bash
# Wheels the GPU machine lacks for benchmarks/gpu.sh, fetched here into .whl/ (gitignored) for a
# device run to carry (`carry: [".whl"]`); gpu.sh installs them (--no-index --no-deps, into
# /tmp/featstore-site on PYTHONPATH) when .whl/ is there.  That machine's image (Python 3.12,
# torch, transformers, numpy, pandas, pyarrow, PIL, tokenizers ... ; see the device notes) has no
# zarr and none of bench_store's peers.  ~37 MB; the working tree that travels is limited to 64 MiB.
#   core:  zarr and what it needs (featstore cannot import without them)
#   HF:    datasets (bench_store's hf_iterable contenders)
#   peers: litdata, mosaic streaming and what they import (Lance's 40 MB wheel is left out:
#          bench_store reports it unavailable there)
set -eu
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
[ -x "$PIP" ] || PIP="python3 -m pip"
rm -rf .whl && mkdir .whl
CORE="zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0"
HF="datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19"
PEERS="litdata==0.2.76 obstore==0.12.1 boto3==1.43.117 botocore==1.43.117 s3transfer jmespath
       mosaicml-streaming==0.13.0 zstd==1.5.6.1 python-snappy==0.7.3 cramjam==2.14.0 brotli==1.2.1 catalogue==2.0.10"
PLAT="--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
for req in $CORE $HF $PEERS; do
    # shellcheck disable=SC2086
    $PIP download -q --no-deps --only-binary=:all: $PLAT -d .whl "$req" 2>&1 | grep -v "is ignored" || true
done
ls .whl | sed 's/^/  /'
du -sh .whl
