// Command etcd is upstream's etcd server (go.etcd.io/etcd/v3's main.go, which only
// calls etcdmain.Main) at the etcd/server version that k8s.io/kubernetes requires,
// so the cluster's etcd is the one its apiserver was built and tested against.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
