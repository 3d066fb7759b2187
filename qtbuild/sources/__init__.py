"""Container image sources: one :class:`~qtbuild.sources.base.Image` interface, one
implementation per place an image can come from (daemon, docker-archive, OCI layout, registry).

Modelled on go-containerregistry's ``v1.Image``: callers see manifest, config and layers, never
how they were fetched.  :func:`qtbuild.sources.open_image` picks the implementation from the
source string.
"""
