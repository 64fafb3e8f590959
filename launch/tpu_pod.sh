#!/usr/bin/env bash
# Install clipjax on every worker of an existing Cloud TPU VM slice and train on all of them.
#
#   TPU=my-v4-32 ZONE=us-central2-b GCS_BUCKET=my-bucket launch/tpu_pod.sh \
#       --config clip_vit_b32 --workdir /mnt/gcs/runs/vitb32 \
#       data.source='wds:gs://my-bucket/laion400m/{00000..41407}.tar' data.num_examples=400000000
#
# Creates nothing: the slice must exist (gcloud compute tpus tpu-vm create ...). Arguments
# go to `clipjax train` on every worker. Variables:
#
#   TPU         name of the TPU VM slice (required)
#   ZONE        its zone (required)
#   PROJECT     GCP project (default: gcloud's configured project)
#   SOURCE      what to install on the workers:
#                 copy (default)   this checkout, copied to ~/clipjax on every worker
#                 git+URL[@REF]    a clone, e.g. git+https://github.com/you/clipjax@main
#   INSTALL     1 (default): pip install -e ~/clipjax "jax[tpu]"; 0: skip (already done)
#   GCS_BUCKET  if set, mounted with gcsfuse at /mnt/gcs on every worker (installed if
#               missing; the TPU's service account needs access to the bucket)
#   ENV         extra environment for the run, e.g. ENV="WANDB_MODE=offline"
#   LOG         log file on each worker (default ~/clipjax-train.log); worker 0's log
#               also streams to this terminal
#
# The workdir must be one folder that every worker sees (checkpoints are written by all
# hosts together): a gcsfuse mount as above, or Filestore/NFS mounted at the same path.
# Every worker joins as process `agent-worker-number` of the TPU metadata server, with
# worker 0 as coordinator, passed explicitly through CLIPJAX_COORDINATOR,
# CLIPJAX_NUM_PROCESSES and CLIPJAX_PROCESS_ID: what jax.distributed.initialize() detects
# on a TPU VM, made independent of clipjax's auto-detection. To stop a run, run
#   gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=all --command 'pkill -f "clipjax train"'
set -euo pipefail

: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE to its zone}"
SOURCE=${SOURCE:-copy}
INSTALL=${INSTALL:-1}
LOG=${LOG:-'~/clipjax-train.log'}
gcloud_args=(--zone "$ZONE")
if [[ -n ${PROJECT:-} ]]; then gcloud_args+=(--project "$PROJECT"); fi
repo=$(cd "$(dirname "$0")/.." && pwd)

ssh_all() {  # the same command on every worker, at once
  gcloud compute tpus tpu-vm ssh "$TPU" "${gcloud_args[@]}" --worker=all --command "$1"
}

# 1. The code.
case $SOURCE in
  copy)
    tarball=$(mktemp "${TMPDIR:-/tmp}/clipjax-src.XXXXXX.tgz")
    tar -C "$repo" --exclude .git --exclude build --exclude '*.egg-info' \
        --exclude __pycache__ -czf "$tarball" .
    gcloud compute tpus tpu-vm scp "$tarball" "$TPU":/tmp/clipjax-src.tgz \
        "${gcloud_args[@]}" --worker=all
    rm -f "$tarball"
    ssh_all 'rm -rf ~/clipjax && mkdir -p ~/clipjax && tar -xzf /tmp/clipjax-src.tgz -C ~/clipjax'
    ;;
  git+*)
    url=${SOURCE#git+}
    ref=
    if [[ $url =~ ^(.*)@([^/@]+)$ ]]; then url=${BASH_REMATCH[1]}; ref=${BASH_REMATCH[2]}; fi
    checkout=${ref:+" && git -C ~/clipjax checkout -q $(printf %q "$ref")"}
    ssh_all "rm -rf ~/clipjax && git clone -q $(printf %q "$url") ~/clipjax$checkout"
    ;;
  *) echo "SOURCE must be 'copy' or git+URL[@REF], not '$SOURCE'." >&2; exit 2 ;;
esac

# 2. Dependencies (jax[tpu] brings libtpu).
if [[ $INSTALL == 1 ]]; then
  ssh_all 'python3 -m pip install -q -U pip && python3 -m pip install -q -e ~/clipjax "jax[tpu]"'
fi

# 3. The shared workdir.
if [[ -n ${GCS_BUCKET:-} ]]; then
  ssh_all "set -e
if ! command -v gcsfuse > /dev/null; then
  echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list > /dev/null
  curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc > /dev/null
  sudo apt-get -qq update && sudo apt-get -qq install -y gcsfuse
fi
sudo mkdir -p /mnt/gcs && sudo chown \$(id -u):\$(id -g) /mnt/gcs
mountpoint -q /mnt/gcs || gcsfuse --implicit-dirs $(printf %q "$GCS_BUCKET") /mnt/gcs"
fi

# 4. Train on every worker at once; worker 0's output streams back here.
args=$(printf ' %q' "$@")
md='curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes'
ssh_all "set -eo pipefail
endpoints=\$($md/worker-network-endpoints)   # host,host,... or name:id:ip,...
export CLIPJAX_COORDINATOR=\$(echo \"\$endpoints\" | cut -d, -f1 | awk -F: '{print \$NF}'):8476
export CLIPJAX_NUM_PROCESSES=\$(echo \"\$endpoints\" | tr , '\\n' | wc -l)
export CLIPJAX_PROCESS_ID=\$($md/agent-worker-number)
export PATH=\$HOME/.local/bin:\$PATH ${ENV:-}
cd ~
if [ \"\$CLIPJAX_PROCESS_ID\" = 0 ]; then
  clipjax train$args 2>&1 | tee $LOG
else
  clipjax train$args > $LOG 2>&1
fi"
