// Command etcd is etcd's own server main, built from the official go.etcd.io/etcd/server/v3 module
// (Debian's etcd 3.4 is too old for Kubernetes 1.37). Built by hack/build-kubernetes.sh.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
