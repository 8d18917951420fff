#!/bin/bash
# lmsys on a multi-host Cloud TPU VM slice (here v5p-32), driven from your machine with gcloud.
#
#   recipes/launch/tpu/train_tpu_vm.sh create    # make the slice (or create it yourself: see `create)` below)
#   recipes/launch/tpu/train_tpu_vm.sh install   # copy this checkout to every host, install lmsys[tpu], mount storage
#   recipes/launch/tpu/train_tpu_vm.sh train     # start `lmsys train` on every host (detached)
#   recipes/launch/tpu/train_tpu_vm.sh logs      # follow process 0's log
#   recipes/launch/tpu/train_tpu_vm.sh stop      # graceful stop: checkpoint, then exit
#   recipes/launch/tpu/train_tpu_vm.sh delete    # delete the slice (the run stays in storage)
#
# GCP names v5p slices by TensorCores: v5p-32 = 16 chips = 4 hosts x 4 chips; JAX sees 16
# devices (one per chip), 4 per process. Every host runs the same command; lmsys sees a Cloud
# TPU VM and JAX finds the other hosts through the TPU VM metadata: no distributed.* keys.
# Values marked EDIT are yours to fill in.
set -euo pipefail

PROJECT=EDIT-project                 # EDIT: your GCP project
ZONE=europe-west4-b                  # EDIT: a zone where you have v5p quota
TPU_NAME=lmsys-v5p-32
ACCELERATOR_TYPE=v5p-32              # 16 chips, 4 hosts; mesh.fsdp=-1 below uses them all
RUNTIME_VERSION=v2-alpha-tpuv5       # the TPU VM software image for v5p
NFS_SHARE=EDIT-filestore-ip:/runs    # EDIT: shared storage every host mounts (a Filestore/NFS export)
MOUNT=/mnt/runs                      # where it is mounted on every host

CONFIG=recipes/configs/tiny.yaml     # EDIT: your config (path inside the copied checkout)
RUN_DIR=/mnt/runs/lmsys-run          # on the shared mount: every host writes its checkpoint shards here
# A gs://bucket/... run_dir works too (Orbax writes it through tensorstore; install gcsfs and
# google-cloud-storage in the venv); this recipe keeps a shared POSIX mount, which also holds
# the compilation cache.

# every gcloud call below targets this slice; --worker=all runs a command on all hosts at once
TPU=(gcloud compute tpus tpu-vm --project "$PROJECT" --zone "$ZONE")

case "${1:-}" in
create)
    # --spot: cheaper, preemptible capacity (the run resumes when you recreate and re-run).
    # Drop it for on-demand/reserved capacity (or use --reserved).
    # OS Login gives your user the same uid on every host, so all hosts may write the files
    # and directories the others create on the shared mount.
    "${TPU[@]}" create "$TPU_NAME" --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION" \
        --metadata enable-oslogin=TRUE --spot
    ;;
install)
    # Ship this checkout (tracked files at HEAD) to every host.
    git archive --format=tar.gz -o /tmp/lmsys.tar.gz HEAD
    "${TPU[@]}" scp /tmp/lmsys.tar.gz "$TPU_NAME:lmsys.tar.gz" --worker=all   # into each host's home
    # The TPU VM image's Python may be older than the 3.11 lmsys needs (Ubuntu 22.04: 3.10), so
    # uv installs a 3.11 venv, then lmsys with the TPU extra (jax[tpu] brings libtpu).
    # Then every host mounts the shared storage at the same path.
    "${TPU[@]}" ssh "$TPU_NAME" --worker=all --command "
        set -e
        mkdir -p ~/lmsys && tar -xzf ~/lmsys.tar.gz -C ~/lmsys
        command -v ~/.local/bin/uv || curl -LsSf https://astral.sh/uv/install.sh | sh
        ~/.local/bin/uv venv --python 3.11 --allow-existing ~/lmsys-venv
        cd ~/lmsys && ~/.local/bin/uv pip install --python ~/lmsys-venv/bin/python -e '.[tpu]'
        sudo apt-get -qq update && sudo apt-get -qq install -y nfs-common
        sudo mkdir -p $MOUNT
        mountpoint -q $MOUNT || sudo mount -t nfs -o hard $NFS_SHARE $MOUNT
        [ -w $MOUNT ] || sudo chown \$(id -u):\$(id -g) $MOUNT"
    ;;
train)
    # Detached (setsid + nohup): the run survives this ssh session. Each host logs to
    # ~/lmsys-train.log and records its pid for `stop`. Re-running `train` resumes from the
    # last checkpoint in RUN_DIR.
    "${TPU[@]}" ssh "$TPU_NAME" --worker=all --command "
        cd ~/lmsys || exit 1
        export JAX_COMPILATION_CACHE_DIR=$MOUNT/jax-cache   # compiled programs survive restarts
        # Mesh: FSDP over all 16 chips (one ICI domain). batch_size is global: a multiple of 16.
        setsid nohup ~/lmsys-venv/bin/lmsys train $CONFIG run_dir=$RUN_DIR \
            mesh.data=1 mesh.fsdp=-1 mesh.tensor=1 batch_size=128 dtype=bfloat16 checkpoint.every=500 \
            --no-progress > ~/lmsys-train.log 2>&1 < /dev/null &
        echo \$! > ~/lmsys-train.pid"
    ;;
logs)
    "${TPU[@]}" ssh "$TPU_NAME" --worker=0 --command "tail -f ~/lmsys-train.log"
    ;;
stop)
    # One SIGTERM to every host's process: each finishes its step, they write a checkpoint
    # together and exit 0 (a second SIGTERM would stop at once, without a checkpoint).
    "${TPU[@]}" ssh "$TPU_NAME" --worker=all --command 'kill -TERM "$(cat ~/lmsys-train.pid)"'
    ;;
delete)
    "${TPU[@]}" delete "$TPU_NAME" --quiet
    ;;
*)
    echo "usage: $0 create|install|train|logs|stop|delete" >&2
    exit 2
    ;;
esac
