#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: create (or reuse) the TPU VM, copy this checkout to every worker,
# install it with the TPU extra, and run `python -m jaxvision.main` on all workers at once
# (`--worker=all`), streaming their logs. JAX finds the pod's coordinator and ranks by itself.
#
#   launch/tpu_pod.sh NAME ZONE ACCELERATOR -- --config configs/imagenet_resnet50.py \
#       --workdir /gcs/BUCKET/runs/r50 --config.data.data_dir=/gcs/BUCKET/tensorflow_datasets
#
# e.g. ACCELERATOR=v4-32 (4 hosts). Environment: PROJECT (gcloud default otherwise), VERSION
# (TPU VM image, default tpu-ubuntu2204-base), SPOT=1 for a spot slice. The workdir must be visible
# to every worker: a gcsfuse mount of a bucket (as above) or Filestore. Preemption sends SIGTERM;
# the run saves at the next step and re-running this command resumes it.
set -euo pipefail
if [ $# -lt 3 ]; then sed -n '2,16p' "$0"; exit 2; fi
NAME=$1 ZONE=$2 TYPE=$3
shift 3
[ "${1:-}" = "--" ] && shift
GCLOUD=(gcloud ${PROJECT:+--project "$PROJECT"} compute tpus tpu-vm)

if ! "${GCLOUD[@]}" describe "$NAME" --zone "$ZONE" >/dev/null 2>&1; then
  "${GCLOUD[@]}" create "$NAME" --zone "$ZONE" --accelerator-type "$TYPE" \
    --version "${VERSION:-tpu-ubuntu2204-base}" ${SPOT:+--spot}
fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ARCHIVE=$(mktemp -d)/jaxvision.tar.gz
tar czf "$ARCHIVE" --exclude .git --exclude .venv --exclude '__pycache__' -C "$ROOT" .
"${GCLOUD[@]}" scp "$ARCHIVE" "$NAME":jaxvision.tar.gz --zone "$ZONE" --worker=all
"${GCLOUD[@]}" ssh "$NAME" --zone "$ZONE" --worker=all --command \
  "mkdir -p ~/jaxvision && tar xzf ~/jaxvision.tar.gz -C ~/jaxvision && \
   (test -d ~/jv-venv || python3 -m venv ~/jv-venv) && ~/jv-venv/bin/pip install -q -e ~/jaxvision[tpu]"

ARGS=$(printf ' %q' "$@")
"${GCLOUD[@]}" ssh "$NAME" --zone "$ZONE" --worker=all --command \
  "cd ~/jaxvision && ~/jv-venv/bin/python -m jaxvision.main$ARGS"
