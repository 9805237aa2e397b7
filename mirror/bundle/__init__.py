"""Air-gapped bundles: images as a standard OCI image layout in a tar, and back.

::

    mirror export REF...  -> FILE.tar[.zst] (or FILE.tar.001, .002 ... + FILE.tar.sha256)
      oci-layout                  {"imageLayoutVersion": "1.0.0"}
      bundle.json                 what is inside: every blob with digest and size, every
                                  reference, base bundle and sequence (manifest.py)
      bundle.json.sig             ed25519 signature of bundle.json's exact bytes (optional)
      index.json                  one descriptor per reference (org.opencontainers.image.ref.name)
      blobs/sha256/<hex>          manifests exactly as upstream sent them, configs, layers

    mirror import FILE...  -> the cache: staged in temp files, every blob hashed, checked
                              complete, then published (blobs, manifests, pins, tag records)

Export reads through the pull service (:mod:`mirror.pull`); import writes through the
store's one blob writer (:class:`~mirror.storage.writer.TempWriter`). Other tools' layouts
(``skopeo copy ... oci-archive:``, ``oras cp --to-oci-layout`` tar'ed) import too.
"""
