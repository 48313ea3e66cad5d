#!/usr/bin/env bash
# Builds the real control plane from the official Go modules into a cache outside the work tree (make kubernetes):
#   kube-apiserver, kube-controller-manager, kube-scheduler (k8s.io/kubernetes, hack/kubernetes/go.mod) and
#   etcd (go.etcd.io/etcd/server/v3, hack/etcd/go.mod). Static (CGO_ENABLED=0), version-stamped, idempotent:
#   a finished build leaves a stamp keyed by the versions and the go.mod/go.sum contents, and is never redone.
# Prints the bin directory on its last line. GPUJOB_KUBE_CACHE overrides the cache root.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# The versions are read from the go.mod files, the one place they are pinned.
version_of() { awk -v m="$2" '$1 == m {print $2} $1 == "require" && $2 == m {print $3}' "$1" | head -1; }
KUBE_VERSION="$(version_of "$here/kubernetes/go.mod" k8s.io/kubernetes)"
ETCD_VERSION="$(version_of "$here/etcd/go.mod" go.etcd.io/etcd/server/v3)"
[[ -n "$KUBE_VERSION" && -n "$ETCD_VERSION" ]] || { echo "build-kubernetes: versions not found in go.mod" >&2; exit 1; }
cache_root="${GPUJOB_KUBE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gpujob}"
bin="$cache_root/kubernetes-$KUBE_VERSION/bin"
key="$(cat "$here"/kubernetes/go.mod "$here"/kubernetes/go.sum "$here"/etcd/go.mod "$here"/etcd/go.sum "$here"/etcd/main.go \
       "$0" | sha256sum | cut -c1-16)"
stamp="$bin/.built-$key"
if [[ -f "$stamp" ]]; then echo "$bin"; exit 0; fi

command -v go >/dev/null || { echo "build-kubernetes: 'go' not found (Go >= 1.26 is needed to build the control plane)" >&2; exit 1; }
mkdir -p "$bin"
minor="${KUBE_VERSION#v1.}"; minor="${minor%%.*}"
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION \
 -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor \
 -X k8s.io/component-base/version.gitTreeState=clean \
 -X k8s.io/client-go/pkg/version.gitVersion=$KUBE_VERSION \
 -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
export CGO_ENABLED=0 GOFLAGS="-mod=readonly -trimpath"
start=$(date +%s)
echo "build-kubernetes: building $KUBE_VERSION and etcd $ETCD_VERSION into $bin (cold: ~15-30 min on 2 cores)" >&2
(cd "$here/kubernetes" && for cmd in kube-apiserver kube-controller-manager kube-scheduler; do
   echo "build-kubernetes: $cmd" >&2
   go build -ldflags "$ldflags" -o "$bin/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd" && mv "$bin/$cmd.tmp" "$bin/$cmd"
 done)
(cd "$here/etcd" && echo "build-kubernetes: etcd" >&2 &&
 go build -ldflags "-s -w" -o "$bin/etcd.tmp" . && mv "$bin/etcd.tmp" "$bin/etcd")
rm -f "$bin"/.built-*
touch "$stamp"
echo "build-kubernetes: done in $(( $(date +%s) - start )) s" >&2
echo "$bin"
