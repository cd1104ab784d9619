"""Generated from protos/snapcache/v1. Do not edit."""
