"""Usage metering on the data plane: per-request counters in memory (:mod:`.aggregator`), an
on-disk spool of batches the control plane has not acknowledged yet (:mod:`.spool`), the
``ReportUsage`` client that drains it (:mod:`.reporter`), and what each finished request
records (:mod:`.recorder`)."""
