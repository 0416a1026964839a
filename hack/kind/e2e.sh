#!/usr/bin/env bash
# kubetrain on a kind cluster, the way a user tries it: build both images, load them,
# helm install, apply the quickstart, wait for Succeeded, ask the served model.
# Needs docker, kind, kubectl and helm. `make kind-e2e` runs it; KEEP=1 keeps the cluster.
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER=${CLUSTER:-kubetrain}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
OPERATOR_IMAGE=ghcr.io/kubetrain/operator:$VERSION
TRAINER_IMAGE=ghcr.io/kubetrain/trainer:$VERSION-cpu
RUN=quickstart

log() { printf '[kind-e2e %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

dump() {
  log "failed: dumping state"
  kubectl get tr,pods,svc,pvc -A -o wide || true
  kubectl describe tr "$RUN" || true
  kubectl -n kubetrain-system logs deploy/kubetrain-operator --tail=200 || true
  for pod in $(kubectl get pods -l "kubetrain.dev/run=$RUN" -o name); do
    kubectl logs "$pod" --tail=100 || true
  done
}

cleanup() {
  status=$?
  [ "$status" -ne 0 ] && dump
  [ "${KEEP:-0}" = 1 ] || kind delete cluster --name "$CLUSTER"
  exit "$status"
}

if ! kind get clusters | grep -qx "$CLUSTER"; then
  log "creating cluster $CLUSTER"
  kind create cluster --name "$CLUSTER" --config hack/kind/cluster.yaml --wait 120s
fi
trap cleanup EXIT

# The same Dockerfiles and build arguments as hack/images.py (which builds them with buildah
# where there is no Docker): the public python:3.11-slim base, torch $TORCH_VERSION from
# PyTorch's CPU index for the CPU trainer (kind nodes have no GPU).
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}

log "building images"
docker build -f operator/Dockerfile -t "$OPERATOR_IMAGE" .
docker build -f trainer_image/Dockerfile \
  --build-arg TORCH_VERSION="$TORCH_VERSION" --build-arg TORCH_INDEX_URL="$TORCH_INDEX_URL" \
  -t "$TRAINER_IMAGE" .
kind load docker-image --name "$CLUSTER" "$OPERATOR_IMAGE" "$TRAINER_IMAGE"

log "installing the chart"
helm upgrade --install kubetrain helm/kubetrain -n kubetrain-system --create-namespace \
  --set image.pullPolicy=Never --set trainer.image.tag="$VERSION-cpu" --wait --timeout 5m

log "applying examples/quickstart.yaml"
kubectl apply -f examples/quickstart.yaml
kubectl wait tr/"$RUN" --for=jsonpath='{.status.phase}'=Succeeded --timeout=30m
kubectl get tr "$RUN" -o wide

log "asking the served model"
kubectl wait tr/"$RUN" --for=condition=Serving --timeout=10m
kubectl port-forward svc/"$RUN"-serve 8000:80 >/dev/null &
forward=$!
sleep 3
curl -sf http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
  -d "{\"model\": \"$RUN\", \"prompt\": \"the cat\", \"max_tokens\": 8}"
echo
kill "$forward"
log "passed"
