package deps

import (
	_ "github.com/containerd/ttrpc"
	_ "golang.org/x/sys/unix"
	_ "google.golang.org/protobuf/proto"
)
