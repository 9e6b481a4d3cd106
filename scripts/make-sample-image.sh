#!/usr/bin/env bash
# Rebuild examples/sample-oci (an OCI image layout with one eStargz layer) and
# its sidecar examples/sample-oci.expected.json.
#
#   scripts/make-sample-image.sh [ESTARGZ_REF]
#
# ESTARGZ_REF is the checker built from the reference eStargz library; by
# default it is built into target/estargz-ref from ../shared/tools/estargz-ref
# ($ESGZ_SHARED overrides ../shared). The output is byte-identical on every run
# with the same estargz library and Go version (0.12.0 and go1.19.8 on Debian 12).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
shared=${ESGZ_SHARED:-$repo/../shared}
estargz_ref=${1:-$repo/target/estargz-ref}

if [ ! -x "$estargz_ref" ]; then
  [ -x "$shared/tools/estargz-ref/build.sh" ] || {
    echo "make-sample-image.sh: $shared/tools/estargz-ref/build.sh not found; set ESGZ_SHARED or pass the estargz-ref binary" >&2
    exit 1
  }
  "$shared/tools/estargz-ref/build.sh" "$estargz_ref"
fi

python3 "$repo/scripts/sample_image.py" "$estargz_ref" \
  "$repo/examples/sample-oci" "$repo/examples/sample-oci.expected.json"
"$estargz_ref" verify -oci "$repo/examples/sample-oci:latest" -require-all
