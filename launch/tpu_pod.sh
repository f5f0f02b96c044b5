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
# to every worker: a gcsfuse mount of a bucket (as above) or Filestore. JAX finds the pod itself
# (config.distributed=auto). Preemption sends SIGTERM: the run saves at the next step and exits
# with status 75, on which this script waits for the slice (recreating a deleted spot VM) and
# runs the command again, which resumes. For slices obtained through queued resources
# (`gcloud compute tpus queued-resources create NAME --node-id NAME --zone ZONE
# --accelerator-type ACCELERATOR --runtime-version VERSION --spot`), create the queued resource
# first: this script then finds the node under the same NAME.
set -euo pipefail
if [ $# -lt 3 ]; then sed -n '2,16p' "$0"; exit 2; fi
NAME=$1 ZONE=$2 TYPE=$3
shift 3
[ "${1:-}" = "--" ] && shift
GCLOUD=(gcloud ${PROJECT:+--project "$PROJECT"} compute tpus tpu-vm)

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ARCHIVE=$(mktemp -d)/jaxvision.tar.gz
tar czf "$ARCHIVE" --exclude .git --exclude .venv --exclude '__pycache__' -C "$ROOT" .

# The slice, created unless it exists, with this checkout installed on every worker (again after a
# spot slice was deleted and recreated: the install is skipped where it is already there).
prepare_slice() {
  if ! "${GCLOUD[@]}" describe "$NAME" --zone "$ZONE" >/dev/null 2>&1; then
    "${GCLOUD[@]}" create "$NAME" --zone "$ZONE" --accelerator-type "$TYPE" \
      --version "${VERSION:-tpu-ubuntu2204-base}" ${SPOT:+--spot}
  fi
  "${GCLOUD[@]}" scp "$ARCHIVE" "$NAME":jaxvision.tar.gz --zone "$ZONE" --worker=all
  "${GCLOUD[@]}" ssh "$NAME" --zone "$ZONE" --worker=all --command \
    "mkdir -p ~/jaxvision && tar xzf ~/jaxvision.tar.gz -C ~/jaxvision && \
     (test -d ~/jv-venv || python3 -m venv ~/jv-venv) && ~/jv-venv/bin/pip install -q -e ~/jaxvision[tpu]"
}

ARGS=$(printf ' %q' "$@")
while true; do
  prepare_slice
  status=0
  "${GCLOUD[@]}" ssh "$NAME" --zone "$ZONE" --worker=all --command \
    "cd ~/jaxvision && ~/jv-venv/bin/python -m jaxvision.main$ARGS" || status=$?
  [ "$status" = 75 ] || exit "$status"  # 75: preempted with a checkpoint saved
  echo "preempted: resuming on $NAME" >&2
  sleep 60
done
