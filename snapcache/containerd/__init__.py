"""Generated from protos/snapcache/containerd (containerd's API). Do not edit."""
