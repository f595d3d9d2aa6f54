"""Units for limits and timeouts, so configuration reads as `20 * SECONDS` or `256 * MiB`."""

SECONDS = 1.0
MILLISECONDS = SECONDS / 1000
MINUTES = 60 * SECONDS
HOURS = 60 * MINUTES
DAYS = 24 * HOURS

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
