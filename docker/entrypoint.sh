#!/usr/bin/env bash
# Entry point of the project images: point this container's working copy at the shared DVC remote
# (MinIO/S3 in docker/compose.yaml), then run the command. Each container owns its working copy, so
# the remote is the only thing tasks on different workers share.
#
#   DVC_REMOTE_URL           e.g. s3://dvc/rnnc  (unset: keep the copy's own default remote)
#   DVC_REMOTE_ENDPOINT_URL  e.g. http://minio:9000 (S3-compatible endpoint; unset: AWS S3)
#   AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY: the credentials, read by DVC's S3 client
#
# Written to .dvc/config.local (never committed), so the repository's own config stays untouched.
set -euo pipefail

workspace="${PIPELINE_WORKSPACE:-/opt/project}"
if [[ -n "${DVC_REMOTE_URL:-}" ]]; then
  (
    cd "$workspace"
    dvc remote add --local --default --force shared "$DVC_REMOTE_URL" >/dev/null
    if [[ -n "${DVC_REMOTE_ENDPOINT_URL:-}" ]]; then
      dvc remote modify --local shared endpointurl "$DVC_REMOTE_ENDPOINT_URL"
    fi
  )
fi
exec "$@"
