"""Who runs ffmpeg next: classes, aging, inheritance, bounded queues, fair shares.

``queue.py`` decides (pure), ``claims.py`` is what producers hold around each run,
``local.py`` schedules one process, ``coordinator.py`` one machine of workers, and
``rules.py`` reads ``[scheduling]``.
"""
