"""Pure codecs for enclave images: EIF container, cpio newc, measurements, CBOR/COSE.

Nothing here opens sockets, spawns processes or knows about the CLI; every function works on
bytes or on file objects handed in by the caller.  This package depends on nothing else in the
project.
"""
