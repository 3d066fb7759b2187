"""qtbuild: convert container images into enclave image files, measure, sign and inspect them."""

__version__ = "0.1.0"
