"""Several instances sharing their work: the shared result store (``store``, ``s3store``,
``memstore``) and the per-key leases through Redis (``leases``, ``memleases``)."""
