"""The kube-scheduler extender: steers pods that use an image cache to zones where a disk can be made."""
